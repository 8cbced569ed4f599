"""`quantize` and `perplexity`: thin commands over `openelm_mlx.quant.run` and `openelm_mlx.evaluate.perplexity`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import OptionError
from ..evaluate.perplexity import SEQ_LEN_HELP, text_windows, window_length
from ..evaluate.perplexity import perplexity as run_perplexity
from ..folders.io import load
from ..quant.run import QuantizeOptions, QuantizeReport, dequantize_folder, quantize_folder
from ._app import app, model_or_demo, settings_options, user_errors


@app.command()
@settings_options(QuantizeOptions)
def quantize(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output model folder.")],
    settings: dict[str, Any],
    src: Annotated[
        Path | None,
        typer.Argument(help="A float MLX model folder (or, with --dequantize, a quantized one; default: the demo)."),
    ] = None,
    eval: Annotated[
        list[Path] | None, typer.Option("--eval", help="Text to report perplexity before/after and KL on.")
    ] = None,
    dequantize: Annotated[bool, typer.Option(help="Turn a quantized model back to float.")] = False,
    force: Annotated[bool, typer.Option(help="Write into a folder openelm-mlx did not create.")] = False,
) -> None:
    """Quantize a model (MLX affine: uniform, mixed recipes, a bits-per-weight target, or GPTQ)."""
    with user_errors():
        src = Path(model_or_demo(src))
        if dequantize:
            defaults = {f.name: f.default for f in dataclasses.fields(QuantizeOptions) if f.name in settings}
            given = sorted(k for k, v in settings.items() if v != defaults[k] and v != ())
            if given or eval:
                raise OptionError("dequantize", f"takes no quantization settings (got {', '.join(given or ['eval'])})")
            report = dequantize_folder(src, output, force=force)
            typer.echo(f"wrote {report.output}: float, {report.bytes_on_disk / 1e6:.2f} MB in {report.seconds:.1f}s")
            return
        opts = QuantizeOptions(**settings, eval_data=tuple(eval or ()))
        _print_report(quantize_folder(src, output, opts, force=force, progress=True))


def _print_report(report: QuantizeReport) -> None:
    """The quantize summary: size, notes, per-module overrides, quality."""
    typer.echo(
        f"wrote {report.output}: {report.bits_per_weight:.3f} bits per weight, "
        f"{report.bytes_on_disk / 1e6:.2f} MB in {report.seconds:.1f}s"
    )
    for note in report.notes:
        typer.echo(f"note: {note}")
    for layer in report.float_layers:
        typer.echo(f"note: {layer} stays float (its width is not a multiple of its group size)")
    overrides = {k: v for k, v in (report.quantization or {}).items() if isinstance(v, dict)}
    for path, s in overrides.items():
        typer.echo(f"  {path}: {s['bits']} bits, group {s['group_size']}")
    if report.perplexity_after is not None:
        typer.echo(
            f"perplexity {report.perplexity_before:.3f} -> {report.perplexity_after:.3f}, "
            f"mean KL from float {report.kl:.5f} nats/token"
        )


@app.command()
def perplexity(
    data: Annotated[list[Path], typer.Option(help="Text (.txt/.jsonl) to score; repeatable.")],
    model: Annotated[
        Path | None, typer.Option(help="MLX model folder (float or quantized; default: the bundled demo).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help=f"{SEQ_LEN_HELP} Each window starts with BOS.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Windows to use, evenly spaced (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
) -> None:
    """Perplexity of a model on text."""
    with user_errors():
        lm, tok = load(model_or_demo(model))
        seq_len, shrunk = window_length(lm.config, seq_len)
        if shrunk:
            typer.echo(f"note: {shrunk}", err=True)
        windows = text_windows(tok, [str(p) for p in data], seq_len, num_samples)
        r = run_perplexity(lm, windows, batch_size, progress=True)
        typer.echo(f"perplexity {r.perplexity:.3f} (loss {r.nll:.4f}) over {r.tokens} tokens in {r.windows} windows")
