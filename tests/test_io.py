"""Save/load: exact round trips, mlx-lm interoperability, and clear errors on bad files."""

import gc
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model

from openelm_mlx import CheckpointError, load_model, save

X = mx.array([[1, 5, 7, 9, 11, 2]])


def test_save_load_is_exact(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert mx.array_equal(loaded(X), tiny_model(X))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_query_heads"] == [2, 4, 4, 4]


def test_saved_model_loads_with_mlx_lm(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "m")
    theirs, _ = mlx_lm_load_model(tmp_path / "m")
    assert mx.array_equal(theirs(X), tiny_model(X))


def test_quantized_save_load_round_trip(tiny_model, tmp_path):
    nn.quantize(tiny_model, group_size=32, bits=4)
    save(tiny_model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert mx.array_equal(load_model(tmp_path / "q")(X), tiny_model(X))
    theirs, _ = mlx_lm_load_model(tmp_path / "q")
    assert mx.array_equal(theirs(X), tiny_model(X))


def test_sharded_save_writes_an_index_and_loads(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "s", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert mx.array_equal(load_model(tmp_path / "s")(X), tiny_model(X))
    # Re-saving unsharded into the same folder removes the old shards and index.
    save(tiny_model, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        ".openelm-mlx-files.json",
        "config.json",
        "model.safetensors",
    ]


def test_apple_untied_checkpoint_drops_unused_classifier(tmp_path):
    from helpers import random_model

    from openelm_mlx.model.config import OpenELMConfig

    model = random_model(OpenELMConfig.tiny(share_input_output_layers=False))
    save(model, tmp_path / "u")
    weights = mx.load(str(tmp_path / "u" / "model.safetensors"))
    weights["transformer.classifier.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(tmp_path / "u" / "model.safetensors"), weights)
    assert mx.array_equal(load_model(tmp_path / "u")(X), model(X))


def _saved(model, tmp_path: Path) -> Path:
    save(model, tmp_path / "m")
    return tmp_path / "m"


def test_missing_config_names_the_file(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model(path)


def test_wrong_shape_names_file_and_tensor(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    w = mx.load(str(path / "model.safetensors"))
    w["transformer.layers.1.ffn.proj_2.weight"] = mx.zeros((64, 10))
    mx.save_safetensors(str(path / "model.safetensors"), w)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'transformer.layers.1.ffn.proj_2.weight' "
        r"has shape \(64, 10\), this OpenELM config expects \(64, 128\)",
    ):
        load_model(path)


def test_unknown_and_missing_tensors_are_named(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    w = mx.load(str(path / "model.safetensors"))
    w["transformer.layers.9.attn.bogus.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(path / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="unknown tensor 'transformer.layers.9.attn.bogus.weight'"):
        load_model(path)
    del w["transformer.layers.9.attn.bogus.weight"], w["transformer.norm.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="missing tensor.*transformer.norm.weight"):
        load_model(path)


def test_truncated_safetensors_names_file_and_tensor(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.+' needs \d+ data bytes"):
        load_model(path)
    (path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        load_model(path)


def test_failed_save_leaves_existing_model_untouched(tiny_model, tmp_path):
    path = _saved(tiny_model, tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    class BrokenTokenizer:
        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(tiny_model, path, tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    shutil.rmtree(path)


def test_models_written_by_mlx_lm_load_here(tmp_path, llama_tokenizer_path):
    """mlx-lm's own `convert` (quantized) of an Apple-format folder loads with our loader, same logits."""
    from helpers import random_model
    from mlx_lm import convert as mlx_lm_convert
    from openelm_mlx.convert import export

    from openelm_mlx.generation.tokenizer import Tokenizer
    from openelm_mlx.model.config import OpenELMConfig

    model = random_model(OpenELMConfig.tiny(vocab_size=32000, model_dim=64))
    save(model, tmp_path / "ours", tokenizer=Tokenizer(llama_tokenizer_path))
    export(tmp_path / "ours", tmp_path / "hf")
    mlx_lm_convert(str(tmp_path / "hf"), str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=32)
    theirs, _ = mlx_lm_load_model(tmp_path / "theirs")
    assert mx.array_equal(load_model(tmp_path / "theirs")(X), theirs(X))


def test_saved_model_with_tokenizer_loads_with_mlx_lm_load(tmp_path, llama_tokenizer_path):
    import mlx_lm
    from helpers import random_model

    from openelm_mlx import load
    from openelm_mlx.generation.tokenizer import Tokenizer
    from openelm_mlx.model.config import OpenELMConfig

    model = random_model(OpenELMConfig.tiny(vocab_size=32000, model_dim=64))
    save(model, tmp_path / "m", tokenizer=Tokenizer(llama_tokenizer_path, chat_template=True))
    their_model, their_tok = mlx_lm.load(str(tmp_path / "m"))
    ours, our_tok = load(tmp_path / "m")
    assert mx.array_equal(their_model(X), ours(X))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert list(their_tok.apply_chat_template(messages, add_generation_prompt=True)) == our_tok.apply_chat_template(
        messages
    )


def _as_bfloat16(model):
    from openelm_mlx.folders.io import cast_floating

    cast_floating(model, mx.bfloat16)
    mx.eval(model.parameters())
    return model


def test_dtype_casts_float_weights_as_they_load(tiny_model, tmp_path):
    """A bfloat16 folder loaded with dtype="float32" computes in float32 on the same (exactly widened) weights."""
    from mlx.utils import tree_flatten

    save(_as_bfloat16(tiny_model), tmp_path / "bf16")
    half = load_model(tmp_path / "bf16")
    wide = load_model(tmp_path / "bf16", dtype="float32")
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.bfloat16}
    assert {v.dtype for _, v in tree_flatten(wide.parameters())} == {mx.float32}
    for (name, h), (_, w) in zip(tree_flatten(half.parameters()), tree_flatten(wide.parameters())):
        assert mx.array_equal(h.astype(mx.float32), w), name
    assert wide(X).dtype == mx.float32 and half(X).dtype == mx.bfloat16


def test_dtype_keeps_packed_quantized_weights(tiny_model, tmp_path):
    from openelm_mlx.folders.io import cast_floating

    nn.quantize(tiny_model, group_size=32, bits=4)
    save(_as_bfloat16(tiny_model), tmp_path / "q")
    wide = load_model(tmp_path / "q", dtype="float32")
    qkv = wide.layers[0].attn.qkv_proj
    assert qkv.weight.dtype == mx.uint32 and qkv.scales.dtype == mx.float32
    cast_floating(tiny_model, mx.float32)  # the same bfloat16 values, widened in memory
    assert mx.array_equal(wide(X), tiny_model(X))


def test_unknown_dtype_is_refused_before_reading(tmp_path):
    from openelm_mlx import OptionError, load

    with pytest.raises(OptionError, match="dtype: must be one of float32, float16, bfloat16, got 'int4'"):
        load(tmp_path / "missing", dtype="int4")


def test_float16_is_refused_for_3b_shaped_models(tmp_path):
    from openelm_mlx import OptionError
    from openelm_mlx.model.config import OpenELMConfig

    (tmp_path / "3b").mkdir()
    (tmp_path / "3b" / "config.json").write_text(json.dumps(OpenELMConfig.from_preset("OpenELM-3B").to_dict()))
    with pytest.raises(OptionError, match="3b/config.json: float16 overflows in 3B-shaped.*use bfloat16 or float32"):
        load_model(tmp_path / "3b", dtype="float16")
    saved_in_float16 = {**OpenELMConfig.from_preset("OpenELM-3B").to_dict(), "torch_dtype": "float16"}
    (tmp_path / "3b" / "config.json").write_text(json.dumps(saved_in_float16))  # as `convert --force` writes it
    with pytest.raises(CheckpointError, match="safetensors"):  # past the dtype check, to the missing weights
        load_model(tmp_path / "3b", dtype="float16")


def test_a_cast_never_holds_both_copies_whole(tmp_path):
    """Casting as it loads evaluates tensor by tensor: the peak is the float32 model plus one saved tensor, not the
    float32 and the bfloat16 model together."""
    from mlx.utils import tree_flatten

    from openelm_mlx.model.config import OpenELMConfig
    from openelm_mlx.model.decoder import Model

    model = Model(OpenELMConfig.tiny(model_dim=256, num_transformer_layers=8))
    mx.eval(model.parameters())
    save(_as_bfloat16(model), tmp_path / "bf16")
    sizes = [v.nbytes for _, v in tree_flatten(model.parameters())]
    del model
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # what earlier tests still hold
    wide = load_model(tmp_path / "bf16", dtype="float32")
    wide_bytes = sum(v.nbytes for _, v in tree_flatten(wide.parameters()))
    assert wide_bytes == 2 * sum(sizes)
    assert mx.get_peak_memory() - before <= wide_bytes + 2 * max(sizes) < wide_bytes + sum(sizes)


def test_dtype_by_mlx_dtype_and_bad_types():
    from openelm_mlx import OptionError
    from openelm_mlx.folders.io import parse_dtype

    assert parse_dtype(mx.bfloat16) == mx.bfloat16 and parse_dtype("float16") == mx.float16
    for bad in (mx.int32, ["float32"], 32, "FLOAT32"):
        with pytest.raises(OptionError, match="dtype: must be one of"):
            parse_dtype(bad)


def test_float16_from_the_hub_reads_only_the_config_before_refusing_a_3b(tmp_path, monkeypatch):
    from openelm_mlx import OptionError, load
    from openelm_mlx.folders import hub
    from openelm_mlx.model.config import OpenELMConfig

    fetched = []

    def fake_download(repo_id, patterns=hub.MODEL_FILES, revision=None):
        fetched.append(tuple(patterns))
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text(json.dumps(OpenELMConfig.from_preset("OpenELM-3B").to_dict()))
        return tmp_path / "snap"

    monkeypatch.setattr(hub, "download", fake_download)
    with pytest.raises(OptionError, match="float16 overflows"):
        load("apple/OpenELM-3B-Instruct", dtype="float16")
    assert fetched == [("config.json",)]
