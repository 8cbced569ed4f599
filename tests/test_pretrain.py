"""Pretraining: tokenizer, data errors, loss falls, SIGKILL + resume is exact, 2 processes equal 1."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.training.data import DataError, read_documents
from openelm_mlx.training.pretrain import PretrainConfig, pretrain, train_tokenizer

CORPUS = "\n".join(
    f"{name}: the {thing} is {adj}, and the {thing} shall be {adj} again."
    for name in ("ROMEO", "JULIET", "NURSE", "FRIAR")
    for thing in ("moon", "night", "rose", "sword", "crown")
    for adj in ("bright", "dark", "sweet", "sharp")
)
ARCH = dict(
    num_transformer_layers=3,
    model_dim=48,
    head_dim=16,
    num_gqa_groups=2,
    qkv_multipliers=(0.5, 1.0),
    ffn_multipliers=(0.5, 2.0),
    ffn_dim_divisor=16,
    vocab_size=320,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(CORPUS * 3)
    tok = train_tokenizer([root / "a.txt"], 320, root / "tok.model")
    return root / "a.txt", tok


def _run(corpus, out, **kw) -> PretrainConfig:
    args = dict(
        data=[str(corpus[0])],
        tokenizer=str(corpus[1]),
        out=str(out),
        steps=12,
        batch_size=4,
        seq_len=32,
        lr=1e-2,
        warmup=2,
        val_every=6,
        save_every=0,
        val_fraction=0.1,
        seed=3,
    )
    return PretrainConfig(**{**args, **kw})


def _cli_args(corpus, arch_file: Path, out: Path, steps: int = 12, batch_size: int = 4, save_every: int = 0) -> list:
    """`pretrain` arguments equal to `_run`'s settings."""
    return [
        "pretrain",
        "--arch-config",
        str(arch_file),
        "--data",
        str(corpus[0]),
        "--tokenizer",
        str(corpus[1]),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--warmup",
        "2",
        "--eval-every",
        "6",
        "--save-every",
        str(save_every),
        "--val-fraction",
        "0.1",
        "--seed",
        "3",
    ]


def _losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (killed, then resumed) keeps its last entry."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_tokenizer_has_openelm_ids_and_round_trips_unseen_text(corpus):
    tok = Tokenizer(corpus[1])
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 320)
    text = "ROMEO: the moon is Zoë's 🦙, 42!"
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.decode(ids) == text


def test_loss_falls_and_final_model_is_saved(corpus, tmp_path):
    from openelm_mlx import load

    metrics = pretrain(OpenELMConfig.from_layerwise(**ARCH), _run(corpus, tmp_path / "run", steps=30), progress=False)
    losses = _losses(tmp_path / "run")
    assert losses[30] < losses[1] - 1.5
    assert metrics["val_loss"] < 4.0  # ln(320) = 5.77 at random
    model, tok = load(tmp_path / "run")
    assert model.config == OpenELMConfig.from_layerwise(**ARCH) and tok.vocab_size == 320
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens_per_sec", "val_loss", "peak_memory_gb"} <= set(log)


def test_sigkill_then_resume_logs_the_same_losses(corpus, tmp_path):
    steps, arch_file = 300, tmp_path / "arch.json"
    arch_file.write_text(json.dumps(OpenELMConfig.from_layerwise(**ARCH).to_dict()))
    pretrain(OpenELMConfig.from_layerwise(**ARCH), _run(corpus, tmp_path / "full", steps=steps), progress=False)
    cmd = [
        sys.executable,
        "-m",
        "openelm_mlx",
        *_cli_args(corpus, arch_file, tmp_path / "killed", steps=steps, save_every=5),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.exists() and any(checkpoints.glob("step_*"))) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = json.loads((sorted(checkpoints.glob("step_*"))[-1] / "state.json").read_text())["step"]
    assert resumed_from < steps, "the run finished before it could be killed"
    pretrain(
        OpenELMConfig.from_layerwise(**ARCH),
        _run(corpus, tmp_path / "killed", steps=steps, resume=True),
        progress=False,
    )
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert all(resumed[s] == full[s] for s in range(resumed_from + 1, steps + 1))  # bitwise


def test_two_processes_equal_one(corpus, tmp_path):
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(OpenELMConfig.from_layerwise(**ARCH).to_dict()))
    pretrain(OpenELMConfig.from_layerwise(**ARCH), _run(corpus, tmp_path / "one", batch_size=4), progress=False)
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
    openelm = str(Path(sys.executable).parent / "openelm-mlx")
    cmd = [
        launcher,
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        "5730",
        "--",
        openelm,
        *_cli_args(corpus, arch_file, tmp_path / "two", batch_size=2),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-3
    assert one[12] < one[1]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n", r"empty.txt: file is empty"),
        ("blob.txt", b"\x00\x01\x02binary", r"blob.txt: looks binary"),
        ("docs.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n', r'docs.jsonl, line 3: no string "text" field'),
        ("bad.jsonl", b'{"text": "a"}\n{oops\n', r"bad.jsonl, line 2: invalid JSON"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents([tmp_path / name]))


def test_cli_reports_bad_data_without_traceback(tmp_path, corpus):
    from typer.testing import CliRunner

    from openelm_mlx.cli import app

    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--arch",
            "OpenELM-270M",
            "--data",
            str(tmp_path / "docs.jsonl"),
            "--tokenizer",
            str(corpus[1]),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 1
    assert 'docs.jsonl, line 2: no string "text" field' in result.output
    assert "Traceback" not in result.output
