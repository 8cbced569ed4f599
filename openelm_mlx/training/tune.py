"""The fine-tuning run on a folder of JSONL examples, shared by lora and finetune: the trainable-parameter
choice is the strategy it takes (`trainable.AdapterWeights`, `trainable.ModelWeights`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError
from ..folders.io import parse_dtype
from ..model.loss import lm_loss
from .data import FinetuneData, load_split
from .loop import (
    Batch,
    OptimizerConfig,
    Trainer,
    enable_grad_checkpoint,
    make_optimizer,
    micro_batches,
    prepare_run_folder,
    run_training,
)
from .memory import check_memory, plan_memory
from .settings import ExampleSettings
from .trainable import TRAIN_CONFIG_FILE, Trainable

log = logging.getLogger("openelm_mlx")


def check_paths(settings: ExampleSettings) -> None:
    for name in ("model", "data", "out"):
        if not getattr(settings, name):
            raise OptionError(name, "is needed (as a setting or in the config file)")
    folder = Path(settings.data)
    if not folder.is_dir():
        raise OptionError("data", f"{folder} is not a folder (expected train.jsonl, valid.jsonl, test.jsonl)")


def load_splits(settings: ExampleSettings, tokenizer: Any, max_seq_len: int) -> dict[str, FinetuneData]:
    """train (required), valid and test (when present and needed) of the data folder."""
    folder = Path(settings.data)
    wanted = ["train", "valid"] + (["test"] if settings.test else [])
    splits = {}
    for name in wanted:
        path = folder / f"{name}.jsonl"
        if name == "train" or path.exists():
            splits[name] = load_split(path, tokenizer, max_seq_len, settings.mask_prompt)
    if settings.test and "test" not in splits:
        raise OptionError("test", f"{folder / 'test.jsonl'} does not exist")
    return splits


def max_seq_len(settings: ExampleSettings, config: Any) -> int:
    """`max_seq_len`, or the model's context length by default.

    Raises:
        OptionError: a `max_seq_len` past the model's context.
    """
    limit = config.max_context_length
    if settings.max_seq_len is not None and settings.max_seq_len > limit:
        raise OptionError("max_seq_len", f"{settings.max_seq_len} is more than the model's max_context_length {limit}")
    return settings.max_seq_len or limit


def total_steps(settings: ExampleSettings, n_train: int, world: int = 1) -> int:
    """`steps`, or the steps of `epochs` (default 3) passes over `n_train` examples."""
    if settings.steps is not None:
        return settings.steps
    per_step = settings.batch_size * settings.grad_accum * world
    return max(1, math.ceil((settings.epochs or 3.0) * n_train / per_step))


def eval_loss(model: nn.Module, *batch: mx.array) -> tuple[mx.array, mx.array]:
    """`lm_loss` over the weighted tokens (inputs, targets, weights), with dropout off."""
    model.eval()
    try:
        return lm_loss(model, *batch)
    finally:
        model.train()


def make_trainer(settings: Any, model: nn.Module, steps: int, group: Any, weights_file: str, **kw: Any) -> Trainer:
    """The shared trainer over `model`'s trainable weights, with the settings' optimizer and precision."""
    dtype = parse_dtype(settings.dtype)
    return Trainer(
        model,
        kw.pop("loss_fn", lm_loss),
        make_optimizer(OptimizerConfig.from_settings(settings, steps)),
        compute_dtype=None if dtype == mx.float32 else dtype,
        grad_clip=settings.grad_clip,
        group=group,
        weights_file=weights_file,
        **kw,
    )


def plan_and_check(settings: Any, model: nn.Module, seq_len: int, lora_hint: bool = True) -> str:
    """The memory plan of this run, refused (unless `settings.force`) when it cannot fit."""
    plan = plan_memory(
        model,
        batch_size=settings.batch_size,
        seq_len=seq_len,
        optimizer=settings.optimizer,
        dtype=settings.dtype,
        grad_accum=settings.grad_accum,
        grad_checkpoint=settings.grad_checkpoint,
    )
    line = check_memory(plan, settings.force, lora_hint=lora_hint)
    log.info(line)
    return line


def train_on_examples(
    settings: ExampleSettings,
    trainable: Trainable,
    model: nn.Module,
    tokenizer: Any,
    progress: bool = False,
    ckpt: Path | None = None,
) -> dict[str, float]:
    """Train `trainable`'s choice of `model`'s parameters on `settings.data`; rank 0 writes `settings.out`.

    `ckpt`: the checkpoint `prepare_folder` chose (rank 0). Returns the final metrics (step, loss, val_loss,
    and test_loss / test_perplexity with `settings.test`).
    """
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(settings.out)
    splits = load_splits(settings, tokenizer, max_seq_len(settings, model.config))
    steps = total_steps(settings, len(splits["train"]), world)
    mx.random.seed(settings.seed)
    trainable.apply(model)
    model.train()
    if settings.grad_checkpoint:
        enable_grad_checkpoint(model)
    longest = max(len(e.weights) for e in splits["train"].examples)  # batches are padded to the longest
    plan_and_check(settings, model, longest, trainable.kind == "model")
    trainer = make_trainer(
        settings, model, steps, group if world > 1 else None, trainable.weights_file, eval_loss_fn=eval_loss
    )
    record = trainable.record(model)
    valid = splits.get("valid")
    metrics = run_training(
        trainer,
        _train_batches(settings, splits["train"], rank, world),
        steps,
        out,
        ckpt,
        resume=settings.resume,
        val_batches=valid.eval_batches(settings.batch_size, settings.val_batches) if valid else [],
        eval_every=settings.val_every,
        save_every=settings.save_every,
        keep_checkpoints=settings.keep_checkpoints,
        state={"seed": settings.seed, **record},
        files=trainable.checkpoint_files(record),
        check_state=partial(trainable.check_resume, record),
        progress=progress,
    )
    if rank == 0:
        trainable.save(model, out, tokenizer, record, {TRAIN_CONFIG_FILE: json.dumps(asdict(settings), indent=2)})
    if settings.test:
        metrics["test_loss"] = trainer.evaluate(splits["test"].eval_batches(settings.batch_size))
        metrics["test_perplexity"] = math.exp(min(metrics["test_loss"], 700.0))
    model.eval()
    return metrics


def prepare_folder(settings: ExampleSettings, trainable: Trainable) -> Path | None:
    """The run-folder rules (`loop.prepare_run_folder`) for `settings.out`, before any loading (rank 0)."""
    out = Path(settings.out)
    return prepare_run_folder(
        out,
        trainable.run_files,
        resume=settings.resume,
        overwrite=settings.overwrite,
        option="out",
        used_marks=("config.json",) if trainable.kind == "model" else (),
        kind=trainable.kind,
        inputs=(settings.model, settings.data),
        writes=trainable.writes(out, None),
    )


def _train_batches(
    settings: ExampleSettings, train: FinetuneData, rank: int, world: int
) -> Callable[[int], list[Batch]]:
    """`step -> micro-batches`, seeding the dropout masks by (seed, step) too, so a resumed run is exact."""
    fetch = micro_batches(
        lambda i: train.batch(i, settings.seed, settings.batch_size, rank, world), settings.grad_accum
    )

    def batches(step: int) -> list[Batch]:
        mx.random.seed(settings.seed * 1_000_003 + step + 1)
        return fetch(step)

    return batches
