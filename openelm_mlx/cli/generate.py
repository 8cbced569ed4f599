"""`generate` and `chat`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from ..bench import blas
from ..errors import DataError, OptionError
from ..folders.io import parse_dtype
from ..generation.generate import GenerationConfig
from ._app import app, model_or_demo, read_stdin_text, settings_options, user_errors

ModelOpt = Annotated[str | None, typer.Option(help="MLX model folder or Hub repo id (default: the bundled demo).")]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help="tokenizer.model path/folder or Hub repo (Apple's repos ship none: hf-internal-testing/llama-tokenizer)."
    ),
]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt (Instruct template).")]
AdapterOpt = Annotated[
    str | None, typer.Option(help="LoRA/DoRA adapters to apply (a folder written by `openelm-mlx lora`).")
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Cast the weights to float32, bfloat16 or float16 as they load (default: as saved). On MLX's CPU backend "
        "with a fast BLAS (Linux), float32 generates several times faster than bfloat16."
    ),
]
CHAT_SETTINGS = ("max_tokens", "temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_kv_size")


def load_for_generation(
    model: str | None,
    tokenizer: str | None,
    adapter_path: str | None = None,
    draft_model: str | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any, Any]:
    """The model, tokenizer and draft model (or None) to generate with (the bundled demo when `model` is None).

    Both models are cast to `dtype` if given (adapter weights keep theirs); adapters are applied to the model; the
    draft model shares its tokenizer and is checked against it. A note on stderr follows a successful load where
    float32 would be much faster.
    """
    from ..folders.io import load
    from ..generation.generate import check_draft_model

    m, tok = load(model_or_demo(model), tokenizer=tokenizer, dtype=dtype)
    if adapter_path is not None:
        from ..training.lora import load_adapters

        load_adapters(m, adapter_path)
    draft = None
    if draft_model:
        draft = load(draft_model, tokenizer=tok.model_file, dtype=dtype)[0]
        check_draft_model(m, draft)  # once here; token_steps still guards each call
    if dtype is None:
        _hint_float32(m)
    return m, tok, draft


def _hint_float32(model: Any) -> None:
    """Say once when a half-precision float model runs on the CPU backend next to the fast BLAS our Linux loader
    found, where float32 is several times faster (MLX's CPU backend has no fast bfloat16/float16 matmul; float32
    goes to the BLAS)."""
    import mlx.core as mx

    from ..folders.io import compute_dtype, dtype_name
    from ..quant.recipes import quantization_settings

    dtype = compute_dtype(model)
    half = dtype in (mx.bfloat16, mx.float16) and quantization_settings(model) is None
    if half and blas.STATE.loaded and mx.default_device() == mx.cpu:
        typer.echo(
            f"note: {dtype_name(dtype)} runs several times slower than float32 on MLX's CPU backend; "
            "--dtype float32 casts the weights as they load (twice the memory).",
            err=True,
        )


def _print_stats(last: Any, drafted: int, draft: bool) -> None:
    typer.echo(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s", err=True)
    typer.echo(f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s", err=True)
    if draft and last.generation_tokens:
        share = 100 * drafted / last.generation_tokens
        typer.echo(f"draft tokens accepted: {drafted}/{last.generation_tokens} ({share:.0f}%)", err=True)
    typer.echo(f"peak memory: {last.peak_memory_gb:.3f} GB", err=True)
    typer.echo(f"BLAS: {blas.STATE.describe()}", err=True)


@app.command()
@settings_options(GenerationConfig)
def generate(
    settings: dict[str, Any],
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="The prompt; '-' reads it from stdin. Repeat it to decode several prompts together."),
    ] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(help="A UTF-8 text file ('-': stdin) with one prompt per line, decoded together."),
    ] = None,
    json_lines: Annotated[
        bool,
        typer.Option("--json", help="With several prompts: one JSON object per line (prompt, text, finish_reason)."),
    ] = False,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    adapter_path: AdapterOpt = None,
    system: SystemOpt = None,
    chat: Annotated[
        bool | None, typer.Option(help="Wrap the prompt in the Instruct template (default: when the model has one).")
    ] = None,
    draft_model: Annotated[
        str | None,
        typer.Option(help="Smaller model with the same vocabulary for speculative decoding (e.g. 270M for 3B)."),
    ] = None,
    dtype: DtypeOpt = None,
    verbose: Annotated[bool, typer.Option(help="Print tokens/s and peak memory on stderr.")] = False,
) -> None:
    """Generate text; it streams to stdout (and nothing else goes there). Several prompts (--prompt repeated, or
    --prompts-file) are decoded together and answered one per line, in order (newlines in an answer written as
    \\n), or as JSON lines with --json."""
    from ..generation.generate import stream_generate

    with user_errors(tokenizer_option=True):
        config = _generation_config(settings)
        if draft_model is None and config.num_draft_tokens != GenerationConfig.num_draft_tokens:
            raise OptionError("num_draft_tokens", "takes effect only with a draft model")
        if dtype is not None:
            parse_dtype(dtype)
        sources, prompts = zip(*_read_prompts(prompt or [], prompts_file))
        if json_lines and len(prompts) == 1 and prompts_file is None:
            raise OptionError("json", "takes effect with several prompts (--prompt repeated or --prompts-file)")
        if len(prompts) > 1 or prompts_file is not None:
            if draft_model is not None:
                raise OptionError("draft_model", "is a single-prompt feature (speculative decoding)")
            m, tok, _ = load_for_generation(model, tokenizer, adapter_path, None, dtype)
            _check_fit(m, tok, sources, prompts, system, chat)
            _generate_many(m, tok, list(prompts), config, system, chat, json_lines, verbose)
            return
        prompt = prompts[0]
        m, tok, draft = load_for_generation(model, tokenizer, adapter_path, draft_model, dtype)
        last, drafted = None, 0
        for step in stream_generate(m, tok, prompt, config=config, system=system, chat=chat, draft_model=draft):
            sys.stdout.write(step.text)
            sys.stdout.flush()
            drafted += step.from_draft
            last = step
        sys.stdout.write("\n")
        if verbose and last is not None:
            _print_stats(last, drafted, draft is not None)


def _generation_config(settings: dict[str, Any]) -> GenerationConfig:
    """The command line's settings; an empty --stop, which the library (and the server) skip, is refused here."""
    if "" in (settings.get("stop") or ()):
        raise OptionError("stop", "is empty; a stop string needs at least one character")
    return GenerationConfig(**settings)


def _read_prompts(prompts: list[str], prompts_file: str | None) -> list[tuple[str, str]]:
    """The prompts of --prompt (stdin for '-') and --prompts-file ('-': stdin), in order, each with where it came
    from ("--prompt" or FILE:LINE); at least one."""
    from ..folders.fs import require_regular_file

    if [*prompts, prompts_file].count("-") > 1:
        raise OptionError("prompt", "'-' (stdin) can be given once")
    out = [("--prompt", read_stdin_text() if p == "-" else p) for p in prompts]
    if prompts_file is not None:
        from pathlib import Path

        name = "stdin" if prompts_file == "-" else str(require_regular_file(Path(prompts_file)))
        data = sys.stdin.buffer.read() if prompts_file == "-" else Path(prompts_file).read_bytes()
        out += _prompt_lines(name, data)
    if not out:
        raise OptionError("prompt", "is required (or --prompts-file)")
    return out


def _prompt_lines(name: str, data: bytes) -> list[tuple[str, str]]:
    """One prompt per line of a UTF-8 text file: a blank line inside it is refused (answers are written one per line,
    so line N of the output answers line N of the file); blank lines at its end are not prompts."""
    if b"\0" in data:
        raise DataError(f"{name}: holds NUL bytes; --prompts-file takes a text file, one prompt per line")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: is not UTF-8 text (byte {e.start}); one prompt per line") from None
    # Lines end at "\n" (and "\r\n") only: str.splitlines also splits at form feeds, U+2028 and others, which would
    # make one line two prompts and shift every answer after it.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise OptionError("prompts_file", f"{name} holds no prompt (one per line)")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{name}:{number}: an empty line; one prompt per line, each answered on its line")
    return [(f"{name}:{number}", line) for number, line in enumerate(lines, 1)]


def _check_fit(m: Any, tok: Any, sources: Sequence[str], prompts: Sequence[str], system: Any, chat: Any) -> None:
    """Every prompt fits the model's context; one that does not is named by where it came from (FILE:LINE)."""
    from ..generation.generate import encode_prompt
    from ..generation.settings import check_context

    for source, p in zip(sources, prompts):
        ids = encode_prompt(tok, p, system, chat)  # its errors (--system without a template, ...) are not the line's
        try:
            check_context(m, ids)
        except OptionError as e:
            if source == "--prompt":
                raise
            raise DataError(f"{source}: the prompt {e.detail}") from None


def _generate_many(
    m: Any, tok: Any, prompts: list[str], config: Any, system: Any, chat: Any, json_lines: bool, verbose: bool
) -> None:
    """Answers to several prompts decoded together on the engine, one line each in order."""
    import json
    import time

    from ..generation.generate import generate_batch

    tic = time.perf_counter()
    reasons: list[str] = []
    answers = generate_batch(m, tok, prompts, config=config, system=system, chat=chat, finish_reasons=reasons)
    elapsed = time.perf_counter() - tic
    for p, a, reason in zip(prompts, answers, reasons):
        record = {"prompt": p, "text": a, "finish_reason": reason}
        line = json.dumps(record, ensure_ascii=False) if json_lines else a.replace("\n", "\\n")
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if verbose:
        tokens = sum(len(tok.encode(a, add_bos=False)) for a in answers)
        typer.echo(
            f"{len(prompts)} prompts in {elapsed:.2f} s, about {tokens / elapsed:.1f} generated tokens/s", err=True
        )
        typer.echo(f"BLAS: {blas.STATE.describe()}", err=True)


@app.command()
@settings_options(GenerationConfig, only=CHAT_SETTINGS)
def chat(
    settings: dict[str, Any],
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    adapter_path: AdapterOpt = None,
    system: SystemOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Chat with an Instruct model; the KV cache is kept between turns. /reset forgets, /exit quits,
    Ctrl-C stops the current answer."""
    from ..generation.chat import ChatSession

    with user_errors(tokenizer_option=True):
        config = _generation_config(settings)
        if dtype is not None:
            parse_dtype(dtype)
        m, tok, _ = load_for_generation(model, tokenizer, adapter_path, dtype=dtype)
        session = ChatSession(m, tok, config=config, system=system)
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a stray non-UTF-8 byte is not worth a crash
        typer.echo("Type a message; /reset forgets the conversation, /exit quits.", err=True)
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                typer.echo("", err=True)
                return
            command = line.strip()
            if command == "/exit":
                return
            if command == "/reset":
                session.reset()
                typer.echo("(conversation reset)", err=True)
                continue
            if command:
                _answer(session, line)


def _answer(session: Any, line: str) -> None:
    from ._app import error_line

    answer = session.send(line)
    try:
        for step in answer:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    except OptionError as e:  # the conversation is full: say so and keep the session
        typer.echo(f"error: {error_line(e)}", err=True)
        return
    except KeyboardInterrupt:
        answer.close()  # the session trims its cache back to what was shown
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
