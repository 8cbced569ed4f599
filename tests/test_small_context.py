"""Every command outside training and generation runs with its defaults on a model whose context is 64 tokens:
a default past the context shrinks to fit with a note, and a setting is checked only where it is used."""

import pytest
from helpers import random_model
from typer.testing import CliRunner

from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.folders.io import save
from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig

CONTEXT = 64


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny random model with a 64-token context and the demo's tokenizer, and some text."""
    root = tmp_path_factory.mktemp("small-context")
    model = random_model(OpenELMConfig.tiny(vocab_size=2048, max_context_length=CONTEXT))
    save(model, root / "model", tokenizer=Tokenizer(DEMO_DIR / "tokenizer.model"))
    (root / "text.txt").write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 40)
    return root


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0 and "error" not in result.output, result.output
    return result.output


def test_quantize_with_its_defaults_reads_no_window_length(small, tmp_path):
    for args in ([], ["--bits", "8"], ["--recipe", "mixed_4_6"], ["--seq-len", "256"]):
        out = run("quantize", small / "model", "-o", tmp_path / f"q{len(args)}", *args)
        assert "wrote" in out and "windows of" not in out  # no text read: nothing to shrink or check


def test_quantize_text_windows_shrink_to_the_context_and_a_given_length_is_checked(small, tmp_path):
    note = f"note: windows of {CONTEXT} tokens, the model's max_context_length (the default is 256)"
    out = run("quantize", small / "model", "-o", tmp_path / "q", "--eval", small / "text.txt")
    assert note in out and "perplexity" in out
    out = run("quantize", small / "model", "-o", tmp_path / "g", "--method", "gptq", "--calib", small / "text.txt")
    assert note in out
    result = CliRunner().invoke(app, ["quantize", str(small / "model"), "-o", str(tmp_path / "x")] +
                                ["--eval", str(small / "text.txt"), "--seq-len", "65"])  # fmt: skip
    assert result.exit_code == 1 and "--seq-len: 65 is more than the model's max_context_length 64" in result.output


def test_perplexity_windows_shrink_to_the_context(small):
    out = run("perplexity", "--model", small / "model", "--data", small / "text.txt")
    assert f"note: windows of {CONTEXT} tokens" in out and "perplexity" in out


def test_bench_lengths_shrink_to_the_context(small):
    # --compare none and one repeat keep it fast; the lengths are the defaults under test.
    out = run("bench", "--model", small / "model", "--compare", "none", "--repeats", "1")
    assert f"note: a 42-token prompt and 22 new tokens, to fit the model's max_context_length {CONTEXT}" in out
    assert "42-token prompt, 22 new tokens" in out
    result = CliRunner().invoke(app, ["bench", "--model", str(small / "model"), "-p", "60", "-g", "10"])
    assert result.exit_code == 1 and "--prompt-tokens: 60 + 10 generated tokens is more than" in result.output


def test_export_and_convert_with_quantization_use_their_defaults(small, tmp_path):
    assert "wrote" in run("export", small / "model", "-o", tmp_path / "hf")
    assert "bits per weight" in run("convert", tmp_path / "hf", "-o", tmp_path / "mlx", "-q")
