"""The compiled decode step (decode.py): the same logits as the eager model, used where it should be, freed with
the model, and traced again when the model's modules change (quantization, adapters)."""

from __future__ import annotations

import gc
import weakref

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from openelm_mlx.generation.generate import generate_tokens
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.step import decoder_for
from openelm_mlx.quant.recipes import quantize_model


def counted_decoder(model, exp="native"):
    """A decoder whose compiled step counts its calls."""
    from openelm_mlx.model import step as decode

    compiled = decode._compiled_step(model, exp)
    calls, step = [], compiled.fn

    def counting(*args):
        calls.append(1)
        return step(*args)

    compiled.fn = counting
    return decoder_for(model, exp), calls


def decode_both(model, decoder, prompt_len: int, steps: int):
    """Greedy-decode with the eager model and the decoder side by side; the worst relative logit difference."""
    ids = mx.array([[int(t) for t in np.random.default_rng(0).integers(3, model.config.vocab_size, prompt_len)]])
    eager_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    y_eager = y = ids
    worst = 0.0
    for _ in range(steps):
        want, got = model(y_eager, eager_cache), decoder(y, cache)
        assert got.shape == want.shape
        worst = max(worst, float(mx.abs(got - want).max() / mx.abs(want).max()))
        y_eager, y = mx.argmax(want[:, -1:], axis=-1), mx.argmax(got[:, -1:], axis=-1)
        assert y.item() == y_eager.item()
    assert cache[0].offset == eager_cache[0].offset
    return worst


@pytest.mark.parametrize("exp", ["native", "power"])
@pytest.mark.parametrize(
    "config",
    [
        OpenELMConfig.tiny(),
        OpenELMConfig.tiny(head_dim=24, share_input_output_layers=False),
        OpenELMConfig.tiny(ffn_with_glu=False, normalize_qk_projections=False),
    ],
)
def test_compiled_steps_equal_the_eager_model(config, exp):
    """With either exponential (the SiLU and the softmax use it)."""
    model = random_model(config)
    decoder, calls = counted_decoder(model, exp)
    # A 250-token prompt and 12 steps: the cache buffer (256 positions) fills and grows on the way.
    assert decode_both(model, decoder, 250, 13) < 1e-5
    assert len(calls) == 11  # every single-token step but the one at a full buffer (eager, which grows it)


def test_the_attention_window_follows_the_cache_across_its_steps():
    """The step attends over the written columns rounded up to WINDOW_STEP, not the whole buffer: crossing from one
    window to the next (60 -> 70 columns, and a batch whose rows are left-padded) equals the eager model."""
    from openelm_mlx.model.step import WINDOW_STEP

    model = random_model(OpenELMConfig.tiny())
    decoder, calls = counted_decoder(model)
    assert decode_both(model, decoder, WINDOW_STEP - 4, 10) < 1e-5
    assert len(calls) == 9


def test_batch_rows_decode_together():
    model = random_model(OpenELMConfig.tiny())
    decoder, calls = counted_decoder(model)
    ids = mx.array(np.random.default_rng(1).integers(3, 256, (3, 9)))
    eager_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    model(ids, eager_cache), decoder(ids, cache)
    step = mx.array([[5], [6], [7]])
    assert mx.allclose(decoder(step, cache), model(step, eager_cache), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


@pytest.mark.parametrize("exp", ["native", "power"])
def test_rows_at_different_positions_decode_together(exp):
    """A left-padded batch (mlx-lm's BatchKVCache): every row equals itself decoded alone, step after step."""
    from mlx_lm.models.cache import BatchKVCache

    model = random_model(OpenELMConfig.tiny())
    decoder, calls = counted_decoder(model, exp)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (3, 11, 6)]
    longest = max(map(len, prompts))
    padding = [longest - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    model(mx.array([[0] * pad + p for p, pad in zip(prompts, padding)]), cache)
    alone = [make_prompt_cache(model) for _ in prompts]
    for p, c in zip(prompts, alone):
        model(mx.array([p]), c)
    y = mx.array([[5], [6], [7]])
    for _ in range(4):
        batch = decoder(y, cache)[:, -1]
        solo = mx.concatenate([model(y[i : i + 1], alone[i])[:, -1] for i in range(3)])
        assert mx.allclose(batch, solo, rtol=1e-4, atol=1e-5)
        y = mx.argmax(solo, axis=-1)[:, None]
    assert len(calls) == 4
    assert "_compiled_decode_step" not in model.__dict__  # kept beside the model, not on it


def test_generation_tokens_equal_mlx_lm_loop_on_the_eager_model():
    model = random_model(OpenELMConfig.tiny())
    from openelm_mlx.model.step import default_exp

    _, calls = counted_decoder(model, default_exp())  # the exponential generation uses on this machine
    ids = [int(t) for t in np.random.default_rng(2).integers(3, 256, 20)]
    ours = list(generate_tokens(model, ids, max_tokens=40, repetition_penalty=1.3, eos_ids=()))
    assert len(calls) == 40  # the last prompt token, then one step per token but the last
    processors = make_logits_processors(repetition_penalty=1.3)
    steps = generate_step(mx.array(ids), model, max_tokens=40, logits_processors=processors)
    assert ours == [int(t) for t, _ in steps]  # mlx-lm's loop on the plain model: every step eager


def test_follows_quantization_and_adapters_after_first_use():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = random_model(OpenELMConfig.tiny())
    decoder = decoder_for(model)
    assert decode_both(model, decoder, 8, 3) < 1e-5  # traced on the float model
    quantize_model(model, bits=8, group_size=32)
    assert decode_both(model, decoder_for(model), 8, 3) < 1e-5
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["attn.qkv_proj"]})
    for layer in model.layers:  # nonzero adapters, so a stale trace without them would differ
        layer.attn.qkv_proj.lora_b = mx.full(layer.attn.qkv_proj.lora_b.shape, 0.05)
    model.eval()
    eager_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    ids = mx.array([[3, 4, 5, 6]])
    model(ids, eager_cache), decoder_for(model)(ids, cache)
    step = mx.array([[7]])
    assert mx.allclose(decoder_for(model)(step, cache), model(step, eager_cache), rtol=1e-5, atol=1e-6)


def test_training_mode_and_other_caches_run_eager():
    model = random_model(OpenELMConfig.tiny())
    decoder, calls = counted_decoder(model)
    cache = make_prompt_cache(model)
    decoder(mx.array([[3, 4, 5]]), cache)
    model.train()
    decoder(mx.array([[6]]), cache)
    model.eval()
    rotating = make_prompt_cache(model, max_kv_size=16)
    decoder(mx.array([[3, 4, 5]]), rotating)
    decoder(mx.array([[6]]), rotating)
    assert calls == []
    decoder(mx.array([[7]]), cache)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_models_decode_close_to_eager(dtype):
    model = random_model(OpenELMConfig.tiny())
    model.set_dtype(dtype)
    decoder, calls = counted_decoder(model)
    assert decode_both(model, decoder, 12, 4) < 2e-2
    assert len(calls) == 3


def test_trimmed_and_restored_caches():
    """Speculative decoding trims caches (stale positions stay in the buffer); saved caches come back via `state`."""
    model = random_model(OpenELMConfig.tiny())
    decoder, calls = counted_decoder(model)
    ids = mx.array([[5, 9, 11, 3, 7, 8]])
    eager_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    model(ids, eager_cache), decoder(ids, cache)
    for token in (4, 12, 13):
        model(mx.array([[token]]), eager_cache), decoder(mx.array([[token]]), cache)
    for c in eager_cache + cache:
        c.trim(3)
    step = mx.array([[21]])
    assert mx.allclose(decoder(step, cache), model(step, eager_cache), rtol=1e-5, atol=1e-6)
    restored = make_prompt_cache(model)
    for c, old in zip(restored, cache):
        c.state = (old.keys, old.values, old.offset)  # the whole buffer, spare capacity included
    step = mx.array([[22]])
    assert mx.allclose(decoder(step, restored), model(step, eager_cache), rtol=1e-5, atol=1e-6)
    assert len(calls) == 5


def test_an_interrupted_trace_leaves_model_and_cache_intact(monkeypatch):
    import openelm_mlx.model.step as decode

    model = random_model(OpenELMConfig.tiny())
    cache = make_prompt_cache(model)
    ids = mx.array([[5, 9, 11]])
    decoder_for(model)(ids, cache)
    before = model(mx.array([[4, 6]]))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "_kernels", interrupted)  # runs only while MLX traces the step
    with pytest.raises(KeyboardInterrupt):
        decoder_for(model)(mx.array([[4]]), cache)
    monkeypatch.undo()
    assert mx.array_equal(model(mx.array([[4, 6]])), before)  # real weights, not the trace's placeholders
    assert cache[0].keys is not None and cache[0].offset == 3
    eager_cache = make_prompt_cache(model)
    model(ids, eager_cache)
    step = mx.array([[4]])
    assert mx.allclose(decoder_for(model)(step, cache), model(step, eager_cache), rtol=1e-5, atol=1e-6)


def test_model_is_freed_with_its_compiled_step():
    model = random_model(OpenELMConfig.tiny())
    decode_both(model, decoder_for(model), 5, 2)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_copied_model_compiles_its_own_step():
    import copy

    model = random_model(OpenELMConfig.tiny())
    decode_both(model, decoder_for(model), 5, 2)
    twin = copy.deepcopy(model)
    twin.update(tree_map(lambda p: p * 0.5, twin.parameters()))
    assert decode_both(twin, decoder_for(twin), 5, 2) < 1e-5


def test_step_softmax_and_silu_hold_at_large_values():
    from openelm_mlx.model import step as decode

    q = mx.array([[[[1.0]]]])  # (B, n_heads, L, head_dim) = 1, 1, 1, 1
    k = mx.array([[[[1000.0], [999.0], [5.0]]]])
    v = mx.array([[[[1.0], [0.0], [7.0]]]])
    mask = mx.array([True, True, False])
    out = decode._power_attention(q, k, v, None, 1.0, mask)  # softmax over (1000, 999, masked)
    assert mx.allclose(out, mx.array([[[[0.7310586]]]]), atol=1e-6)
    x = mx.array([-200.0, -20.0, 0.0, 20.0, 200.0])
    assert mx.allclose(decode._power_silu(x), x * mx.sigmoid(x), rtol=1e-6, atol=1e-12)
    half = decode._power_silu(mx.array([-12.0, 12.0], dtype=mx.float16))  # float16's exp(12) overflows
    assert half.dtype == mx.float16 and mx.allclose(half, mx.array([-7.37e-5, 12.0]), rtol=1e-2)
