"""`convert` and `export`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OptionError
from ..quant.run import RTN_SETTINGS, QuantizeOptions
from ._app import app, model_or_demo, user_errors

_Q = {f.name: f for f in dataclasses.fields(QuantizeOptions) if f.name in RTN_SETTINGS}


def _q_option(name: str) -> Any:
    """convert's --q-NAME option: the help of `quantize`'s --NAME (the default is taken from the same field)."""
    return typer.Option(help=f"With -q: {_Q[name].metadata['help']}")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Local folder, checkpoint file (.safetensors/.bin/.pt) or Hub repo id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output MLX model folder.")],
    dtype: Annotated[str | None, typer.Option(help="float16, bfloat16 or float32 (default: the source's).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.model path/folder or Hub repo to attach.")] = None,
    arch: Annotated[str | None, typer.Option(help="Released size for CoreNet checkpoints, e.g. OpenELM-270M.")] = None,
    arch_config: Annotated[Path | None, typer.Option(help="JSON/YAML with CoreNet GPTConfig fields.")] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="Keep this many embedding rows (CoreNet pads to 32128).")
    ] = None,
    quantize: Annotated[
        bool,
        typer.Option(
            "-q", "--quantize", help="Quantize Linear layers and embedding by round to nearest (as `quantize` does)."
        ),
    ] = False,
    q_bits: Annotated[int, _q_option("bits")] = _Q["bits"].default,
    q_group_size: Annotated[int, _q_option("group_size")] = _Q["group_size"].default,
    q_recipe: Annotated[str | None, _q_option("recipe")] = _Q["recipe"].default,
    q_embedding_bits: Annotated[str | None, _q_option("embedding_bits")] = _Q["embedding_bits"].default,
    force: Annotated[
        bool,
        typer.Option(
            help="Allow float16 for 3B-shaped models (they overflow), and writing into a folder openelm-mlx did "
            "not create (only files it writes are replaced)."
        ),
    ] = False,
    chat_template: Annotated[
        bool | None,
        typer.Option(help="Record the Instruct chat template (default: when the source is named -Instruct)."),
    ] = None,
) -> None:
    """Convert a Hugging Face or CoreNet OpenELM checkpoint to MLX."""
    from ..convert import convert as run_convert

    with user_errors(tokenizer_option=True):
        q = {"bits": q_bits, "group_size": q_group_size, "recipe": q_recipe, "embedding_bits": q_embedding_bits}
        opts = _quantize_options(q) if quantize else None
        given = [name for name, value in q.items() if value != _Q[name].default]
        if not quantize and given:
            raise OptionError(f"q_{given[0]}", "takes effect only with -q/--quantize")
        report = run_convert(
            src,
            output,
            dtype=dtype,
            tokenizer=tokenizer,
            arch=arch,
            arch_config=arch_config,
            vocab_size=vocab_size,
            quantize=opts,
            force=force,
            chat_template=chat_template,
        )
        line = f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, {report.bytes_on_disk / 1e6:.1f} MB"
        if report.bits_per_weight is not None:
            line += f", {report.bits_per_weight:.2f} bits per weight"
        typer.echo(line + f" in {report.seconds:.1f}s")
        for layer in report.float_layers:
            typer.echo(f"note: {layer} stays float (its width is not a multiple of its group size)")


def _quantize_options(settings: dict[str, Any]) -> QuantizeOptions:
    """`quantize`'s settings from convert's --q-* options (errors name the --q-* option)."""
    try:
        return QuantizeOptions(**settings)
    except OptionError as e:
        raise OptionError(f"q_{e.option}" if e.option in RTN_SETTINGS else e.option, e.detail) from None


@app.command()
def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output Hugging Face folder.")],
    src: Annotated[
        Path | None, typer.Argument(help="An MLX model folder (quantized ones are dequantized; default: the demo).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float16, bfloat16 or float32 (default: the model's).")] = None,
    force: Annotated[
        bool, typer.Option(help="Write into a folder openelm-mlx did not create (only its own files are replaced).")
    ] = False,
) -> None:
    """Export an MLX model back to a Hugging Face folder in Apple's format."""
    from ..convert import export as run_export

    with user_errors():
        report = run_export(model_or_demo(src), output, dtype=dtype, force=force)
        typer.echo(
            f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, "
            f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f}s"
        )
