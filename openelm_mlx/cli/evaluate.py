"""`evaluate`: lm-eval-harness tasks (the paper's zero-shot suite, local YAML tasks) and the cloze check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DataError, OptionError, check_range
from ._app import app, user_errors
from .generate import AdapterOpt, ModelOpt, TokenizerOpt, load_for_generation

EVAL_EXTRA = "pip install 'openelm-mlx[eval]'"
MAX_BATCH_SIZE = 1024  # rows per forward pass; each holds up to a context of activations and logits


@app.command()
def evaluate(
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated: lm-eval task names or task .yaml files, 'paper' (the paper's seven zero-shot "
            "tasks), or 'cloze' (with --data; needs no lm-eval)."
        ),
    ],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    adapter_path: AdapterOpt = None,
    data: Annotated[Path | None, typer.Option(help="Text file for the cloze task (.txt, or .jsonl of text).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples (default: each task's; paper: 0).")] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many examples per task.")] = None,
    batch_size: Annotated[int, typer.Option(help="Continuation rows per forward pass.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot sampler and the cloze draws.")] = 0,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write lm-eval's results JSON here (atomically).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an -o file this command did not write.")] = False,
) -> None:
    """Accuracy on lm-eval-harness tasks or on a text file (cloze), with the paper's numbers beside known sizes."""
    with user_errors(tokenizer_option=True):
        names = _check_options(tasks, data, num_fewshot, limit, batch_size, seed)
        if force and output is None:
            raise OptionError("force", "takes effect only with -o")
        lm_tasks = [n for n in names if n != "cloze"]
        harness, specs, manager = None, [], None
        if lm_tasks:
            harness = _import_harness()
            specs, manager = harness.resolve_tasks(lm_tasks)  # an unknown task fails before the model loads
        if output is not None:
            from ..evaluate.report import check_results_file

            inputs = [p for p in (data, *[n for n in lm_tasks if n.endswith((".yaml", ".yml"))]) if p]
            check_results_file(output, force, inputs)
        m, tok, _ = load_for_generation(model, tokenizer, adapter_path)
        results: dict[str, Any] = {"results": {}}
        if harness is not None:
            lm = harness.OpenELMLM(m, tok, batch_size=batch_size)
            results = harness.run_tasks(lm, specs, manager, num_fewshot, limit, seed)
        if "cloze" in names:
            from ..evaluate.cloze import evaluate_cloze
            from ..evaluate.report import cloze_entry

            cloze = evaluate_cloze(m, tok, data, limit, seed, batch_size, progress=True)
            results["results"]["cloze"] = cloze_entry(cloze)
        settings = dict(tasks=names, num_fewshot=num_fewshot, limit=limit, seed=seed)
        _report(results, m.config, tok.chat_template, output, model, settings)


def _check_options(
    tasks: str, data: Path | None, num_fewshot: int | None, limit: int | None, batch_size: int, seed: int
) -> list[str]:
    check_range("num_fewshot", num_fewshot, 0, integer=True)
    check_range("limit", limit, 1, integer=True)
    check_range("batch_size", batch_size, 1, MAX_BATCH_SIZE, integer=True)
    check_range("seed", seed, 0, 2**63 - 1, integer=True)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise OptionError("tasks", "names no task")
    if "cloze" in names and data is None:
        raise OptionError("data", "is needed by the cloze task: a plain text file")
    if data is not None and not data.exists():
        raise DataError(f"{data}: no such file")
    if data is not None and "cloze" not in names:
        raise OptionError("data", "takes effect only with the cloze task")
    if names == ["cloze"] and num_fewshot:
        raise OptionError("num_fewshot", "does not apply to the cloze task")
    return names


def _import_harness() -> Any:
    try:
        from ..evaluate import harness
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise OptionError(
            "tasks", f"lm-eval tasks need lm-evaluation-harness: {EVAL_EXTRA} (the cloze task needs nothing)"
        ) from None
    return harness


def _report(
    results: dict[str, Any], config: Any, instruct: bool, output: Path | None, model: str | None, settings: dict
) -> None:
    from importlib.metadata import version

    from ..evaluate.paper import known_size, paper_row
    from ..evaluate.report import format_table, write_results

    size = known_size(config)
    label = f"{size}-Instruct" if size and instruct else size
    typer.echo(format_table(results, paper_row(config, instruct), label))
    if size is None and any(t in results["results"] for t in ("arc_easy", "hellaswag")):
        typer.echo("(not a released OpenELM size: no paper row to compare)", err=True)
    if output is not None:
        provenance = {"command": "evaluate", "version": version("openelm-mlx"), "model": model, **settings}
        write_results(output, results, provenance)
        typer.echo(f"wrote {output}", err=True)
