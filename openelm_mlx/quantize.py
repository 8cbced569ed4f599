"""Affine quantization of an OpenELM with MLX's own `nn.quantize` (settings go to config.json on save)."""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

from .model import Model

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def check_settings(bits: int, group_size: int) -> None:
    """Raise ValueError unless MLX's affine quantization supports these settings."""
    if bits not in Q_BITS or group_size not in Q_GROUP_SIZES:
        raise ValueError(
            f"quantization supports bits {Q_BITS} and group sizes {Q_GROUP_SIZES}, "
            f"got bits={bits}, group_size={group_size}"
        )


def quantize_model(model: Model, bits: int = 4, group_size: int = 64) -> list[str]:
    """Quantize every Linear and the (tied) embedding in place.

    A layer whose input width `group_size` does not divide stays float.

    Returns:
        The paths of layers left in float.

    Raises:
        ValueError: unsupported bits or group size.
    """
    check_settings(bits, group_size)
    skipped: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if module.weight.shape[-1] % group_size:
            skipped.append(path)
            return False
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return skipped


def bits_per_weight(model: Model) -> float:
    """Stored bits per logical weight (scales and biases included)."""
    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters())) * 8
    logical = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            logical += m.weight.size * 32 // m.bits
        elif isinstance(m, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            logical += m.weight.size
    return stored / logical
