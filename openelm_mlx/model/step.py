"""A compiled single-token decode step for MLX's CPU backend, built from the model's own modules.

On the CPU backend every primitive costs microseconds of dispatch, and an eager 270M decode step is ~2,300 primitives
around 65 matrix-vector products. This step runs the same `Model.__call__` inside one `mx.compile`d function, with the
KV-cache writes inside, on caches that hold one row or a batch of rows at different positions (mlx-lm's `KVCache` and
`BatchKVCache`). Only the elementwise kernels may differ from the eager model's (`Kernels`): with `exp="power"` the
SiLU and the attention softmax compute e ** x (libm's `powf`), which MLX's x86-64 wheel runs over twice as fast as its
scalar `exp`. Anything else (a prompt chunk, another cache type, training mode, the GPU, where the fused kernels
already are) goes through the model as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import weakref
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from .decoder import Kernels, Model

Exp = Literal["native", "power"]
EXPS: tuple[Exp, ...] = ("native", "power")


def default_exp() -> Exp:
    """ "power" on x86-64 CPUs, where MLX's wheel computes `exp` in scalar code calling libm's `fmaf` (12.8 ns per
    element against 4.4 for `powf`, measured), "native" elsewhere (Apple silicon and the GPU have a vector `exp`)."""
    return "power" if platform.machine().lower() in ("x86_64", "amd64") else "native"


def power_exp(x: mx.array) -> mx.array:
    """float32's e raised to `x`: exp(x) within 3e-8 * |x| relative (e is 3e-8 off in float32)."""
    return mx.power(math.e, x)


def _power_silu(x: mx.array) -> mx.array:
    """x / (1 + e ** -x), in float32 (float16's exp(-x) overflows past x = -11)."""
    xf = x.astype(mx.float32)
    return (xf / (1 + power_exp(-xf))).astype(x.dtype)


def _power_attention(q: mx.array, k: mx.array, v: mx.array, cache: Any, scale: float, mask: Any) -> mx.array:
    """Grouped attention of a few query positions over the cache, softmax through e ** x in float32.

    q (B, n_heads, L, head_dim); k, v (B, n_kv_heads, S, head_dim); mask: a boolean array broadcasting to
    (B, n_heads, L, S) or None.
    """
    B, n_heads, L, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    q = (q * scale).reshape(B, n_kv_heads, group * L, head_dim)  # query heads by shared kv head
    scores = q @ k.swapaxes(-1, -2)  # (B, n_kv_heads, group * L, S)
    # One query position and a mask the same for every head: the mask broadcasts over the grouped layout as it is
    # (two reshapes fewer per layer in a decode step).
    grouped = L == 1 and (mask is None or mask.ndim < 3 or mask.shape[-3] == 1)
    if not grouped:
        scores = scores.reshape(B, n_heads, L, -1)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    s = scores.astype(mx.float32)
    e = power_exp(s - s.max(axis=-1, keepdims=True))
    probs = (e / e.sum(axis=-1, keepdims=True)).astype(q.dtype)
    out = (probs if grouped else probs.reshape(B, n_kv_heads, group * L, -1)) @ v
    return out.reshape(B, n_heads, L, head_dim)


class RopeTables:
    """RoPE at one position per row (`offset` (B,)) or per token (`offset` (B, T)) as
    `x * cos + swap_halves(x) * sin`, the tables made once per forward pass (one offset array serves every layer)
    instead of once per call as `mx.fast.rope`'s CPU fallback does."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int, float], tuple[mx.array, mx.array, mx.array]] = {}

    def __call__(self, x: mx.array, head_dim: int, base: float, offset: mx.array) -> mx.array:
        key = (id(offset), head_dim, base)
        if key not in self.tables:
            half = head_dim // 2
            inv_freq = mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half))  # base ** (-2i / d)
            theta = offset.astype(mx.float32)[..., None] * inv_freq  # (B, half) or (B, T, half)
            cos, sin = mx.cos(theta), mx.sin(theta)
            shape = (offset.shape[0], 1, -1, head_dim)  # broadcast over (B, heads, positions, head_dim)
            self.tables[key] = (
                offset,
                mx.concatenate([cos, cos], -1).reshape(shape),
                mx.concatenate([-sin, sin], -1).reshape(shape),
            )
        _, cos, sin = self.tables[key]
        half = x.shape[-1] // 2
        swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
        return (x.astype(mx.float32) * cos + swapped.astype(mx.float32) * sin).astype(x.dtype)


def exp_kernels(exp: Exp) -> Kernels:
    """The kernels `exp` decides (SiLU, and attention's softmax; `attention` takes a boolean mask), with the
    model's own RoPE: for other forward passes that want the step's exp, e.g. evaluation's packed rows."""
    if exp == "native":
        return Kernels()
    return Kernels(silu=_power_silu, attention=_power_attention)


def _kernels(exp: Exp) -> Kernels:
    """The step's kernels (made per trace: the RoPE tables are per step)."""
    return dataclasses.replace(exp_kernels(exp), rope=RopeTables())


WINDOW_STEP = 64  # attention reads the cache's first columns in multiples of this (each width is its own trace)


class _StepCache:
    """One layer's cache inside the traced step: preallocated buffers, the column this step writes, each row's first
    valid column (left padding) and so its position (for RoPE), all arrays so one trace serves every step. Attention
    reads the first `window` columns (those written, rounded up), not the whole buffer: at batch 8 on the demo model a
    step over 256 columns took 2.8 ms and over 64 columns 2.3 ms."""

    def __init__(
        self, keys: mx.array, values: mx.array, column: mx.array, offset: mx.array, start: mx.array, window: int
    ):
        self.keys, self.values, self.column, self.offset, self.start = keys, values, column, offset, start
        self.window = window

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k, self.column, axes=(2,))  # (B, n_kv_heads, capacity, head_dim)
        self.values = mx.slice_update(self.values, v, self.column, axes=(2,))
        return self.keys[:, :, : self.window], self.values[:, :, : self.window]

    def make_mask(self, N: int, **kwargs: Any) -> mx.array:
        """(B, 1, 1, window): a row sees its own columns up to the one written now (later ones are unwritten or
        left by a trim)."""
        cols = mx.arange(self.window)
        return ((cols >= self.start[:, None]) & (cols <= self.column))[:, None, None, :]


def _step_fn(holder: list[Model], exp: Exp) -> Any:
    """The function to compile: (tokens (B, 1), column (1,), starts (B,) or (1,), window, keys, values) ->
    (logits (B, 1, V), keys, values), on the model in `holder` (whose weights are the trace's implicit inputs).
    A row's position is `column - start`, as in mlx-lm's BatchKVCache (`offset == _idx - left_padding`).
    `window` is an array whose length is the attention window: an input shape, so each width is its own trace."""

    def step(
        tokens: mx.array,
        column: mx.array,
        start: mx.array,
        window: mx.array,
        keys: list,
        values: list,
    ):
        offset = column - start  # one array for every layer: RopeTables makes its tables once
        caches = [_StepCache(k, v, column, offset, start, window.shape[0]) for k, v in zip(keys, values)]
        logits = holder[0](tokens[:, 0], caches, _kernels(exp))[:, None]  # rows of (B, D) inside: see Attention
        return logits, [c.keys for c in caches], [c.values for c in caches]

    return step


def _layout(cache: list[Any] | None) -> tuple[type, int] | None:
    """(cache type, write column) when every layer holds one plain or batch KV cache at one column with room."""
    if not cache:
        return None
    first = cache[0]
    kind = type(first)
    if kind not in (KVCache, BatchKVCache) or first.keys is None:
        return None
    column = first.offset if kind is KVCache else first._idx
    capacity = first.keys.shape[2]
    if column >= capacity:
        return None
    same = (c.offset if kind is KVCache else c._idx for c in cache[1:])
    if any(type(c) is not kind or c.keys is None or c.keys.shape[2] != capacity for c in cache[1:]):
        return None
    return (kind, column) if all(col == column for col in same) else None


CAPACITY_STEP = 256  # mlx-lm's cache growth step


def _round_capacity(cache: list[Any]) -> None:
    """Pad the buffers to a multiple of 256 positions: a batch cache's `filter`/`extend` leave any capacity, and each
    new capacity would be a new trace of the step. The columns added lie past the write column (masked, unread)."""
    capacity = cache[0].keys.shape[2]
    extra = -capacity % CAPACITY_STEP
    if extra:
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        for c in cache:
            c.keys, c.values = mx.pad(c.keys, pad), mx.pad(c.values, pad)


@functools.cache
def _zeros(n: int) -> mx.array:
    """No left padding for `n` rows (made once: an array made per step costs the step its making)."""
    return mx.zeros((n,), dtype=mx.int32)


@functools.cache
def _window_array(n: int) -> mx.array:
    """A length-`n` array standing for the attention window (its shape is the step's input)."""
    return mx.zeros((n,), dtype=mx.int8)


class _CompiledStep:
    """A model's compiled step for one choice of kernels. The weights are the compiled function's implicit inputs,
    read at each call, so it follows `model.update`; MLX traces it again for each new combination of input shapes
    and dtypes (batch size, cache capacity, quantized or adapted modules). A change that keeps every parameter's
    shape and dtype (an RMSNorm's `eps`, a LoRA layer's `scale`) is not seen: make a new model for that."""

    def __init__(self, exp: Exp):
        # MLX reads the implicit inputs from `holder` at each call: the model is put in for the call only, so the
        # compiled function never keeps it alive.
        self.holder: list[Model] = []
        self.fn = mx.compile(_step_fn(self.holder, exp), inputs=self.holder)
        self.traced: set[tuple] = set()


# Kept beside the model, not on it (a model carries no generation state), by id: MLX modules are dicts, which a
# WeakKeyDictionary cannot hash. The steps do not hold the model and are dropped when it is collected.
_STEPS: dict[int, dict[Exp, _CompiledStep]] = {}


def _compiled_step(model: Model, exp: Exp) -> _CompiledStep:
    if id(model) not in _STEPS:
        _STEPS[id(model)] = {}
        weakref.finalize(model, _STEPS.pop, id(model), None)
    steps = _STEPS[id(model)]
    if exp not in steps:
        steps[exp] = _CompiledStep(exp)
    return steps[exp]


def _trace_key(model: Model, tokens: mx.array, keys: mx.array, start: mx.array, window: int) -> tuple:
    """What makes MLX trace the step again: input shapes and dtypes, and which modules the weights sit in (the
    projections of the first and last layer, the embedding and head, where quantization and adapters go)."""
    # Read as dict items (modules are dicts): attribute access on a module costs a Python call each, and this runs
    # at every step.
    transformer = model["transformer"]
    layers = transformer["layers"]
    modules = [transformer["token_embeddings"], model.get("lm_head")]
    for layer in (layers[0], layers[-1]):
        attn, ffn = layer["attn"], layer["ffn"]
        modules += [attn["qkv_proj"], attn["out_proj"], ffn["proj_1"], ffn["proj_2"]]
    return (tokens.shape, tokens.dtype, keys.shape, keys.dtype, start.shape, window, *map(id, modules))


class CompiledDecoder:
    """`model(tokens, cache)` with single-token steps on KV caches run as one compiled function.

    Made by `decoder_for`; the compiled step is kept per model and serves every decoder made for it.

    Args:
        model: our `Model`, in eval mode (as `load` returns it); in training mode every call is eager.
        exp: "native" (MLX's exp, equal to the eager model to rounding) or "power" (see `default_exp`).
    """

    def __init__(self, model: Model, exp: Exp):
        self.model, self.exp = model, exp
        self._compiled = _compiled_step(model, exp)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    @property
    def config(self) -> Any:
        return self.model.config

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None) -> mx.array:
        model = self.model
        layout = None if model.training or tokens.ndim != 2 or tokens.shape[1] != 1 else _layout(cache)
        if layout is None:
            return model(tokens, cache)
        kind, column = layout
        _round_capacity(cache)
        column_array = mx.array([column], dtype=mx.int32)
        # A plain cache's rows are all at `column`, none padded: (1,) broadcasts over the rows.
        start = _zeros(1) if kind is KVCache else cache[0].left_padding.astype(mx.int32)
        window = min(cache[0].keys.shape[2], (column // WINDOW_STEP + 1) * WINDOW_STEP)
        key = _trace_key(model, tokens, cache[0].keys, start, window)
        # While MLX traces, the model holds placeholder arrays; an exception there (Ctrl-C in `chat`) would leave
        # them in place, so the weights are put back from a copy taken before each trace.
        saved = None if key in self._compiled.traced else model.parameters()
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        for c in cache:  # drop the caches' references so the buffers can be updated in place
            c.keys = c.values = None
        self._compiled.holder.append(model)
        try:
            logits, new_keys, new_values = self._compiled.fn(
                tokens, column_array, start, _window_array(window), keys, values
            )
        except BaseException:
            for c, k, v in zip(cache, keys, values):
                c.keys, c.values = k, v
            if saved is not None:
                model.update(saved)
            raise
        finally:
            self._compiled.holder.clear()
        self._compiled.traced.add(key)
        # A batch cache's offsets are made from its padding, not added to (`offset + 1` at every step made a lazy
        # chain per layer), once for all layers; each layer gets its own handle on them (`mx.array(a)` shares `a`'s
        # data), as an in-place `offset += n` on one layer must not move the others.
        new_offset = None if kind is KVCache else (column + 1) - start
        for c, k, v in zip(cache, new_keys, new_values):
            c.keys, c.values = k, v
            if kind is KVCache:
                c.offset = column + 1
            else:
                c.offset, c._idx = mx.array(new_offset), column + 1
        return logits


def decoder_for(model: nn.Module, exp: Exp | None = None) -> Any:
    """The model to generate with: a `CompiledDecoder` for our `Model` on the CPU backend, else `model` itself.

    Args:
        exp: the exponential of the step's SiLU and softmax, "native" or "power" (default: `default_exp()`).
    """
    if exp is not None and exp not in EXPS:
        raise ValueError(f"exp must be one of {EXPS}, got {exp!r}")
    if not isinstance(model, Model) or mx.default_device() != mx.cpu:
        return model
    return CompiledDecoder(model, exp or default_exp())
