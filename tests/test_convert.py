"""Conversion: every source format gives the reference logits; bad input fails cleanly, writing nothing."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import corenet_state, hf_folder, write_malicious_zip, write_safetensors, write_torch_zip
from helpers import numpy_weights, random_model, reference_config
from openelm_mlx.convert import convert, export
from openelm_mlx.convert.tables import CORENET_TABLE, HF_TABLE, invert, map_state_dict
from openelm_mlx.convert.torch_zip import UnsafeCheckpointError, load_torch_zip
from reference import reference_logits, rel_error
from typer.testing import CliRunner

from openelm_mlx import load, load_model
from openelm_mlx.cli import app
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.quant.run import QuantizeOptions

TOKENS = [1, 9, 33, 200, 17, 5, 250, 64]
CONFIG = OpenELMConfig.tiny()


@pytest.fixture(scope="module")
def source():
    """(HF-keyed float32 weights, Apple config.json dict, reference logits) of a random tiny model."""
    weights = numpy_weights(random_model(CONFIG, seed=7))
    return weights, CONFIG.to_dict(), reference_logits(weights, reference_config(CONFIG), TOKENS)


def _logits(path: Path) -> np.ndarray:
    return np.array(load_model(path)(mx.array([TOKENS]))[0].astype(mx.float32))


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_huggingface_formats_match_reference(source, tmp_path, fmt):
    weights, config, ref = source
    hf_folder(tmp_path / "hf", weights, config, fmt)
    report = convert(tmp_path / "hf", tmp_path / "mlx")
    assert report.dtype == "float32" and report.tensors == len(weights)
    assert rel_error(_logits(tmp_path / "mlx"), ref) <= 1e-4


def test_untied_apple_checkpoint_drops_classifier(tmp_path):
    config = OpenELMConfig.tiny(share_input_output_layers=False)
    weights = numpy_weights(random_model(config, seed=2))
    ref = reference_logits(weights, reference_config(config), TOKENS)
    weights["transformer.classifier.weight"] = np.zeros((3, 3), np.float32)
    hf_folder(tmp_path / "hf", weights, config.to_dict())
    convert(tmp_path / "hf", tmp_path / "mlx")
    assert rel_error(_logits(tmp_path / "mlx"), ref) <= 1e-4


@pytest.mark.parametrize("wrap", [None, "model_state_dict"])
def test_corenet_checkpoints_with_padded_vocab(source, tmp_path, wrap, caplog):
    weights, config, ref = source
    state = corenet_state(weights, padded_vocab=CONFIG.vocab_size + 64)
    name = "training_checkpoint_last.pt" if wrap else "checkpoint_last.pt"
    write_torch_zip(tmp_path / name, state, wrap=wrap)
    arch = tmp_path / "arch.yaml"
    arch.write_text(
        "\n".join(
            f"{k}: {json.dumps(v)}"
            for k, v in config.items()
            if k not in ("num_query_heads", "num_kv_heads", "architectures", "model_type")
        )
    )
    convert(tmp_path / name, tmp_path / "mlx", arch_config=arch)
    assert load_model(tmp_path / "mlx").config.vocab_size == CONFIG.vocab_size + 64  # padded, with a warning
    assert "padded vocabulary" in caplog.text
    convert(tmp_path / name, tmp_path / "mlx2", arch_config=arch, vocab_size=CONFIG.vocab_size)
    assert rel_error(_logits(tmp_path / "mlx2"), ref) <= 1e-4


def test_corenet_vocab_defaults_to_the_tokenizer_size(tmp_path, llama_tokenizer_path):
    config = OpenELMConfig.tiny(vocab_size=32000, model_dim=32, head_dim=16)
    weights = numpy_weights(random_model(config))
    (tmp_path / "OpenELM-tiny-Instruct").mkdir()
    ckpt = tmp_path / "OpenELM-tiny-Instruct" / "checkpoint.pt"
    write_torch_zip(ckpt, corenet_state(weights, 32128))
    (tmp_path / "arch.json").write_text(json.dumps(config.to_dict()))
    convert(
        ckpt,
        tmp_path / "out",
        arch_config=tmp_path / "arch.json",
        tokenizer=str(llama_tokenizer_path),
    )
    model, tok = load(tmp_path / "out")
    assert model.config.vocab_size == 32000 and tok.vocab_size == 32000
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in saved["chat_template"]  # an Instruct source: the template is recorded
    assert tok.chat_template
    convert(
        ckpt,
        tmp_path / "base",
        arch_config=tmp_path / "arch.json",
        tokenizer=str(llama_tokenizer_path),
        chat_template=False,
    )
    assert not load(tmp_path / "base")[1].chat_template


def test_bfloat16_torch_checkpoint_keeps_its_dtype(source, tmp_path):
    weights, config, ref = source
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    write_torch_zip(tmp_path / "hf" / "pytorch_model.bin", weights, dtype="bfloat16")
    report = convert(tmp_path / "hf", tmp_path / "mlx")
    assert report.dtype == "bfloat16"
    assert rel_error(_logits(tmp_path / "mlx"), ref) <= 5e-2


def test_quantized_conversion_round_trips_the_in_memory_model(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", weights, config)
    report = convert(tmp_path / "hf", tmp_path / "q", quantize=QuantizeOptions(bits=4, group_size=32))
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization"]["bits"] == 4 and saved["quantization"]["group_size"] == 32
    assert 6.0 < report.bits_per_weight < 6.5  # 4 bits + float32 scale and bias per 32 weights, float norms
    from openelm_mlx.quant.recipes import quantize_model

    in_memory = load_model(tmp_path / "hf")
    quantize_model(in_memory, 4, 32)
    assert mx.array_equal(load_model(tmp_path / "q")(mx.array([TOKENS])), in_memory(mx.array([TOKENS])))


def test_layers_the_group_size_does_not_divide_stay_float(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", weights, config)
    report = convert(tmp_path / "hf", tmp_path / "q", quantize=QuantizeOptions(group_size=128))
    assert "transformer.layers.0.attn.qkv_proj" in report.float_layers  # model_dim 64 < 128
    assert load_model(tmp_path / "q")(mx.array([TOKENS])).shape == (1, len(TOKENS), CONFIG.vocab_size)


def test_hf_to_mlx_to_hf_is_bit_exact(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", weights, config)
    convert(tmp_path / "hf", tmp_path / "mlx")
    export(tmp_path / "mlx", tmp_path / "back")
    back = mx.load(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(weights)
    assert all(np.array_equal(np.array(back[k]), weights[k]) for k in weights)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["auto_map"]["AutoModelForCausalLM"].endswith("OpenELMForCausalLM")
    assert exported["num_query_heads"] == config["num_query_heads"]


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_zip(tmp_path / "pytorch_model.bin", marker)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: refusing to load: .* os.system"):
        load_torch_zip(tmp_path / "pytorch_model.bin")
    result = CliRunner().invoke(app, ["convert", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "os.system" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_files_fail_cleanly(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "st", weights, config)
    data = (tmp_path / "st" / "model.safetensors").read_bytes()
    (tmp_path / "st" / "model.safetensors").write_bytes(data[:-64])
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "st"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "model.safetensors: truncated: tensor" in result.output
    hf_folder(tmp_path / "bin", weights, config, "bin")
    data = (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "bin"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "pytorch_model.bin: not a torch zip checkpoint" in result.output
    assert not (tmp_path / "out").exists() and "Traceback" not in result.output


def test_config_that_disagrees_with_weights_names_the_tensor(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", weights, {**config, "num_query_heads": [4, 4, 4, 4], "num_kv_heads": [2, 2, 2, 2]})
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "model.safetensors: tensor 'transformer.layers.0.attn.qkv_proj.weight' has shape (64, 64)" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_key_is_named(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", {**weights, "transformer.layers.0.attn.rotary.inv_freq": np.ones(8)}, config)
    with pytest.raises(ValueError, match="unknown tensor 'transformer.layers.0.attn.rotary.inv_freq'"):
        convert(tmp_path / "hf", tmp_path / "out")


def test_existing_output_is_untouched_when_conversion_fails(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", weights, config)
    convert(tmp_path / "hf", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError):
        convert(tmp_path / "hf", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_3b_float16_is_refused_without_force(tmp_path):
    config = OpenELMConfig.tiny(
        model_dim=3072,
        head_dim=128,
        num_transformer_layers=1,
        vocab_size=8,
        ffn_multipliers=(0.5, 0.5),
        ffn_dim_divisor=256,
    )
    weights = {k: np.zeros(v.shape, np.float32) for k, v in numpy_weights(random_model(config)).items()}
    hf_folder(tmp_path / "hf", weights, config.to_dict())
    with pytest.raises(ValueError, match="float16 overflows.*bfloat16.*force"):
        convert(tmp_path / "hf", tmp_path / "out", dtype="float16")
    assert convert(tmp_path / "hf", tmp_path / "out", dtype="float16", force=True).dtype == "float16"


def test_hub_repo_converts_offline_from_a_prefilled_cache(tmp_path, monkeypatch, llama_tokenizer_path):
    llama = OpenELMConfig.tiny(vocab_size=32000)  # the LLaMA tokenizer needs all 32000 rows
    weights, config = numpy_weights(random_model(llama, seed=7)), llama.to_dict()
    ref = reference_logits(weights, reference_config(llama), TOKENS)
    cache = tmp_path / "hf_home" / "hub" / "models--apple--OpenELM-tiny-Instruct"
    commit = "0" * 40
    snapshot = hf_folder(cache / "snapshots" / commit, weights, config)
    shutil.copyfile(llama_tokenizer_path, snapshot / "tokenizer.model")
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    convert("apple/OpenELM-tiny-Instruct", tmp_path / "mlx")
    assert rel_error(_logits(tmp_path / "mlx"), ref) <= 1e-4
    assert (tmp_path / "mlx" / "tokenizer.model").is_file()
    result = CliRunner().invoke(app, ["convert", "apple/not-cached", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "apple/not-cached: not in the local Hugging Face cache" in result.output


def test_tables_are_inverses_and_reject_unknown_keys():
    # The CoreNet table renames every key, so a round trip through it fails if templates were not inverted.
    corenet = {f"layers.{i}.attn.qkv_proj.weight": i for i in range(12)}
    corenet.update({"token_embeddings.weight": 20, "norm.weight": 21, "classifier.weight": 22})
    mlx_names = map_state_dict(corenet, CORENET_TABLE)
    assert "transformer.layers.11.attn.qkv_proj.weight" in mlx_names and "lm_head.weight" in mlx_names
    assert map_state_dict(mlx_names, invert(CORENET_TABLE)) == corenet
    hf = {"transformer.layers.3.ffn.proj_2.weight": 0, "transformer.norm.weight": 1}
    assert map_state_dict(map_state_dict(hf, HF_TABLE), invert(HF_TABLE)) == hf
    with pytest.raises(ValueError, match="two sources"):
        invert({"a": "x", "b": "x"})
    assert map_state_dict({"layers.11.ffn.proj_1.weight": 1, "classifier.weight": 2}, CORENET_TABLE) == {
        "transformer.layers.11.ffn.proj_1.weight": 1,
        "lm_head.weight": 2,
    }
    with pytest.raises(ValueError, match="ckpt.pt: unknown tensor 'layers.1.attn.bias'"):
        map_state_dict({"layers.1.attn.bias": 0}, CORENET_TABLE, "ckpt.pt")


def test_write_safetensors_helper_is_readable_by_mlx(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert mx.load(str(tmp_path / "a.safetensors"))["x"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_embedding_and_bad_quantization_settings_fail_before_writing(source, tmp_path):
    weights, config, _ = source
    hf_folder(tmp_path / "hf", {k: v for k, v in weights.items() if "token_embeddings" not in k}, config)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "missing tensor 'transformer.token_embeddings.weight'" in result.output
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "-q", "--q-bits", "7"]
    )
    assert result.exit_code == 1 and "--q-bits: must be one of (2, 3, 4, 5, 6, 8), got 7" in result.output
    assert not (tmp_path / "out").exists()


def test_corenet_training_yaml_names_the_architecture(tmp_path):
    from openelm_mlx.folders.arch import read_arch_config

    (tmp_path / "openelm_270M.yaml").write_text(
        "_anchor_vocab_size: &_anchor_vocab_size 32128\n"
        "_anchor_padding_index: &_anchor_padding_index 32000\n"
        "model:\n  activation_checkpointing: false\n  language_modeling:\n    name: general_gpt\n"
        "    general_gpt:\n      model_name: OpenELM-270M\n      vocab_size: *_anchor_vocab_size\n"
        "      max_context_length: 2048\n      padding_index: *_anchor_padding_index\n"
    )
    config = read_arch_config(tmp_path / "openelm_270M.yaml")
    assert config.num_parameters() == 271_527_168 + 128 * 1280  # the padded embedding rows
    assert config.vocab_size == 32128 and config.num_query_heads[-1] == 20
