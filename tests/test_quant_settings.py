"""Quantization settings are defined once: `convert -q` goes through `quantize`'s settings and recipes, and the
KV cache has its own bit choices (what mlx-lm's QuantizedKVCache stores correctly)."""

import json

import mlx.core as mx
import pytest
from checkpoints import hf_folder
from helpers import numpy_weights, random_model
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache
from typer.testing import CliRunner

from openelm_mlx import OptionError
from openelm_mlx.cli import app
from openelm_mlx.generation.settings import KV_BITS, GenerationConfig
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.quant.recipes import DEFAULT_BITS, DEFAULT_GROUP_SIZE, Q_BITS, QuantRecipe
from openelm_mlx.quant.run import QuantizeOptions

CONFIG = OpenELMConfig.tiny(model_dim=128, vocab_size=256)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-settings")
    return hf_folder(root / "hf", numpy_weights(random_model(CONFIG, seed=5)), CONFIG.to_dict())


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--bits", "3", "--group-size", "32"],
        ["--recipe", "mixed_4_6"],
        ["--bits", "8", "--embedding-bits", "float"],
    ],
    ids=["default", "uniform", "recipe", "embedding-bits"],
)
def test_convert_q_writes_what_quantize_writes(hf, tmp_path, args):
    q_args = [a.replace("--", "--q-") for a in args]
    assert run("convert", hf, "-o", tmp_path / "float").exit_code == 0
    assert run("quantize", tmp_path / "float", "-o", tmp_path / "ours", *args).exit_code == 0
    result = run("convert", hf, "-o", tmp_path / "direct", "-q", *q_args)
    assert result.exit_code == 0, result.output
    ours, direct = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("ours", "direct"))
    assert direct["quantization"] == ours["quantization"]
    a = mx.load(str(tmp_path / "ours" / "model.safetensors"))
    b = mx.load(str(tmp_path / "direct" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_convert_q_options_are_checked_as_quantize_checks_them(hf, tmp_path):
    cases = [
        (["--q-recipe", "mixed_4_6"], "--q-recipe: takes effect only with -q/--quantize"),
        (["-q", "--q-recipe", "mixed_4_6", "--q-bits", "3"], "--q-bits: is set by the recipe"),
        (["-q", "--q-recipe", "mixed_9"], "--q-recipe: must be one of mixed_3_6, mixed_4_6"),
        (["-q", "--q-embedding-bits", "7"], "--q-embedding-bits: must be one of"),
        (["-q", "--q-group-size", "48"], "--q-group-size: must be one of (32, 64, 128)"),
    ]
    for args, message in cases:
        result = run("convert", hf, "-o", tmp_path / "out", *args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_the_quantization_defaults_are_the_ones_defined_in_recipes():
    assert (QuantRecipe().bits, QuantRecipe().group_size) == (DEFAULT_BITS, DEFAULT_GROUP_SIZE)
    assert (QuantizeOptions().bits, QuantizeOptions().group_size) == (DEFAULT_BITS, DEFAULT_GROUP_SIZE)
    for command, option in (["quantize", "--bits"], ["convert", "--q-bits"]):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        line = next(x for x in result.output.splitlines() if f"{option} " in x)
        assert ", ".join(map(str, Q_BITS[:-1])) in line and f"[default: {DEFAULT_BITS}]" in line


@pytest.mark.parametrize("head_dim", range(32, 257, 32))
def test_every_kv_bits_choice_works_with_mlx_lm_quantized_cache(head_dim):
    for bits in KV_BITS:
        GenerationConfig(kv_bits=bits)
        cache = QuantizedKVCache(group_size=32, bits=bits)
        for n in (5, 1):  # a prompt, then one decode step
            k, v, q = (mx.random.normal((1, 2, n, head_dim)) for _ in range(3))
            out = scaled_dot_product_attention(q, *cache.update_and_fetch(k, v), cache=cache, scale=0.1, mask=None)
            assert out.shape == (1, 2, n, head_dim) and mx.isfinite(out).all().item()


@pytest.mark.parametrize("bits", sorted(set(range(1, 9)) - set(KV_BITS)))
def test_kv_bits_the_cache_cannot_store_are_refused(bits):
    with pytest.raises(OptionError, match="kv_bits"):
        GenerationConfig(kv_bits=bits)
