"""The `openelm-mlx` command: one typer app, one thin command per verb."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Run, convert, quantize, fine-tune and pretrain Apple's OpenELM models with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can cause print one line on stderr and exit 1, without a traceback."""
    from .data import DataError
    from .hub import HubError
    from .io import CheckpointError
    from .tokenizer import TokenizerNotFoundError

    try:
        yield
    except (CheckpointError, DataError, HubError, TokenizerNotFoundError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("train-tokenizer")
def train_tokenizer_cmd(
    data: Annotated[list[Path], typer.Option(help="Text files, folders, or JSONL with a 'text' field.")],
    vocab_size: Annotated[int, typer.Option(help="Number of pieces (>= 259: 256 bytes + unk/BOS/EOS).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .model file.")],
) -> None:
    """Train a SentencePiece BPE tokenizer (byte fallback; unk 0, BOS 1, EOS 2)."""
    from .pretrain import train_tokenizer
    from .tokenizer import Tokenizer

    with user_errors():
        path = train_tokenizer([str(d) for d in data], vocab_size, output)
        tok = Tokenizer(path)
        typer.echo(f"wrote {path} ({tok.vocab_size} pieces)")


@app.command()
def pretrain(
    data: Annotated[list[Path], typer.Option(help="Text files, folders, or JSONL with a 'text' field.")],
    tokenizer: Annotated[Path, typer.Option(help="SentencePiece tokenizer.model (see train-tokenizer).")],
    out: Annotated[Path, typer.Option(help="Run folder: log.jsonl, checkpoints/, and the final model.")],
    arch: Annotated[str | None, typer.Option(help="A released size, e.g. OpenELM-270M.")] = None,
    arch_config: Annotated[Path | None, typer.Option(help="JSON/YAML with CoreNet GPTConfig fields.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch per process.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (CoreNet 270M: 5.3e-3).")] = 5.3e-3,
    min_lr: Annotated[float | None, typer.Option(help="Final cosine learning rate (default lr/10).")] = None,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps from 1e-6.")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on norms).")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).")] = 1.0,
    z_loss: Annotated[float, typer.Option(help="z-loss weight on logsumexp^2.")] = 1e-4,
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: float32 or bfloat16 (float32 master weights).")
    ] = "float32",
    grad_checkpoint: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
    eval_every: Annotated[int, typer.Option(help="Held-out loss every N steps (0: only never).")] = 100,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: never).")] = 500,
    val_fraction: Annotated[float, typer.Option(help="Fraction of tokens held out.")] = 0.02,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
) -> None:
    """Pretrain an OpenELM from scratch (CoreNet's recipe); run with `mlx.launch` for several processes."""
    from .pretrain import PretrainConfig
    from .pretrain import pretrain as run_pretraining

    with user_errors():
        from .io import resolve_arch

        config = resolve_arch(arch, arch_config)
        if config is None:
            raise ValueError("give --arch (e.g. OpenELM-270M) or --arch-config FILE")
        run = PretrainConfig(
            data=[str(d) for d in data],
            tokenizer=str(tokenizer),
            out=str(out),
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            grad_accum=grad_accum,
            lr=lr,
            min_lr=min_lr,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            z_loss=z_loss,
            dtype=dtype,
            grad_checkpoint=grad_checkpoint,
            eval_every=eval_every,
            save_every=save_every,
            val_fraction=val_fraction,
            seed=seed,
            resume=resume,
        )
        metrics = run_pretraining(config, run)
        summary = f"step {metrics['step']}: loss {metrics.get('loss', float('nan')):.4f}"
        if "val_loss" in metrics:
            summary += f", held-out loss {metrics['val_loss']:.4f}"
        typer.echo(f"{summary}; model saved in {out}", err=True)


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
    force: Annotated[bool, typer.Option(help="Allow float16 for 3B-shaped models (they overflow).")] = False,
    chat_template: Annotated[
        bool | None,
        typer.Option(help="Record the Instruct chat template (default: when the source is named -Instruct)."),
    ] = None,
) -> None:
    """Convert a Hugging Face or CoreNet OpenELM checkpoint to MLX."""
    from .convert.convert import convert as run_convert

    with user_errors():
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
            log=lambda m: typer.echo(m, err=True),
        )
        line = f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, {report.bytes_on_disk / 1e6:.1f} MB"
        if report.bits_per_weight is not None:
            line += f", {report.bits_per_weight:.2f} bits per weight"
        typer.echo(line + f" in {report.seconds:.1f}s")
        for layer in report.float_layers:
            typer.echo(f"note: {layer} stays float (its width is not a multiple of {q_group_size})")


@app.command()
def export(
    src: Annotated[Path, typer.Argument(help="An MLX model folder (quantized models are dequantized).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output Hugging Face folder.")],
    dtype: Annotated[str | None, typer.Option(help="float16, bfloat16 or float32 (default: the model's).")] = None,
) -> None:
    """Export an MLX model back to a Hugging Face folder in Apple's format."""
    from .convert.convert import export as run_export

    with user_errors():
        report = run_export(src, output, dtype=dtype)
        typer.echo(
            f"wrote {report.output}: {report.tensors} tensors, {report.dtype}, "
            f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f}s"
        )


def _load_for_generation(model: str | None, tokenizer: str | None):  # -> (model, tokenizer)
    from .demo import DEMO_DIR, DEMO_NAME
    from .io import load

    if model is None:
        typer.echo(
            f"Using the {DEMO_NAME}. For a real model: openelm-mlx convert apple/OpenELM-270M-Instruct "
            "--tokenizer hf-internal-testing/llama-tokenizer -o OpenELM-270M-Instruct, then "
            "--model OpenELM-270M-Instruct.",
            err=True,
        )
        model = str(DEMO_DIR)
    return load(model, tokenizer=tokenizer)


ModelOpt = Annotated[str | None, typer.Option(help="MLX model folder or Hub repo id (default: the bundled demo).")]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help="tokenizer.model path/folder or Hub repo (Apple's repos ship none: hf-internal-testing/llama-tokenizer)."
    ),
]
MaxTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate.")]
TempOpt = Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass (1: off).")]
RepPenaltyOpt = Annotated[
    float | None, typer.Option(help="Penalty for repeating recent tokens; Apple's model card suggests 1.2.")
]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (same seed, same sample).")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt (Instruct template).")]
MaxKvOpt = Annotated[int | None, typer.Option(help="Rotating KV cache of this many tokens, for long runs.")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="The prompt; '-' reads it from stdin.")],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: off).")] = 0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability (0: off).")] = 0.0,
    repetition_penalty: RepPenaltyOpt = None,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    chat: Annotated[
        bool | None, typer.Option(help="Wrap the prompt in the Instruct template (default: when the model has one).")
    ] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable; not printed).")] = None,
    max_kv_size: MaxKvOpt = None,
    kv_bits: Annotated[int | None, typer.Option(help="Quantize the KV cache to this many bits (4 or 8).")] = None,
    kv_group_size: Annotated[int, typer.Option(help="Group size of the quantized KV cache.")] = 64,
    draft_model: Annotated[
        str | None,
        typer.Option(help="Smaller model with the same vocabulary for speculative decoding (e.g. 270M for 3B)."),
    ] = None,
    num_draft_tokens: Annotated[int, typer.Option(help="Tokens the draft model proposes per step.")] = 3,
    verbose: Annotated[bool, typer.Option(help="Print tokens/s and peak memory on stderr.")] = False,
) -> None:
    """Generate text; it streams to stdout (and nothing else goes there)."""
    from .generate import stream_generate
    from .io import load

    with user_errors():
        if prompt == "-":
            prompt = sys.stdin.read()
        m, tok = _load_for_generation(model, tokenizer)
        draft = load(draft_model, tokenizer=tok.model_file)[0] if draft_model else None
        last, drafted = None, 0
        for step in stream_generate(
            m,
            tok,
            prompt,
            max_tokens,
            system=system,
            chat=chat,
            stop=stop or (),
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            draft_model=draft,
            num_draft_tokens=num_draft_tokens,
            max_kv_size=max_kv_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        ):
            sys.stdout.write(step.text)
            sys.stdout.flush()
            drafted += step.from_draft
            last = step
        sys.stdout.write("\n")
        if verbose and last is not None:
            typer.echo(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s", err=True)
            typer.echo(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s", err=True)
            if draft is not None and last.generation_tokens:
                typer.echo(
                    f"draft tokens accepted: {drafted}/{last.generation_tokens} "
                    f"({100 * drafted / last.generation_tokens:.0f}%)",
                    err=True,
                )
            typer.echo(f"peak memory: {last.peak_memory_gb:.3f} GB", err=True)


@app.command()
def chat(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    repetition_penalty: RepPenaltyOpt = None,
    seed: SeedOpt = None,
    max_kv_size: MaxKvOpt = None,
) -> None:
    """Chat with an Instruct model; the KV cache is kept between turns. /reset forgets, /exit quits,
    Ctrl-C stops the current answer."""
    from .chat import ChatSession

    with user_errors():
        m, tok = _load_for_generation(model, tokenizer)
        session = ChatSession(
            m,
            tok,
            system=system,
            max_kv_size=max_kv_size,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        typer.echo("Type a message; /reset forgets the conversation, /exit quits.", err=True)
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                typer.echo("", err=True)
                return
            if line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                session.reset()
                typer.echo("(conversation reset)", err=True)
                continue
            if not line.strip():
                continue
            answer = session.send(line)
            try:
                for step in answer:
                    sys.stdout.write(step.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                answer.close()  # the session trims its cache back to what was shown
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="openelm-mlx")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
