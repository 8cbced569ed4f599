"""`lora` (train LoRA / DoRA / QLoRA adapters) and `fuse` (merge adapters into a model folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OptionError
from ..training.lora import PAPER_RECIPE, LoraConfig
from ._app import app, flag, model_or_demo, settings_options, user_errors

RECIPE_HELP = "'paper': the OpenELM paper's PEFT settings: " + ", ".join(
    f"{flag(k)} {v}" for k, v in PAPER_RECIPE.items()
)


def explicit_options(ctx: typer.Context, names: list[str]) -> set[str]:
    """The options the user typed (not left at their defaults)."""
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return {n for n, source in sources.items() if source is not None and source.name != "DEFAULT"}


DATA_HELP = 'Folder with train.jsonl (and valid/test.jsonl): {"text"}, {"prompt","completion"} or {"messages"}.'
TOKENIZER_HELP = "tokenizer.model, a folder or Hub repo (default: the model's)."
CONFIG_HELP = "YAML with the same keys as these options; options typed here win."


def summary(metrics: dict[str, float]) -> str:
    """The last line of a fine-tuning run: its losses."""
    line = f"step {metrics['step']}: loss {metrics['loss']:.4f}"
    if "val_loss" in metrics:
        line += f", validation loss {metrics['val_loss']:.4f}"
    if "test_loss" in metrics:
        line += f", test loss {metrics['test_loss']:.4f} (perplexity {metrics['test_perplexity']:.2f})"
    return line


@app.command()
@settings_options(LoraConfig)
def lora(
    ctx: typer.Context,
    settings: dict[str, Any],
    model: Annotated[
        str | None,
        typer.Option(help="Model folder or Hub repo; a quantized model trains QLoRA (default: the bundled demo)."),
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help=TOKENIZER_HELP)] = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            "--adapter-path",
            help="Output folder: adapters.safetensors, adapter_config.json, log, checkpoints.",
        ),
    ] = None,
    recipe: Annotated[str | None, typer.Option(help=RECIPE_HELP)] = None,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
) -> None:
    """Fine-tune adapters on a frozen model (LoRA, DoRA, or QLoRA on a quantized model); run with `mlx.launch`
    for several processes. The update is scaled by alpha / rank."""
    from ..training.lora import make_config, train_lora

    with user_errors(tokenizer_option=True):
        paths = {"model": model, "tokenizer": tokenizer, "data": data, "out": out}
        given = {k: str(v) for k, v in paths.items() if v is not None}
        cfg = make_config({**settings, **given}, explicit_options(ctx, list(settings)) | set(given), recipe, config)
        if not cfg.model:  # neither typed nor in --config
            cfg = dataclasses.replace(cfg, model=model_or_demo(None))
        metrics = train_lora(cfg, progress=True)
        typer.echo(f"{summary(metrics)}; adapters saved in {cfg.out}", err=True)


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
    export_gguf: Annotated[
        Path | None, typer.Option(help="Also write the fused model as this GGUF file (llama.cpp / LM Studio).")
    ] = None,
    gguf_outtype: Annotated[str, typer.Option(help="With --export-gguf: f32, f16, bf16, q8_0, q4_0, ...")] = "f16",
) -> None:
    """Merge adapters into the model's weights; checks the fused logits against the adapted model's first."""
    from ..convert.gguf import OUTTYPES
    from ..folders.fs import check_output_file
    from ..training.lora import fuse_model

    with user_errors(tokenizer_option=True):
        if export_gguf is not None:  # refused before the fuse, not after it
            if gguf_outtype not in OUTTYPES:
                raise OptionError("gguf_outtype", f"must be one of {', '.join(OUTTYPES)}, got {gguf_outtype!r}")
            check_output_file(export_gguf, force, (), what="GGUF file", option="export_gguf")
        result = fuse_model(model_or_demo(model), adapter_path, output, dequantize, tokenizer, force)
        note = f"fused (logits within {result['fuse_error']:.1e} relative)"
        if "requantize_error" in result:
            note += f", quantized again ({result['requantize_error']:.1e} relative change from requantizing)"
        typer.echo(f"{note}; model saved in {output}", err=True)
        if export_gguf is not None:
            from ..convert.pipeline import export_gguf as write_gguf
            from .convert import echo_gguf_report

            options = dict(force=force, beside_source=True, option="export_gguf")  # its own output's folder may hold it
            echo_gguf_report(write_gguf(output, export_gguf, gguf_outtype, **options))
