"""`convert` and `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionError
from ._app import app, model_or_demo, user_errors


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
        bool, typer.Option("-q", "--quantize", help="Affine-quantize Linear layers and embedding.")
    ] = False,
    q_bits: Annotated[int, typer.Option(help="Bits per weight: 2, 3, 4, 5, 6 or 8.")] = 4,
    q_group_size: Annotated[int, typer.Option(help="Quantization group size: 32, 64 or 128.")] = 64,
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
        if not quantize and (q_bits, q_group_size) != (4, 64):
            raise OptionError("q_bits", "and q_group_size take effect only with -q/--quantize")
        report = run_convert(
            src,
            output,
            dtype=dtype,
            tokenizer=tokenizer,
            arch=arch,
            arch_config=arch_config,
            vocab_size=vocab_size,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            force=force,
            chat_template=chat_template,
        )
        line = f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, {report.bytes_on_disk / 1e6:.1f} MB"
        if report.bits_per_weight is not None:
            line += f", {report.bits_per_weight:.2f} bits per weight"
        typer.echo(line + f" in {report.seconds:.1f}s")
        for layer in report.float_layers:
            typer.echo(f"note: {layer} stays float (its width is not a multiple of {q_group_size})")


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
