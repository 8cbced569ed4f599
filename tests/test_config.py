"""Layer-wise scaling: presets equal Apple's published sizes; configs round-trip; bad ones raise."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from openelm_mlx.model.config import OpenELMConfig, make_divisible, preset_names
from openelm_mlx.model.decoder import Model

# From ../shared/OPENELM.md.
PARAMS = {
    "OpenELM-270M": 271_527_168,
    "OpenELM-450M": 457_179_136,
    "OpenELM-1_1B": 1_079_891_456,
    "OpenELM-3B": 3_036_647_424,
}
LAYERS = {"OpenELM-270M": 16, "OpenELM-450M": 20, "OpenELM-1_1B": 28, "OpenELM-3B": 36}


def test_270m_per_layer_sizes_match_apple():
    c = OpenELMConfig.from_preset("OpenELM-270M")
    assert c.num_query_heads == (12,) * 5 + (16,) * 7 + (20,) * 4
    assert c.num_kv_heads == tuple(q // 4 for q in c.num_query_heads)
    assert c.intermediate_sizes == (
        768,
        1024,
        1280,
        1536,
        1792,
        2048,
        2560,
        2816,
        3072,
        3328,
        3584,
        3840,
        4352,
        4608,
        4864,
        5120,
    )


@pytest.mark.parametrize("name", list(PARAMS))
def test_preset_parameter_counts(name):
    c = OpenELMConfig.from_preset(name + "-Instruct")
    assert c.num_transformer_layers == LAYERS[name]
    assert c.num_parameters() == PARAMS[name]


@pytest.mark.parametrize("name", ["OpenELM-270M", "OpenELM-3B"])
def test_model_tree_has_the_config_parameter_count(name):
    # MLX arrays are lazy: building the model allocates nothing until evaluated.
    model = Model(OpenELMConfig.from_preset(name))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == PARAMS[name]
    # Last layer: 20 query + 2 * 5 KV heads of 64 (270M); 24 + 2 * 6 heads of 128 (3B).
    expected_rows = {"OpenELM-270M": 30 * 64, "OpenELM-3B": 36 * 128}[name]
    assert model.layers[-1].attn.qkv_proj.weight.shape[0] == expected_rows


def test_make_divisible_never_rounds_down_more_than_10_percent():
    assert make_divisible(0.5 * 1280, 256) == 768  # 640 -> 768, not 512
    assert make_divisible(100, 256) == 256


def test_hf_dict_round_trip_uses_stored_lists():
    c = OpenELMConfig.tiny()
    d = json.loads(json.dumps(c.to_dict()))
    assert OpenELMConfig.from_dict(d) == c
    d["num_query_heads"] = [4, 4, 4, 4]
    d["num_kv_heads"] = [1, 1, 2, 4]
    stored = OpenELMConfig.from_dict(d)
    assert stored.num_query_heads == (4, 4, 4, 4) and stored.num_kv_heads == (1, 1, 2, 4)


def test_scalar_multipliers_give_uniform_layers_and_write_back_as_numbers():
    c = OpenELMConfig.from_layerwise(
        3, 64, 16, num_gqa_groups=1, qkv_multipliers=1.0, ffn_multipliers=2.0, ffn_dim_divisor=32
    )
    assert c.num_query_heads == (4, 4, 4) and c.intermediate_sizes == (128, 128, 128)
    assert c.to_dict()["qkv_multipliers"] == 1.0  # Apple's config rejects a one-element list


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "not an OpenELM"),
        ({"num_query_heads": [4, 4, 4], "num_kv_heads": [1, 1, 1]}, "num_query_heads has 3"),
        ({"num_query_heads": [4, 4, 4, 4], "num_kv_heads": [3, 1, 1, 1]}, "layer 0: 4 query heads"),
        ({"ffn_multipliers": [1.0, 2.0, 3.0]}, "ffn_multipliers must be"),
        ({"activation_fn_name": "gelu"}, "activation_fn_name"),
        ({"normalization_layer_name": "layer_norm"}, "normalization_layer_name"),
    ],
)
def test_invalid_configs_raise_clear_errors(change, message):
    d = {**OpenELMConfig.tiny().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        OpenELMConfig.from_dict(d)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="OpenELM-270M-Instruct"):
        OpenELMConfig.from_preset("OpenELM-7B")
    assert len(preset_names()) == 8


def test_tiny_varies_heads_and_widths_with_gqa():
    c = OpenELMConfig.tiny()
    assert len(set(c.num_query_heads)) > 1 and len(set(c.intermediate_sizes)) > 1
    assert all(q > kv for q, kv in zip(c.num_query_heads, c.num_kv_heads))
    assert Model(c)(mx.array([[1, 2, 3]])).shape == (1, 3, c.vocab_size)


# mlx-community/OpenELM-1_1B-Instruct-4bit's config.json, field for field (mlx-lm's format of Apple's).
PUBLISHED_1_1B = """{
  "activation_fn_name": "swish", "architectures": ["OpenELMForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
  "ffn_dim_divisor": 256,
  "ffn_multipliers": [0.5, 0.63, 0.76, 0.89, 1.02, 1.15, 1.28, 1.41, 1.54, 1.67, 1.8, 1.93, 2.06, 2.19, 2.31, 2.44,
                      2.57, 2.7, 2.83, 2.96, 3.09, 3.22, 3.35, 3.48, 3.61, 3.74, 3.87, 4.0],
  "ffn_with_glu": true, "head_dim": 64, "initializer_range": 0.02, "max_context_length": 2048, "model_dim": 2048,
  "model_type": "openelm", "normalization_layer_name": "rms_norm", "normalize_qk_projections": true,
  "num_gqa_groups": 4,
  "num_kv_heads": [4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8],
  "num_query_heads": [16, 16, 16, 20, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24, 24, 24, 24, 24, 28, 28, 28, 28, 28, 28,
                      32, 32, 32, 32],
  "num_transformer_layers": 28, "qkv_multipliers": [0.5, 1.0], "quantization": {"group_size": 64, "bits": 4},
  "rope_freq_constant": 10000, "rope_max_length": 4096, "share_input_output_layers": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": true, "vocab_size": 32000
}"""


def test_published_config_equals_the_preset():
    published = OpenELMConfig.from_dict(json.loads(PUBLISHED_1_1B))
    assert published == OpenELMConfig.from_preset("OpenELM-1_1B-Instruct")
    assert published.num_parameters() == PARAMS["OpenELM-1_1B"]


def test_rms_norm_eps_is_read_and_used_and_unknown_keys_are_warned_once():
    import mlx.core as mx
    import pytest as _pytest
    from helpers import random_model

    d = OpenELMConfig.tiny().to_dict()
    assert d["rms_norm_eps"] == 1e-6
    with _pytest.warns(UserWarning, match="config fields not used by OpenELM, ignored: rope_scaling, sliding_window"):
        wide = OpenELMConfig.from_dict({**d, "rms_norm_eps": 0.5, "rope_scaling": None, "sliding_window": 4})
    assert wide.rms_norm_eps == 0.5
    a, b = random_model(OpenELMConfig.tiny(), seed=1), random_model(wide, seed=1)
    x = mx.array([[1, 2, 3]])
    assert not mx.allclose(a(x), b(x))  # the model uses the config's epsilon, not a constant
