"""Hostile and mistaken input: one clear refusal naming the file/field/option, exit 1, nothing of the user's lost."""

import json
import os
import struct

import numpy as np
import pytest
from checkpoints import hf_folder, write_safetensors
from helpers import numpy_weights, random_model
from typer.testing import CliRunner

from openelm_mlx import CheckpointError, OptionError, load, load_model, save
from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.folders.fs import OWNED_FILE
from openelm_mlx.folders.weights import safetensors_header
from openelm_mlx.generation.generate import GenerationConfig, generate_tokens
from openelm_mlx.model.config import OpenELMConfig

CONFIG = OpenELMConfig.tiny()


def run(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    return result


def one_error(result, *fragments):
    """Exit 1 with one `error:` line holding every fragment."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.output


@pytest.fixture(scope="module")
def weights():
    return numpy_weights(random_model(CONFIG, seed=3))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- output folders: refused unless ours, user files kept, interrupted runs repaired ---------------------------


def test_convert_refuses_a_folder_it_did_not_write_and_force_keeps_user_files(weights, tmp_path):
    hf_folder(tmp_path / "hf", weights, CONFIG.to_dict())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"my own shard")
    before = snapshot(out)
    one_error(run("convert", tmp_path / "hf", "-o", out), "--force: is needed", str(out), "not written by openelm-mlx")
    assert snapshot(out) == before
    # A file that loaders would read as weights cannot stay beside ours: refused even with --force.
    one_error(
        run("convert", tmp_path / "hf", "-o", out, "--force"), "model-00001-of-00009.safetensors", "did not write"
    )
    assert snapshot(out) == before
    (out / "model-00001-of-00009.safetensors").unlink()
    assert run("convert", tmp_path / "hf", "-o", out, "--force").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"
    load_model(out)


def test_force_never_replaces_a_file_or_folder_of_the_users(weights, tmp_path):
    hf_folder(tmp_path / "hf", weights, CONFIG.to_dict())
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)  # a folder named like an output file
    (out / "model.safetensors" / "keep").write_text("x")
    one_error(run("convert", tmp_path / "hf", "-o", out, "--force"), "model.safetensors", "did not write")
    assert (out / "model.safetensors" / "keep").read_text() == "x"


def test_updating_our_output_keeps_added_files_and_drops_stale_shards(tiny_model, tmp_path):
    save(tiny_model, tmp_path / "m", max_shard_bytes=20_000)
    (tmp_path / "m" / "README.md").write_text("my notes")
    save(tiny_model, tmp_path / "m")  # an earlier output of ours: no force needed
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [OWNED_FILE, "README.md", "config.json", "model.safetensors"]


def test_interrupted_update_is_repaired_and_temporaries_removed(tiny_model, tmp_path, caplog):
    dest = tmp_path / "m"
    save(tiny_model, dest)
    (dest / "mine.txt").write_text("keep")
    os.rename(dest, tmp_path / ".m.old-abc")  # killed between the two renames of an update
    (tmp_path / ".m.tmp-dead").mkdir()  # and an earlier conversion killed mid-write
    (tmp_path / ".m.tmp-dead" / "model.safetensors").write_bytes(b"0" * 100)
    save(tiny_model, dest)
    assert (dest / "mine.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".m.*"))
    assert "restored the previous output" in caplog.text and "removed 1 temporary folder" in caplog.text


def test_output_folders_follow_the_umask(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        save(tiny_model, tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


# --- safetensors, shard indexes, config.json: declared sizes and types checked -----------------------------------


def _raw_safetensors(path, header: object, data: bytes = b"\0" * 64):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2], "not a JSON object"),
        ({"w": {"dtype": "F32", "shape": [2]}}, "'w': data_offsets must be two non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "'w': data_offsets"),
        ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "'w' has unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "'w': shape must be"),
        ({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "'w': shape must be"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "'a' and 'b' overlap",
        ),
        ({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, "'w' needs 400 data bytes, file has 64"),
        ({"__metadata__": {"format": 3}}, "__metadata__ must map strings to strings"),
    ],
)
def test_safetensors_headers_are_checked_against_the_file(tmp_path, header, message):
    path = _raw_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.") + ".*" + _escape(message)):
        safetensors_header(path)


def _escape(s):
    import re

    return re.escape(s)


def test_deeply_nested_or_duplicated_json_is_one_error(tmp_path):
    path = _raw_safetensors(tmp_path / "deep.safetensors", None)
    raw = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="deep.safetensors: not valid JSON"):
        safetensors_header(path)
    dup = tmp_path / "dup.safetensors"
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = b'{"w": ' + entry + b', "w": ' + entry + b"}"
    dup.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="dup.safetensors: key 'w' appears twice"):
        safetensors_header(dup)


def test_shard_index_is_authoritative_and_stays_in_the_folder(weights, tmp_path):
    hf_folder(tmp_path / "hf", weights, CONFIG.to_dict(), "sharded")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    name = next(iter(original["weight_map"]))
    outside = {**original, "weight_map": {**original["weight_map"], name: "../outside/x.safetensors"}}
    index.write_text(json.dumps(outside))
    with pytest.raises(CheckpointError, match="must be files in the same folder"):
        load_model(tmp_path / "hf")
    one_error(run("convert", tmp_path / "hf", "-o", tmp_path / "o"), "must be files in the same folder")
    shards = sorted(set(original["weight_map"].values()))
    moved = {
        **original,
        "weight_map": {**original["weight_map"], name: next(s for s in shards if s != original["weight_map"][name])},
    }
    index.write_text(json.dumps(moved))  # the index places a tensor in a shard that does not hold it
    with pytest.raises(CheckpointError, match="index"):
        load_model(tmp_path / "hf")
    one_error(run("convert", tmp_path / "hf", "-o", tmp_path / "o"), "index")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ffn_with_glu", "false", "ffn_with_glu must be true or false, got 'false'"),
        ("model_dim", 64.0, "model_dim must be a whole number, got 64.0"),
        ("num_transformer_layers", 10**6, "num_transformer_layers must be between 1 and 1024"),
        ("rope_freq_constant", [1], "rope_freq_constant must be a number"),
    ],
)
def test_config_fields_are_type_checked(tmp_path, tiny_model, field, value, message):
    save(tiny_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(CheckpointError, match="config.json: " + _escape(message)):
        load_model(tmp_path / "m")


def test_arch_files_with_wrong_types_are_named(tmp_path):
    arch = tmp_path / "arch.yaml"
    arch.write_text(json.dumps({**OpenELMConfig.tiny().to_dict(), "model_dim": "abc", "num_query_heads": None}))
    from openelm_mlx.errors import ConfigError
    from openelm_mlx.folders.arch import read_arch_config

    with pytest.raises(ConfigError, match=str(arch)):
        read_arch_config(arch)
    args = ["pretrain", "--arch-config", arch, "--data", arch, "--tokenizer", arch, "--out", tmp_path / "run"]
    one_error(run(*args), str(arch))


def test_a_config_larger_than_its_weights_is_refused_before_building(tmp_path, tiny_model):
    save(tiny_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    big = OpenELMConfig.tiny(num_transformer_layers=1000, model_dim=4096, head_dim=64, vocab_size=256).to_dict()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **big}))
    with pytest.raises(CheckpointError, match="parameters, more than the .* bytes of weights could hold"):
        load_model(tmp_path / "m")


def test_special_files_are_refused_not_waited_on(tmp_path, tiny_model):
    save(tiny_model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        load_model(tmp_path / "m")
    one_error(run("convert", tmp_path / "m", "-o", tmp_path / "o"), "not a regular file")


# --- tokenizers and draft models that do not fit the model --------------------------------------------------------


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tiny_model, weights):
    save(tiny_model, tmp_path / "m")  # vocab 256
    demo_tok = DEMO_DIR / "tokenizer.model"  # 2048 pieces
    with pytest.raises(CheckpointError, match="2048 pieces but the model's vocabulary is 256"):
        load(tmp_path / "m", tokenizer=demo_tok)
    hf_folder(tmp_path / "hf", weights, CONFIG.to_dict())
    one_error(run("convert", tmp_path / "hf", "-o", tmp_path / "o", "--tokenizer", demo_tok), "2048 pieces")
    assert not (tmp_path / "o").exists()


def test_a_draft_model_with_another_vocabulary_is_refused():
    model = random_model(OpenELMConfig.tiny(vocab_size=300))
    draft = random_model(OpenELMConfig.tiny(vocab_size=256))
    with pytest.raises(OptionError, match="draft_model: has a vocabulary of 256 tokens, the model 300"):
        list(generate_tokens(model, [1, 2, 3], max_tokens=2, draft_model=draft))


# --- options: every range checked, one line naming the option --------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "-1"], "--max-tokens: must be >= 1, got -1"),
        (["--temp", "-1"], "--temp: must be >= 0"),
        (["--temp", "nan"], "--temp: must be a finite number"),
        (["--top-p", "2"], "--top-p: must be <= 1"),
        (["--top-p", "0"], "--top-p: must be > 0"),
        (["--top-k", "-3"], "--top-k: must be >= 0"),
        (["--max-kv-size", "1"], "--max-kv-size: must be >= 8"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens: must be >= 1"),
        (["--kv-bits", "4", "--kv-group-size", "0"], "--kv-group-size: must be one of (32, 64, 128)"),
        (["--kv-bits", "7"], "--kv-bits: must be one of"),
        (["--repetition-penalty", "0"], "--repetition-penalty: must be > 0"),
        (["--system", "Be brief.", "--no-chat"], "--system: needs the chat template"),
    ],
)
def test_generate_options_are_range_checked(args, message):
    one_error(run("generate", "--prompt", "Hi", *args), message)


def test_kv_bits_default_group_fits_the_demo_and_bad_utf8_stdin_is_replaced():
    result = run("generate", "--prompt", "-", "--kv-bits", "4", "--max-tokens", "5", input=b"ROMEO\xff\xfe:")
    assert result.exit_code == 0, result.output


def test_h_is_help():
    assert run("-h").exit_code == 0 and run("generate", "-h").exit_code == 0


def test_generation_config_checks_types_in_python_too():
    with pytest.raises(OptionError, match="max_tokens: must be a whole number"):
        GenerationConfig(max_tokens=2.5)
    with pytest.raises(OptionError, match="stop: must be strings"):
        GenerationConfig(stop=(1,))
    with pytest.raises(TypeError, match="unknown generation setting"):
        list(generate_tokens(random_model(CONFIG), [1], max_tokens=1, temperature=0.5))


def test_write_safetensors_fixture_still_round_trips(tmp_path):  # the hand-written writer the tests rely on
    write_safetensors(tmp_path / "a.safetensors", {"x": np.arange(4, dtype=np.float32)})
    assert safetensors_header(tmp_path / "a.safetensors")[1]["x"]["shape"] == [4]


# --- pretraining: options, run folders, resume, corrupt checkpoints -----------------------------------------------


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A text file, the demo tokenizer and an architecture file sized to it."""
    root = tmp_path_factory.mktemp("pre")
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 300)
    arch = root / "arch.json"
    arch.write_text(json.dumps(OpenELMConfig.tiny(vocab_size=2048, model_dim=32, head_dim=16).to_dict()))
    return text, DEMO_DIR / "tokenizer.model", arch


def pretrain_args(run_inputs, out, *extra):
    text, tok, arch = run_inputs
    base = ["pretrain", "--arch-config", arch, "--data", text, "--tokenizer", tok, "--out", out]
    return [*base, "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", *extra]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--steps", "-5"], "--steps: must be >= 1"),
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
        (["--seq-len", "0"], "--seq-len: must be >= 1"),
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--dtype", "float16"], "--dtype: must be float32 or bfloat16"),
        (["--seq-len", "5000"], "--seq-len: 5000 is more than the model's max_context_length"),
        (["--val-fraction", "0.9"], "--val-fraction: must be <= 0.5"),
    ],
)
def test_pretrain_options_are_range_checked(run_inputs, tmp_path, args, message):
    one_error(run(*pretrain_args(run_inputs, tmp_path / "run", *args)), message)
    assert not (tmp_path / "run").exists()


def test_run_folder_rules_resume_and_log(run_inputs, tmp_path):
    out = tmp_path / "run"
    assert run(*pretrain_args(run_inputs, out, "--save-every", "2", "--val-fraction", "0")).exit_code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("val_loss" not in r for r in log)  # no NaN held-out loss
    before = snapshot(out)
    one_error(run(*pretrain_args(run_inputs, out)), "--out:", "holds an earlier run")
    assert snapshot(out) == before
    # --resume continues from the checkpoint at step 2; the replayed steps replace, not repeat, the log's
    assert run(*pretrain_args(run_inputs, out, "--resume", "--steps", "6", "--save-every", "2")).exit_code == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    (out / "mine.txt").write_text("keep")
    assert run(*pretrain_args(run_inputs, out, "--overwrite")).exit_code == 0
    assert (out / "mine.txt").read_text() == "keep" and not (out / "checkpoints").exists()
    one_error(run(*pretrain_args(run_inputs, tmp_path / "fresh", "--resume")), "--resume:", "no checkpoint")


@pytest.mark.parametrize("damage", ["truncate", "zero", "state"])
def test_corrupt_checkpoints_are_named(run_inputs, tmp_path, damage):
    out = tmp_path / "run"
    assert run(*pretrain_args(run_inputs, out, "--save-every", "2")).exit_code == 0
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    if damage == "truncate":
        path = ckpt / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "zero":
        path = ckpt / "optimizer.safetensors"
        path.write_bytes(b"\0" * path.stat().st_size)
    else:
        path = ckpt / "state.json"
        path.write_text(json.dumps({"step": "two"}))
    one_error(run(*pretrain_args(run_inputs, out, "--resume", "--steps", "6")), str(path))


def test_unfinished_checkpoint_temporaries_are_removed(run_inputs, tmp_path, caplog):
    out = tmp_path / "run"
    assert run(*pretrain_args(run_inputs, out, "--save-every", "2")).exit_code == 0
    (out / "checkpoints" / ".step_00000004.tmp-x").mkdir()
    result = run(*pretrain_args(run_inputs, out, "--resume", "--steps", "5"))
    assert result.exit_code == 0 and not list((out / "checkpoints").glob(".step_*"))
    assert "removed 1 unfinished checkpoint" in result.output


def test_train_tokenizer_vocabulary_sizes_are_one_line(tmp_path, run_inputs):
    text = run_inputs[0]
    one_error(run("train-tokenizer", "--data", text, "--vocab-size", "100", "-o", tmp_path / "t.model"), "--vocab-size")
    one_error(
        run("train-tokenizer", "--data", text, "--vocab-size", "5000", "-o", tmp_path / "t.model"),
        "too large",
        "at most",
    )
    assert not (tmp_path / "t.model").exists()


# --- outputs never replace an input or another kind of output (found by an adversarial pass) ----------------------


def _tiny_lora_data(root):
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "To be or not to be"}\n' * 4)
    return data


def test_lora_adapter_path_may_not_be_a_model_folder_and_fuse_may_not_write_into_adapters(tmp_path):
    model = tmp_path / "model"
    assert run("export", DEMO_DIR, "-o", tmp_path / "hf").exit_code == 0
    assert run("convert", tmp_path / "hf", "-o", model).exit_code == 0
    before = snapshot(model)
    data = _tiny_lora_data(tmp_path)
    lora = ["lora", "--model", model, "--data", data, "--iters", "1", "--batch-size", "1"]
    one_error(run(*lora, "--adapter-path", model), str(model), "is also an input")
    assert run("convert", tmp_path / "hf", "-o", tmp_path / "model2").exit_code == 0  # a model, not an input
    one_error(run(*lora, "--adapter-path", tmp_path / "model2"), "holds model written by openelm-mlx")
    assert snapshot(model) == before
    assert run(*lora, "--adapter-path", tmp_path / "ad").exit_code == 0
    adapters = snapshot(tmp_path / "ad")
    fuse = ["fuse", "--model", model, "--adapter-path", tmp_path / "ad"]
    one_error(run(*fuse, "-o", tmp_path / "ad"), "is also an input")
    one_error(run(*fuse, "-o", tmp_path / "ad", "--force"), "is also an input")
    assert snapshot(tmp_path / "ad") == adapters


@pytest.mark.parametrize("command", ["convert", "export", "quantize"])
def test_a_model_is_never_written_over_its_own_source(tmp_path, command):
    src = tmp_path / "src"
    assert (
        run("export" if command == "convert" else "convert", *_roundtrip_source(tmp_path, command), "-o", src).exit_code
        == 0
    )
    before = snapshot(src)
    extra = ["--bits", "4"] if command == "quantize" else []
    one_error(run(command, src, "-o", src, *extra), "is also an input")
    one_error(run(command, src, "-o", src, "--force", *extra), "is also an input")
    if command == "export":
        gguf = ["--format", "gguf", "--force"]
        one_error(run(command, src, "-o", src / "m.gguf", *gguf), "m.gguf is inside", "write the GGUF file elsewhere")
    assert snapshot(src) == before


def _roundtrip_source(tmp_path, command):
    """A source of the right format for `command`: an HF folder for convert, an MLX folder otherwise."""
    if command == "convert":
        return [DEMO_DIR]
    assert run("export", DEMO_DIR, "-o", tmp_path / "hf0").exit_code == 0
    return [tmp_path / "hf0"]


def test_overwrite_keeps_user_files_and_strangers_weights_are_refused_before_training(run_inputs, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.txt").write_text("keep")
    (out / "log.jsonl").write_text("{}\n")
    assert run(*pretrain_args(run_inputs, out, "--overwrite")).exit_code == 0
    assert (out / "checkpoints" / "mine.txt").read_text() == "keep"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_text("not ours")
    result = run(*pretrain_args(run_inputs, other))
    one_error(result, "model.safetensors", "did not write and would replace or read beside its output")
    assert "step" not in result.output and sorted(p.name for p in other.iterdir()) == ["model.safetensors"]


# --- more found by the adversarial pass -------------------------------------------------------------------------


def test_train_tokenizer_never_overwrites_without_force_nor_its_own_data(tmp_path, run_inputs):
    text = tmp_path / "t.txt"
    text.write_text(run_inputs[0].read_text())
    before = text.read_bytes()
    one_error(run("train-tokenizer", "--data", text, "--vocab-size", "300", "-o", text, "--force"), "training data")
    assert text.read_bytes() == before
    (tmp_path / "mine.model").write_text("keep")
    one_error(run("train-tokenizer", "--data", text, "--vocab-size", "300", "-o", tmp_path / "mine.model"), "--force")
    assert (tmp_path / "mine.model").read_text() == "keep"


def test_lone_surrogates_in_data_and_prompts_are_text_not_crashes(tmp_path):
    from openelm_mlx.generation.tokenizer import Tokenizer
    from openelm_mlx.training.data import read_documents

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "abc \\ud800 def"}\n')
    (doc,) = read_documents([data])
    assert "\ufffd" in doc
    tok = Tokenizer(DEMO_DIR / "tokenizer.model")
    assert tok.decode(tok.encode("x\udcff", add_bos=False)).startswith("x\ufffd")  # argv's undecodable byte


def test_usage_errors_are_one_line_with_exit_1():
    import subprocess
    import sys

    for args in (["generate", "--prompt", "hi", "--max-tokens", "abc"], ["generate"], ["no-such-command"]):
        done = subprocess.run([sys.executable, "-m", "openelm_mlx", *args], capture_output=True, text=True, timeout=60)
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("note:")]
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt", "Hi", "--kv-group-size", "32"], "--kv-group-size: takes effect only with kv_bits"),
        (["generate", "--prompt", "Hi", "--num-draft-tokens", "5"], "--num-draft-tokens: takes effect only"),
        (["generate", "--prompt", "Hi", "--max-tokens", "99999999999999999999"], "--max-tokens: must be <="),
        (["serve", "--api-key", ""], "--api-key: must not be empty"),
    ],
)
def test_options_that_would_be_ignored_are_refused(args, message):
    one_error(run(*args), message)


def test_conflicting_quantize_and_convert_options(tmp_path, weights):
    hf_folder(tmp_path / "hf", weights, CONFIG.to_dict())
    one_error(run("convert", tmp_path / "hf", "-o", tmp_path / "o", "--q-bits", "8"), "only with -q/--quantize")
    assert run("convert", tmp_path / "hf", "-o", tmp_path / "m").exit_code == 0
    one_error(run("quantize", tmp_path / "m", "-o", tmp_path / "q", "--recipe", "mixed_3_6", "--bits", "2"), "--bits")
    one_error(run("quantize", tmp_path / "m", "-o", tmp_path / "q", "--dequantize", "--bits", "8"), "--dequantize")


def test_meaningless_configs_and_nan_weights_are_refused(tmp_path, weights, tiny_model):
    bad = {**weights, "transformer.norm.weight": np.full_like(weights["transformer.norm.weight"], np.nan)}
    hf_folder(tmp_path / "hf", bad, CONFIG.to_dict())
    one_error(run("convert", tmp_path / "hf", "-o", tmp_path / "o"), "'transformer.norm.weight' holds NaN")
    assert not (tmp_path / "o").exists()
    save(tiny_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 999999}))
    with pytest.raises(CheckpointError, match="eos_token_id 999999 is outside the vocabulary of 256"):
        load_model(tmp_path / "m")


def test_a_fifo_as_lora_config_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    data = _tiny_lora_data(tmp_path)
    args = [
        "lora",
        "--model",
        DEMO_DIR,
        "--data",
        data,
        "--adapter-path",
        tmp_path / "a",
        "--config",
        tmp_path / "fifo",
    ]
    one_error(run(*args), "not a regular file")


# --- found by the second adversarial pass -------------------------------------------------------------------


def test_force_through_a_symlink_writes_into_its_target_and_keeps_its_permissions(tiny_model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("mine")
    os.chmod(real, 0o700)
    (tmp_path / "link").symlink_to(real)
    save(tiny_model, tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and (real / "keep").read_text() == "mine"
    assert (real / "model.safetensors").is_file() and real.stat().st_mode & 0o777 == 0o700


def test_python_api_refuses_bad_prompts_and_paths(tmp_path):
    from openelm_mlx.generation.generate import generate
    from openelm_mlx.generation.tokenizer import Tokenizer

    model, tok = load(DEMO_DIR)
    for bad in ([[99999]], [[-1]], [], [[]]):
        with pytest.raises(OptionError, match="prompt"):
            generate(model, tok, bad, max_tokens=2)
    assert GenerationConfig(stop=None).stop == ()
    with pytest.raises(OptionError, match="empty path"):
        load("")
    with pytest.raises(OptionError, match="empty path"):
        save(model, "")
    assert isinstance(tok, Tokenizer)


def test_windows_longer_than_the_context_are_refused(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 400)
    one_error(run("perplexity", "--model", DEMO_DIR, "--data", text, "--seq-len", "4096"), "--seq-len: 4096 is more")


def test_lora_with_nothing_left_to_learn_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "To be or not to be, that is", "completion": " the question"}\n' * 4)
    args = ["lora", "--model", DEMO_DIR, "--data", data, "--adapter-path", tmp_path / "a", "--iters", "2"]
    one_error(run(*args, "--mask-prompt", "--max-seq-len", "2"), "no token is left to learn from")


def test_train_tokenizer_may_write_inside_its_data_folder(tmp_path, run_inputs):
    data = tmp_path / "d"
    data.mkdir()
    (data / "corpus.txt").write_text(run_inputs[0].read_text())
    assert run("train-tokenizer", "--data", data, "--vocab-size", "300", "-o", data / "x.model").exit_code == 0


def test_a_closed_pipe_is_not_an_error():
    import subprocess
    import sys

    cmd = f"{sys.executable} -m openelm_mlx generate --prompt ROMEO: --max-tokens 300 | head -c 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
