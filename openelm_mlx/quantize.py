"""Affine quantization of an OpenELM with MLX's own `nn.quantize`, and the config's `quantization` entry.

A `QuantRecipe` says which modules get which bits and group size; it yields MLX's `class_predicate`
and the mlx-lm `quantization` entry of config.json, which `apply_quantization` reads back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, OptionError

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
QUANTIZABLE = (nn.Linear, nn.Embedding)
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def check_settings(bits: Any, group_size: Any, where: str = "") -> None:
    """Raise OptionError unless MLX's affine quantization supports these settings."""
    if bits not in Q_BITS or isinstance(bits, bool):
        raise OptionError(f"{where}bits" if where else "q_bits", f"must be one of {Q_BITS}, got {bits!r}")
    if group_size not in Q_GROUP_SIZES or isinstance(group_size, bool):
        raise OptionError(
            f"{where}group_size" if where else "q_group_size", f"must be one of {Q_GROUP_SIZES}, got {group_size!r}"
        )


@dataclass(frozen=True)
class QuantRecipe:
    """Bits and group size for every quantizable module, with per-module overrides.

    Args:
        bits, group_size: the default for Linear layers and the embedding.
        overrides: module path (e.g. `transformer.layers.0.attn.out_proj`) -> {"bits", "group_size"},
            or None to keep that module in float.
    """

    bits: int = 4
    group_size: int = 64
    overrides: dict[str, dict[str, int] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_settings(self.bits, self.group_size)
        for path, o in self.overrides.items():
            if o is not None:
                check_settings(o.get("bits"), o.get("group_size"), where=f"{path}.")

    def settings_for(self, path: str) -> dict[str, int] | None:
        """{"bits", "group_size"} for the module at `path`, or None to keep it float."""
        if path in self.overrides:
            return self.overrides[path]
        return {"bits": self.bits, "group_size": self.group_size}

    def predicate(self, skipped: list[str]) -> Callable[[str, nn.Module], bool | dict[str, Any]]:
        """MLX's `class_predicate`: a module's settings, False for float; modules whose width the group
        size does not divide stay float and are appended to `skipped`."""

        def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
            if not isinstance(module, QUANTIZABLE):
                return False
            s = self.settings_for(path)
            if s is None:
                return False
            if module.weight.shape[-1] % s["group_size"]:
                skipped.append(path)
                return False
            return {"bits": s["bits"], "group_size": s["group_size"], "mode": "affine"}

        return predicate


def quantize_model(
    model: nn.Module, bits: int = 4, group_size: int = 64, recipe: QuantRecipe | None = None
) -> list[str]:
    """Quantize every Linear and the (tied) embedding in place (`recipe` overrides bits/group_size).

    Returns:
        The paths of layers left in float because the group size does not divide their width.

    Raises:
        OptionError: unsupported bits or group size.
    """
    recipe = recipe or QuantRecipe(bits, group_size)
    skipped: list[str] = []
    nn.quantize(model, group_size=recipe.group_size, bits=recipe.bits, class_predicate=recipe.predicate(skipped))
    return skipped


def quantization_settings(model: nn.Module) -> dict[str, Any] | None:
    """The mlx-lm `quantization` config entry for a model quantized with `nn.quantize`, or None.

    The most common (group_size, bits) is the default; modules that differ get their own entry.
    """
    found = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if isinstance(m, QUANTIZED)
    }
    if not found:
        return None
    settings = list(found.values())
    default = max(settings, key=settings.count)
    return {**default, **{p: s for p, s in found.items() if s != default}}


def apply_quantization(
    model: nn.Module, entry: Any, is_quantized: Callable[[str], bool], source: Path | str = "config.json"
) -> None:
    """Quantize the modules `is_quantized(path)` names, as a config's `quantization` entry says.

    Raises:
        CheckpointError: naming `source`, when the entry is malformed or names unsupported settings.
    """
    if not isinstance(entry, dict):
        raise CheckpointError(f'{source}: "quantization" must be an object')
    try:
        check_settings(entry.get("bits"), entry.get("group_size"), where="quantization.")
        for path, override in entry.items():
            if isinstance(override, dict):
                check_settings(override.get("bits"), override.get("group_size"), where=f"quantization.{path}.")
    except OptionError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if entry.get("mode", "affine") != "affine":
        raise CheckpointError(f"{source}: quantization mode {entry.get('mode')!r} is not supported (affine only)")

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not is_quantized(path):
            return False
        override = entry.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(model, group_size=entry["group_size"], bits=entry["bits"], class_predicate=predicate)


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per logical weight (scales and biases included)."""
    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters())) * 8
    logical = 0
    for _, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            logical += m.weight.size * 32 // m.bits
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            logical += m.weight.size
    return stored / logical
