"""The OpenELM decoder in MLX: layer-wise-scaled GQA attention with Q/K RMSNorm, RoPE, SwiGLU.

Module attribute names equal Apple's Hugging Face checkpoint keys, so weights load strictly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# mlx-lm's helpers dispatch on its cache types (quantized KV caches, batch masks with
# left padding, rotating windows), so our model runs under all of mlx-lm's caches.
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import OpenELMConfig


def rope(x: mx.array, head_dim: int, base: float, offset: int | mx.array) -> mx.array:
    """Non-traditional RoPE (the two halves of each head rotated) from position `offset` (an int, or one per row)."""
    return mx.fast.rope(x, head_dim, traditional=False, base=base, scale=1.0, offset=offset)


@dataclass(frozen=True)
class Kernels:
    """The elementwise pieces a forward pass computes with: the layer math stays in the modules below, and a faster
    path (model/step.py) swaps only these. `attention(q, k, v, cache, scale, mask)` is mlx-lm's signature;
    `rope(x, head_dim, base, offset)` is `rope` above."""

    silu: Callable[[mx.array], mx.array] = nn.silu
    attention: Callable[..., mx.array] = scaled_dot_product_attention
    rope: Callable[..., mx.array] = rope


FUSED = Kernels()  # MLX's fused kernels: the eager model and training


class Attention(nn.Module):
    """Causal GQA attention with a fused qkv projection, split by heads as `[Q | K | V]`."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.num_query_heads[layer_idx]
        self.n_kv_heads = config.num_kv_heads[layer_idx]
        self.head_dim = head_dim = config.head_dim
        self.rope_base = float(config.rope_freq_constant)
        self.scale = head_dim**-0.5
        D = config.model_dim
        self.qkv_proj = nn.Linear(D, (self.n_heads + 2 * self.n_kv_heads) * head_dim, bias=False)
        if config.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.n_heads * head_dim, D, bias=False)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, kernels: Kernels = FUSED) -> mx.array:
        """x (B, L, D), or (B, D) for one position per row: the compiled decode step's input, as a 3-D input costs
        each projection a flatten and an unflatten."""
        B, L = (x.shape[0], 1) if x.ndim == 2 else x.shape[:2]
        heads = self.n_heads + 2 * self.n_kv_heads
        if L == 1:  # a decode step: the transpose is a reshape (no strided copies; 5% of a demo-model step)
            qkv = self.qkv_proj(x).reshape(B, heads, 1, self.head_dim)
        else:
            qkv = self.qkv_proj(x).reshape(B, L, heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, heads, L, head_dim)
        qk, v = mx.split(qkv, [self.n_heads + self.n_kv_heads], axis=1)  # q and k heads together
        if "q_norm" in self:  # q_norm on the query heads and k_norm on the key heads, in one pass
            qk = mx.fast.rms_norm(qk, None, self.q_norm.eps) * self._qk_norm_weight()
        # q and k sit at the same positions: one rotation for both (with the joint norm, a demo-model decode step
        # took 3% less time than with a norm and a rotation each)
        qk = kernels.rope(qk, self.head_dim, self.rope_base, cache.offset if cache is not None else 0)
        q, k = mx.split(qk, [self.n_heads], axis=1)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = kernels.attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        out = (out if L == 1 else out.transpose(0, 2, 1, 3)).reshape(*x.shape[:-1], -1)  # (B, [L,] n_heads * head_dim)
        return self.out_proj(out)

    def _qk_norm_weight(self) -> mx.array:
        """q_norm's weight for each query head above k_norm's for each key head: (n_heads + n_kv_heads, 1, head_dim).
        (Both norms take the config's one epsilon.)"""
        head = (1, self.head_dim)
        return mx.concatenate(
            [
                mx.broadcast_to(self.q_norm.weight, (self.n_heads, *head)),
                mx.broadcast_to(self.k_norm.weight, (self.n_kv_heads, *head)),
            ]
        )


class FeedForward(nn.Module):
    """SwiGLU with a fused `proj_1` whose rows are `[gate | up]`, or plain SiLU without GLU."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        hidden = config.intermediate_sizes[layer_idx]
        self.glu = config.ffn_with_glu
        self.proj_1 = nn.Linear(config.model_dim, (2 if self.glu else 1) * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, config.model_dim, bias=False)

    def __call__(self, x: mx.array, kernels: Kernels = FUSED) -> mx.array:
        activation = kernels.silu
        h = self.proj_1(x)
        if self.glu:
            gate, up = mx.split(h, 2, axis=-1)
            return self.proj_2(activation(gate) * up)
        return self.proj_2(activation(h))


class DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + attn(attn_norm(x))`, `out = h + ffn(ffn_norm(h))`."""

    def __init__(self, config: OpenELMConfig, layer_idx: int):
        super().__init__()
        # Declared in the backward pass's order, FFN first: training updates the parameters in this order, so a
        # layer's gradients are consumed soon after they are made (full fine-tuning at 270M, batch 2 x 256, peaked
        # 4.38 GB instead of 4.55 with AdamW and 2.27 instead of 2.36 with Adafactor, measured).
        self.ffn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.ffn = FeedForward(config, layer_idx)
        self.attn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, kernels: Kernels = FUSED) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache, kernels)
        return h + self.ffn(self.ffn_norm(h), kernels)


class Transformer(nn.Module):
    """Embedding, decoder layers and final norm (the `transformer.` prefix of the checkpoint)."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_transformer_layers)]
        self.norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None, kernels: Kernels = FUSED) -> mx.array:
        h = self.token_embeddings(tokens)  # (B, L, D), or (B, D) from tokens (B,): one per row
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h if h.ndim == 3 else h[:, None], cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, kernels)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM causal LM: `model(tokens (B, L), cache=None) -> logits (B, L, vocab_size)`; tokens (B,), one
    position per row after the cache, give logits (B, vocab_size).

    `cache` is a list with one KV cache per layer made outside the model, e.g. by
    `mlx_lm.models.cache.make_prompt_cache(model)`.
    """

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.model_type = "openelm"
        self.transformer = Transformer(config)
        if not config.share_input_output_layers:
            self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None, kernels: Kernels = FUSED) -> mx.array:
        return self.head(self.transformer(tokens, cache, kernels))

    def head(self, h: mx.array) -> mx.array:
        """Logits from final hidden states: the tied embedding, or `lm_head`."""
        if self.config.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.transformer.layers
