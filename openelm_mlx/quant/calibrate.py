"""Calibrated quantization: activations recorded on calibration text, float16-overflow checks, GPTQ, and
per-module sensitivity for a bits-per-weight target. Builds on quantize.py (recipes, the bits planner).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..errors import CheckpointError, check_range
from ..evaluate.perplexity import kl_divergence, log_probs
from .recipes import (
    EMBEDDING,
    QuantRecipe,
    float_modules,
    logical_weights,
    planned_bits_per_weight,
    quantize_model,
    stored_bits,
)

FP16_MAX = 65504.0
LAYER_MODULES = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


class _Recorder(nn.Module):
    """Runs `module` and records, under `path` in `stats`, the peak |output| (over finite values), whether
    every output is finite, and optionally `X^T X` of its input (of its output with `head=True`)."""

    def __init__(self, module: nn.Module, path: str, stats: dict[str, dict], hessian: bool, head: bool = False):
        super().__init__()
        self.module = module
        self._where = (path, stats, hessian, head)
        stats[path] = {"peak": mx.array(0.0), "finite": mx.array(True), "H": None}

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        out = self.module(x, *args, **kwargs)
        path, stats, hessian, head = self._where
        s = stats[path]
        ok = mx.isfinite(out)
        s["peak"] = mx.maximum(s["peak"], mx.where(ok, mx.abs(out), 0).max().astype(mx.float32))
        s["finite"] = mx.logical_and(s["finite"], ok.all())
        if hessian:
            f = (out if head else x).reshape(-1, x.shape[-1]).astype(mx.float32)
            s["H"] = f.T @ f if s["H"] is None else s["H"] + f.T @ f
        return out


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` (a `named_modules` key)."""
    model.update_modules(tree_unflatten([(path, module)]))


def _watched(model: nn.Module) -> list[str]:
    """Module paths in execution order: each layer's projections, then the layer itself."""
    paths = []
    for i in range(len(model.layers)):
        paths += [f"transformer.layers.{i}.{m}" for m in LAYER_MODULES] + [f"transformer.layers.{i}"]
    return paths


def record(
    model: nn.Module, windows: mx.array, hessians: Sequence[str] = (), batch_size: int = 4
) -> dict[str, dict[str, Any]]:
    """Run `windows` through `model`, recording per module (and "logits") the peak |output| and finiteness,
    and `X^T X` of the inputs of the modules in `hessians` (for the embedding: the output head's input)."""
    stats: dict[str, dict] = {}
    tied = EMBEDDING in hessians and model.config.share_input_output_layers
    watched = _watched(model)
    targets = watched + [p for p in hessians if p not in watched and p != EMBEDDING]
    targets += ["transformer.norm"] if tied else []
    originals = {}
    for path in targets:
        head = path == "transformer.norm"
        originals[path] = dict(model.named_modules())[path]
        _put(model, path, _Recorder(originals[path], path, stats, path in hessians or head, head=head))
    stats["logits"] = {"peak": mx.array(0.0), "finite": mx.array(True), "H": None}
    try:
        for s in range(0, len(windows), batch_size):
            logits = model(windows[s : s + batch_size, :-1])
            ok = mx.isfinite(logits)
            lg = stats["logits"]
            lg["peak"] = mx.maximum(lg["peak"], mx.where(ok, mx.abs(logits), 0).max().astype(mx.float32))
            lg["finite"] = mx.logical_and(lg["finite"], ok.all())
            mx.eval([x for v in stats.values() for x in v.values() if x is not None])
    finally:
        for path, module in reversed(list(originals.items())):
            _put(model, path, module)
    if tied:
        stats[EMBEDDING] = stats.pop("transformer.norm")
    return stats


@dataclass
class Activations:
    """The largest |activation| seen (`peak`, at module `where`) and the first module with inf/nan, if any."""

    peak: float
    where: str
    bad: str | None


def check_activations(model: nn.Module, windows: mx.array) -> Activations:
    """Run calibration `windows` and report the peak activation and the first non-finite module output."""
    stats = record(model, windows)
    order = _watched(model) + ["logits"]
    bad = next((p for p in order if not stats[p]["finite"].item()), None)
    where = max(order, key=lambda p: stats[p]["peak"].item())
    return Activations(stats[where]["peak"].item(), where, bad)


def make_safe(model: nn.Module, windows: mx.array, source: str, what: str = "model") -> list[str]:
    """Keep `model` from emitting garbage: a float16 model whose activations pass 65504 (or become inf/nan)
    is cast to bfloat16 when float32 runs clean; otherwise non-finite outputs are refused.

    Returns:
        Notes on what was changed (empty when nothing was).

    Raises:
        CheckpointError: naming `source` and the first module with inf/nan outputs even in float32.
    """
    dtype = model.transformer.norm.weight.dtype
    act = check_activations(model, windows)
    if act.bad is None and (dtype != mx.float16 or act.peak <= FP16_MAX):
        return []
    if dtype != mx.float32:
        model.set_dtype(mx.float32)
        wide = check_activations(model, windows)
        if wide.bad is None:
            model.set_dtype(mx.bfloat16)
            return [
                f"{what}: activations reach {wide.peak:.4g} at {wide.where}, beyond float16's {FP16_MAX:.0f} "
                f"(inf/nan from {act.bad or act.where}); kept in bfloat16"
            ]
        act = wide
    raise CheckpointError(
        f"{source}: the {what} gives inf/nan outputs at {act.bad} on calibration text, even in float32; "
        "refusing to write a model that emits garbage"
    )


# ---------------------------------------------------------------- GPTQ


def pack(q: np.ndarray, bits: int) -> mx.array:
    """Pack integer levels `q` (rows, cols) LSB-first into uint32 words, MLX's affine layout for every width."""
    rows, cols = q.shape
    b = (q[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1
    b = b.reshape(rows, cols * bits // 32, 32).astype(np.uint64)
    return mx.array((b << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32))


def _inverse_hessian_factor(H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (GPTQ's `Hinv`)."""
    H = H.copy()
    d = np.arange(len(H))
    H[d, d] += damp * max(float(np.mean(np.diag(H))), 1e-8)
    return np.linalg.cholesky(np.linalg.inv(H)).T


def gptq_weight(w: mx.array, H: np.ndarray, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """GPTQ (Frantar et al. 2022) of one weight (out, in) given `H = X^T X` of its inputs: columns are
    rounded in order and each rounding error is spread over the columns not yet rounded.

    Returns:
        (packed weight, scales, biases) in MLX's affine layout, scales/biases in `w`'s dtype.
    """
    W = np.array(w.astype(mx.float32), dtype=np.float64)
    dead = np.diag(H) == 0
    H = H.astype(np.float64).copy()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(H)
    top = 2**bits - 1
    Q = np.zeros(W.shape, np.uint32)
    scales, biases = [], []
    for i in range(0, W.shape[1], group_size):
        j = i + group_size
        _, s, b = mx.quantize(mx.array(W[:, i:j]).astype(w.dtype), group_size=group_size, bits=bits)
        scales.append(s)
        biases.append(b)
        s, b = np.array(s.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
        err = np.zeros((W.shape[0], j - i))
        for k in range(i, j):
            q = np.clip(np.round((W[:, k] - b[:, 0]) / s[:, 0]), 0, top)
            Q[:, k] = q
            e = (W[:, k] - (s[:, 0] * q + b[:, 0])) / U[k, k]
            W[:, k:j] -= np.outer(e, U[k, k:j])
            err[:, k - i] = e
        W[:, j:] -= err @ U[i:j, j:]
    return pack(Q, bits), mx.concatenate(scales, axis=-1), mx.concatenate(biases, axis=-1)


def gptq_quantize(model: nn.Module, recipe: QuantRecipe, windows: mx.array, batch_size: int = 4) -> list[str]:
    """Quantize like `quantize_model` (same modules, settings and config entry), but with GPTQ weights
    computed from the calibration `windows` (the tied embedding via the output head's inputs).

    Returns:
        The paths of layers left in float.
    """
    plan = {}
    for path, m in float_modules(model).items():
        s = recipe.settings_for(path)
        if s is not None and m.weight.shape[-1] % s["group_size"] == 0:
            plan[path] = s
    usable = [p for p in plan if p != EMBEDDING or model.config.share_input_output_layers]
    stats = record(model, windows, hessians=usable, batch_size=batch_size)
    solved = {}
    modules = dict(model.named_modules())
    for path in usable:
        H = np.array(stats[path].pop("H"), dtype=np.float64)
        solved[path] = gptq_weight(modules[path].weight, H, plan[path]["bits"], plan[path]["group_size"])
        mx.eval(solved[path])
    skipped = quantize_model(model, recipe=recipe)
    modules = dict(model.named_modules())  # now the quantized ones
    for path, (wq, scales, biases) in solved.items():
        modules[path].weight, modules[path].scales, modules[path].biases = wq, scales, biases
    return skipped


# ---------------------------------------------------------------- bits per weight target

SENSITIVITY_BITS = (2, 3, 4, 6, 8)


def _fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return mx.dequantize(q, s, b, group_size=group_size, bits=bits).astype(w.dtype)


def measure_sensitivity(
    model: nn.Module, windows: mx.array, group_size: int, candidates: Sequence[int] = SENSITIVITY_BITS
) -> dict[str, dict[int, float]]:
    """For each quantizable module and bit width: the mean KL divergence of the model's next-token
    distribution on `windows` from the float model's when only that module is quantized (round to nearest)."""
    inputs = windows[:, :-1]
    ref = log_probs(model(inputs))
    mx.eval(ref)
    out: dict[str, dict[int, float]] = {}
    for path, module in float_modules(model).items():
        if module.weight.shape[-1] % group_size:
            continue
        w = module.weight
        out[path] = {}
        for bits in candidates:
            module.weight = _fake_quantize(w, bits, group_size)
            out[path][bits] = max(kl_divergence(ref, model(inputs)).mean().item(), 0.0)
        module.weight = w
    return out


def allocate_bits(
    model: nn.Module, sensitivity: dict[str, dict[int, float]], target_bpw: float, base: QuantRecipe
) -> QuantRecipe:
    """Bits per module reaching at most `target_bpw`: start every measured module at its fewest bits, then
    repeatedly take the upgrade with the largest KL reduction per stored bit that still fits.

    Modules `base` overrides keep their settings. Raises OptionError when the target is out of reach.
    """
    free = {p: s for p, s in sensitivity.items() if p not in base.overrides}
    choice = {p: min(s) for p, s in free.items()}
    modules = float_modules(model)

    def recipe() -> QuantRecipe:
        bits = max(set(choice.values()), key=list(choice.values()).count) if choice else base.bits
        over = {p: {"bits": b, "group_size": base.group_size} for p, b in choice.items() if b != bits}
        return QuantRecipe(bits, base.group_size, {**over, **base.overrides})

    low, high = planned_bits_per_weight(model, recipe()), _bpw_at(model, base, free, max(SENSITIVITY_BITS))
    check_range("target_bpw", target_bpw, round(low - 0.005, 2), round(high + 0.005, 2))
    budget = target_bpw * logical_weights(model) - _stored_total(model, recipe())
    g = base.group_size
    while True:
        best = None
        for p, kl in free.items():
            cur = stored_bits(modules[p], {"bits": choice[p], "group_size": g})
            for b in (b for b in kl if b > choice[p]):
                cost = stored_bits(modules[p], {"bits": b, "group_size": g}) - cur
                gain = (kl[choice[p]] - kl[b]) / cost
                if cost <= budget and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, p, b, cost)
        if best is None:
            return recipe()
        choice[best[1]] = best[2]
        budget -= best[3]


def _stored_total(model: nn.Module, recipe: QuantRecipe) -> float:
    return planned_bits_per_weight(model, recipe) * logical_weights(model)


def _bpw_at(model: nn.Module, base: QuantRecipe, free: dict[str, Any], bits: int) -> float:
    over = {p: {"bits": bits, "group_size": base.group_size} for p in free}
    return planned_bits_per_weight(model, QuantRecipe(base.bits, base.group_size, {**over, **base.overrides}))
