"""`lora` (train LoRA / DoRA / QLoRA adapters) and `fuse` (merge adapters into a model folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..training.lora import PAPER_RECIPE, LoraConfig
from ._app import app, flag, model_or_demo, settings_options, user_errors

RECIPE_HELP = "'paper': the OpenELM paper's PEFT settings: " + ", ".join(
    f"{flag(k)} {v}" for k, v in PAPER_RECIPE.items()
)


def _explicit(ctx: typer.Context, names: list[str]) -> set[str]:
    """The options the user typed (not left at their defaults)."""
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return {n for n, source in sources.items() if source is not None and source.name != "DEFAULT"}


@app.command()
@settings_options(LoraConfig)
def lora(
    ctx: typer.Context,
    settings: dict[str, Any],
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or Hub repo; a quantized model trains QLoRA (default: the bundled demo)."),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.model, a folder or Hub repo (default: the model's).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help='Folder with train.jsonl (and valid/test.jsonl): {"text"}, {"prompt","completion"} or {"messages"}.'
        ),
    ] = None,
    adapter_path: Annotated[
        Path | None, typer.Option(help="Output folder: adapters.safetensors, adapter_config.json, log, checkpoints.")
    ] = None,
    recipe: Annotated[str | None, typer.Option(help=RECIPE_HELP)] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML with the same keys as these options; options typed here win.")
    ] = None,
) -> None:
    """Fine-tune adapters on a frozen model (LoRA, DoRA, or QLoRA on a quantized model); run with `mlx.launch`
    for several processes. The update is scaled by alpha / rank."""
    from ..training.lora import finetune, make_config

    with user_errors(tokenizer_option=True):
        paths = {"model": model, "tokenizer": tokenizer, "data": data, "adapter_path": adapter_path}
        given = {k: str(v) for k, v in paths.items() if v is not None}
        cfg = make_config({**settings, **given}, _explicit(ctx, list(settings)) | set(given), recipe, config)
        if not cfg.model:  # neither typed nor in --config
            cfg = dataclasses.replace(cfg, model=model_or_demo(None))
        metrics = finetune(cfg, progress=True)
        summary = f"step {metrics['step']}: loss {metrics['loss']:.4f}"
        if "val_loss" in metrics:
            summary += f", validation loss {metrics['val_loss']:.4f}"
        if "test_loss" in metrics:
            summary += f", test loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.2f})"
        typer.echo(f"{summary}; adapters saved in {cfg.adapter_path}", err=True)


@app.command()
def fuse(
    adapter_path: Annotated[Path, typer.Option(help="Adapter folder written by `lora`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fused model folder.")],
    model: Annotated[
        str | None,
        typer.Option(help="The base model folder or Hub repo the adapters were trained on (default: the demo)."),
    ] = None,
    dequantize: Annotated[bool, typer.Option(help="Write a float model from a quantized base.")] = False,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.model, a folder or Hub repo (default: the model's).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Write into an existing folder not written by openelm-mlx.")] = False,
) -> None:
    """Merge adapters into the model's weights; checks the fused logits against the adapted model's first."""
    from ..training.lora import fuse_model

    with user_errors(tokenizer_option=True):
        result = fuse_model(model_or_demo(model), adapter_path, output, dequantize, tokenizer, force)
        note = f"fused (logits within {result['fuse_error']:.1e} relative)"
        if "requantize_error" in result:
            note += f", quantized again ({result['requantize_error']:.1e} relative change from requantizing)"
        typer.echo(f"{note}; model saved in {output}", err=True)
