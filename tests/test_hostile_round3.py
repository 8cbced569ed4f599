"""Round 3 of hostile and unlucky inputs (issue 23, part 8): each ends in one clear line and loses nothing."""

import json
import os
from pathlib import Path

import pytest
from checkpoints import hf_folder
from helpers import numpy_weights, random_model
from typer.testing import CliRunner

from openelm_mlx import CheckpointError, load, save
from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import HubError
from openelm_mlx.folders.hub import download, resolve
from openelm_mlx.model.config import OpenELMConfig

V2048 = OpenELMConfig.tiny(vocab_size=2048, model_dim=32, head_dim=16)


def run(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    return result


def one_error(result, *fragments):
    """Exit 1 with one `error:` line holding every fragment."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.output


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer: smaller than the 2048-row vocabulary of V2048 and the demo."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tok512")
    text = root / "text.txt"
    text.write_text((DEMO_DIR.parent.parent / "README.md").read_text())
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(root / "tok"),
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return root / "tok.model"


@pytest.fixture(scope="module")
def model_2048(tmp_path_factory):
    """An MLX folder (no tokenizer) and a Hugging Face folder of a 2048-vocabulary model."""
    root = tmp_path_factory.mktemp("m2048")
    model = random_model(V2048, seed=5)
    save(model, root / "mlx")
    hf_folder(root / "hf", numpy_weights(model), V2048.to_dict())
    return root


# --- the Hub: every error one line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["apple/..", "apple/-x-", "apple/a b"])
def test_repo_ids_that_are_not_ones_are_a_hub_error(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match="not a local path, nor a Hugging Face repo id"):
        download(repo)
    one_error(run("generate", "--model", repo, "--prompt", "x"), repo, "not a local path")


def test_a_symlink_loop_as_source_says_so(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="too many levels of symbolic links"):
        resolve(tmp_path / "loop")
    one_error(run("convert", tmp_path / "loop", "-o", tmp_path / "o"), "loop", "symbolic links")
    one_error(run("generate", "--model", tmp_path / "dangling", "--prompt", "x"), "link to nothing")


# --- outputs never replace inputs -------------------------------------------------------------------------------


def test_bench_json_may_not_be_a_file_of_its_model(tmp_path):
    model = tmp_path / "m"
    save(random_model(OpenELMConfig.tiny()), model)
    before = snapshot(model)
    for force in ([], ["--force"]):
        result = run("bench", "--model", model, "--json", model / "config.json", "--compare", "none", *force)
        one_error(result, "--json", "config.json", "is inside", "write the results elsewhere")
    one_error(run("bench", "--model", model, "--json", model / "new.json", "--compare", "none"), "is inside")
    assert snapshot(model) == before


def test_train_tokenizer_may_not_write_over_its_data(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 100)
    before = data.read_bytes()
    args = ["train-tokenizer", "--data", data, "--vocab-size", "300", "-o", data]
    one_error(run(*args, "--force"), "is one of the training data files")
    assert data.read_bytes() == before


# --- tokenizers smaller than the vocabulary -------------------------------------------------------------------------


def test_a_tokenizer_smaller_than_the_vocabulary_is_refused_at_load(model_2048, small_tokenizer):
    with pytest.raises(CheckpointError, match="512 pieces but the model's vocabulary is 2048"):
        load(model_2048 / "mlx", tokenizer=small_tokenizer)
    one_error(
        run("generate", "--model", model_2048 / "mlx", "--tokenizer", small_tokenizer, "--prompt", "x"),
        "512 pieces but the model's vocabulary is 2048",
    )


def test_convert_never_cuts_the_vocabulary_to_a_smaller_tokenizer_silently(model_2048, small_tokenizer, tmp_path):
    out = tmp_path / "o"
    one_error(
        run("convert", model_2048 / "hf", "-o", out, "--tokenizer", small_tokenizer),
        "--vocab-size",
        "512 pieces",
        "2048",
    )
    assert not out.exists()
    result = run("convert", model_2048 / "hf", "-o", out, "--tokenizer", small_tokenizer, "--vocab-size", "512")
    assert result.exit_code == 0, result.output
    model, tok = load(out)
    assert model.config.vocab_size == 512 == tok.vocab_size


# --- a full disk or a file-size limit: one line, the previous output whole, no temporaries -------------------------


def _temporaries(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _limited(args, limit):
    """Run the CLI in a subprocess whose files may not grow past `limit` bytes (writes then fail with EFBIG)."""
    import resource
    import subprocess
    import sys

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    # Python ignores SIGXFSZ itself, so a write past the limit fails with EFBIG instead of killing the process.
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx", *map(str, args)], capture_output=True, text=True, preexec_fn=preexec
    )


def test_a_file_size_limit_is_one_line_and_the_previous_output_stays_whole(model_2048, tmp_path):
    out = tmp_path / "out"
    assert run("convert", model_2048 / "hf", "-o", out).exit_code == 0
    before = snapshot(out)
    result = _limited(["convert", model_2048 / "hf", "-o", out, "--dtype", "float32"], 64 << 10)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "file-size limit" in errors[0], result.stderr
    assert snapshot(out) == before and _temporaries(out) == []
    assert run("convert", model_2048 / "hf", "-o", out, "--dtype", "float16").exit_code == 0  # a later run succeeds
    assert snapshot(out) != before


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root and mount rights; skipped otherwise)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk, leave):
    """Fill `disk` until only about `leave` bytes are free."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_one_line_for_convert_export_and_lora(model_2048, small_disk, tmp_path):
    model, hf = small_disk / "model", small_disk / "hf"
    assert run("convert", model_2048 / "hf", "-o", model, "--tokenizer", DEMO_DIR / "tokenizer.model").exit_code == 0
    assert run("export", model, "-o", hf).exit_code == 0
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "To be or not to be"}\n' * 4)
    lora = ["lora", "--model", model, "--data", tmp_path / "data", "--iters", "1", "--batch-size", "1"]
    models = {f: snapshot(f) for f in (model, hf)}
    _fill(small_disk, 16 << 10)
    commands = {
        model: [
            "convert",
            model_2048 / "hf",
            "-o",
            model,
            "--dtype",
            "float32",
            "--tokenizer",
            DEMO_DIR / "tokenizer.model",
        ],
        hf: ["export", model, "-o", hf, "--dtype", "float32"],
        small_disk / "adapters": [*lora, "--adapter-path", small_disk / "adapters"],
    }
    for dest, args in commands.items():
        one_error(run(*args), str(dest), "no space left on the device")
        assert _temporaries(dest) == []
    assert {f: snapshot(f) for f in (model, hf)} == models
    assert not (small_disk / "adapters" / "adapters.safetensors").exists()
    (small_disk / "filler").unlink()
    commands[small_disk / "adapters"].append("--overwrite")  # the failed run's log stays until a run replaces it
    for args in commands.values():
        assert (r := run(*args)).exit_code == 0, r.output


# --- two runs writing the same folder: a lock per output folder, temporaries removed only when their owner is dead -


@pytest.fixture
def hold_lock():
    """`hold_lock(folder)`: another process claims `folder` until the test ends."""
    import subprocess
    import sys

    procs = []

    def hold(folder):
        code = "import sys; from openelm_mlx.folders.fs import claim_folder; claim_folder(sys.argv[1]); print('held')"
        proc = subprocess.Popen(
            [sys.executable, "-c", code + "; sys.stdout.flush(); sys.stdin.read()", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc.pid

    yield hold
    for proc in procs:
        proc.communicate("")


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_folder_another_run_is_writing_is_refused_and_its_temporaries_kept(model_2048, tmp_path, hold_lock):
    out = tmp_path / "out"
    assert run("convert", model_2048 / "hf", "-o", out).exit_code == 0
    before = snapshot(out)
    pid = hold_lock(out)
    live = tmp_path / f".out.tmp-{pid}-abcd1234"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    one_error(run("convert", model_2048 / "hf", "-o", out, "--dtype", "float16"), str(out), f"process {pid}")
    assert snapshot(out) == before and live.is_dir()
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abcd1234"
    dead.mkdir()
    mine = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"  # this process is alive: its temporary stays
    mine.mkdir()
    assert run("convert", model_2048 / "hf", "-o", tmp_path / "other").exit_code == 0  # other folders are free
    from openelm_mlx.folders.fs import recover

    recover(out)
    assert not dead.exists() and live.is_dir() and mine.is_dir()


def test_two_concurrent_converts_never_crash_or_mix(model_2048, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "openelm_mlx", "convert", str(model_2048 / "hf"), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert all("Traceback" not in err for _, err in results), results
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or "another openelm-mlx run" in err, err
    from openelm_mlx import load_model

    assert load_model(out).config.vocab_size == 2048
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_run_folder_another_run_uses_is_refused(tmp_path, hold_lock):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "To be or not to be"}\n' * 4)
    adapters = tmp_path / "ad"
    pid = hold_lock(adapters)
    args = ["lora", "--data", data, "--iters", "1", "--batch-size", "1", "--adapter-path", adapters]
    one_error(run(*args, "--model", DEMO_DIR), str(adapters), f"process {pid}")
    assert not adapters.exists()
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / f".step_000001.tmp-{_dead_pid()}-x").mkdir()
    (checkpoints / f".step_000002.tmp-{os.getpid()}-x").mkdir()  # a live owner's: kept
    from openelm_mlx.training.loop import prepare_run_folder, release_folder

    prepare_run_folder(tmp_path / "run", ("log.jsonl",), resume=False, overwrite=False, option="out")
    release_folder(tmp_path / "run")
    assert [p.name for p in checkpoints.iterdir()] == [f".step_000002.tmp-{os.getpid()}-x"]


# --- adapter folders: every field checked, weights finite ------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"text": "To be or not to be"}\n' * 4)
    args = ["lora", "--model", DEMO_DIR, "--data", root / "data", "--iters", "1", "--batch-size", "1"]
    assert run(*args, "--adapter-path", root / "ad").exit_code == 0
    return root / "ad"


def _copy(folder, tmp_path):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "ad"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank", 2**40, "rank must be a whole number from 1 to 4096"),
        ("rank", True, "rank must be a whole number"),
        ("dropout", 5.0, "dropout must be a number from 0"),
        ("scale", float("nan"), "scale must be a finite"),
        ("scale", 1e308, "scale must be a finite"),
        ("scale", "2", "scale must be a finite"),
        ("keys", ["attn.nothing"], "keys must be a list of module keys"),
    ],
)
def test_adapter_config_fields_are_checked(adapters, tmp_path, field, value, message):
    folder = _copy(adapters, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"][field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    one_error(
        run("generate", "--adapter-path", folder, "--prompt", "x", "--max-tokens", "2"), "adapter_config.json", message
    )
    one_error(run("fuse", "--model", DEMO_DIR, "--adapter-path", folder, "-o", tmp_path / "f"), message)


def test_an_adapter_config_without_its_fields_says_so(adapters, tmp_path):
    folder = _copy(adapters, tmp_path)
    (folder / "adapter_config.json").write_text("{}")
    result = run("generate", "--adapter-path", folder, "--prompt", "x", "--max-tokens", "2")
    one_error(result, "adapter_config.json", 'misses "num_layers" and "lora_parameters"')


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapters_are_refused_by_generate_and_fuse_alike(adapters, tmp_path, bad):
    import mlx.core as mx

    folder = _copy(adapters, tmp_path)
    weights = mx.load(str(folder / "adapters.safetensors"))
    name = sorted(weights)[0]
    weights[name] = mx.full(weights[name].shape, bad, weights[name].dtype)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    for args in (
        ["generate", "--adapter-path", folder, "--prompt", "x", "--max-tokens", "2"],
        ["fuse", "--model", DEMO_DIR, "--adapter-path", folder, "-o", tmp_path / "f"],
    ):
        one_error(run(*args), "adapters.safetensors", name, "NaN or infinite")
    assert not (tmp_path / "f").exists()


def test_fuse_of_adapters_that_overflow_says_so_not_differ_by_nan(adapters, tmp_path):
    import mlx.core as mx

    folder = _copy(adapters, tmp_path)
    weights = mx.load(str(folder / "adapters.safetensors"))
    weights = {k: mx.full(v.shape, 1e30, v.dtype) for k, v in weights.items()}  # finite, but the update overflows
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    result = run("fuse", "--model", DEMO_DIR, "--adapter-path", folder, "-o", tmp_path / "f")
    one_error(result, "logits are NaN or infinite", "unusable")
    assert "differ by nan" not in result.output


# --- messages that say what is wrong with the input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, message", [("folder", "a folder, not a file"), ("fifo", "a FIFO"), ("device", "a device")]
)
def test_a_data_file_that_is_no_file_says_what_it_is(tmp_path, kind, message):
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.jsonl"
    {"folder": train.mkdir, "fifo": lambda: os.mkfifo(train), "device": lambda: train.symlink_to("/dev/null")}[kind]()
    args = ["lora", "--model", DEMO_DIR, "--data", data, "--adapter-path", tmp_path / "a", "--iters", "1"]
    one_error(run(*args), "train.jsonl", message)
    if kind != "folder":  # perplexity reads folders of text files
        one_error(run("perplexity", "--model", DEMO_DIR, "--data", train), message)


def test_a_tokenizer_folder_without_one_and_a_model_without_one_get_fitting_advice(model_2048, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("generate", "--model", DEMO_DIR, "--tokenizer", tmp_path / "empty", "--prompt", "x")
    one_error(result, "empty: folder has no tokenizer.model")
    assert "llama" not in result.output.lower()
    result = run("generate", "--model", model_2048 / "mlx", "--prompt", "x")
    one_error(result, "has no tokenizer.model", "2048-token vocabulary is not the LLaMA tokenizer's 32000")
    assert "--tokenizer hf-internal-testing" not in result.output


def test_convert_arch_against_a_config_json_names_the_conflict(model_2048, tmp_path):
    one_error(
        run("convert", model_2048 / "hf", "-o", tmp_path / "o", "--arch", "OpenELM-270M"),
        "--arch: conflicts with",
        "config.json",
        "num_transformer_layers",
    )
    assert run("convert", model_2048 / "hf", "-o", tmp_path / "o").exit_code == 0


# --- mlx-lm's folders: the tokenizer.json its save writes is read ----------------------------------------------------


@pytest.fixture(scope="module")
def mlx_lm_folder(tmp_path_factory):
    """The bundled demo loaded and saved by mlx-lm's own code (as `mlx_lm fuse` does): tokenizer.json only."""
    from mlx_lm.utils import load as mlx_lm_load
    from mlx_lm.utils import save as mlx_lm_save

    out = tmp_path_factory.mktemp("mlx_lm") / "saved"
    model, tok = mlx_lm_load(str(DEMO_DIR))
    config = json.loads((DEMO_DIR / "config.json").read_text())
    mlx_lm_save(out, DEMO_DIR, model, tok, config)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    return out


def test_generate_reads_the_tokenizer_mlx_lm_writes(mlx_lm_folder):
    from openelm_mlx.generation.tokenizer import Tokenizer

    model, tok = load(mlx_lm_folder)
    ours = Tokenizer(DEMO_DIR / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (ours.vocab_size, ours.bos_id, ours.eos_id)
    for text in ["To be, or not to be: that is the question.\n\nWhy,  then", "naïve café 😀 中文", "a</s>b <s>"]:
        assert tok.encode(text) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == ours.apply_chat_template(messages)
    byte_pieces = ours.encode("😀", add_bos=False)
    stream = tok.detokenizer()
    assert "".join(stream.add_token(t) for t in byte_pieces) + stream.finalize() == "😀"
    args = ["--prompt", "To be", "--max-tokens", "12", "--temp", "0"]
    theirs, mine = run("generate", "--model", mlx_lm_folder, *args), run("generate", "--model", DEMO_DIR, *args)
    assert theirs.exit_code == 0 and theirs.stdout == mine.stdout and len(mine.stdout.strip()) > 5, theirs.output


def test_a_model_saved_with_a_tokenizer_json_keeps_it(mlx_lm_folder, tmp_path):
    model, tok = load(mlx_lm_folder)
    save(model, tmp_path / "again", tokenizer=tok)
    assert (tmp_path / "again" / "tokenizer.json").is_file()
    assert load(tmp_path / "again")[1].encode("To be") == tok.encode("To be")


# --- defaults: every command that reads a model defaults to the bundled demo -----------------------------------------


def test_every_command_that_reads_a_model_defaults_to_the_demo(adapters, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "To be or not to be"}\n' * 4)
    commands = [
        ["quantize", "-o", tmp_path / "q", "--bits", "8"],
        ["export", "-o", tmp_path / "e"],
        ["perplexity", "--data", data / "train.jsonl", "--seq-len", "8", "--num-samples", "2"],
        ["bench", "-p", "8", "-g", "2", "--repeats", "1", "--compare", "none"],
        ["lora", "--data", data, "--adapter-path", tmp_path / "a", "--iters", "1", "--batch-size", "1"],
        ["fuse", "--adapter-path", adapters, "-o", tmp_path / "f"],
        ["finetune", "--data", data, "-o", tmp_path / "ft", "--steps", "1", "--batch-size", "1"],
    ]
    for args in commands:
        result = run(*args)
        assert result.exit_code == 0 and "Using the openelm-mlx bundled demo" in result.output, (args, result.output)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["model"] == str(DEMO_DIR)
