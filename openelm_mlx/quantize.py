"""Affine quantization of an OpenELM with MLX's own `nn.quantize`: recipes (uniform, mixed, per module), the
config's `quantization` entry, and `quantize_folder` / `dequantize_folder`, the file-level entry points.
Calibrated methods (GPTQ, sensitivity for a bits-per-weight target, overflow checks) are in calibrate.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import CheckpointError, OptionError, TokenizerNotFoundError, check_range

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


# ---------------------------------------------------------------- recipes

RECIPES = {"mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
METHODS = ("rtn", "gptq")
EMBEDDING = "transformer.token_embeddings"
HEAD = "lm_head"
FP16_MAX = 65504.0
LAYER_MODULES = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


def float_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The float Linear and Embedding modules by path (what a recipe can quantize)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, QUANTIZABLE) and not isinstance(m, QUANTIZED)}


def sensitive_layers(num_layers: int) -> list[int]:
    """Layers whose out_proj/proj_2 get more bits in the mixed recipes: the first and last eighth (at least
    the first and last layer) and every third layer in between (mlx-lm's and llama.cpp's Q4_K_M choice)."""
    lo, hi = max(1, num_layers // 8), min(num_layers - 1, 7 * num_layers // 8)
    return [i for i in range(num_layers) if i < lo or i >= hi or (i - num_layers // 8) % 3 == 2]


def mixed_recipe(name: str, model: nn.Module, group_size: int = 64) -> QuantRecipe:
    """`mixed_3_6` / `mixed_4_6`: 3 (4) bits, with 6 bits for the embedding (= tied output head) and the
    out_proj and proj_2 of the `sensitive_layers`.

    Raises:
        OptionError: unknown recipe name.
    """
    if name not in RECIPES:
        raise OptionError("recipe", f"must be one of {', '.join(RECIPES)}, got {name!r}")
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


def _stored_bits(module: nn.Module, setting: dict[str, int] | None) -> int:
    """Bits `module`'s weight takes on disk under `setting` (float when None or undividable)."""
    w = module.weight
    if setting is None or w.shape[-1] % setting["group_size"]:
        return w.size * w.dtype.size * 8
    return w.size * setting["bits"] + (w.size // setting["group_size"]) * 2 * w.dtype.size * 8


def planned_bits_per_weight(model: nn.Module, recipe: QuantRecipe) -> float:
    """The `bits_per_weight` a float model will have once `quantize_model(model, recipe=recipe)` runs."""
    modules = float_modules(model)
    stored = sum(_stored_bits(m, recipe.settings_for(p)) for p, m in modules.items())
    quantizable = {f"{p}.weight" for p in modules}
    stored += sum(v.nbytes * 8 for k, v in tree_flatten(model.parameters()) if k not in quantizable)
    return stored / _logical(model)


# ---------------------------------------------------------------- calibration: activations and Hessians


def _logical(model: nn.Module) -> int:
    return sum(m.weight.size for _, m in model.named_modules() if isinstance(m, (*QUANTIZABLE, nn.RMSNorm)))


BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Machine learning models run on many devices today.\n"
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    "def main():\n    print('hello, world')\n\nThe capital of France is Paris; 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.\n"
)


@dataclass
class QuantizeReport:
    """What `quantize_folder` / `dequantize_folder` did; perplexities and KL only when evaluated."""

    output: Path
    bits_per_weight: float | None
    bytes_on_disk: int
    float_layers: list[str]
    quantization: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kl: float | None = None
    seconds: float = 0.0


@dataclass
class QuantizeOptions:
    """Settings of `quantize_folder` (checked before any model is loaded, by `check`)."""

    bits: int = 4
    group_size: int = 64
    recipe: str | None = None
    target_bpw: float | None = None
    method: str = "rtn"
    calib: tuple[str, ...] = ()
    embedding_bits: int | str | None = None
    eval_data: tuple[str, ...] = ()
    seq_len: int = 256
    num_samples: int = 32
    batch_size: int = 4

    def check(self) -> None:
        """Raise OptionError for an unsupported or contradictory setting."""
        if self.bits not in Q_BITS or isinstance(self.bits, bool):
            raise OptionError("bits", f"must be one of {Q_BITS}, got {self.bits!r}")
        if self.group_size not in Q_GROUP_SIZES or isinstance(self.group_size, bool):
            raise OptionError("group_size", f"must be one of {Q_GROUP_SIZES}, got {self.group_size!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise OptionError("recipe", f"must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_range("target_bpw", self.target_bpw, 2.0, 32.0)
        if self.target_bpw is not None and self.recipe is not None:
            raise OptionError("target_bpw", "give a bits-per-weight target or a recipe, not both")
        if (self.method == "gptq" or self.target_bpw is not None) and not self.calib:
            raise OptionError("calib", "calibration text is needed for gptq and for a bits-per-weight target")
        parse_embedding_bits(self.embedding_bits)
        for name in ("seq_len", "num_samples", "batch_size"):
            check_range(name, getattr(self, name), 1, integer=True)


def _load_float(src: str | Path) -> tuple[nn.Module, Any]:
    """The model and its tokenizer (None if the folder has none); refuses a quantized model."""
    from .io import load, load_model

    try:
        model, tok = load(src)
    except TokenizerNotFoundError:
        model, tok = load_model(src), None
    if any(isinstance(m, QUANTIZED) for _, m in model.named_modules()):
        raise CheckpointError(f"{src}: already quantized; quantize a float model (or dequantize this one first)")
    return model, tok


def _windows(tok: Any, paths: Sequence[str], opts: QuantizeOptions, vocab: int) -> mx.array:
    """Windows of the text in `paths` (of the built-in sentences when none; random ids without a tokenizer)."""
    from .eval import make_windows, text_windows

    if paths:
        if tok is None:
            raise TokenizerNotFoundError(f"{paths[0]}: reading text needs a tokenizer beside the model")
        return text_windows(tok, list(paths), opts.seq_len, opts.num_samples)
    if tok is None:
        return mx.array(np.random.default_rng(0).integers(3, vocab, (4, 65)).astype(np.int32))
    return make_windows(tok.encode(BUILTIN_TEXT, add_bos=False), 64, tok.bos_id, source="built-in text")


def build_recipe(model: nn.Module, opts: QuantizeOptions, calib: mx.array) -> QuantRecipe:
    from .calibrate import allocate_bits, measure_sensitivity  # calibrate builds on this module

    """The recipe `opts` asks for: uniform, a named mixed recipe, or a bits-per-weight target."""
    if opts.recipe is not None:
        recipe = mixed_recipe(opts.recipe, model, opts.group_size)
    else:
        recipe = QuantRecipe(opts.bits, opts.group_size)
    recipe = with_embedding_bits(recipe, model, parse_embedding_bits(opts.embedding_bits))
    if opts.target_bpw is not None:
        sens = measure_sensitivity(model, calib[: opts.batch_size], opts.group_size)
        recipe = allocate_bits(model, sens, opts.target_bpw, recipe)
    return recipe


def quantize_folder(
    src: str | Path, dst: str | Path, opts: QuantizeOptions, force: bool = False, progress: bool = False
) -> QuantizeReport:
    """Quantize the float model folder `src` into `dst` (atomically, with its tokenizer), checking on
    calibration text that it stays finite, and, with `opts.eval_data`, measuring its quality.

    Raises:
        OptionError, CheckpointError, DataError: before anything is written.
    """
    from .calibrate import gptq_quantize, make_safe  # these modules build on this one
    from .eval import mean_kl, perplexity
    from .io import load_model, save

    tic = time.perf_counter()
    opts.check()
    model, tok = _load_float(src)
    calib = _windows(tok, opts.calib, opts, model.config.vocab_size)
    evaluation = _windows(tok, opts.eval_data, opts, model.config.vocab_size) if opts.eval_data else None
    notes = make_safe(model, calib, str(src))
    recipe = build_recipe(model, opts, calib)
    if opts.method == "gptq":
        skipped = gptq_quantize(model, recipe, calib, opts.batch_size)
    else:
        skipped = quantize_model(model, recipe=recipe)
    mx.eval(model.parameters())
    notes += make_safe(model, calib, str(src), what="quantized model")
    save(model, dst, tokenizer=tok, force=force)
    report = QuantizeReport(
        Path(dst), bits_per_weight(model), _weight_bytes(dst), skipped, quantization_settings(model), notes
    )
    if evaluation is not None:
        reference = load_model(src)
        reference.set_dtype(model.transformer.norm.weight.dtype)
        report.perplexity_before = perplexity(reference, evaluation, opts.batch_size, progress).perplexity
        report.perplexity_after = perplexity(model, evaluation, opts.batch_size, progress).perplexity
        report.kl = mean_kl(reference, model, evaluation, opts.batch_size, progress)
    report.seconds = time.perf_counter() - tic
    return report


def dequantize_folder(src: str | Path, dst: str | Path, force: bool = False) -> QuantizeReport:
    """Write the quantized model folder `src` back in float (the dtype of its scales) into `dst`."""
    from mlx_lm.utils import dequantize_model

    from .io import load, load_model, save

    tic = time.perf_counter()
    try:
        model, tok = load(src)
    except TokenizerNotFoundError:
        model, tok = load_model(src), None
    if not any(isinstance(m, QUANTIZED) for _, m in model.named_modules()):
        raise CheckpointError(f"{src}: not quantized; nothing to dequantize")
    model = dequantize_model(model)
    save(model, dst, tokenizer=tok, force=force)
    report = QuantizeReport(Path(dst), None, _weight_bytes(dst), [], None)
    report.seconds = time.perf_counter() - tic
    return report


def _weight_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors"))
