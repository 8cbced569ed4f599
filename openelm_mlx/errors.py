"""The error types of the library: each names the file, field, tensor, line or setting at fault.

The CLI and the server turn any `OpenELMError` into one line (exit code 1, or an HTTP 400); every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class OpenELMError(ValueError):
    """Something the user gave (a file, a setting, data) is wrong; the message says what and where."""


class CheckpointError(OpenELMError):
    """A model file is missing, corrupt, or disagrees with its config; the message names it."""


class ConfigError(CheckpointError):
    """An architecture config (config.json, a CoreNet YAML) is invalid; the message names the field."""


class DataError(OpenELMError):
    """Bad training or evaluation data; the message names the file (and line)."""


class OptionError(OpenELMError):
    """A setting is out of range. `option` is its name (`max_tokens`); the CLI shows it as `--max-tokens`."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message


class HubError(OpenELMError, OSError):
    """A repo could not be fetched; the message says why and what to do."""


class TokenizerNotFoundError(OpenELMError, FileNotFoundError):
    """No tokenizer.model next to the model and none given."""


def check_range(
    option: str,
    value: float | int | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise OptionError unless `low <= value <= high` (`low < value` with `low_open`); None passes.

    NaN and infinities are refused wherever a bound is given.
    """
    if value is None:
        return
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(option, f"must be a whole number, got {value!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or value
        in (
            float("inf"),
            float("-inf"),
        )
    ):
        raise OptionError(option, f"must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise OptionError(option, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise OptionError(option, f"must be <= {high}, got {value}")


def settings_field(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:
    """A settings-dataclass field with `help`: the CLI turns it into an option with this default
    (also spelled as each of `aliases`, e.g. "--iters")."""
    return field(default=default, metadata={"help": help, "aliases": aliases})
