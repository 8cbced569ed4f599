"""LoRA/DoRA/QLoRA: tiny tasks are learned, the base stays bitwise, fuse/resume/mlx-lm agree, bad data is named."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import openelm_mlx.cli.lora  # noqa: F401  (registers `lora` and `fuse`)
from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import CheckpointError, OptionError
from openelm_mlx.folders.io import load, load_model, save
from openelm_mlx.generation.generate import generate
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.quant.recipes import quantize_model
from openelm_mlx.training.adapters import ADAPTERS_FILE, fuse_model, load_adapters
from openelm_mlx.training.data import DataError, FinetuneData, load_split
from openelm_mlx.training.lora import LoraConfig, make_config, train_lora
from openelm_mlx.training.trainable import AdapterWeights
from openelm_mlx.training.tune import prepare_folder

PROMPT = "ROMEO: what is the password?\nJULIET:"
ANSWER = "the moon is made of cheese."


def _write(path: Path, records: list) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task")
    records = [{"prompt": PROMPT.replace("?", "?" * (i % 3 + 1)), "completion": " " + ANSWER} for i in range(12)]
    _write(root / "train.jsonl", records)
    _write(root / "valid.jsonl", records[:4])
    _write(root / "test.jsonl", records[4:8])
    return root


def _run(task: Path, out: Path, model_dir: Path = DEMO_DIR, **kw) -> tuple[dict, object, object]:
    model, tok = load(model_dir)
    settings = dict(steps=20, lr=1e-2, batch_size=4, val_every=10, save_every=0, mask_prompt=True, seed=1)
    cfg = LoraConfig(model=str(model_dir), data=str(task), out=str(out), **{**settings, **kw})
    return train_lora(cfg, progress=False, model=model, tokenizer=tok), model, tok


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _answer(model, tok) -> str:
    return generate(model, tok, PROMPT, max_tokens=14, temp=0.0).strip()


def _base_weights(model) -> dict[str, np.ndarray]:
    return {
        k.replace(".linear.", ".").replace(".embedding.", "."): np.array(v)
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] not in ("lora_a", "lora_b", "m")
    }


@pytest.fixture(scope="module")
def lora_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapters"
    base, tok = load(DEMO_DIR)
    before = _base_weights(base), _answer(base, tok)
    metrics, model, tok = _run(task, out, test=True, targets="qkv_proj,out_proj,proj_1,proj_2,token_embeddings")
    return out, before, metrics, model, tok


def test_lora_learns_the_task_and_leaves_the_base_bitwise_unchanged(lora_run):
    out, (weights, answer_before), metrics, model, tok = lora_run
    losses = _losses(out)
    assert losses[-1] < 0.05 * losses[0]
    assert answer_before != ANSWER and _answer(model, tok).startswith(ANSWER)
    after = _base_weights(model)
    assert after.keys() == weights.keys()
    assert all(np.array_equal(weights[k], after[k]) for k in weights)
    assert metrics["val_loss"] < 0.5 and metrics["test_perplexity"] == pytest.approx(np.exp(metrics["test_loss"]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["format_version"] == 1 and config["fine_tune_type"] == "lora"
    assert config["lora_parameters"]["keys"][-1] == "transformer.token_embeddings"


def test_saved_adapters_load_in_ours_and_in_mlx_lm_with_the_same_logits(lora_run):
    import mlx_lm

    out, _, _, trained, tok = lora_run
    x = mx.array([tok.encode(PROMPT)])
    ours = load_adapters(load_model(DEMO_DIR), out)
    theirs, _ = mlx_lm.load(str(DEMO_DIR), adapter_path=str(out))
    reference = trained(x)
    assert mx.allclose(ours(x), reference, atol=1e-5).item()
    assert mx.allclose(theirs(x), reference, atol=1e-4).item()


def test_fused_model_equals_the_adapted_model(lora_run, tmp_path):
    import mlx_lm

    out, _, _, trained, tok = lora_run
    result = fuse_model(DEMO_DIR, out, tmp_path / "fused")
    assert result["fuse_error"] <= 1e-5
    fused, fused_tok = load(tmp_path / "fused")
    x = mx.array([tok.encode(PROMPT)])
    ref = trained(x)
    assert (mx.abs(fused(x) - ref).max() / mx.abs(ref).max()).item() <= 1e-5
    assert _answer(fused, fused_tok).startswith(ANSWER)
    assert mx.allclose(mlx_lm.load(str(tmp_path / "fused"))[0](x), ref, atol=1e-4).item()


def test_fuse_refuses_when_the_merge_does_not_match(lora_run, tmp_path, monkeypatch):
    from mlx_lm.tuner.lora import LoRALinear

    original = LoRALinear.fuse

    def broken(self, dequantize=False):
        fused = original(self, dequantize)
        fused.weight = fused.weight * 1.01
        return fused

    monkeypatch.setattr(LoRALinear, "fuse", broken)
    with pytest.raises(CheckpointError, match="fused logits differ"):
        fuse_model(DEMO_DIR, lora_run[0], tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_dora_learns_the_task_and_fuses(task, tmp_path):
    metrics, model, tok = _run(task, tmp_path / "dora", dora=True)
    losses = _losses(tmp_path / "dora")
    assert losses[-1] < 0.05 * losses[0] and _answer(model, tok).startswith(ANSWER)
    assert any(k.endswith(".m") for k, _ in tree_flatten(model.trainable_parameters()))
    fuse_model(DEMO_DIR, tmp_path / "dora", tmp_path / "fused")
    x = mx.array([tok.encode(PROMPT)])
    ref = model(x)
    assert (mx.abs(load_model(tmp_path / "fused")(x) - ref).max() / mx.abs(ref).max()).item() <= 1e-5


def test_resume_gives_the_same_losses_and_adapters_as_an_uninterrupted_run(task, tmp_path):
    out = tmp_path / "run"
    _run(task, out, steps=6, save_every=3, val_every=2, dropout=0.1, lr=3e-3, grad_accum=2, batch_size=3)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    adapters = mx.load(str(out / "adapters.safetensors"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    _run(task, out, steps=6, save_every=3, val_every=2, dropout=0.1, lr=3e-3, grad_accum=2, batch_size=3, resume=True)
    again = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(log, again):
        assert (a["loss"], a.get("val_loss")) == (b["loss"], b.get("val_loss"))
    resumed = mx.load(str(out / "adapters.safetensors"))
    assert all(mx.array_equal(adapters[k], resumed[k]).item() for k in adapters)


def test_checkpoints_keep_the_newest_and_a_hand_edited_state_is_named(task, tmp_path):
    out = tmp_path / "run"
    _run(task, out, steps=4, save_every=1, keep_checkpoints=1, val_every=0)
    ckpt = out / "checkpoints" / "step_00000003"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]
    load_adapters(load_model(DEMO_DIR), ckpt)  # a checkpoint is also an adapter folder
    saved = json.loads((ckpt / "state.json").read_text())
    del saved["adapter_config"]["lora_parameters"]
    (ckpt / "state.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "state.json"))):
        _run(task, out, steps=4, resume=True)


def test_a_used_adapter_path_is_refused_unless_resume_or_overwrite(task, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "adapters.safetensors").write_bytes(b"x")  # someone's own adapters (e.g. from mlx-lm): never replaced
    (out / "notes.txt").write_text("mine")
    cfg = dict(model=str(DEMO_DIR), data=str(task), out=str(out))
    for extra in ({}, {"overwrite": True}):
        with pytest.raises(CheckpointError, match="adapters.safetensors, which openelm-mlx did not write"):
            prepare_folder(LoraConfig(**cfg, **extra), AdapterWeights(0, {}))
    (out / "adapters.safetensors").unlink()
    _run(task, out, steps=2, save_every=0)  # an earlier run of ours
    with pytest.raises(OptionError, match="holds an earlier run") as e:
        prepare_folder(LoraConfig(**cfg), AdapterWeights(0, {}))
    assert e.value.option == "out"
    with pytest.raises(OptionError, match="no checkpoint"):
        prepare_folder(LoraConfig(**cfg, resume=True), AdapterWeights(0, {}))
    assert prepare_folder(LoraConfig(**cfg, overwrite=True), AdapterWeights(0, {})) is None
    assert "notes.txt" in {p.name for p in out.iterdir()} and not (out / "log.jsonl").exists()


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    model, tok = load(DEMO_DIR)
    quantize_model(model, bits=4, group_size=32)
    return save(model, tmp_path_factory.mktemp("q4") / "model", tokenizer=tok)


def test_qlora_trains_on_the_quantized_base_and_fuses_quantized_or_float(task, quantized_dir, tmp_path):
    import mlx_lm

    out = tmp_path / "qlora"
    _, model, tok = _run(task, out, model_dir=quantized_dir, lr=2e-2)
    losses = _losses(out)
    assert losses[-1] < 0.1 * losses[0]
    assert json.loads((quantized_dir / "config.json").read_text())["quantization"]["bits"] == 4
    x = mx.array([tok.encode(PROMPT)])
    adapted = model(x)
    result = fuse_model(quantized_dir, out, tmp_path / "q", dequantize=False)
    assert result["fuse_error"] <= 1e-5 and "requantize_error" in result
    assert "quantization" in json.loads((tmp_path / "q" / "config.json").read_text())
    assert mx.allclose(load_model(tmp_path / "q")(x), mlx_lm.load(str(tmp_path / "q"))[0](x), atol=1e-4).item()
    fuse_model(quantized_dir, out, tmp_path / "f", dequantize=True)
    assert "quantization" not in json.loads((tmp_path / "f" / "config.json").read_text())
    ref = load_model(tmp_path / "f")(x)
    assert (mx.abs(ref - adapted).max() / mx.abs(adapted).max()).item() <= 1e-5
    assert mx.allclose(mlx_lm.load(str(tmp_path / "f"))[0](x), ref, atol=1e-4).item()


class _Tok:
    bos_id, eos_id = 1, 2

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [1] * add_bos + [3 + ord(c) % 50 for c in text]

    def encode_chat_text(self, text: str) -> list[int]:
        out = []
        for i, chunk in enumerate(text.split("</s>")):
            out += [2] * bool(i) + self.encode(chunk, add_bos=False)
        return out


def test_mask_prompt_counts_only_completion_and_assistant_tokens(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    _write(tmp_path / "d.jsonl", [{"prompt": "abcd", "completion": "xyz"}, chat, {"text": "plain"}])
    masked = load_split(tmp_path / "d.jsonl", _Tok(), 256, mask_prompt=True)
    full = load_split(tmp_path / "d.jsonl", _Tok(), 256, mask_prompt=False)
    assert [e.weights.sum() for e in masked.examples] == [3 + 1, 2 + 1 + 2 + 1, 5 + 1]
    assert [e.weights.sum() for e in full.examples] == [len(e.ids) - 1 for e in full.examples]
    inputs, targets, weights = (mx.array(a) for a in FinetuneData(masked.examples).batch(0, 0, 3))
    logits = mx.random.normal((*inputs.shape, 60))
    loss, n = lm_loss(lambda _: logits, inputs, targets, weights)
    noise = mx.where((weights == 0)[..., None], mx.random.normal(logits.shape) * 10, 0)
    loss2, n2 = lm_loss(lambda _: logits + noise, inputs, targets, weights)
    assert n.item() == n2.item() == 16 and loss.item() == pytest.approx(loss2.item(), rel=1e-6)


def test_long_examples_are_truncated_with_one_warning(tmp_path, caplog):
    _write(tmp_path / "d.jsonl", [{"text": "x" * 50}] * 3 + [{"text": "short"}])
    data = load_split(tmp_path / "d.jsonl", _Tok(), 16)
    assert max(len(e.ids) for e in data.examples) == 16
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 4" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', "line 2: invalid JSON"),
        ('{"text": "ok"}\n\n{"prompt": "p"}\n', 'line 3: "completion" must be a string'),
        ('{"text": 5}\n', 'line 1: "text" must be a string'),
        ('{"other": "x"}\n', 'line 1: needs "text"'),
        ('["text"]\n', "line 1: expected a JSON object"),
        ("", "file is empty"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: the chat has no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "line 1: message 0 needs a 'role'"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_split(tmp_path / "train.jsonl", _Tok(), 32)
    assert str(tmp_path / "train.jsonl") in str(e.value)


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(rank=0), "rank"),
        (dict(dropout=1.5), "dropout"),
        (dict(targets="qkv_proj,lm_head"), "targets"),
        (dict(num_layers="three"), "num_layers"),
        (dict(steps=5, epochs=1.0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(resume=True, overwrite=True), "resume"),
        (dict(targets=5), "targets"),
        (dict(num_layers=2.5), "num_layers"),
        (dict(mask_prompt="no"), "mask_prompt"),
        (dict(keep_checkpoints=0), "keep_checkpoints"),
    ],
)
def test_bad_settings_raise_option_errors(kw, option):
    with pytest.raises(OptionError) as e:
        LoraConfig(**kw)
    assert e.value.option == option


def test_settings_come_from_defaults_recipe_file_then_explicit_options(tmp_path):
    (tmp_path / "c.yaml").write_text("recipe: paper\nrank: 4\nmax-seq-len: 64\ntargets: [qkv_proj]\n")
    values = {"rank": 8, "lr": 1e-4, "iters": 7, "epochs": None}
    cfg = make_config(values, explicit={"iters"}, config_file=tmp_path / "c.yaml")
    assert (cfg.rank, cfg.lr, cfg.max_seq_len, cfg.targets, cfg.steps, cfg.epochs) == (4, 3e-4, 64, "qkv_proj", 7, None)
    assert cfg.scale == 32 / 4 and cfg.dropout == 0.1
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    with pytest.raises(OptionError, match="unknown setting 'rnak'"):
        make_config(values, config_file=tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "line, message",
    [
        ("targets: 5", "targets must be a string, got 5"),
        ("num_layers: 2.5", "num_layers must be a positive whole number or 'all', got 2.5"),
        ('mask_prompt: "no"', "mask_prompt must be true or false, got 'no'"),
        ("lr: 1e-4", "lr must be a number, got '1e-4' (YAML reads 1e-4 as text"),
        ("recipe: [paper]", "recipe must be a string"),
    ],
)
def test_config_file_values_of_the_wrong_type_name_the_file_and_key(tmp_path, line, message):
    (tmp_path / "c.yaml").write_text(line + "\n")
    with pytest.raises(OptionError, match=re.escape(f"{tmp_path / 'c.yaml'}: {message}")) as e:
        make_config({}, config_file=tmp_path / "c.yaml")
    assert e.value.option == "config"


def test_cli_trains_tests_and_fuses(task, tmp_path):
    runner = CliRunner()
    args = ["lora", "--model", str(DEMO_DIR), "--data", str(task), "--adapter-path", str(tmp_path / "a")]
    args += ["--iters", "2", "--batch-size", "2", "--rank", "4", "--test", "--val-every", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test loss" in result.output and (tmp_path / "a" / "adapters.safetensors").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--out" in again.output and "holds an earlier run" in again.output
    fused = runner.invoke(
        app, ["fuse", "--model", str(DEMO_DIR), "--adapter-path", str(tmp_path / "a"), "-o", str(tmp_path / "m")]
    )
    assert fused.exit_code == 0, fused.output
    # generate --adapter-path prints what the fused model prints (and differs from the plain base)
    gen = ["generate", "--prompt", "ROMEO:", "--max-tokens", "12"]
    adapted = runner.invoke(app, [*gen, "--model", str(DEMO_DIR), "--adapter-path", str(tmp_path / "a")])
    merged = runner.invoke(app, [*gen, "--model", str(tmp_path / "m")])
    assert adapted.exit_code == 0 and adapted.stdout == merged.stdout, adapted.output
    chat = runner.invoke(app, ["chat", "--adapter-path", str(tmp_path / "a"), "--max-tokens", "4"], input="Hi\n/exit\n")
    assert chat.exit_code == 0, chat.output
    shutil.rmtree(tmp_path / "a" / "checkpoints", ignore_errors=True)
    (tmp_path / "a" / "adapters.safetensors").write_bytes(b"\0" * 10)
    broken = runner.invoke(
        app, ["fuse", "--model", str(DEMO_DIR), "--adapter-path", str(tmp_path / "a"), "-o", str(tmp_path / "n")]
    )
    assert broken.exit_code == 1 and "adapters.safetensors" in broken.output


def test_two_processes_train_the_same_adapters_as_one(task, tmp_path):
    """Data-parallel LoRA under `mlx.launch` (ring backend, 2 local processes x batch 2) equals one process
    with batch 4; only rank 0 writes."""
    import os
    import subprocess
    import sys

    _run(task, tmp_path / "one", steps=6, batch_size=4, val_every=0)
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
    cli = str(Path(sys.executable).parent / "openelm-mlx")
    args = ["lora", "--model", str(DEMO_DIR), "--data", str(task), "--adapter-path", str(tmp_path / "two")]
    args += ["--iters", "6", "--batch-size", "2", "--lr", "1e-2", "--val-every", "0", "--save-every", "0"]
    args += ["--mask-prompt", "--seed", "1"]
    cmd = [launcher, "-n", "2", "--backend", "ring", "--starting-port", "5750", "--", cli, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < 1e-3
    assert_same_adapters(tmp_path / "one", tmp_path / "two", task)


def assert_same_adapters(one: Path, two: Path, task: Path) -> None:
    """Adapters trained by Adam in two runs whose sums ran in another order (other processes, another BLAS):
    a near-zero gradient's sign may flip, which moves that weight by about lr, so a weight-by-weight
    tolerance is not robust. What is: the bulk of the weights agree, and both give the same loss."""
    a, b = mx.load(str(one / ADAPTERS_FILE)), mx.load(str(two / ADAPTERS_FILE))
    assert a.keys() == b.keys()
    far = sum((mx.abs(a[k] - b[k]) > 1e-3).sum().item() for k in a)
    assert far <= 0.01 * sum(v.size for v in a.values())
    model, tok = load(DEMO_DIR)
    batch = tuple(map(mx.array, load_split(task / "valid.jsonl", tok, 64, True).eval_batches(4)[0]))
    losses = [lm_loss(load_adapters(load_model(DEMO_DIR), folder), *batch)[0].item() for folder in (one, two)]
    assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[0])), losses
