"""`python -m openelm_mlx.evaluate ARGS`: lm-eval's own command line (`lm_eval ARGS`) with `--model openelm-mlx`
registered (lm-eval 0.4.x has no plugin entry points; see harness.py)."""

from lm_eval.__main__ import cli_evaluate

from . import harness  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
