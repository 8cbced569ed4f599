"""The typer app every command registers on, the one place user errors become one line and exit 1,
and options generated from the settings dataclasses (one place for defaults and help)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from ..bench import blas
from ..errors import OpenELMError, OptionError, TokenizerNotFoundError
from ..generation.tokenizer import LLAMA_TOKENIZER_REPO

app = typer.Typer(
    help="Run, convert, quantize, fine-tune, serve and pretrain Apple's OpenELM models with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def flag(option: str) -> str:
    """`max_tokens` -> `--max-tokens`."""
    return "--" + option.replace("_", "-")


def error_line(e: BaseException, tokenizer_option: bool = False) -> str:
    """The one line a user sees for an error they caused (`tokenizer_option`: the command has --tokenizer)."""
    if isinstance(e, TokenizerNotFoundError) and tokenizer_option:
        line = f"{e} With this command: --tokenizer {LLAMA_TOKENIZER_REPO}"
    elif isinstance(e, OptionError):
        line = f"{flag(e.option) if e.option.isidentifier() else e.option}: {e.detail}"
    elif isinstance(e, OSError) and not isinstance(e, OpenELMError):
        where = f"{e.filename}: " if e.filename else ""
        line = f"{where}{(e.strerror or str(e)).lower()}"
    else:
        line = str(e)
    return " ".join(line.split())  # one line, whatever a library message held


def _warning_line(message: Warning | str, category: type, *args: object, **kwargs: object) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


class _StderrHandler(logging.Handler):
    """Library notices (repaired folders, BLAS choice) as plain lines on whatever stderr is now."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(
            f"{record.levelname.lower()}: {record.getMessage()}"
            if record.levelno >= logging.WARNING
            else record.getMessage(),
            err=True,
        )


@contextlib.contextmanager
def user_errors(tokenizer_option: bool = False) -> Iterator[None]:
    """Errors a user can cause print one line on stderr and exit 1; bugs keep their traceback.

    `tokenizer_option`: the command takes --tokenizer, so a missing tokenizer's message can name it.
    """
    warnings.formatwarning = _warning_line  # a plain line, not the source line of the warning
    logger = logging.getLogger("openelm_mlx")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        if blas.STATE.source == "bundled":  # once per process: MLX's reference BLAS is slow on Linux
            typer.echo(f"note: {blas.STATE.describe()}", err=True)
    try:
        yield
    except BrokenPipeError:  # `openelm-mlx ... | head`: the reader has gone, which is no error of the user's
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (OpenELMError, OSError) as e:
        typer.echo(f"error: {error_line(e, tokenizer_option)}", err=True)
        raise typer.Exit(1) from None


def model_or_demo(model: str | Path | None) -> str:
    """`model`, or the bundled demo's folder (with a note on stderr) when none is given: every command that reads
    a model defaults to the demo."""
    if model is not None:
        return str(model)
    from ..demo import DEMO_DIR, DEMO_NAME

    typer.echo(
        f"Using the {DEMO_NAME}. For a real model: openelm-mlx convert apple/OpenELM-270M-Instruct "
        "--tokenizer hf-internal-testing/llama-tokenizer -o OpenELM-270M-Instruct, then "
        "--model OpenELM-270M-Instruct.",
        err=True,
    )
    return str(DEMO_DIR)


def read_stdin_text() -> str:
    """All of stdin as text; bytes that are not UTF-8 become U+FFFD rather than an error."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "replace")
    return data.decode("utf-8", errors="replace")


def _option_type(hint: Any) -> Any:
    """Typer-friendly type for a dataclass field: tuples of strings become repeatable options."""
    if typing.get_origin(hint) is tuple:
        return list[typing.get_args(hint)[0]] | None
    return hint


def _spellings(f: dataclasses.Field) -> tuple[str, ...]:
    """A field's option names when it has aliases (none: typer derives the name, and --no-X for a flag)."""
    aliases = f.metadata.get("aliases", ())
    return (flag(f.name), *aliases) if aliases else ()


def settings_options(cls: type, defaults: dict[str, Any] | None = None, only: tuple[str, ...] | None = None):
    """Decorator: add one CLI option per field of dataclass `cls` that has `metadata["help"]`.

    The wrapped command receives them gathered as `settings: dict` (tuples restored); `defaults`
    changes a default for this command only, and `only` keeps a subset of the fields.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata and (only is None or f.name in only)]

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        resolved = typing.get_type_hints(command, include_extras=True)  # the command module's names
        params = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=resolved[name])
            for name, p in inspect.signature(command).parameters.items()
            if name != "settings"
        ]
        for f in fields:
            default = (defaults or {}).get(f.name, f.default)
            hint = _option_type(hints[f.name])
            if typing.get_origin(hints[f.name]) is tuple:
                default = None
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=Annotated[hint, typer.Option(*_spellings(f), help=f.metadata["help"])],
                )
            )
        names = [f.name for f in fields]
        tuples = {f.name for f in fields if typing.get_origin(hints[f.name]) is tuple}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in names}
            for n in tuples:
                settings[n] = tuple(settings[n] or ())
            return command(settings=settings, **kwargs)

        del wrapper.__wrapped__
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return wrap
