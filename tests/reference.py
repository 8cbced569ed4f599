"""An independent, slow float64 numpy OpenELM written from ../shared/OPENELM.md.

It shares no code with openelm_mlx.model.decoder: it reads a flat Hugging Face-keyed weight dict and
per-layer sizes, and does everything with explicit loops and numpy.
"""

from __future__ import annotations

import numpy as np


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float, positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE over the full head dim. x: (heads, L, hd)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (L, hd/2)
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(weights: dict[str, np.ndarray], cfg: dict, tokens: list[int]) -> np.ndarray:
    """Logits (L, vocab) for one sequence.

    Args:
        weights: HF key -> array (`transformer.layers.N.attn.qkv_proj.weight`, ...).
        cfg: Apple config.json dict with per-layer `num_query_heads`, `num_kv_heads`, and
            `intermediate` (FFN widths), plus `head_dim`, `rope_freq_constant`, `ffn_with_glu`,
            `normalize_qk_projections`, `share_input_output_layers`.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    hd = cfg["head_dim"]
    L = len(tokens)
    pos = np.arange(L)
    x = w["transformer.token_embeddings.weight"][np.array(tokens)]  # (L, D)
    for i in range(cfg["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nkv = cfg["num_query_heads"][i], cfg["num_kv_heads"][i]
        h = _rms_norm(x, w[p + "attn_norm.weight"])
        qkv = h @ w[p + "attn.qkv_proj.weight"].T  # (L, (nq+2nkv)*hd)
        qkv = qkv.reshape(L, nq + 2 * nkv, hd)
        q = qkv[:, :nq].transpose(1, 0, 2)
        k = qkv[:, nq : nq + nkv].transpose(1, 0, 2)
        v = qkv[:, nq + nkv :].transpose(1, 0, 2)
        if cfg["normalize_qk_projections"]:
            q = _rms_norm(q, w[p + "attn.q_norm.weight"])
            k = _rms_norm(k, w[p + "attn.k_norm.weight"])
        q = _rope(q, cfg["rope_freq_constant"], pos)
        k = _rope(k, cfg["rope_freq_constant"], pos)
        groups = nq // nkv
        out = np.zeros((nq, L, hd))
        for j in range(nq):
            kj, vj = k[j // groups], v[j // groups]
            scores = q[j] @ kj.T / np.sqrt(hd)
            scores = np.where(np.tril(np.ones((L, L), dtype=bool)), scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[j] = (scores / scores.sum(axis=-1, keepdims=True)) @ vj
        attn = out.transpose(1, 0, 2).reshape(L, nq * hd) @ w[p + "attn.out_proj.weight"].T
        x = x + attn
        h = _rms_norm(x, w[p + "ffn_norm.weight"]) @ w[p + "ffn.proj_1.weight"].T
        inter = cfg["intermediate"][i]
        h = _silu(h[:, :inter]) * h[:, inter:] if cfg["ffn_with_glu"] else _silu(h)
        x = x + h @ w[p + "ffn.proj_2.weight"].T
    x = _rms_norm(x, w["transformer.norm.weight"])
    head = w["transformer.token_embeddings.weight"] if cfg["share_input_output_layers"] else w["lm_head.weight"]
    return x @ head.T


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))
