"""Full fine-tuning and continued pretraining: what trains and what stays bitwise, resume, mlx-lm reads the
output, data parallelism, divergence, the memory plan, and bad input refused in one line."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from openelm_mlx.cli import app
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import OptionError
from openelm_mlx.folders.io import load, load_model, save
from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.training import loop, memory
from openelm_mlx.training.data import load_split
from openelm_mlx.training.finetune import FinetuneConfig, finetune
from openelm_mlx.training.lora import LoraConfig, train_lora
from openelm_mlx.training.pretrain import PretrainConfig, pretrain

WORDS = "moon sun star tree river stone cloud fire wind snow rain leaf bird fish wolf bear".split()


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """32 prompts, each with its own random two-word answer: a table to memorise (no low-rank shortcut)."""
    root = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    records = [
        {"prompt": f"{a} {b} ->", "completion": f" {rng.choice(WORDS)} {rng.choice(WORDS)}"}
        for a in WORDS[:8]
        for b in WORDS[:4]
    ]
    text = "\n".join(map(json.dumps, records)) + "\n"
    for split in ("train", "valid"):
        (root / f"{split}.jsonl").write_text(text)
    return root


def _settings(task: Path, out: Path, **kw) -> dict:
    base = dict(model=str(DEMO_DIR), data=str(task), out=str(out), steps=6, batch_size=8, mask_prompt=True)
    return {**base, "val_every": 0, "save_every": 0, "seed": 0, **kw}


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(load_model(path).parameters())}


def test_full_finetuning_learns_a_table_that_rank_1_lora_cannot_in_the_same_steps(task, tmp_path):
    steps = dict(steps=30, val_every=30)
    full = finetune(FinetuneConfig(**_settings(task, tmp_path / "full", lr=1e-3, **steps)))
    lora = train_lora(LoraConfig(**_settings(task, tmp_path / "lora", lr=1e-2, rank=1, **steps)))
    assert full["val_loss"] < 0.5 * lora["val_loss"], (full["val_loss"], lora["val_loss"])
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and (tmp_path / "full" / "tokenizer.model").is_file()
    assert json.loads((tmp_path / "full" / "tokenizer_config.json").read_text()) == json.loads(
        (DEMO_DIR / "tokenizer_config.json").read_text()
    )


def test_last_layers_only_and_a_frozen_embedding_stay_bitwise(task, tmp_path):
    before = _weights(DEMO_DIR)
    finetune(FinetuneConfig(**_settings(task, tmp_path / "m", lr=1e-3, num_layers=2, train_embeddings=False)))
    after = _weights(tmp_path / "m")
    n = load_model(DEMO_DIR).config.num_transformer_layers
    trained = tuple(f"transformer.layers.{i}." for i in range(n - 2, n))
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same == (not k.startswith(trained) and k != "transformer.norm.weight"), k


def test_frozen_norms_stay_bitwise_and_bfloat16_keeps_float32_masters(task, tmp_path):
    before = _weights(DEMO_DIR)
    finetune(FinetuneConfig(**_settings(task, tmp_path / "m", lr=1e-3, train_norms=False, dtype="bfloat16")))
    after = _weights(tmp_path / "m")
    assert all(after[k].dtype == np.float32 for k in after)
    for k in before:
        assert np.array_equal(before[k], after[k]) == k.endswith("norm.weight"), k


def test_resume_equals_an_uninterrupted_run_with_adafactor(task, tmp_path):
    kw = dict(lr=1e-3, steps=6, save_every=3, val_every=2, optimizer="adafactor", batch_size=4, grad_accum=2)
    out = tmp_path / "run"
    finetune(FinetuneConfig(**_settings(task, out, **kw)))
    log, weights = (out / "log.jsonl").read_text().splitlines(), _weights(out)
    assert [p.name for p in loop.checkpoints(out / "checkpoints")] == ["step_00000003"]
    finetune(FinetuneConfig(**_settings(task, out, **kw, resume=True)))  # steps 4-6 again, from step 3's state
    again = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(map(json.loads, log), map(json.loads, again)):
        assert (a["loss"], a.get("val_loss")) == (b["loss"], b.get("val_loss"))
    resumed = _weights(out)
    assert all(np.array_equal(weights[k], resumed[k]) for k in weights)


def test_the_saved_model_loads_in_mlx_lm_with_the_same_logits(task, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    finetune(FinetuneConfig(**_settings(task, tmp_path / "m", lr=1e-3)))
    theirs, _ = mlx_lm_load_model(tmp_path / "m")
    ours = load_model(tmp_path / "m")
    x = mx.array([[1, 40, 300, 7, 1000, 5]])
    ref = ours(x)
    assert (mx.abs(theirs(x) - ref).max() / mx.abs(ref).max()).item() <= 1e-5


def test_continued_pretraining_lowers_held_out_loss(tmp_path):
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(600)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:500]))
    _, tok = load(DEMO_DIR)
    held_out = mx.array([tok.encode("\n".join(lines[500:]))[:257]])

    def loss(path: Path) -> float:
        return lm_loss(load_model(path), held_out[:, :-1], held_out[:, 1:])[0].item()

    run = PretrainConfig(
        data=[str(tmp_path / "train.txt")],
        init_from=str(DEMO_DIR),
        out=str(tmp_path / "run"),
        steps=15,
        batch_size=4,
        seq_len=64,
        lr=1e-3,
        warmup=0,
        save_every=0,
        val_every=0,
    )
    pretrain(None, run)
    assert loss(tmp_path / "run") < 0.8 * loss(DEMO_DIR)
    assert Tokenizer(tmp_path / "run" / "tokenizer.model").vocab_size == tok.vocab_size


def _diverge_at(monkeypatch, step: int) -> None:
    """The loss of optimizer step `step` (1-based) comes out NaN, as a diverged run's does."""
    original = loop.Trainer.step
    seen = {"n": 0}

    def step_fn(self, micro_batches):
        metrics = original(self, micro_batches)
        seen["n"] += 1
        return {**metrics, "loss": float("nan")} if seen["n"] >= step else metrics

    monkeypatch.setattr(loop.Trainer, "step", step_fn)


@pytest.mark.parametrize("command", ["finetune", "lora", "pretrain"])
def test_divergence_stops_at_the_step_and_writes_no_nan_checkpoint(task, tmp_path, monkeypatch, command):
    _diverge_at(monkeypatch, 3)
    out = tmp_path / "run"
    if command == "pretrain":
        (tmp_path / "text.txt").write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(16)) * 20)
        run = PretrainConfig(data=[str(tmp_path / "text.txt")], init_from=str(DEMO_DIR), out=str(out), steps=5)
        call = lambda: pretrain(None, run.__class__(**{**run.__dict__, "save_every": 1, "batch_size": 2}))  # noqa: E731
    elif command == "lora":
        call = lambda: train_lora(LoraConfig(**_settings(task, out, steps=5, save_every=1)))  # noqa: E731
    else:
        call = lambda: finetune(FinetuneConfig(**_settings(task, out, steps=5, save_every=1)))  # noqa: E731
    with pytest.raises(loop.Diverged, match=r"diverged at step 3 .*last good checkpoint: .*step_00000002") as e:
        call()
    assert e.value.option == "lr"
    assert [p.name for p in loop.checkpoints(out / "checkpoints")] == ["step_00000001", "step_00000002"]
    assert not (out / "model.safetensors").exists() and not (out / "adapters.safetensors").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_divergence_before_any_checkpoint_says_so(task, tmp_path, monkeypatch):
    _diverge_at(monkeypatch, 1)
    result = CliRunner().invoke(
        app, ["finetune", "--model", str(DEMO_DIR), "--data", str(task), "-o", str(tmp_path / "m"), "--steps", "2"]
    )
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "--lr: training diverged at step 1" in line and "no checkpoint was saved" in line


def test_the_memory_plan_refuses_with_the_cheapest_fix_and_force_overrides(task, tmp_path, monkeypatch):
    from openelm_mlx.model.decoder import Model

    model = Model(OpenELMConfig.from_preset("OpenELM-270M"))  # shapes only: never evaluated
    plan = memory.plan_memory(model, batch_size=8, seq_len=2048)
    fixed = memory.plan_memory(model, batch_size=8, seq_len=2048, grad_checkpoint=True)
    assert fixed.total < plan.total and fixed.weights == plan.weights == 4 * model.config.num_parameters()
    assert memory.plan_memory(model, batch_size=8, seq_len=2048, optimizer="adafactor").optimizer < plan.optimizer / 50
    assert memory.cheapest_fix(plan, fixed.total + 1) == "add --grad-checkpoint"
    smaller = memory.cheapest_fix(plan, fixed.total - fixed.activations_checkpointed // 2)
    assert smaller.startswith("use --grad-checkpoint --batch-size 4 --grad-accum 2"), smaller
    one_example = fixed.activations_checkpointed // 8
    adafactor = memory.cheapest_fix(plan, fixed.weights + fixed.gradients + one_example + one_example // 8)
    assert adafactor.startswith("use --optimizer adafactor --grad-checkpoint --batch-size 1"), adafactor
    assert "lora" in memory.cheapest_fix(plan, plan.weights)
    monkeypatch.setattr(memory, "machine_memory", lambda: 1)
    args = ["finetune", "--model", str(DEMO_DIR), "--data", str(task), "-o", str(tmp_path / "m"), "--steps", "1"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "--force: the run needs about" in refused.output
    assert "add --grad-checkpoint" in refused.output or "lora" in refused.output
    assert not (tmp_path / "m" / "model.safetensors").exists()
    forced = CliRunner().invoke(app, [*args, "--overwrite", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_two_processes_equal_one_at_the_same_global_batch(task, tmp_path):
    """`finetune` under `mlx.launch` (2 processes x batch 4) against one process with batch 8."""
    finetune(FinetuneConfig(**_settings(task, tmp_path / "one", lr=1e-3)))
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
    cli = str(Path(sys.executable).parent / "openelm-mlx")
    args = ["finetune", "--model", str(DEMO_DIR), "--data", str(task), "-o", str(tmp_path / "two"), "--steps", "6"]
    args += ["--batch-size", "4", "--lr", "1e-3", "--val-every", "0", "--save-every", "0", "--mask-prompt"]
    cmd = [launcher, "-n", "2", "--backend", "ring", "--starting-port", "5770", "--", cli, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert len(losses[1]) == 6 and max(abs(a - b) for a, b in zip(*losses)) < 1e-3
    # Adam moves a weight whose gradient is near zero by about lr * its (summation-order-dependent) sign:
    # compare the bulk of the weights, and what the two models compute.
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    far = sum(int((np.abs(a[k] - b[k]) > 1e-4).sum()) for k in a)
    assert far <= 0.01 * sum(v.size for v in a.values())
    _, tok = load(DEMO_DIR)
    batch = tuple(map(mx.array, load_split(task / "valid.jsonl", tok, 64, True).eval_batches(32)[0]))
    one, two = (lm_loss(load_model(tmp_path / n), *batch)[0].item() for n in ("one", "two"))
    assert abs(one - two) < 1e-3 * max(1.0, one), (one, two)


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory) -> Path:
    """A tiny model whose context is 64 tokens, with the demo's tokenizer (and template)."""
    folder = tmp_path_factory.mktemp("ctx64") / "model"
    _, tok = load(DEMO_DIR)
    save(random_model(OpenELMConfig.tiny(vocab_size=tok.vocab_size, max_context_length=64)), folder, tokenizer=tok)
    return folder


def test_each_training_command_runs_with_its_defaults_on_a_64_token_model(small_context_model, task, tmp_path):
    runner = CliRunner()
    model = str(small_context_model)
    (tmp_path / "text.txt").write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(16)) * 20)
    commands = {
        "lora": ["lora", "--model", model, "--data", str(task), "-o", str(tmp_path / "a"), "--steps", "1"],
        "finetune": ["finetune", "--model", model, "--data", str(task), "-o", str(tmp_path / "f"), "--steps", "1"],
        "pretrain": ["pretrain", "--init-from", model, "--data", str(tmp_path / "text.txt"), "-o", str(tmp_path / "p")]
        + ["--steps", "1"],
    }
    for name, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (name, result.output)
    assert "--seq-len 64" in result.output  # pretraining's default 512 shrank, with a note
    assert json.loads((tmp_path / "p" / "train_config.json").read_text())["seq_len"] == 64


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-layers", "0"], "--num-layers: must be a positive whole number or 'all', got '0'"),
        (["--num-layers", "7"], "--num-layers: 7 is more than the model's 6 decoder layers"),
        (["--optimizer", "lion"], "--optimizer: must be one of adamw, adafactor, sgd, got 'lion'"),
        (["--dtype", "float16"], "--dtype: must be float32 or bfloat16"),
        (["-o", str(DEMO_DIR)], str(DEMO_DIR)),
        (["--steps", "2", "--epochs", "1"], "--steps: and epochs cannot both be given"),
    ],
)
def test_bad_finetune_input_gets_one_line_before_loading(task, tmp_path, extra, message, monkeypatch):
    import openelm_mlx.folders.io as io

    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["finetune", "--model", str(DEMO_DIR), "--data", str(task), "-o", str(tmp_path / "m"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


def test_a_quantized_base_is_refused_with_where_to_go(task, tmp_path):
    from openelm_mlx.quant.recipes import quantize_model

    model, tok = load(DEMO_DIR)
    quantize_model(model, bits=4, group_size=32)
    save(model, tmp_path / "q", tokenizer=tok)
    with pytest.raises(OptionError, match="lora.*QLoRA.*quantize --dequantize") as e:
        finetune(FinetuneConfig(**_settings(task, tmp_path / "m", model=str(tmp_path / "q"))))
    assert e.value.option == "model"
    with pytest.raises(OptionError, match="is quantized"):
        pretrain(
            None,
            PretrainConfig(data=[str(task / "train.jsonl")], init_from=str(tmp_path / "q"), out=str(tmp_path / "p")),
        )


def test_pretrain_init_from_refuses_arch_a_non_model_and_another_vocabulary(tmp_path):
    runner = CliRunner()
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    args = ["pretrain", "--data", str(tmp_path / "t.txt"), "-o", str(tmp_path / "run")]
    both = runner.invoke(app, [*args, "--init-from", str(DEMO_DIR), "--arch", "OpenELM-270M"])
    assert both.exit_code == 1 and "--arch: and --init-from cannot both be given" in both.output
    (tmp_path / "empty").mkdir()
    not_model = runner.invoke(app, [*args, "--init-from", str(tmp_path / "empty")])
    assert not_model.exit_code == 1 and "not a model folder" in not_model.output
    from openelm_mlx.training.pretrain import train_tokenizer

    train_tokenizer([tmp_path / "t.txt"], 270, tmp_path / "small.model")
    other = runner.invoke(app, [*args, "--init-from", str(DEMO_DIR), "--tokenizer", str(tmp_path / "small.model")])
    assert other.exit_code == 1 and "a continued model needs its own vocabulary" in other.output
    assert not (tmp_path / "run").exists()


def test_old_option_names_are_aliases_of_the_shared_ones(task, tmp_path):
    from openelm_mlx.training.lora import make_config

    cfg = make_config({"iters": 3, "adapter_path": "x", "eval_every": 2})
    assert (cfg.steps, cfg.out, cfg.val_every) == (3, "x", 2)
    with pytest.raises(OptionError, match="given twice"):
        make_config({"iters": 3, "steps": 4})
    (tmp_path / "c.yaml").write_text("iters: 5\nadapter-path: y\n")
    cfg = make_config({}, config_file=tmp_path / "c.yaml")
    assert (cfg.steps, cfg.out) == (5, "y")
