"""The language-model loss, used by training and evaluation alike."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def lm_loss(
    model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array | None = None, z_loss: float = 0.0
) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy (+ z_loss * logsumexp^2) over the (masked) targets, and their count."""
    logits = model(inputs).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    loss = lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    if mask is None:
        return loss.mean(), mx.array(loss.size)
    n = mask.sum()
    return (loss * mask).sum() / mx.maximum(n, 1), n
