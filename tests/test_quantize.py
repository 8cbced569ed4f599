"""Quantization: recipes, GPTQ, bits per weight, float16-overflow safety, save/load (ours and mlx-lm's),
perplexity on the demo model, and the `quantize` / `perplexity` commands."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_model
from typer.testing import CliRunner

import openelm_mlx.cli.quantize  # noqa: F401  (registers the commands)
from openelm_mlx.cli._app import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import CheckpointError, OptionError
from openelm_mlx.evaluate.perplexity import make_windows, perplexity
from openelm_mlx.folders.io import load, load_model, save
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.quant.calibrate import allocate_bits, gptq_quantize, measure_sensitivity, pack
from openelm_mlx.quant.recipes import (
    QuantRecipe,
    bits_per_weight,
    mixed_recipe,
    planned_bits_per_weight,
    quantize_model,
    sensitive_layers,
)
from openelm_mlx.quant.run import BUILTIN_TEXT, QuantizeOptions, quantize_folder


@pytest.fixture(scope="module")
def texts(request):
    """(held-out windows, calibration windows) of tiny Shakespeare, tokenized by the demo tokenizer."""
    from conftest import SHARED

    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    text = path.read_text()
    cut = int(len(text) * 0.95)
    _, tok = load(DEMO_DIR)
    held = make_windows(tok.encode(text[cut:], add_bos=False), 128, tok.bos_id, 4)
    calib = make_windows(tok.encode(text[:60_000], add_bos=False), 128, tok.bos_id, 8)
    return held, calib


def demo_ppl(windows, bits=None, recipe=None, calib=None):
    model, _ = load(DEMO_DIR)
    if calib is not None:
        gptq_quantize(model, recipe or QuantRecipe(bits, 64), calib)
    elif bits or recipe:
        quantize_model(model, recipe=recipe or QuantRecipe(bits, 64))
    return perplexity(model, windows).perplexity, bits_per_weight(model) if (bits or recipe) else 32.0


def test_8bit_and_4bit_perplexity_stay_close_to_float(texts):
    held, _ = texts
    ref, _ = demo_ppl(held)
    assert demo_ppl(held, 8)[0] == pytest.approx(ref, rel=0.01)
    assert demo_ppl(held, 4)[0] == pytest.approx(ref, rel=0.10)


def test_gptq_3bit_beats_round_to_nearest_at_the_same_bits_per_weight(texts):
    held, calib = texts
    rtn, rtn_bpw = demo_ppl(held, 3)
    gptq, gptq_bpw = demo_ppl(held, 3, calib=calib)
    assert gptq_bpw == rtn_bpw
    assert gptq < rtn * 0.98, (gptq, rtn)


def test_pack_is_mlx_affine_layout_for_every_width():
    w = mx.random.normal((8, 128))
    for bits in (2, 3, 4, 5, 6, 8):
        wq, s, b = mx.quantize(w, group_size=32, bits=bits)
        deq = np.array(mx.dequantize(wq, s, b, group_size=32, bits=bits))
        levels = np.round((deq - np.repeat(np.array(b), 32, -1)) / np.repeat(np.array(s), 32, -1))
        assert mx.array_equal(pack(levels.astype(np.uint32), bits), wq)


def test_mixed_recipe_gives_the_bits_per_weight_it_plans():
    model = random_model(OpenELMConfig.tiny(num_transformer_layers=8, model_dim=64))
    recipe = mixed_recipe("mixed_3_6", model, 32)
    six = {p for p, s in recipe.overrides.items() if s["bits"] == 6}
    assert sensitive_layers(8) == [0, 3, 6, 7]
    expected = {"transformer.token_embeddings"}
    expected |= {f"transformer.layers.{i}.{m}" for i in (0, 3, 6, 7) for m in ("attn.out_proj", "ffn.proj_2")}
    assert six == expected
    planned = planned_bits_per_weight(model, recipe)
    quantize_model(model, recipe=recipe)
    assert bits_per_weight(model) == pytest.approx(planned, abs=1e-9)
    assert 3 + 64 / 32 < planned < 6 + 64 / 32  # float32 scale and bias per 32 weights


def test_target_bpw_allocates_bits_within_the_target():
    model = random_model(OpenELMConfig.tiny())
    windows = mx.array(np.random.default_rng(0).integers(3, 256, (2, 33)).astype(np.int32))
    sens = measure_sensitivity(model, windows, 32)
    recipe = allocate_bits(model, sens, 5.0, QuantRecipe(4, 32))
    planned = planned_bits_per_weight(model, recipe)
    assert 4.5 < planned <= 5.0 and recipe.overrides
    quantize_model(model, recipe=recipe)
    assert bits_per_weight(model) == pytest.approx(planned, abs=1e-9)
    with pytest.raises(OptionError, match="target_bpw"):
        allocate_bits(random_model(OpenELMConfig.tiny()), sens, 2.5, QuantRecipe(4, 32))


def test_saved_model_loads_in_ours_and_mlx_lm_with_the_in_memory_logits(tmp_path):
    from mlx_lm.utils import load_model as lm_load_model

    model, tok = load(DEMO_DIR)
    quantize_model(model, recipe=mixed_recipe("mixed_3_6", model, 64))
    save(model, tmp_path / "q", tokenizer=tok)
    ids = mx.array([tok.encode("ROMEO: What light")])
    expected = model(ids)
    assert mx.array_equal(load_model(tmp_path / "q")(ids), expected)
    theirs, _ = lm_load_model(tmp_path / "q")
    assert mx.allclose(theirs(ids), expected, atol=1e-4)


def overflow_folder(path, scale: float, dtype) -> None:
    """A tiny model whose layer-1 FFN is scaled so its outputs pass float16's range (or float32's)."""
    model = random_model(OpenELMConfig.tiny())
    ffn = model.layers[1].ffn
    ffn.proj_1.weight = ffn.proj_1.weight * scale
    ffn.proj_2.weight = ffn.proj_2.weight * scale
    model.set_dtype(dtype)
    save(model, path)


def test_float16_overflow_is_detected_and_kept_in_bfloat16(tmp_path):
    overflow_folder(tmp_path / "f16", 60.0, mx.float16)
    ids = mx.array([[1, 5, 9, 30, 7, 100, 200, 3]])
    assert not mx.isfinite(load_model(tmp_path / "f16")(ids)).all()  # the float16 model emits garbage
    report = quantize_folder(tmp_path / "f16", tmp_path / "q", QuantizeOptions(bits=4, group_size=32))
    assert any("bfloat16" in n and "transformer.layers.1" in n for n in report.notes), report.notes
    assert json.loads((tmp_path / "q" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert mx.isfinite(load_model(tmp_path / "q")(ids)).all()


def test_non_finite_even_in_float32_is_refused(tmp_path):
    overflow_folder(tmp_path / "f32", 1e19, mx.float32)
    with pytest.raises(CheckpointError, match=r"inf/nan outputs at transformer\.layers\.1"):
        quantize_folder(tmp_path / "f32", tmp_path / "q", QuantizeOptions(bits=4, group_size=32))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "7"], "error: --bits: must be one of (2, 3, 4, 5, 6, 8), got 7"),
        (["--group-size", "48"], "error: --group-size: must be one of (32, 64, 128), got 48"),
        (["--target-bpw", "1", "--calib", "x.txt"], "error: --target-bpw: must be >= 2.0, got 1.0"),
        (["--method", "gptq"], "error: --calib: calibration text is needed"),
        (["--recipe", "mixed_2_6"], "error: --recipe: must be one of mixed_3_6, mixed_4_6"),
    ],
)
def test_bad_options_exit_1_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["quantize", str(DEMO_DIR), "-o", str(tmp_path / "q"), *args])
    assert result.exit_code == 1 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_quantize_command_reports_and_dequantize_restores_float(tmp_path):
    (tmp_path / "eval.txt").write_text(BUILTIN_TEXT)
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["quantize", str(DEMO_DIR), "-o", str(tmp_path / "q"), "--bits", "8", "--embedding-bits", "float"]
        + ["--eval", str(tmp_path / "eval.txt"), "--seq-len", "64"],
    )
    assert out.exit_code == 0, out.output
    assert "bits per weight" in out.output and "MB" in out.output and "mean KL from float" in out.output
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and "transformer.token_embeddings" not in config["quantization"]
    out = runner.invoke(app, ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "f"), "--dequantize"])
    assert out.exit_code == 0, out.output
    assert "quantization" not in json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    out = runner.invoke(app, ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "used"), "--dequantize"])
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1  # a used folder needs --force
    out = runner.invoke(app, ["perplexity", "--model", str(tmp_path / "f"), "--data", str(tmp_path / "eval.txt")])
    assert out.exit_code == 0 and "perplexity" in out.output and "tokens in 1 windows" in out.output
