"""`convert` and `export`."""

from __future__ import annotations

import dataclasses
import logging
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
    """Convert a Hugging Face, CoreNet or GGUF (llama.cpp) OpenELM checkpoint to MLX."""
    from ..convert import convert as run_convert
    from ..convert.pipeline import import_gguf, is_gguf

    with user_errors(tokenizer_option=True):
        q = {"bits": q_bits, "group_size": q_group_size, "recipe": q_recipe, "embedding_bits": q_embedding_bits}
        opts = _quantize_options(q) if quantize else None
        given = [name for name, value in q.items() if value != _Q[name].default]
        if not quantize and given:
            raise OptionError(f"q_{given[0]}", "takes effect only with -q/--quantize")
        if is_gguf(src):
            unused = {"arch": arch, "arch_config": arch_config, "vocab_size": vocab_size, "quantize": quantize or None}
            for name, value in unused.items():
                if value is not None:
                    raise OptionError(name, "does not apply to a GGUF file (it records its architecture)")
            report = import_gguf(
                src, output, dtype=dtype, tokenizer=tokenizer, force=force, chat_template=chat_template
            )
            typer.echo(
                f"wrote {report.output}: {report.tensors} tensors, {report.dtype} (GGUF dequantized where quantized), "
                f"tokenizer {report.tokenizer}, {report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f}s"
            )
            return
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
    output: Annotated[Path, typer.Option("-o", "--output", help="Output Hugging Face folder, or .gguf file.")],
    src: Annotated[
        Path | None, typer.Argument(help="An MLX model folder (quantized ones are dequantized; default: the demo).")
    ] = None,
    format: Annotated[
        str, typer.Option(help="hf (Apple's Hugging Face layout) or gguf (one file for llama.cpp / LM Studio).")
    ] = "hf",
    dtype: Annotated[str | None, typer.Option(help="hf: float16, bfloat16 or float32 (default: the model's).")] = None,
    outtype: Annotated[
        str | None,
        typer.Option(
            help="gguf: f32, f16 (default), bf16, q8_0, q4_0, q4_k_m or q6_k (K-quants need llama-cpp-python)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Write into a folder openelm-mlx did not create (only its own files are replaced), or replace "
            "an existing .gguf file."
        ),
    ] = False,
) -> None:
    """Export an MLX model to a Hugging Face folder in Apple's format, or to a GGUF file for llama.cpp."""
    from ..convert import export as run_export
    from ..convert.pipeline import export_gguf

    with user_errors():
        src = model_or_demo(src)
        if format not in ("hf", "gguf"):
            raise OptionError("format", f"must be hf or gguf, got {format!r}")
        if format == "gguf":
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its quantizer logs every tensor
            if dtype is not None:
                raise OptionError("dtype", "applies to --format hf; use --outtype for gguf")
            echo_gguf_report(export_gguf(src, output, outtype or "f16", force=force))
            return
        if outtype is not None:
            raise OptionError("outtype", "applies to --format gguf")
        report = run_export(src, output, dtype=dtype, force=force)
        typer.echo(
            f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, "
            f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f}s"
        )


def echo_gguf_report(report) -> None:
    """The GGUF export's notes (dequantized source, per-tensor fallbacks) on stderr, the result on stdout."""
    if report.dequantized:
        typer.echo("note: the model is quantized (MLX affine); dequantized to float before export", err=True)
    for line in report.notes:
        typer.echo(f"note: {line}", err=True)
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    typer.echo(
        f"wrote {report.output}: {report.tensors} tensors ({types}), {report.outtype}, "
        f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f}s"
    )
