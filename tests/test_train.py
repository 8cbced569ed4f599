"""The shared training loop: reusable with any loss/batches/callbacks, accumulation, precision, checkpointing."""

import mlx.core as mx
import numpy as np
from helpers import random_model
from mlx.utils import tree_flatten

from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.training.loop import OptimizerConfig, Trainer, enable_grad_checkpoint, make_optimizer, make_schedule

X = mx.array(np.random.default_rng(0).integers(3, 256, (4, 17)), dtype=mx.int32)


def _trainer(model, **kw):
    opt = make_optimizer(OptimizerConfig(lr=1e-2, steps=50, warmup=0))
    return Trainer(model, lambda m, x, y: lm_loss(m, x, y), opt, **kw)


def test_fit_with_frozen_weights_masked_loss_and_callbacks():
    """What a LoRA run does: only some parameters train, a masked loss, a callback per step."""
    model = random_model(OpenELMConfig.tiny())
    model.freeze()
    model.transformer.norm.unfreeze()
    frozen_before = np.array(model.layers[0].attn.qkv_proj.weight)
    mask = mx.concatenate([mx.zeros((4, 8)), mx.ones((4, 8))], axis=1)  # loss on the answer half only
    seen = []

    class Record:
        def on_step_end(self, trainer, metrics):
            seen.append(metrics["loss"])

    opt = make_optimizer(OptimizerConfig(lr=5e-2, steps=20))
    trainer = Trainer(model, lambda m, x, y, k: lm_loss(m, x, y, mask=k), opt)
    trainer.fit(lambda step: [(X[:, :16], X[:, 1:], mask)], steps=20, callbacks=[Record()])
    assert len(seen) == 20 and seen[-1] < seen[0]
    assert np.array_equal(np.array(model.layers[0].attn.qkv_proj.weight), frozen_before)
    assert not np.allclose(np.array(model.transformer.norm.weight), 1.0)


def _close(a: dict, b: dict, rtol: float = 1e-4) -> bool:
    """Every gradient of `a` equals `b`'s to a tolerance relative to the largest gradient of its tensor
    (robust to a BLAS that sums in another order; a comparison of weights after an Adam step is not: the
    step moves a weight by about lr * sign(gradient), and a near-zero gradient's sign is summation noise)."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    return all((mx.abs(fa[k] - fb[k]).max() <= rtol * mx.maximum(mx.abs(fb[k]).max(), 1e-6)).item() for k in fa)


def test_gradient_accumulation_equals_one_big_batch():
    a, b = random_model(OpenELMConfig.tiny()), random_model(OpenELMConfig.tiny())
    loss_one, grads_one, tokens_one = _trainer(a).gradients([(X[:, :-1], X[:, 1:])])
    loss_two, grads_two, tokens_two = _trainer(b).gradients([(X[:2, :-1], X[:2, 1:]), (X[2:, :-1], X[2:, 1:])])
    assert abs(loss_one.item() - loss_two.item()) < 1e-5 and tokens_one == tokens_two == X[:, 1:].size
    assert _close(grads_two, grads_one)


def test_an_sgd_step_moves_weights_by_lr_times_the_gradient():
    """A reassociation-stable check of the update itself: SGD's first step (no momentum yet, no clip)."""
    model = random_model(OpenELMConfig.tiny())
    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    opt = make_optimizer(OptimizerConfig(lr=1e-2, steps=50, weight_decay=0.0, name="sgd", min_lr=1e-2))
    trainer = Trainer(model, lambda m, x, y: lm_loss(m, x, y), opt, grad_clip=0.0)
    _, grads, _ = trainer.gradients([(X[:, :-1], X[:, 1:])])
    trainer.step([(X[:, :-1], X[:, 1:])])
    moved = {k: mx.array(before[k]) - v for k, v in tree_flatten(model.trainable_parameters())}
    assert _close(moved, {k: 1e-2 * g for k, g in tree_flatten(grads)}, rtol=1e-3)


def test_bfloat16_compute_keeps_float32_master_weights_and_state():
    model = random_model(OpenELMConfig.tiny())
    trainer = _trainer(model, compute_dtype=mx.bfloat16)
    metrics = trainer.fit(lambda step: [(X[:, :-1], X[:, 1:])], steps=3)
    assert np.isfinite(metrics["loss"])
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert {v.dtype for k, v in tree_flatten(trainer.optimizer.state) if k.endswith(("m", "v"))} == {mx.float32}


def test_grad_checkpointing_gives_the_same_gradients():
    a, b = random_model(OpenELMConfig.tiny()), random_model(OpenELMConfig.tiny())
    enable_grad_checkpoint(b)
    loss_a, grads_a, _ = _trainer(a).gradients([(X[:, :-1], X[:, 1:])])
    loss_b, grads_b, _ = _trainer(b).gradients([(X[:, :-1], X[:, 1:])])
    assert abs(loss_a.item() - loss_b.item()) < 1e-6
    assert _close(grads_b, grads_a)
    assert type(random_model(OpenELMConfig.tiny()).layers[0]).__name__ == "DecoderLayer"  # others untouched


def test_schedule_warms_up_from_1e6_then_decays_to_a_tenth():
    schedule = make_schedule(OptimizerConfig(lr=1e-3, steps=100, warmup=10))
    assert abs(schedule(mx.array(0)).item() - 1e-6) < 1e-9
    assert abs(schedule(mx.array(10)).item() - 1e-3) < 1e-9
    assert abs(schedule(mx.array(100)).item() - 1e-4) < 1e-9


def test_weight_decay_spares_norms():
    model = random_model(OpenELMConfig.tiny())
    opt = make_optimizer(OptimizerConfig(lr=1e-2, steps=10, weight_decay=0.5))
    trainer = Trainer(
        model, lambda m, x, y: (mx.sum(m.transformer.norm.weight) * 0.0 + 0.0 * lm_loss(m, x, y)[0], mx.array(1)), opt
    )
    norm_before = np.array(model.transformer.norm.weight)
    emb_before = np.array(model.transformer.token_embeddings.weight)
    trainer.step([(X[:, :-1], X[:, 1:])])  # zero gradient: only weight decay moves anything
    assert np.array_equal(np.array(model.transformer.norm.weight), norm_before)
    assert not np.allclose(np.array(model.transformer.token_embeddings.weight), emb_before)


def test_a_step_over_two_micro_batches_moves_weights_as_one_big_batch():
    """The fused update after accumulation: SGD's first step (no momentum yet) over 2 micro-batches equals the
    step over their union, to a tolerance relative to each tensor's largest change."""
    steps = []
    for split in ([(X[:, :-1], X[:, 1:])], [(X[:2, :-1], X[:2, 1:]), (X[2:, :-1], X[2:, 1:])]):
        model = random_model(OpenELMConfig.tiny())
        before = dict(tree_flatten(model.trainable_parameters()))
        before = {k: mx.array(np.array(v)) for k, v in before.items()}
        opt = make_optimizer(OptimizerConfig(lr=1e-2, steps=50, weight_decay=0.0, name="sgd", min_lr=1e-2))
        metrics = Trainer(model, lambda m, x, y: lm_loss(m, x, y), opt, grad_clip=1.0).step(split)
        steps.append(({k: before[k] - v for k, v in tree_flatten(model.trainable_parameters())}, metrics))
    (moved_one, one), (moved_two, two) = steps
    assert one["tokens"] == two["tokens"] == X[:, 1:].size
    assert abs(one["loss"] - two["loss"]) < 1e-5 and abs(one["grad_norm"] - two["grad_norm"]) < 1e-4 * one["grad_norm"]
    assert _close(moved_two, moved_one, rtol=1e-3)


def test_a_checkpoint_of_the_earlier_two_optimizer_split_resumes(tmp_path):
    """Round-3 checkpoints saved the optimizer state as `states.0.*` (undecayed) and `states.1.*` (decayed)."""
    model = random_model(OpenELMConfig.tiny())
    trainer = _trainer(model)
    trainer.fit(lambda step: [(X[:, :-1], X[:, 1:])], steps=2)
    trainer.save_checkpoint(tmp_path / "ckpt", {"step": 2})
    flat = dict(tree_flatten(trainer.optimizer.state))
    split = {f"states.{int(k.endswith(('weight.m', 'weight.v')) and flat[k].ndim > 1)}.{k}": v for k, v in flat.items()}
    split.update({f"states.0.{k}": v for k, v in flat.items() if k in ("step", "learning_rate")})
    mx.save_safetensors(str(tmp_path / "ckpt" / "optimizer.safetensors"), split)
    resumed = _trainer(random_model(OpenELMConfig.tiny()))
    assert resumed.load_checkpoint(tmp_path / "ckpt")["step"] == 2
    restored = dict(tree_flatten(resumed.optimizer.state))
    assert restored.keys() == flat.keys() and all(mx.array_equal(restored[k], flat[k]).item() for k in flat)


def test_row_major_weight_gradients_equal_mlx_autograd_and_leave_the_model_as_it_was():
    """The training step's own Linear/tied-head VJP (gradients laid out like their weights) gives MLX's gradients."""
    import mlx.nn as nn

    from openelm_mlx.training.loop import row_major_weight_gradients

    model = random_model(OpenELMConfig.tiny())  # tied embedding: its gradient is the head's plus the lookup's
    model.layers[0].ffn.proj_2 = nn.Linear(*reversed(model.layers[0].ffn.proj_2.weight.shape), bias=True)
    mx.eval(model.parameters())
    batch = (X[:, :-1], X[:, 1:])
    loss, grads, _ = _trainer(model).gradients([batch])
    _, expected = nn.value_and_grad(model, lambda m, x, y: lm_loss(m, x, y)[0])(model, *batch)
    assert _close(grads, expected, rtol=1e-5)
    with row_major_weight_gradients(model):
        assert type(model.layers[0].ffn.proj_1).__name__ == "_Linear"
    assert type(model.layers[0].ffn.proj_1) is nn.Linear and type(model.transformer.token_embeddings) is nn.Embedding
