"""`bench` (our speed next to mlx-lm's, same weights) and `info` (MLX, device, BLAS, matmul and memory speed)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from ..bench.speed import DEFAULT_GEN_TOKENS, DEFAULT_PROMPT_TOKENS
from ..quant.recipes import DEFAULT_GROUP_SIZE
from ._app import app, model_or_demo, user_errors


def _tokenizer_for_cli(model: Any, tokenizer: str | None, folder: str | None) -> Any:
    """A tokenizer mlx-lm can load whose vocabulary covers the model's, or None (the CLI run is then skipped)."""
    from ..demo import DEMO_DIR
    from ..generation.tokenizer import TOKENIZER_FILE, Tokenizer

    for candidate in (tokenizer, folder and Path(folder) / TOKENIZER_FILE, DEMO_DIR / TOKENIZER_FILE):
        if candidate and Path(candidate).is_file():
            tok = Tokenizer(candidate)
            if tok.vocab_size >= model.config.vocab_size:
                return tok
    return None


def _build_model(model: str | None, arch: str | None, arch_config: str | None, dtype: str | None, seed: int) -> Any:
    from ..bench.speed import random_model
    from ..errors import OptionError
    from ..folders.arch import resolve_arch

    if model is not None and (arch is not None or arch_config is not None):
        raise OptionError("model", "give either --model or --arch (random weights)")
    if arch is None and arch_config is None:
        from ..folders.io import load_model

        return load_model(model_or_demo(model), dtype=dtype)
    return random_model(resolve_arch(arch, arch_config), dtype or "float32", seed)


def _print_report(r: dict[str, Any]) -> None:
    typer.echo(f"machine: {r['machine']}")
    typer.echo(f"BLAS: {r['blas']}")
    s = r["settings"]
    typer.echo(f"{s['prompt_tokens']}-token prompt, {s['gen_tokens']} new tokens, median of {s['repeats']} runs")
    for name in ("ours", "mlx_lm", "mlx_lm_cli"):
        if r[name]:
            v = r[name]
            typer.echo(
                f"  {name:11s} prompt {v['prompt_tps']:9.1f} tok/s  generation {v['generation_tps']:7.2f} tok/s  "
                f"peak {v['peak_memory_gb']:.3f} GB"
            )
    for name in ("ratio", "ratio_cli"):
        if r[name]:
            typer.echo(f"  {name:11s} prompt {r[name]['prompt']:.2f}x, generation {r[name]['generation']:.2f}x")
    if p := r["decode_paired"]:
        typer.echo(
            f"  decode steps interleaved one by one: ours {p['ours_tps']:.2f} tok/s, mlx-lm {p['mlx_lm_tps']:.2f} "
            f"tok/s, ratio {p['ratio']:.2f}x"
        )
    roof = r["roofline"]
    typer.echo(
        f"  roofline: {roof['weight_bytes_per_token'] / 1e9:.3f} GB of weights per token at "
        f"{roof['memory_read_gbps']:.1f} GB/s: decode runs at {100 * roof['fraction']:.0f}% of the bandwidth bound"
    )


@app.command()
def bench(
    model: Annotated[
        str | None, typer.Option(help="MLX model folder to benchmark (default: the bundled demo).")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="A released size with random weights, e.g. OpenELM-270M.")] = None,
    arch_config: Annotated[str | None, typer.Option(hidden=True, help="An architecture file (random weights).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: float32 / as saved).")
    ] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(
            "--prompt-tokens", "-p", help=f"Prompt length (default: {DEFAULT_PROMPT_TOKENS}, less for a short context)."
        ),
    ] = None,
    gen_tokens: Annotated[
        int | None,
        typer.Option(
            "--gen-tokens", "-g", help=f"Tokens to generate (default: {DEFAULT_GEN_TOKENS}, less for a short context)."
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs of each (after one warm-up); medians are reported.")] = 3,
    compare: Annotated[
        str, typer.Option(help="mlx-lm: also run mlx-lm in process and its CLI; none: only ours.")
    ] = "mlx-lm",
    quantize: Annotated[int | None, typer.Option(help="Quantize the weights to this many bits (4 or 8) first.")] = None,
    group_size: Annotated[int, typer.Option(help="Group size for --quantize.")] = DEFAULT_GROUP_SIZE,
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.model for mlx-lm's CLI run (default: the model's, or the demo's).")
    ] = None,
    json: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON to this file.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --json file.")] = False,
    seed: Annotated[int, typer.Option(hidden=True, help="Seed of the random weights.")] = 0,
) -> None:
    """Prompt and generation tokens/s and peak memory: ours, mlx-lm's model in this process, mlx-lm's CLI."""
    from ..bench import speed as b
    from ..errors import OptionError

    with user_errors():
        b.check_options(prompt_tokens, gen_tokens, repeats, dtype or "float32")
        if model is None and arch is None and arch_config is None:
            model = model_or_demo(None)
        if json is not None:
            from ..folders.fs import check_output_file

            given = [p for p in (model, tokenizer, arch_config) if p]
            check_output_file(
                json, force, inputs=given, inputs_are="inputs of this command", what="results", option="json"
            )
        elif force:
            raise OptionError("force", "takes effect only with --json")
        if compare not in ("mlx-lm", "none"):
            raise OptionError("compare", f"must be mlx-lm or none, got {compare!r}")
        if quantize is not None and quantize not in (4, 8):
            raise OptionError("quantize", f"must be 4 or 8, got {quantize}")
        if quantize is None and group_size != DEFAULT_GROUP_SIZE:
            raise OptionError("group_size", "takes effect only with --quantize")
        if quantize is not None:
            from ..quant.recipes import check_settings

            check_settings(quantize, group_size)
        m = _build_model(model, arch, arch_config, dtype, seed)
        prompt_tokens, gen_tokens, shrunk = b.fit_lengths(prompt_tokens, gen_tokens, m.config.max_context_length)
        if shrunk:
            typer.echo(f"note: {shrunk}", err=True)
        if quantize is not None:
            from ..quant.recipes import quantize_model

            quantize_model(m, bits=quantize, group_size=group_size)
        folder = None
        tok = _tokenizer_for_cli(m, tokenizer, model) if compare == "mlx-lm" else None
        if compare == "mlx-lm" and tok is None:
            typer.echo("skipping mlx-lm's CLI run: no tokenizer covers the vocabulary (give --tokenizer)", err=True)
        tmp = Path(tempfile.mkdtemp(prefix="openelm-bench-")) if tok is not None else None
        try:
            if tmp is not None:
                from ..folders.io import save

                folder = save(m, tmp / "model", tokenizer=tok)
            r = b.report(m, prompt_tokens, gen_tokens, repeats, cli_folder=folder, compare=compare == "mlx-lm")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        _print_report(r)
        if json is not None:
            b.write_json(json, r)


@app.command()
def info() -> None:
    """MLX version and device, the BLAS in use, and measured matmul GFLOP/s and memory read GB/s."""
    from ..bench import blas
    from ..bench import speed as b

    with user_errors():
        import mlx.core as mx

        typer.echo(f"mlx: {mx.__version__}")
        typer.echo(f"device: {mx.default_device()}")
        typer.echo(f"machine: {b.machine()}")
        typer.echo(f"blas: {blas.STATE.describe()}")
        typer.echo(f"matmul: {b.matmul_gflops():.1f} GFLOP/s (1024x1024 float32)")
        typer.echo(f"memory: {b.memory_read_gbps():.1f} GB/s read")
