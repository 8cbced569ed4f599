"""Quantizing a model folder: `QuantizeOptions` (the one place for the workflow's defaults and help), the
recipe they ask for, and `quantize_folder` / `dequantize_folder` with their `QuantizeReport`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import dequantize_model

from ..errors import CheckpointError, OptionError, TokenizerNotFoundError, check_range, settings_field
from ..evaluate.perplexity import SEQ_LEN_HELP, make_windows, mean_kl, perplexity, text_windows, window_length
from ..folders.fs import check_output
from ..folders.io import load_model, save
from ..generation.tokenizer import find_tokenizer
from .calibrate import allocate_bits, gptq_quantize, make_safe, measure_sensitivity
from .recipes import (
    BITS_HELP,
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    GROUP_SIZE_HELP,
    QUANTIZED,
    RECIPES,
    QuantRecipe,
    bits_per_weight,
    check_recipe,
    check_settings,
    mixed_recipe,
    one_of,
    parse_embedding_bits,
    quantization_settings,
    quantize_model,
    with_embedding_bits,
)

METHODS = ("rtn", "gptq")
RTN_SETTINGS = ("bits", "group_size", "recipe", "embedding_bits")  # what needs no calibration text
BUILTIN_WINDOW = 64  # tokens per window of the built-in sentences (fewer when the model's context is shorter)
BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Machine learning models run on many devices today.\n"
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    "def main():\n    print('hello, world')\n\nThe capital of France is Paris; 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.\n"
)


def _paths(value: Any) -> tuple[str, ...]:
    return (str(value),) if isinstance(value, (str, Path)) else tuple(map(str, value))


@dataclass(frozen=True)
class QuantizeOptions:
    """Settings of `quantize_folder`, checked when built (before any model is loaded).

    Each field with help is also a `quantize` CLI option, with this default; `eval_data` is the CLI's `--eval`.
    `calib` and `eval_data` take paths (one or several); `embedding_bits` a bit width ("6" or 6) or "float".
    """

    bits: int = settings_field(DEFAULT_BITS, BITS_HELP)
    group_size: int = settings_field(DEFAULT_GROUP_SIZE, GROUP_SIZE_HELP)
    recipe: str | None = settings_field(
        None, f"Mixed precision: {one_of(RECIPES)} (more bits for the embedding and sensitive layers)."
    )
    target_bpw: float | None = settings_field(
        None, "Allocate bits per layer from measured sensitivity (needs --calib)."
    )
    method: str = settings_field("rtn", "rtn (round to nearest) or gptq (needs calibration text).")
    calib: tuple[str, ...] = settings_field((), "Calibration text (.txt/.jsonl); repeatable.")
    embedding_bits: str | None = settings_field(None, "Bits for the embedding and tied output head, or 'float'.")
    eval_data: tuple[str, ...] = ()
    seq_len: int | None = settings_field(None, f"{SEQ_LEN_HELP} For calibration and evaluation text.")
    num_samples: int = settings_field(32, "Windows of calibration/evaluation text to use.")
    batch_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib", _paths(self.calib))
        object.__setattr__(self, "eval_data", _paths(self.eval_data))
        check_settings(self.bits, self.group_size)
        if self.recipe is not None:
            check_recipe(self.recipe)
            if self.bits != QuantizeOptions.bits:
                raise OptionError("bits", f"is set by the recipe {self.recipe!r}; give one or the other")
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

    @property
    def needs_calibration(self) -> bool:
        """GPTQ and a bits-per-weight target read calibration text; round to nearest does not."""
        return self.method != "rtn" or self.target_bpw is not None


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


def _load(src: str | Path) -> tuple[nn.Module, Any]:
    """The model and its tokenizer (None if the folder has none), the model loaded once."""
    model = load_model(src)
    try:
        return model, find_tokenizer(Path(src))
    except TokenizerNotFoundError:
        return model, None


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def _load_float(src: str | Path) -> tuple[nn.Module, Any]:
    """`_load`, refusing a quantized model."""
    model, tok = _load(src)
    if _is_quantized(model):
        raise CheckpointError(f"{src}: already quantized; quantize a float model (or dequantize this one first)")
    return model, tok


def _weight_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("model*.safetensors"))


def _windows(tok: Any, paths: Sequence[str], opts: QuantizeOptions, seq_len: int | None, config: Any) -> mx.array:
    """Windows of `seq_len` tokens of the text in `paths`; without paths, of the built-in sentences (random ids
    without a tokenizer), in windows that fit the model's context."""
    if paths:
        if tok is None:
            raise TokenizerNotFoundError(f"{paths[0]}: reading text needs a tokenizer beside the model")
        return text_windows(tok, list(paths), seq_len, opts.num_samples)
    length = min(BUILTIN_WINDOW, config.max_context_length)
    if tok is None:
        return mx.array(np.random.default_rng(0).integers(3, config.vocab_size, (4, length + 1)).astype(np.int32))
    return make_windows(tok.encode(BUILTIN_TEXT, add_bos=False), length, tok.bos_id, source="built-in text")


def build_recipe(model: nn.Module, opts: QuantizeOptions, calib: mx.array | None = None) -> QuantRecipe:
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


def check_rtn(opts: QuantizeOptions) -> None:
    """Raise OptionError unless `opts` quantizes by round to nearest (a uniform setting or a recipe)."""
    if opts.needs_calibration:
        name = "target_bpw" if opts.target_bpw is not None else "method"
        raise OptionError(name, "needs calibration text; this quantizes by round to nearest only")


def quantize_rtn(model: nn.Module, opts: QuantizeOptions) -> list[str]:
    """Quantize `model` in place by round to nearest as `opts` asks (bits, group size, recipe, embedding bits).

    Returns:
        The paths of layers left in float because the group size does not divide their width.
    """
    check_rtn(opts)
    return quantize_model(model, recipe=build_recipe(model, opts))


def quantize_folder(
    src: str | Path, dst: str | Path, opts: QuantizeOptions, force: bool = False, progress: bool = False
) -> QuantizeReport:
    """Quantize the float model folder `src` into `dst` (atomically, with its tokenizer), checking on
    calibration text that it stays finite, and, with `opts.eval_data`, measuring its quality.

    Raises:
        OptionError, CheckpointError, DataError: before anything is written.
    """
    tic = time.perf_counter()
    check_output(dst, force, "model", (src,))  # before any calibration work
    model, tok = _load_float(src)
    # The window length matters only for text: checked (or shrunk to the model's context) only then.
    seq_len, shrunk = window_length(model.config, opts.seq_len) if opts.calib or opts.eval_data else (None, None)
    notes = [shrunk] if shrunk else []
    calib = _windows(tok, opts.calib, opts, seq_len, model.config)
    evaluation = _windows(tok, opts.eval_data, opts, seq_len, model.config) if opts.eval_data else None
    notes += make_safe(model, calib, str(src))
    recipe = build_recipe(model, opts, calib)
    if opts.method == "gptq":
        skipped = gptq_quantize(model, recipe, calib, opts.batch_size)
    else:
        skipped = quantize_model(model, recipe=recipe)
    mx.eval(model.parameters())
    notes += make_safe(model, calib, str(src), what="quantized model")
    save(model, dst, tokenizer=tok, force=force, inputs=(src,))
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
    """Write the quantized model folder `src` back in float (the dtype of its scales) into `dst`.

    Raises:
        CheckpointError: `src` is not quantized.
    """
    check_output(dst, force, "model", (src,))
    tic = time.perf_counter()
    model, tok = _load(src)
    if not _is_quantized(model):
        raise CheckpointError(f"{src}: not quantized; nothing to dequantize")
    save(dequantize_model(model), dst, tokenizer=tok, force=force, inputs=(src,))
    return QuantizeReport(Path(dst), None, _weight_bytes(dst), [], None, seconds=time.perf_counter() - tic)
