"""Helpers shared by the tests: tiny random OpenELM models and their weights as numpy arrays."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def random_model(config: OpenELMConfig, seed: int = 0) -> Model:
    """A model whose every weight (norms included) is random, so swapped tensors show up."""
    mx.random.seed(seed)
    model = Model(config)
    rng = np.random.default_rng(seed)
    params = [
        (k, mx.array(rng.uniform(0.5, 1.5, v.shape).astype(np.float32)) if k.endswith("norm.weight") else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model.eval()


def reference_config(config: OpenELMConfig) -> dict:
    """What tests/reference.py needs: Apple's dict plus the per-layer FFN widths."""
    return {**config.to_dict(), "intermediate": list(config.intermediate_sizes)}


def numpy_weights(model: Model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
