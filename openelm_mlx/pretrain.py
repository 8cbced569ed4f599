"""Pretraining an OpenELM from scratch with CoreNet's recipe, on one Mac or several (mx.distributed).

Also trains a SentencePiece tokenizer with OpenELM's special ids.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import OpenELMConfig
from .data import TokenData, read_documents, tokenize_to_file
from .io import parse_dtype, save
from .model import Model
from .tokenizer import Tokenizer
from .train import Evaluate, OptimizerConfig, Trainer, enable_grad_checkpoint, lm_loss, make_optimizer

CHECKPOINTS = "checkpoints"


def init_weights(model: Model, seed: int) -> None:
    """CoreNet's initialisation: Linear ~ N(0, in^-1/2), embedding ~ N(0, D^-1/2), norms 1,
    `out_proj` and `proj_2` ~ N(0, D^-1/2 (2L)^-1/2)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    residual_std = cfg.model_dim**-0.5 * (2 * cfg.num_transformer_layers) ** -0.5
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = np.ones(p.shape)
        elif name.endswith(("out_proj.weight", "proj_2.weight")):
            value = rng.normal(0.0, residual_std, p.shape)
        elif name.endswith("token_embeddings.weight"):
            value = rng.normal(0.0, cfg.model_dim**-0.5, p.shape)
        else:
            value = rng.normal(0.0, p.shape[-1] ** -0.5, p.shape)
        params.append((name, mx.array(value.astype(np.float32))))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def train_tokenizer(
    data: Sequence[str | Path], vocab_size: int, output: str | Path, max_sentences: int = 2_000_000
) -> Path:
    """Train a SentencePiece BPE model (byte fallback; unk 0, BOS 1, EOS 2, no pad), written atomically."""
    import sentencepiece as spm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in read_documents(data):
                f.writelines(line + "\n" for line in doc.splitlines() if line.strip())
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tok"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=1.0,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            num_threads=1,  # deterministic: the same data gives the same tokenizer
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            minloglevel=2,
        )
        os.replace(Path(tmp) / "tok.model", output)
    return output


@dataclass
class PretrainConfig:
    """Settings of a pretraining run (CoreNet's defaults, sized down by the caller)."""

    data: list[str]
    tokenizer: str
    out: str
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 5.3e-3
    min_lr: float | None = None
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    dtype: str = "float32"
    grad_checkpoint: bool = False
    eval_every: int = 100
    save_every: int = 500
    keep_checkpoints: int = 2
    val_fraction: float = 0.02
    seed: int = 0
    resume: bool = False
    arch: dict[str, Any] = field(default_factory=dict)


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step_*"))
    return found[-1] if found else None


def pretrain(config: OpenELMConfig, run: PretrainConfig, progress: bool = True) -> dict[str, float]:
    """Train `config` from scratch (or resume) on `run.data`; the final model is saved in `run.out`.

    Returns:
        Final metrics: {"step", "loss", "val_loss"}.
    """
    compute_dtype = parse_dtype(run.dtype)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(run.out)
    tokenizer = Tokenizer(run.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model vocab_size is {config.vocab_size}")
    data = _prepare_data(run, tokenizer, out, rank, world, group)

    model = Model(config)
    init_weights(model, run.seed)
    if run.grad_checkpoint:
        enable_grad_checkpoint(model)
    opt = OptimizerConfig(
        lr=run.lr, steps=run.steps, warmup=run.warmup, min_lr=run.min_lr, weight_decay=run.weight_decay
    )
    trainer = Trainer(
        model,
        lambda m, x, y: lm_loss(m, x, y, z_loss=run.z_loss),
        make_optimizer(opt),
        compute_dtype=None if compute_dtype == mx.float32 else compute_dtype,
        grad_clip=run.grad_clip,
        group=group if world > 1 else None,
    )
    start = 0
    if run.resume and (ckpt := latest_checkpoint(out)) is not None:
        start = trainer.load_checkpoint(ckpt)["step"]
    elif rank == 0 and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()

    def batches(step: int) -> list[tuple[mx.array, ...]]:
        return [
            tuple(
                map(mx.array, data.batch(step * run.grad_accum + i, run.seed, run.batch_size, run.seq_len, rank, world))
            )
            for i in range(run.grad_accum)
        ]

    log = _Logger(out, enabled=rank == 0, progress=progress, total=run.steps, start=start)
    callbacks = [
        Evaluate(data.val_batches(run.batch_size, run.seq_len), run.eval_every, run.steps),
        log,
        _Checkpointer(out, run, enabled=rank == 0),
    ]
    metrics = trainer.fit(batches, run.steps, start, callbacks)
    log.close()
    if rank == 0:
        save(model, out, tokenizer=tokenizer, config_extra={"torch_dtype": "float32"})
        (out / "train_config.json").write_text(json.dumps(asdict(run), indent=2))
    return metrics


def _prepare_data(run: PretrainConfig, tokenizer: Tokenizer, out: Path, rank: int, world: int, group: Any) -> TokenData:
    """Rank 0 tokenizes (once, cached); other ranks wait for it, then all map the same file."""
    args = (
        run.data,
        lambda t: tokenizer.encode(t, add_bos=False),
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.vocab_size,
        tokenizer.model_file,
        out / "data",
    )
    if rank == 0:
        path = tokenize_to_file(*args)
    if world > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # barrier: rank 0 has written the file
    if rank != 0:
        path = tokenize_to_file(*args)  # finds the cached file
    return TokenData.open(path, run.val_fraction, run.seq_len)


class _Checkpointer:
    """Every `save_every` steps (not the last: the final model is saved anyway), rank 0 writes a
    checkpoint and keeps the newest `keep_checkpoints`."""

    def __init__(self, out: Path, run: PretrainConfig, enabled: bool):
        self.out, self.run, self.enabled = out, run, enabled

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step, every = int(metrics["step"]), self.run.save_every
        if not (self.enabled and every and step % every == 0 and step < self.run.steps):
            return
        trainer.save_checkpoint(self.out / CHECKPOINTS / f"step_{step:08d}", {"step": step, "seed": self.run.seed})
        for old in sorted((self.out / CHECKPOINTS).glob("step_*"))[: -self.run.keep_checkpoints]:
            shutil.rmtree(old)


class _Logger:
    """One JSON line per step in `out/log.jsonl`, and a progress bar on stderr (rank 0 only)."""

    def __init__(self, out: Path, enabled: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.file = None
        self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(
            json.dumps({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}) + "\n"
        )
        self.file.flush()
        if self.bar is not None:
            post = {
                "loss": f"{metrics['loss']:.3f}",
                "tok/s": f"{metrics['tokens_per_sec']:.0f}",
                "mem": f"{metrics['peak_memory_gb']:.2f}GB",
            }
            if "val_loss" in metrics:
                post["val"] = f"{metrics['val_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()
