"""`finetune` (train a model's own weights on JSONL examples; the output is a model folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..training.finetune import FinetuneConfig
from ._app import app, model_or_demo, settings_options, user_errors
from .lora import CONFIG_HELP, DATA_HELP, TOKENIZER_HELP, explicit_options, summary


@app.command()
@settings_options(FinetuneConfig)
def finetune(
    ctx: typer.Context,
    settings: dict[str, Any],
    model: Annotated[
        str | None, typer.Option(help="Float model folder or Hub repo (for a quantized one: lora; default: the demo).")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help=TOKENIZER_HELP)] = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Output model folder (with log.jsonl and checkpoints/).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
) -> None:
    """Fine-tune every weight of a model, or its last --num-layers, in float32 master weights; the output is a
    normal model folder. A memory plan is checked first. Run with `mlx.launch` for several processes."""
    from ..training.finetune import finetune as run_finetuning
    from ..training.finetune import make_config

    with user_errors(tokenizer_option=True):
        paths = {"model": model, "tokenizer": tokenizer, "data": data, "out": out}
        given = {k: str(v) for k, v in paths.items() if v is not None}
        cfg = make_config({**settings, **given}, explicit_options(ctx, list(settings)) | set(given), config)
        if not cfg.model:  # neither typed nor in --config: the demo, as every command that reads a model
            cfg = dataclasses.replace(cfg, model=model_or_demo(None))
        metrics = run_finetuning(cfg, progress=True)
        typer.echo(f"{summary(metrics)}; model saved in {cfg.out}", err=True)
