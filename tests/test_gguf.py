"""GGUF both ways: export in llama.cpp's `openelm` layout (read back with the gguf package's own reader),
import with a rebuilt tokenizer, hostile files refused in one line, and logits checked inside llama.cpp."""

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model
from mlx.utils import tree_flatten
from openelm_mlx.convert.gguf import proto_from_vocab, vocab_from_proto
from openelm_mlx.convert.pipeline import export_gguf, import_gguf
from typer.testing import CliRunner

import openelm_mlx.cli.convert  # noqa: F401  (registers `convert` and `export`)
import openelm_mlx.cli.lora  # noqa: F401  (registers `fuse`)
from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import TokenizerNotFoundError
from openelm_mlx.folders.io import load, load_model, save
from openelm_mlx.generation.template import JINJA
from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig

gguf = pytest.importorskip("gguf")
runner = CliRunner()
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"
SAMPLES = [
    "Hello world",
    "  two  leading spaces and\ttabs\n\nnewlines ",
    "ROMEO: What light through yonder window breaks?",
    "naïve café — 東京 😀 \u00a0nbsp",
    "digits 1234567890 and 3.14159",
    "",
    " ",
    "<s> </s> <unk> are plain text here",
]


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _layerwise_folder(root: Path, chat: bool = False) -> Path:
    """A tiny random OpenELM, uneven heads and widths per layer with GQA, saved with the demo tokenizer."""
    config = OpenELMConfig.tiny(vocab_size=2048, num_transformer_layers=5, qkv_multipliers=(0.25, 1.0))
    assert len(set(config.num_query_heads)) > 1 and len(set(config.intermediate_sizes)) > 2
    assert all(q > kv for q, kv in zip(config.num_query_heads, config.num_kv_heads))
    save(random_model(config, seed=3), root, tokenizer=Tokenizer(DEMO_TOKENIZER, chat_template=chat))
    return root


@pytest.fixture(scope="module")
def layerwise(tmp_path_factory) -> Path:
    return _layerwise_folder(tmp_path_factory.mktemp("layerwise") / "model")


@pytest.fixture(scope="module")
def demo_f32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "demo-f32.gguf"
    export_gguf(DEMO_DIR, path, "f32")
    return path


# --- export, read back with gguf's reader -----------------------------------------------------------------


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_every_key_and_tensor_reads_back_with_the_gguf_reader(layerwise, tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(layerwise, path, "f32")
    reader = gguf.GGUFReader(path)
    config = load_model(layerwise).config
    expect = {
        "general.architecture": "openelm",
        "openelm.block_count": config.num_transformer_layers,
        "openelm.context_length": config.max_context_length,
        "openelm.embedding_length": config.model_dim,
        "openelm.feed_forward_length": list(config.intermediate_sizes),
        "openelm.attention.head_count": list(config.num_query_heads),
        "openelm.attention.head_count_kv": list(config.num_kv_heads),
        "openelm.rope.dimension_count": config.head_dim,
        "openelm.attention.key_length": config.head_dim,
        "openelm.attention.value_length": config.head_dim,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "openelm.rope.freq_base") == pytest.approx(config.rope_freq_constant)
    assert _field(reader, "openelm.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert reader.fields["openelm.attention.head_count"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    vocab = vocab_from_proto(DEMO_TOKENIZER.read_bytes(), "demo")
    assert _field(reader, "tokenizer.ggml.tokens") == vocab.tokens
    assert _field(reader, "tokenizer.ggml.token_type") == vocab.types
    assert np.allclose(_field(reader, "tokenizer.ggml.scores"), vocab.scores)
    assert "tokenizer.chat_template" not in reader.fields

    ours = _weights(load_model(layerwise))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    expected_names = {"token_embd.weight", "output_norm.weight"}
    for i, width in enumerate(config.intermediate_sizes):
        p = f"transformer.layers.{i}."
        pairs = {
            "attn_norm": ours[p + "attn_norm.weight"],
            "attn_qkv": ours[p + "attn.qkv_proj.weight"],  # rows: all Q heads, then K, then V
            "attn_q_norm": ours[p + "attn.q_norm.weight"],
            "attn_k_norm": ours[p + "attn.k_norm.weight"],
            "attn_output": ours[p + "attn.out_proj.weight"],
            "ffn_norm": ours[p + "ffn_norm.weight"],
            "ffn_gate": ours[p + "ffn.proj_1.weight"][:width],
            "ffn_up": ours[p + "ffn.proj_1.weight"][width:],
            "ffn_down": ours[p + "ffn.proj_2.weight"],
        }
        for name, value in pairs.items():
            t = tensors[f"blk.{i}.{name}.weight"]
            expected_names.add(t.name)
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(t.data).reshape(value.shape), value), t.name
    assert set(tensors) == expected_names
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), ours["transformer.token_embeddings.weight"])


def test_instruct_models_carry_the_chat_template_both_ways(tmp_path):
    folder = _layerwise_folder(tmp_path / "instruct", chat=True)
    export_gguf(folder, tmp_path / "i.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "i.gguf")
    assert _field(reader, "tokenizer.chat_template") == JINJA
    import_gguf(tmp_path / "i.gguf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == JINJA


# --- round trips ------------------------------------------------------------------------------------------


def test_f32_round_trip_is_bitwise_and_keeps_the_per_layer_config(layerwise, tmp_path):
    export_gguf(layerwise, tmp_path / "m.gguf", "f32")
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    before, after = load_model(layerwise), load_model(tmp_path / "back")
    for name in ("num_query_heads", "num_kv_heads", "intermediate_sizes", "head_dim", "model_dim", "vocab_size"):
        assert getattr(after.config, name) == getattr(before.config, name), name
    a, b = _weights(before), _weights(after)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_released_shapes_get_the_released_config_back():
    from openelm_mlx.convert.gguf import GGUFHeader, GGUFTensor, config_from_header, gguf_metadata

    config = OpenELMConfig.from_preset("OpenELM-270M")
    vocab = vocab_from_proto(DEMO_TOKENIZER.read_bytes(), "demo")
    vocab.tokens += [f"[PAD{i}]" for i in range(2048, config.vocab_size)]
    header = GGUFHeader({k: v for k, v, _ in gguf_metadata(config, _pad(vocab, config.vocab_size), "x", "f16")})
    header.tensors["token_embd.weight"] = GGUFTensor("token_embd.weight", (32000, 1280), "F16", 0, 0)
    assert config_from_header(header, 32000, "x") == config


def _pad(vocab, n):
    vocab.scores += [0.0] * (n - len(vocab.scores))
    vocab.types += [5] * (n - len(vocab.types))
    return vocab


@pytest.mark.parametrize("outtype, bits", [("q8_0", 8), ("q4_0", 4)])
def test_quantized_round_trip_is_within_the_blocks_error(tmp_path, outtype, bits):
    export_gguf(DEMO_DIR, tmp_path / "q.gguf", outtype)
    import_gguf(tmp_path / "q.gguf", tmp_path / "back")
    a, b = _weights(load_model(DEMO_DIR)), _weights(load_model(tmp_path / "back"))
    # Q8_0: d = amax / 127, error <= d / 2; Q4_0: d = amax / 8, error <= d (the clipped end); + fp16 scales
    step, slack = (127, 0.6) if bits == 8 else (8, 1.1)
    for name in a:
        err = np.abs(a[name] - b[name])
        if a[name].ndim == 1:
            assert np.array_equal(a[name], b[name]), name  # norms stay F32
            continue
        amax = np.abs(a[name]).reshape(-1, 32).max(axis=1)
        assert np.all(err.reshape(-1, 32).max(axis=1) <= slack * amax / step + 1e-7), name
        assert err.max() > 0  # really quantized


# --- the tokenizer --------------------------------------------------------------------------------------


def _corpus(extra: Path | None) -> list[str]:
    lines = list(SAMPLES)
    if extra is not None:
        text = extra.read_text(encoding="utf-8")
        lines += text[:60000].splitlines() + [text[-20000:]]
    return lines


def _assert_same_tokenizer(original: Path, corpus: list[str], tmp_path: Path) -> None:
    rebuilt = tmp_path / "rebuilt.model"
    rebuilt.write_bytes(proto_from_vocab(vocab_from_proto(original.read_bytes(), "x"), "x"))
    a, b = Tokenizer(original), Tokenizer(rebuilt)
    assert a.vocab_size == b.vocab_size
    assert all(a.sp.id_to_piece(i) == b.sp.id_to_piece(i) for i in range(a.vocab_size))
    for line in corpus:
        assert a.encode(line) == b.encode(line), line[:80]
        ids = a.encode(line, add_bos=False)
        assert a.decode(ids) == b.decode(ids)


def test_rebuilt_demo_tokenizer_tokenizes_identically(tmp_path, request):
    shakespeare = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
    _assert_same_tokenizer(DEMO_TOKENIZER, _corpus(shakespeare if shakespeare.is_file() else None), tmp_path)


def test_rebuilt_llama_tokenizer_tokenizes_identically(llama_tokenizer_path, shakespeare_path, tmp_path):
    corpus = _corpus(shakespeare_path)
    tests = llama_tokenizer_path.parent / "tests.jsonl"
    if tests.is_file():
        corpus += [json.loads(line).get("text", "") for line in tests.read_text().splitlines() if line.strip()]
    _assert_same_tokenizer(llama_tokenizer_path, corpus, tmp_path)


def test_a_vocabulary_that_cannot_be_rebuilt_exactly_needs_a_tokenizer(demo_f32, tmp_path):
    data = bytearray(demo_f32.read_bytes())
    at = data.find(b"tokenizer.ggml.model") + len(b"tokenizer.ggml.model") + 4 + 8
    assert data[at : at + 5] == b"llama"
    data[at : at + 5] = b"gpt2 "  # a BPE vocabulary of another kind (same length, so the file stays valid)
    other = tmp_path / "gpt2vocab.gguf"
    other.write_bytes(bytes(data))
    with pytest.raises(TokenizerNotFoundError, match="cannot be rebuilt"):
        import_gguf(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["convert", str(other), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "--tokenizer" in result.output and len(result.output.strip().splitlines()) == 1
    ok = runner.invoke(app, ["convert", str(other), "-o", str(tmp_path / "out"), "--tokenizer", str(DEMO_TOKENIZER)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == DEMO_TOKENIZER.read_bytes()


# --- options and bad input --------------------------------------------------------------------------------


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_options_and_a_folder_without_tokenizer_write_nothing(tmp_path):
    out = tmp_path / "m.gguf"
    line = _one_error_line(
        runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(out), "--format", "gguf", "--outtype", "q3"])
    )
    assert "--outtype" in line and "q8_0" in line
    assert "--format" in _one_error_line(
        runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(out), "--format", "onnx"])
    )
    bare = tmp_path / "bare"
    shutil.copytree(DEMO_DIR, bare)
    (bare / "tokenizer.model").unlink()
    line = _one_error_line(runner.invoke(app, ["export", str(bare), "-o", str(out), "--format", "gguf"]))
    assert "has no tokenizer.model" in line  # the message every command gives
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_an_existing_file_or_an_input_is_never_replaced_silently(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    line = _one_error_line(runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(out), "--format", "gguf"]))
    assert "--force" in line and out.read_text() == "mine"
    folder = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, folder)
    target = folder / "model.safetensors"
    line = _one_error_line(
        runner.invoke(app, ["export", str(folder), "-o", str(target), "--format", "gguf", "--force"])
    )
    assert "one of the" in line
    ok = runner.invoke(app, ["export", str(DEMO_DIR), "-o", str(out), "--format", "gguf", "--force"])
    assert ok.exit_code == 0 and out.read_bytes()[:4] == b"GGUF"


def test_widths_the_block_does_not_divide_fall_back_per_tensor_and_say_so(tmp_path):
    config = OpenELMConfig.tiny(vocab_size=2048, ffn_dim_divisor=8)
    odd = [w for w in config.intermediate_sizes if w % 32]
    assert odd
    save(random_model(config), tmp_path / "m", tokenizer=Tokenizer(DEMO_TOKENIZER))
    result = runner.invoke(
        app, ["export", str(tmp_path / "m"), "-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--outtype", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:") and "ffn_down" in line]
    assert len(notes) == len(odd) and all("written as F16" in n for n in notes)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for i, width in enumerate(config.intermediate_sizes):
        assert types[f"blk.{i}.ffn_down.weight"] == ("F16" if width % 32 else "Q8_0")
        assert types[f"blk.{i}.ffn_up.weight"] == "Q8_0"


def test_a_quantized_mlx_model_is_dequantized_first_and_says_so(tmp_path):
    from openelm_mlx.quant.recipes import quantize_model

    model, tok = load(DEMO_DIR)
    quantize_model(model, bits=8, group_size=32)
    save(model, tmp_path / "q", tokenizer=tok)
    result = runner.invoke(
        app, ["export", str(tmp_path / "q"), "-o", str(tmp_path / "q.gguf"), "--format", "gguf", "--outtype", "f32"]
    )
    assert result.exit_code == 0 and "dequantized" in result.output
    import_gguf(tmp_path / "q.gguf", tmp_path / "back")
    from mlx_lm.utils import dequantize_model

    expected = _weights(dequantize_model(load_model(tmp_path / "q")))
    got = _weights(load_model(tmp_path / "back"))
    assert all(np.array_equal(expected[k].astype(np.float32), got[k]) for k in got)


def _patched(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _key_value_at(data: bytearray, key: bytes) -> int:
    """Offset of the value type field that follows metadata `key`."""
    return data.find(key) + len(key)


def _tensor_offset_at(data: bytearray, name: bytes) -> int:
    at = data.find(name + b"\x01\x00\x00\x00") + len(name)  # a 1-D tensor: n_dims 1
    return at + 4 + 8 + 4


HOSTILE = {
    "claims 10^9 tensors": (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 10**9)), "1000000000 tensors"),
    "a key string past the end": (lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 2**40)), "at most 65536"),
    "a value string past the end": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a + 4, a + 12))(_key_value_at(d, b"general.name"))), struct.pack("<Q", 2**40)
        ),
        "past the end",
    ),
    "an array whose item type lies": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a + 4, a + 8))(_key_value_at(d, b"tokenizer.ggml.tokens"))), struct.pack("<I", 77)
        ),
        "type 77",
    ),
    "an array whose count lies": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a + 8, a + 16))(_key_value_at(d, b"tokenizer.ggml.scores"))), struct.pack("<Q", 2**50)
        ),
        "past the end",
    ),
    "a tensor offset outside the file": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a, a + 8))(_tensor_offset_at(d, b"output_norm.weight"))), struct.pack("<Q", 2**40)
        ),
        "output_norm.weight",
    ),
    "a shape larger than the bytes": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a - 12, a - 4))(_tensor_offset_at(d, b"output_norm.weight"))), struct.pack("<Q", 2**31)
        ),
        "output_norm.weight",
    ),
    "a truncated file": (lambda d: d.__delitem__(slice(len(d) * 2 // 3, None)), "outside the file"),
    "a truncated header": (lambda d: d.__delitem__(slice(2000, None)), "past the end"),
    "a header cut before its counts": (lambda d: d.__delitem__(slice(300, None)), "26 metadata entries"),
    "an unknown tensor type": (
        lambda d: d.__setitem__(
            slice(*(lambda a: (a - 4, a))(_tensor_offset_at(d, b"output_norm.weight"))), struct.pack("<I", 200)
        ),
        "unknown tensor type 200",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_lying_or_truncated_gguf_is_one_line_naming_the_file_and_field(demo_f32, tmp_path, case):
    edit, expected = HOSTILE[case]
    bad = _patched(demo_f32, tmp_path / "bad.gguf", edit)
    line = _one_error_line(runner.invoke(app, ["convert", str(bad), "-o", str(tmp_path / "out")]))
    assert str(bad) in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_a_gguf_of_another_architecture_is_named(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = _one_error_line(runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "out")]))
    assert "'llama'" in line and str(path) in line and not (tmp_path / "out").exists()


def test_hf_only_options_are_refused_for_a_gguf(demo_f32, tmp_path):
    line = _one_error_line(
        runner.invoke(app, ["convert", str(demo_f32), "-o", str(tmp_path / "o"), "--arch", "OpenELM-270M"])
    )
    assert "--arch" in line


# --- fuse --export-gguf -----------------------------------------------------------------------------------


def test_fuse_writes_the_fused_model_as_gguf(tmp_path):
    from openelm_mlx.training.lora import LoraConfig, train_lora

    data = tmp_path / "data"
    data.mkdir()
    rows = "\n".join(json.dumps({"text": "ROMEO: the moon is made of cheese."}) for _ in range(8)) + "\n"
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(rows)
    model, tok = load(DEMO_DIR)
    cfg = LoraConfig(
        model=str(DEMO_DIR),
        data=str(data),
        out=str(tmp_path / "a"),
        steps=2,
        batch_size=2,
        val_every=0,
        save_every=0,
        lr=1e-2,
    )
    train_lora(cfg, progress=False, model=model, tokenizer=tok)
    out = tmp_path / "fused.gguf"
    args = ["fuse", "--model", str(DEMO_DIR), "--adapter-path", str(tmp_path / "a"), "-o", str(tmp_path / "m")]
    bad = runner.invoke(app, [*args, "--export-gguf", str(out), "--gguf-outtype", "q5"])
    assert "--gguf-outtype" in _one_error_line(bad) and not (tmp_path / "m").exists()  # refused before fusing
    result = runner.invoke(app, [*args, "--export-gguf", str(out), "--gguf-outtype", "f32"])
    assert result.exit_code == 0, result.output
    import_gguf(out, tmp_path / "back")
    fused, back = _weights(load_model(tmp_path / "m")), _weights(load_model(tmp_path / "back"))
    base = _weights(load_model(DEMO_DIR))
    assert all(np.array_equal(fused[k], back[k]) for k in fused)
    assert any(not np.array_equal(fused[k], base[k]) for k in fused)  # the adapters are in it
    inside = [*args[:-1], str(tmp_path / "m2"), "--export-gguf", str(tmp_path / "m2" / "m.gguf")]
    result = runner.invoke(app, inside)  # the GGUF may go in the folder the fuse writes
    assert result.exit_code == 0 and (tmp_path / "m2" / "m.gguf").is_file(), result.output


# --- inside llama.cpp -------------------------------------------------------------------------------------


def _llama(path: Path, n_ctx: int = 256):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from openelm_mlx.evaluate.llama_cpp import open_llama

    return open_llama(path, n_ctx, n_threads=2)


@pytest.mark.parametrize("which", ["demo", "layerwise"])
def test_llama_cpp_logits_match_ours_at_f32(which, layerwise, tmp_path):
    from openelm_mlx.evaluate.llama_cpp import llama_logits

    folder = DEMO_DIR if which == "demo" else layerwise
    export_gguf(folder, tmp_path / "m.gguf", "f32")
    llm = _llama(tmp_path / "m.gguf")
    model, tok = load(folder)
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    tokens = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True) == tokens  # the embedded vocabulary tokenizes as ours
    ours = np.array(model(mx.array([tokens]))[0].astype(mx.float32), dtype=np.float64)
    theirs = llama_logits(llm, tokens)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(ours).max()  # ~1e-6 measured (float32 KV cache)


def test_greedy_text_is_identical_in_llama_cpp(demo_f32):
    from openelm_mlx.evaluate.llama_cpp import llama_greedy
    from openelm_mlx.generation.generate import generate

    llm = _llama(demo_f32)
    model, tok = load(DEMO_DIR)
    ours = generate(model, tok, "ROMEO:", max_tokens=32, temp=0.0)
    theirs = llama_greedy(llm, tok.encode("ROMEO:"), 32)
    assert len(theirs) == 32 and ours == tok.decode(theirs)
    assert llm.detokenize(theirs).decode("utf-8", "replace").strip() == ours.strip()  # llama.cpp's own text


def test_llama_cpp_perplexity_matches_ours_at_f32(demo_f32, shakespeare_path):
    from openelm_mlx.evaluate.llama_cpp import llama_perplexity
    from openelm_mlx.evaluate.perplexity import make_windows, perplexity

    llm = _llama(demo_f32, n_ctx=512)
    model, tok = load(DEMO_DIR)
    text = shakespeare_path.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.95) :]  # the demo's held-out 5%
    windows = make_windows(tok.encode(held_out, add_bos=False), 256, tok.bos_id, num_samples=4)
    ours = perplexity(model, windows).perplexity
    theirs = llama_perplexity(llm, windows).perplexity
    assert abs(theirs - ours) <= 0.01 * ours, (ours, theirs)


def test_k_quants_go_through_llama_cpps_quantizer_and_read_back_exactly(tmp_path):
    """q4_k_m: llama.cpp's own mix and fallbacks, listed; our import dequantizes the same weights llama.cpp runs."""
    from openelm_mlx.evaluate.llama_cpp import llama_logits

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    report = export_gguf(DEMO_DIR, tmp_path / "k.gguf", "q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "k.gguf").tensors}
    assert "Q4_K" in types.values() and report.types["Q4_K"] == sum(v == "Q4_K" for v in types.values())
    listed = {note.split(":")[0] for note in report.notes}
    assert listed == {n for n, v in types.items() if v not in ("Q4_K", "F32")}  # every fallback named
    import_gguf(tmp_path / "k.gguf", tmp_path / "back")
    (back, tok), (float_model, _) = load(tmp_path / "back"), load(DEMO_DIR)
    tokens = tok.encode("ROMEO: But soft, what light through yonder window breaks?")
    theirs = llama_logits(_llama(tmp_path / "k.gguf"), tokens)
    ours, unquantized = (np.array(m(mx.array([tokens]))[0], dtype=np.float64) for m in (back, float_model))
    scale = np.abs(ours).max()
    # llama.cpp also quantizes the activations (8-bit) in quantized matmuls: ~1% here, against ~4.5% for the
    # float model; our import reproduces the quantized weights llama.cpp runs, not the float ones.
    assert np.abs(ours - theirs).max() <= 2e-2 * scale
    assert np.abs(ours - theirs).max() < 0.5 * np.abs(unquantized - theirs).max()
