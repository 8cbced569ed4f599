"""Affine quantization of an OpenELM with MLX's own `nn.quantize`: settings checks, recipes (uniform, mixed,
per module), the config's `quantization` entry, and bits-per-weight planning. Calibrated methods are in
calibrate.py; quantizing a model folder is quantize_run.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError, OptionError

# The one place for the quantization defaults and choices (MLX's affine modes); help text is derived from them.
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
QUANTIZABLE = (nn.Linear, nn.Embedding)
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def one_of(choices: Any) -> str:
    """`(2, 3, 4)` -> "2, 3 or 4" (for help text)."""
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


BITS_HELP = f"Bits per weight: {one_of(Q_BITS)}."
GROUP_SIZE_HELP = f"Quantization group size: {one_of(Q_GROUP_SIZES)}."


def check_settings(bits: Any, group_size: Any, prefix: str = "") -> None:
    """Raise OptionError, naming `{prefix}bits` or `{prefix}group_size`, unless MLX's affine quantization
    supports these settings."""
    if bits not in Q_BITS or isinstance(bits, bool):
        raise OptionError(f"{prefix}bits", f"must be one of {Q_BITS}, got {bits!r}")
    if group_size not in Q_GROUP_SIZES or isinstance(group_size, bool):
        raise OptionError(f"{prefix}group_size", f"must be one of {Q_GROUP_SIZES}, got {group_size!r}")


@dataclass(frozen=True)
class QuantRecipe:
    """Bits and group size for every quantizable module, with per-module overrides.

    Args:
        bits, group_size: the default for Linear layers and the embedding.
        overrides: module path (e.g. `transformer.layers.0.attn.out_proj`) -> {"bits", "group_size"},
            or None to keep that module in float.
    """

    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    overrides: dict[str, dict[str, int] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_settings(self.bits, self.group_size)
        for path, o in self.overrides.items():
            if o is not None:
                check_settings(o.get("bits"), o.get("group_size"), prefix=f"{path}.")

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
    model: nn.Module, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE, recipe: QuantRecipe | None = None
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
        check_settings(entry.get("bits"), entry.get("group_size"), prefix="quantization.")
        for path, override in entry.items():
            if isinstance(override, dict):
                check_settings(override.get("bits"), override.get("group_size"), prefix=f"quantization.{path}.")
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


# ---------------------------------------------------------------- recipes

RECIPES = {"mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
EMBEDDING = "transformer.token_embeddings"
HEAD = "lm_head"


def float_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The float Linear and Embedding modules by path (what a recipe can quantize)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, QUANTIZABLE) and not isinstance(m, QUANTIZED)}


def sensitive_layers(num_layers: int) -> list[int]:
    """Layers whose out_proj/proj_2 get more bits in the mixed recipes: the first and last eighth (at least
    the first and last layer) and every third layer in between (mlx-lm's and llama.cpp's Q4_K_M choice)."""
    lo, hi = max(1, num_layers // 8), min(num_layers - 1, 7 * num_layers // 8)
    return [i for i in range(num_layers) if i < lo or i >= hi or (i - num_layers // 8) % 3 == 2]


def check_recipe(name: Any) -> None:
    """Raise OptionError (naming `recipe`) unless `name` is one of the mixed recipes."""
    if name not in RECIPES:
        raise OptionError("recipe", f"must be one of {', '.join(RECIPES)}, got {name!r}")


def mixed_recipe(name: str, model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> QuantRecipe:
    """`mixed_3_6` / `mixed_4_6`: 3 (4) bits, with 6 bits for the embedding (= tied output head) and the
    out_proj and proj_2 of the `sensitive_layers`.

    Raises:
        OptionError: unknown recipe name.
    """
    check_recipe(name)
    low, high = RECIPES[name]
    hi = {"bits": high, "group_size": group_size}
    overrides = {p: hi for p in float_modules(model) if p in (EMBEDDING, HEAD)}
    for i in sensitive_layers(len(model.layers)):
        overrides.update({f"transformer.layers.{i}.{m}": hi for m in ("attn.out_proj", "ffn.proj_2")})
    return QuantRecipe(low, group_size, overrides)


def parse_embedding_bits(value: int | str | None) -> int | None | str:
    """None (no change), "float", or a bit width for the embedding (and tied head).

    Raises:
        OptionError: anything else.
    """
    if value is None or value == "float":
        return value
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in Q_BITS:
        raise OptionError("embedding_bits", f"must be one of {Q_BITS} or float, got {value!r}")
    return bits


def with_embedding_bits(recipe: QuantRecipe, model: nn.Module, embedding_bits: int | str | None) -> QuantRecipe:
    """`recipe` with the embedding and output head at `embedding_bits` ("float": not quantized)."""
    if embedding_bits is None:
        return recipe
    setting = None if embedding_bits == "float" else {"bits": int(embedding_bits), "group_size": recipe.group_size}
    heads = {p: setting for p in float_modules(model) if p in (EMBEDDING, HEAD)}
    return QuantRecipe(recipe.bits, recipe.group_size, {**recipe.overrides, **heads})


# ---------------------------------------------------------------- bits-per-weight planner


def logical_weights(model: nn.Module) -> int:
    """The weights `bits_per_weight` divides by, counted on a float model (Linear, Embedding, RMSNorm)."""
    return sum(m.weight.size for _, m in model.named_modules() if isinstance(m, (*QUANTIZABLE, nn.RMSNorm)))


def stored_bits(module: nn.Module, setting: dict[str, int] | None) -> int:
    """Bits `module`'s weight takes on disk under `setting` (float when None or undividable)."""
    w = module.weight
    if setting is None or w.shape[-1] % setting["group_size"]:
        return w.size * w.dtype.size * 8
    return w.size * setting["bits"] + (w.size // setting["group_size"]) * 2 * w.dtype.size * 8


def planned_bits_per_weight(model: nn.Module, recipe: QuantRecipe) -> float:
    """The `bits_per_weight` a float model will have once `quantize_model(model, recipe=recipe)` runs."""
    modules = float_modules(model)
    stored = sum(stored_bits(m, recipe.settings_for(p)) for p, m in modules.items())
    quantizable = {f"{p}.weight" for p in modules}
    stored += sum(v.nbytes * 8 for k, v in tree_flatten(model.parameters()) if k not in quantizable)
    return stored / logical_weights(model)
