"""The MLX decoder against the independent float64 numpy reference, and cached decoding."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import numpy_weights, random_model, reference_config
from mlx_lm.models.cache import make_prompt_cache
from reference import reference_logits, rel_error

from openelm_mlx.model.config import OpenELMConfig

TOKENS = [1, 17, 200, 5, 9, 100, 42, 7, 3, 0, 255, 31, 64]
CONFIGS = {
    "layerwise-gqa-qknorm": {},
    "untied": {"share_input_output_layers": False},
    "no-glu": {"ffn_with_glu": False},
    "no-qknorm-mha": {"normalize_qk_projections": False, "num_gqa_groups": 1},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_reference(name):
    config = OpenELMConfig.tiny(**CONFIGS[name])
    model = random_model(config, seed=1)
    logits = np.array(model(mx.array([TOKENS]))[0])
    ref = reference_logits(numpy_weights(model), reference_config(config), TOKENS)
    assert rel_error(logits, ref) <= 1e-4


def test_untied_model_uses_lm_head():
    model = random_model(OpenELMConfig.tiny(share_input_output_layers=False))
    before = model(mx.array([TOKENS]))
    model.lm_head.weight = model.lm_head.weight * 2
    assert mx.allclose(model(mx.array([TOKENS])), before * 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache_kwargs", [{}, {"max_kv_size": 64}])
def test_cached_decoding_equals_full_forward(tiny_model, cache_kwargs):
    full = tiny_model(mx.array([TOKENS]))
    cache = make_prompt_cache(tiny_model, **cache_kwargs)
    steps = [tiny_model(mx.array([TOKENS[:5]]), cache=cache)]
    for t in TOKENS[5:]:
        steps.append(tiny_model(mx.array([[t]]), cache=cache))
    cached = mx.concatenate(steps, axis=1)
    assert mx.allclose(cached, full, atol=1e-5, rtol=1e-5)


def test_batch_rows_are_independent(tiny_model):
    batch = mx.array([TOKENS, TOKENS[::-1]])
    out = tiny_model(batch)
    assert mx.allclose(out[1], tiny_model(mx.array([TOKENS[::-1]]))[0], atol=1e-5)


def test_one_token_per_row_as_a_flat_batch_equals_the_usual_shape(tiny_model):
    """tokens (B,) after a cache give logits (B, V): the rows the compiled decode step runs the layers on."""
    batch = mx.array([TOKENS[:6], TOKENS[6:12]])
    usual, flat = make_prompt_cache(tiny_model), make_prompt_cache(tiny_model)
    tiny_model(batch, cache=usual), tiny_model(batch, cache=flat)
    nxt = mx.array([TOKENS[12], TOKENS[0]])
    expected = tiny_model(nxt[:, None], cache=usual)[:, 0]
    got = tiny_model(nxt, cache=flat)
    assert got.shape == expected.shape and mx.allclose(got, expected, atol=1e-5, rtol=1e-5)
