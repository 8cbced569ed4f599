"""The checks other tests rely on catch real breakage: the parity bound sees swapped SwiGLU halves and a
skipped q/k norm; gradient checkpointing really checkpoints; bfloat16 compute really changes the arithmetic."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import numpy_weights, random_model, reference_config
from reference import reference_logits, rel_error

from openelm_mlx.model import decoder as model_module
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.training.loop import OptimizerConfig, Trainer, enable_grad_checkpoint, make_optimizer

TOKENS = [1, 17, 200, 5, 9, 100, 42, 7, 3, 0, 255, 31, 64]
PARITY_BOUND = 1e-4  # test_model.py's bound
X = mx.array(np.random.default_rng(0).integers(0, 256, size=(4, 17)))


def _parity_error(mutate=lambda model: None) -> float:
    config = OpenELMConfig.tiny()
    model = random_model(config, seed=1)
    weights = numpy_weights(model)
    mutate(model)
    logits = np.array(model(mx.array([TOKENS]))[0])
    return rel_error(logits, reference_logits(weights, reference_config(config), TOKENS))


class _SwappedSwiGLU(model_module.FeedForward):
    def __call__(self, x, kernels=None):
        up, gate = mx.split(self.proj_1(x), 2, axis=-1)  # halves in the wrong order
        return self.proj_2(nn.silu(gate) * up)


def _swap_swiglu(model):
    for layer in model.layers:
        layer.ffn.__class__ = _SwappedSwiGLU


def _skip_qk_norm(model):
    for layer in model.layers:  # the attention normalises q and k only when it has the norms
        del layer.attn["q_norm"], layer.attn["k_norm"]


@pytest.mark.parametrize("mutate", [_swap_swiglu, _skip_qk_norm])
def test_parity_bound_catches_mutations(mutate):
    assert _parity_error() <= PARITY_BOUND
    assert _parity_error(mutate) > 100 * PARITY_BOUND


def _trainer(model, **kw):
    opt = make_optimizer(OptimizerConfig(lr=1e-2, steps=10, warmup=0))
    return Trainer(model, lambda m, x, y: lm_loss(m, x, y), opt, compile=False, **kw)


def test_grad_checkpoint_wraps_every_layer_call(monkeypatch):
    calls = []
    real = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda fn: calls.append(fn) or real(fn))
    model = random_model(OpenELMConfig.tiny())
    enable_grad_checkpoint(model)
    _trainer(model).step([(X[:, :-1], X[:, 1:])])
    assert len(calls) == len(model.layers)


def test_bfloat16_compute_changes_the_loss_a_little():
    f32 = _trainer(random_model(OpenELMConfig.tiny())).step([(X[:, :-1], X[:, 1:])])["loss"]
    bf16 = _trainer(random_model(OpenELMConfig.tiny()), compute_dtype=mx.bfloat16).step([(X[:, :-1], X[:, 1:])])["loss"]
    assert f32 != bf16 and abs(f32 - bf16) < 0.05 * abs(f32)


def test_evaluate_uses_its_loss_weighted_by_tokens_and_tokens_count_unmasked():
    model = random_model(OpenELMConfig.tiny())

    def count_loss(m, x, y, k):  # loss = mean of the mask, n = its sum: a weighted mean is checkable
        return k.mean() + 0.0 * lm_loss(m, x, y)[0], k.sum()

    opt = make_optimizer(OptimizerConfig(lr=1e-3, steps=10))
    trainer = Trainer(model, count_loss, opt, compile=False)
    full, half = mx.ones((4, 16)), mx.concatenate([mx.ones((4, 8)), mx.zeros((4, 8))], axis=1)
    batches = [(X[:, :16], X[:, 1:], full), (X[:, :16], X[:, 1:], half)]
    # weighted: (1.0 * 64 + 0.5 * 32) / 96; unweighted would be 0.75
    assert trainer.evaluate(batches) == pytest.approx((64 + 16) / 96)
    assert trainer.step([batches[1]])["tokens"] == 32
