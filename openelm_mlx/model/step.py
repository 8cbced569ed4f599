"""A compiled single-token decode step for MLX's CPU backend, used by generation in place of the eager model call.

On the CPU backend every primitive costs microseconds of dispatch, and `mx.fast.rms_norm`, `mx.fast.rope` and
`mx.fast.scaled_dot_product_attention` expand into a dozen primitives each: an eager 270M decode step is ~2,300
primitives around 65 matrix-vector products. This step is one `mx.compile`d function over the whole layer stack with
the KV-cache writes inside (~700 primitives), with RMSNorm, RoPE and grouped attention written for one position:
the same math (float32: equal to the eager model to rounding; bfloat16/float16: RoPE and the norms' statistics in
float32, as the fused kernels compute them). Anything it does not handle (a prompt chunk, another cache type,
training mode, the GPU, where the fused kernels already are) goes through the model as usual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from .decoder import Model

Exp = Callable[[mx.array], mx.array]


def _power_exp(x: mx.array) -> mx.array:
    """float32's e raised to `x`: exp(x) within 3e-8 * |x| relative (e is 3e-8 off in float32)."""
    return mx.power(math.e, x)


@cache
def fast_exp() -> Exp:
    """`mx.exp`, or `_power_exp` on builds where that is over twice as fast, picked once per process.

    MLX's x86-64 wheel (0.32) computes `exp` in scalar code that calls libm's `fmaf` through the PLT, also inside the
    kernels `mx.compile` generates: 12.8 ns per element on the development machine, where `power` (libm's `powf`)
    takes 4.4. The SwiGLU and the attention softmax are most of a decode step's `exp`s. A build whose `exp` is
    vectorised fails the 2x test and keeps `mx.exp`, which also keeps the step's results equal to the eager model's
    to the last bit in those parts.
    """

    def best_of_five(fn: Exp, x: mx.array) -> float:
        times = []
        for _ in range(5):
            tic = time.perf_counter()
            mx.eval(fn(x))
            times.append(time.perf_counter() - tic)
        return min(times)

    with mx.stream(mx.cpu):
        x = mx.linspace(-8.0, 0.0, 1 << 16)
        mx.eval(x)
        fast = best_of_five(_power_exp, x) * 2 < best_of_five(mx.exp, x)
    return _power_exp if fast else mx.exp


def _silu(x: mx.array, exp: Exp) -> mx.array:
    """`nn.silu`; through `exp` as x / (1 + exp(-x)) in float32 (float16's exp(-x) overflows past x = -11)."""
    if exp is mx.exp:
        return nn.silu(x)
    xf = x.astype(mx.float32)
    return (xf / (1 + exp(-xf))).astype(x.dtype)


def _softmax(scores: mx.array, exp: Exp) -> mx.array:
    """Softmax over the last axis, in float32 (as `precise=True`)."""
    if exp is mx.exp:
        return mx.softmax(scores, axis=-1, precise=True)
    s = scores.astype(mx.float32)
    e = exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(scores.dtype)


def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """`mx.fast.rms_norm` as its CPU fallback computes it (statistics in float32), in three primitives."""
    xf = x.astype(mx.float32)
    return (xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight


def _rope_tables(offset: mx.array, head_dim: int, base: float) -> tuple[mx.array, mx.array]:
    """cos and signed sin of the one position `offset`, laid out so `rope(x) = x * cos + swap_halves(x) * sin`."""
    half = head_dim // 2
    inv_freq = mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half))  # base ** (-2i / head_dim)
    theta = offset.astype(mx.float32) * inv_freq
    cos, sin = mx.cos(theta), mx.sin(theta)
    return mx.concatenate([cos, cos]), mx.concatenate([-sin, sin])


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Non-traditional RoPE (rotate the two halves of each head) at one position."""
    half = x.shape[-1] // 2
    swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(mx.float32) * cos + swapped.astype(mx.float32) * sin).astype(x.dtype)


def _attention(
    attn: nn.Module,
    x: mx.array,
    offset: mx.array,
    keys: mx.array,
    values: mx.array,
    mask: mx.array,
    rope: Any,
    exp: Exp,
) -> tuple[mx.array, mx.array, mx.array]:
    """One position of `model.Attention` on preallocated cache buffers: (output (B, D), keys, values)."""
    B = x.shape[0]
    n_heads, n_kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = attn.qkv_proj(x).reshape(B, n_heads + 2 * n_kv_heads, head_dim)
    qk, v = qkv[:, : n_heads + n_kv_heads], qkv[:, n_heads + n_kv_heads :]
    if "q_norm" in attn:  # one statistic pass over q and k heads together, each with its own weight
        weight = mx.concatenate(
            [
                mx.broadcast_to(attn.q_norm.weight, (n_heads, head_dim)),
                mx.broadcast_to(attn.k_norm.weight, (n_kv_heads, head_dim)),
            ]
        )
        qk = _rms_norm(qk, weight, attn.q_norm.eps)
    qk = _rope(qk, *rope)
    q, k = qk[:, :n_heads] * attn.scale, qk[:, n_heads:]  # scaled before the product, as the eager attention does
    start = offset.reshape(1)
    keys = mx.slice_update(keys, k[:, :, None], start, axes=(2,))  # (B, n_kv_heads, capacity, head_dim)
    values = mx.slice_update(values, v[:, :, None], start, axes=(2,))
    # Query heads grouped by the kv head they share: one (group, head_dim) @ (head_dim, capacity) per kv head.
    scores = q.reshape(B, n_kv_heads, n_heads // n_kv_heads, head_dim) @ keys.swapaxes(-1, -2)
    probs = _softmax(mx.where(mask, scores, -mx.inf), exp)
    out = (probs @ values).reshape(B, n_heads * head_dim)
    return attn.out_proj(out), keys, values


def _step_fn(model: Model, exp: Exp) -> Any:
    """The function to compile: (tokens (B, 1), offset, keys, values) -> (logits (B, 1, V), keys, values)."""

    def silu(x: mx.array) -> mx.array:
        return _silu(x, exp)

    def step(tokens: mx.array, offset: mx.array, keys: list, values: list) -> tuple:
        config, t = model.config, model.transformer
        h = t.token_embeddings(tokens[:, 0])  # (B, D)
        mask = mx.arange(keys[0].shape[2]) <= offset  # past `offset`: unwritten, or left by a trim
        rope = _rope_tables(offset, config.head_dim, float(config.rope_freq_constant))
        new_keys, new_values = [], []
        for layer, k, v in zip(t.layers, keys, values):
            x = _rms_norm(h, layer.attn_norm.weight, layer.attn_norm.eps)
            out, k, v = _attention(layer.attn, x, offset, k, v, mask, rope, exp)
            h = h + out
            h = h + layer.ffn(_rms_norm(h, layer.ffn_norm.weight, layer.ffn_norm.eps), activation=silu)
            new_keys.append(k)
            new_values.append(v)
        return model.head(_rms_norm(h, t.norm.weight, t.norm.eps))[:, None], new_keys, new_values

    return step


def _usable(tokens: mx.array, cache: list[Any] | None) -> bool:
    """One new position per row, and plain KV caches at one offset with room for it."""
    if cache is None or tokens.ndim != 2 or tokens.shape[1] != 1:
        return False
    first = cache[0]
    if type(first) is not KVCache or first.keys is None or first.offset >= first.keys.shape[2]:
        return False
    capacity = first.keys.shape[2]
    return all(
        type(c) is KVCache and c.keys is not None and c.offset == first.offset and c.keys.shape[2] == capacity
        for c in cache
    )


class _CompiledStep:
    """A model's compiled step, kept on the model as a plain attribute.

    The weights are the compiled function's implicit inputs, read at each call, so it follows `model.update`. MLX
    traces it again for each new combination of input shapes and dtypes (batch size, cache capacity, token dtype,
    quantized or adapted modules); a change that keeps every parameter's shape and dtype (say an RMSNorm's `eps`,
    or a LoRA layer's `scale`) is not seen: make a new model for that. The model and its step reference each other,
    so the garbage collector, not `del`, frees them; a copied model (`copy.deepcopy`) compiles its own.
    """

    def __init__(self, model: Model):
        self.fn = mx.compile(_step_fn(model, fast_exp()), inputs=[model.state])
        self.traced: set[tuple] = set()

    def __deepcopy__(self, memo: dict) -> None:
        return None


def _trace_key(model: Model, tokens: mx.array, cache: list[Any]) -> tuple:
    """What makes MLX trace the step again: input shapes and dtypes, and which modules the weights sit in (the
    projections of the first and last layer, the embedding and head, where quantization and adapters go)."""
    first, last = model.layers[0], model.layers[-1]
    modules = [model.transformer.token_embeddings, model.__dict__.get("lm_head")]
    for layer in (first, last):
        modules += [layer.attn.qkv_proj, layer.attn.out_proj, layer.ffn.proj_1, layer.ffn.proj_2]
    return (tokens.shape, tokens.dtype, cache[0].keys.shape, cache[0].keys.dtype, *map(id, modules))


class CompiledDecoder:
    """`model(tokens, cache)` with single-token steps on plain KV caches run as one compiled function.

    Made by `decoder_for`; the compiled step lives on the model and serves every decoder made for it.

    Args:
        model: our `Model`, in eval mode (as `load` returns it); in training mode every call is eager.
    """

    def __init__(self, model: Model):
        self.model = model
        self._compiled = model.__dict__.get("_compiled_decode_step")
        if self._compiled is None:
            self._compiled = _CompiledStep(model)
            object.__setattr__(model, "_compiled_decode_step", self._compiled)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    @property
    def config(self) -> Any:
        return self.model.config

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None) -> mx.array:
        model = self.model
        if model.training or not _usable(tokens, cache):
            return model(tokens, cache)
        key = _trace_key(model, tokens, cache)
        # While MLX traces, the model holds placeholder arrays; an exception there (Ctrl-C in `chat`) would leave
        # them in place, so the weights are put back from a copy taken before each trace.
        saved = None if key in self._compiled.traced else model.parameters()
        offset = cache[0].offset
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        for c in cache:  # drop the caches' references so the buffers can be updated in place
            c.keys = c.values = None
        try:
            logits, new_keys, new_values = self._compiled.fn(tokens, mx.array(offset, dtype=mx.int32), keys, values)
        except BaseException:
            for c, k, v in zip(cache, keys, values):
                c.keys, c.values = k, v
            if saved is not None:
                model.update(saved)
            raise
        self._compiled.traced.add(key)
        for c, k, v in zip(cache, new_keys, new_values):
            c.keys, c.values, c.offset = k, v, offset + 1
        return logits


def decoder_for(model: nn.Module) -> Any:
    """The model to generate with: a `CompiledDecoder` for our `Model` on the CPU backend, else `model` itself."""
    if not isinstance(model, Model) or mx.default_device() != mx.cpu:
        return model
    return CompiledDecoder(model)
