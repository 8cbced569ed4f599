"""Checks of an adapter folder read from disk: every adapter_config.json field we use, and finite adapter weights.

mlx-lm writes its whole training setup into adapter_config.json; only the fields that shape the adapters are
read (and checked like config.json's), the others are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import CheckpointError

MAX_RANK = 4096  # as `LoraConfig.rank`
MAX_SCALE = 1e6  # as `LoraConfig.alpha` over rank 1: past it the update swamps any weight


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_adapter_config(
    raw: dict[str, Any],
    path: Path,
    n_layers: int,
    known_keys: Collection[str],
    default_keys: Sequence[str],
    format_version: int,
) -> tuple[int, dict[str, Any], bool]:
    """(num_layers, lora_parameters, dora) of an adapter_config.json, each field checked for type and range.

    Args:
        raw: the file's JSON object; `path` names it in errors.
        n_layers: decoder layers of the model the adapters go on.
        known_keys: the module keys adapters may wrap (mlx-lm's names); `default_keys` when none are listed.
        format_version: the newest version this code reads.

    Raises:
        CheckpointError: naming the file and the field.
    """

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} must be {what}, got {_show(raw, field)}")

    kind = raw.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise CheckpointError(f"{path}: fine_tune_type {kind!r:.60} is not supported (lora or dora)")
    version = raw.get("format_version", format_version)
    if not _whole(version) or not 0 <= version <= format_version:
        raise CheckpointError(f"{path}: format_version {version!r:.60} is not one this openelm-mlx reads")
    num_layers, p = raw.get("num_layers"), raw.get("lora_parameters")
    missing = [f'"{k}"' for k in ("num_layers", "lora_parameters") if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: misses {' and '.join(missing)}; is it an adapter_config.json?")
    if not _whole(num_layers) or not 1 <= num_layers <= n_layers:
        raise CheckpointError(f"{path}: num_layers {num_layers!r:.60} does not fit a model of {n_layers} layers")
    if not isinstance(p, dict):
        raise CheckpointError(f'{path}: "lora_parameters" must be an object')
    rank, scale, dropout = p.get("rank"), p.get("scale"), p.get("dropout", 0.0)
    if not _whole(rank) or not 1 <= rank <= MAX_RANK:
        raise bad("lora_parameters.rank", f"a whole number from 1 to {MAX_RANK}")
    if not _number(scale) or not 0 < abs(scale) <= MAX_SCALE:
        raise bad("lora_parameters.scale", f"a finite non-zero number of at most {MAX_SCALE:g} in size")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise bad("lora_parameters.dropout", "a number from 0 up to (not including) 1")
    keys = p.get("keys") or list(default_keys)
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in known_keys for k in keys):
        raise bad("lora_parameters.keys", f"a list of module keys from {', '.join(sorted(known_keys))}")
    if "alpha" in raw and not (_number(raw["alpha"]) and 0 < raw["alpha"] <= MAX_SCALE * MAX_RANK):
        raise bad("alpha", "a finite positive number")
    return num_layers, {**p, "rank": rank, "scale": scale, "dropout": dropout, "keys": keys}, kind == "dora"


def _show(raw: dict[str, Any], field: str) -> str:
    value: Any = raw
    for part in field.split("."):
        value = value.get(part, "nothing") if isinstance(value, dict) else "nothing"
    return f"{value!r:.60}"


def check_finite(weights: dict[str, mx.array], path: Path) -> None:
    """Refuse adapter weights holding NaN or infinite values (they make a model print garbage).

    Raises:
        CheckpointError: naming the file and the first such tensor.
    """
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
