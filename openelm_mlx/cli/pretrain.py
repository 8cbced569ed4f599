"""`train-tokenizer` and `pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..training.pretrain import PretrainConfig
from ._app import app, settings_options, user_errors


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    data: Annotated[list[Path], typer.Option(help="Text files, folders, or JSONL with a 'text' field.")],
    vocab_size: Annotated[
        int, typer.Option(help="Number of pieces (at least 260: 256 bytes, unk, BOS, EOS, and one more).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .model file.")],
    force: Annotated[bool, typer.Option(help="Replace an existing file at --output.")] = False,
) -> None:
    """Train a SentencePiece BPE tokenizer (byte fallback; unk 0, BOS 1, EOS 2)."""
    from ..generation.tokenizer import Tokenizer
    from ..training.pretrain import train_tokenizer

    with user_errors():
        path = train_tokenizer([str(d) for d in data], vocab_size, output, force=force)
        typer.echo(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")


@app.command()
@settings_options(PretrainConfig)
def pretrain(
    data: Annotated[list[Path], typer.Option(help="Text files, folders, or JSONL with a 'text' field.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Run folder: log.jsonl, checkpoints/, and the final model.")],
    settings: dict[str, Any],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="SentencePiece tokenizer.model (see train-tokenizer); default with --init-from: the model's."
        ),
    ] = None,
    arch: Annotated[str | None, typer.Option(help="A released size, e.g. OpenELM-270M.")] = None,
    arch_config: Annotated[Path | None, typer.Option(help="JSON/YAML with CoreNet GPTConfig fields.")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Continue pretraining this converted model (its config and tokenizer).")
    ] = None,
) -> None:
    """Pretrain an OpenELM from scratch (CoreNet's recipe), or continue a model on new text with --init-from;
    run with `mlx.launch` for several processes."""
    from ..errors import OptionError
    from ..folders.arch import resolve_arch
    from ..training.pretrain import pretrain as run_pretraining

    with user_errors():
        if init_from is not None and (arch or arch_config):
            raise OptionError("arch", "and --init-from cannot both be given: a continued model keeps its own config")
        config = None if init_from is not None else resolve_arch(arch, arch_config)
        if config is None and init_from is None:
            raise OptionError("arch", "is needed: give --arch (e.g. OpenELM-270M), --arch-config FILE or --init-from")
        run = PretrainConfig(
            data=[str(d) for d in data],
            tokenizer=str(tokenizer or ""),
            out=str(out),
            init_from=None if init_from is None else str(init_from),
            **settings,
        )
        metrics = run_pretraining(config, run, progress=True)
        summary = f"step {metrics['step']}: loss {metrics.get('loss', float('nan')):.4f}"
        if "val_loss" in metrics:
            summary += f", held-out loss {metrics['val_loss']:.4f}"
        typer.echo(f"{summary}; model saved in {out}", err=True)
