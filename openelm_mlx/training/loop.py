"""The training loop shared by pretrain, lora and finetune: the loss, batches and callbacks are passed in.

Float32 master weights with optional bfloat16 compute, gradient accumulation and clipping,
data parallelism through `mx.distributed`, atomic, exactly-resumable checkpoints, and a finiteness check of
the loss after every step (a diverged run stops there, before any checkpoint of that step is written).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import CheckpointError, OptionError
from ..folders.fs import (
    atomic_output_dir,
    check_output,
    claim_folder,
    release_folder,
    remove_stale,
    require_regular_file,
)
from ..folders.weights import check_tensors, load_safetensors
from .settings import OPTIMIZERS, RunSettings

Batch = tuple[mx.array, ...]
LossFn = Callable[..., tuple[mx.array, mx.array]]  # (model, *batch) -> (loss, n_tokens)
CHECKPOINTS = "checkpoints"
log = logging.getLogger("openelm_mlx")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or Adafactor, SGD) with linear warmup then cosine decay (CoreNet's recipe by default)."""

    lr: float
    steps: int
    warmup: int = 0
    min_lr: float | None = None  # default lr / 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_init_lr: float = 1e-6
    name: str = "adamw"  # or "adafactor", "sgd" (see settings.OPTIMIZERS)

    @classmethod
    def from_settings(cls, settings: RunSettings, steps: int) -> OptimizerConfig:
        """The optimizer of a run's settings, over `steps` steps."""
        return cls(settings.lr, steps, settings.warmup, settings.min_lr, settings.weight_decay, name=settings.optimizer)


def make_schedule(cfg: OptimizerConfig) -> Callable[[mx.array], mx.array]:
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    cosine = optim.cosine_decay(cfg.lr, max(1, cfg.steps - cfg.warmup), end=min_lr)
    if cfg.warmup <= 0:
        return cosine
    warmup = optim.linear_schedule(min(cfg.warmup_init_lr, cfg.lr), cfg.lr, cfg.warmup)
    return optim.join_schedules([warmup, cosine], [cfg.warmup])


def make_optimizer(cfg: OptimizerConfig) -> optim.Optimizer:
    """`cfg.name` on the schedule; 1-D parameters (norms) get no weight decay.

    AdamW keeps two float32 moments per weight; Adafactor (no first moment, our schedule instead of its
    relative step) keeps a row and a column vector per matrix; SGD keeps one momentum per weight.
    One optimizer over every weight (an `optim.MultiOptimizer` split into decayed and undecayed trees peaked
    0.4 GB higher at 270M, measured).
    """
    schedule = make_schedule(cfg)
    if cfg.name == "adafactor":
        return _MatrixDecay.of(optim.Adafactor)(
            schedule, weight_decay=cfg.weight_decay, scale_parameter=False, relative_step=False
        )
    if cfg.name == "sgd":
        return _MatrixDecay.of(optim.SGD)(schedule, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return _MatrixDecay.of(optim.AdamW)(schedule, betas=list(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise OptionError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {cfg.name!r}")


class _MatrixDecay:
    """Mixed into an MLX optimizer: weight decay on matrices only (`apply_single` runs with no decay on the
    1-D parameters, which are norm weights here)."""

    weight_decay: float

    @staticmethod
    def of(base: type[optim.Optimizer]) -> type[optim.Optimizer]:
        return type(base.__name__, (_MatrixDecay, base), {})

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim > 1 or not self.weight_decay:
            return super().apply_single(gradient, parameter, state)  # type: ignore[misc]
        decay, self.weight_decay = self.weight_decay, 0.0
        try:
            return super().apply_single(gradient, parameter, state)  # type: ignore[misc]
        finally:
            self.weight_decay = decay


def _merge_split_state(flat: dict[str, mx.array]) -> dict[str, mx.array]:
    """An optimizer state saved by the earlier two-optimizer split (`states.0.*` undecayed, `states.1.*`
    decayed) as one optimizer's state, so those checkpoints resume; any other state is returned as is."""
    if not flat or not all(k.startswith(("states.0.", "states.1.")) for k in flat):
        return flat
    merged = {k[len("states.0.") :]: v for k, v in flat.items() if k.startswith("states.0.")}
    merged.update({k[len("states.1.") :]: v for k, v in flat.items() if k.startswith("states.1.")})
    return merged


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (this model's layers only)."""
    base = type(model.layers[0])

    class Checkpointed(base):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
            def inner(params: dict, *a: Any) -> mx.array:
                self.update(params)
                return base.__call__(self, *a, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args)

    for layer in model.layers:
        layer.__class__ = Checkpointed


@mx.custom_function
def _linear(x: mx.array, weight: mx.array) -> mx.array:
    return x @ weight.T


@_linear.vjp
def _linear_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    """The weight's gradient made by one matmul in the weight's own row-major layout. MLX's default VJP gives it
    transposed, and elementwise kernels on mixed layouts run a slow strided path: AdamW's update of 230M weights
    took 3.0 s that way, 0.76 s this way (measured on this CPU, where a whole step took 7 s)."""
    x, weight = primals
    flat = cotangent.reshape(-1, cotangent.shape[-1])
    return (cotangent @ weight).astype(x.dtype), (flat.T @ x.reshape(-1, x.shape[-1])).astype(weight.dtype)


class _Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = _linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class _Embedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:  # the tied output head
        return _linear(x, self["weight"])


@contextmanager
def row_major_weight_gradients(model: nn.Module) -> Iterator[None]:
    """While tracing a training step: `model`'s plain Linear layers (and a tied embedding's head) compute their
    weight gradients in the weights' layout (`_linear_vjp`). The same forward; the classes are restored after."""
    swapped = []
    for _, module in model.named_modules():
        training_class = {nn.Linear: _Linear, nn.Embedding: _Embedding}.get(type(module))
        if training_class is not None:
            swapped.append((module, type(module)))
            module.__class__ = training_class
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


class Diverged(OptionError):
    """The loss or gradient norm of a step is not finite (the model's weights are no longer usable)."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_checkpoint: Path | None = None):
        self.step, self.loss, self.grad_norm, self.last_checkpoint = step, loss, grad_norm, last_checkpoint
        saved = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        super().__init__(
            "lr",
            f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm}); nothing of this step was "
            f"saved, {saved}: lower the learning rate, or resume with a lower one",
        )


class Callback(Protocol):
    """Called after every optimizer step; may add entries to `metrics` (e.g. a held-out loss)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...


def peak_memory_gb() -> float:
    """Peak memory: MLX's allocator counter, or the process's max RSS where MLX reports none."""
    peak = mx.get_peak_memory()
    if not peak:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024
    return peak / 1e9


@dataclass
class Evaluate:
    """Adds `val_loss` (the trainer's evaluation loss over fixed `batches`) every `every` steps and at `last_step`."""

    batches: Sequence[Batch]
    every: int
    last_step: int

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if self.batches and self.every and (step % self.every == 0 or step == self.last_step):
            metrics["val_loss"] = trainer.evaluate(self.batches)


class Logger:
    """One JSON line per step in `path` and a progress bar on stderr (loss, tokens/s, peak memory)."""

    def __init__(self, path: Path, total: int, start: int = 0, enabled: bool = True, progress: bool = False):
        self.enabled, self.file, self.bar = enabled, None, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        finite = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        self.file.write(json.dumps(finite) + "\n")
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


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (a resumed run replays them), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


class Checkpointer:
    """Every `every` steps before `last_step`, writes `folder/step_NNNNNNNN` with the trainer's state, the
    step and `state` in state.json, and the `files` (name -> text), keeping the newest `keep` (only when
    `enabled`, i.e. on rank 0)."""

    def __init__(
        self,
        folder: Path,
        every: int,
        last_step: int,
        keep: int = 2,
        state: dict[str, Any] | None = None,
        files: dict[str, str] | None = None,
        enabled: bool = True,
    ):
        self.folder, self.every, self.last_step, self.keep = folder, every, last_step, keep
        self.state, self.files, self.enabled = state or {}, files or {}, enabled

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if not (self.enabled and self.every and step % self.every == 0 and step < self.last_step):
            return
        trainer.save_checkpoint(self.folder / f"step_{step:08d}", {"step": step, **self.state}, self.files)
        for old in checkpoints(self.folder)[: -self.keep]:
            shutil.rmtree(old)


def prepare_run_folder(
    out: Path,
    run_files: Sequence[str],
    *,
    resume: bool,
    overwrite: bool,
    option: str,
    used_marks: Sequence[str] = (),
    kind: str = "model",
    inputs: Sequence[str | Path] = (),
    writes: Sequence[str] = (),
) -> Path | None:
    """The run-folder rules of every training command; returns the checkpoint to resume from, if any.

    Checked before any training (`fs.check_output`): `out` is no input, holds no other kind of output and
    no entry of someone else's where the run `writes` one.
    A folder holding an earlier run (any of `run_files` or `used_marks`) is refused unless `resume`
    (continue from its newest complete checkpoint) or `overwrite` (its run files and checkpoints go;
    anything else, even inside `checkpoints/`, stays). Temporaries of a killed checkpoint write are removed.

    Raises:
        OptionError: a used folder without resume/overwrite, or resume with no checkpoint.
        CheckpointError: see `fs.check_output`.
    """
    check_output(out, force=True, kind=kind, inputs=inputs, writes=writes)
    claim_folder(out)  # held until `run_training` ends: a second run into `out` is refused meanwhile
    try:
        return _prepare_claimed(out, run_files, resume, overwrite, option, used_marks)
    except BaseException:
        release_folder(out)
        raise


def _prepare_claimed(
    out: Path, run_files: Sequence[str], resume: bool, overwrite: bool, option: str, used_marks: Sequence[str]
) -> Path | None:
    if stale := remove_stale(out / CHECKPOINTS, ".step_*.tmp-*"):
        log.warning("%s: removed %d unfinished checkpoint(s) of an interrupted run", out / CHECKPOINTS, stale)
    if resume:
        found = checkpoints(out / CHECKPOINTS)
        if not found:
            raise OptionError("resume", f"found no checkpoint in {out / CHECKPOINTS} to continue from")
        return found[-1]
    used = [name for name in (*run_files, *used_marks) if (out / name).exists()]
    if used and not overwrite:
        raise OptionError(
            option, f"{out} holds an earlier run ({', '.join(used)}): resume it, or overwrite it to start afresh"
        )
    for name in run_files:
        target = out / name
        if name == CHECKPOINTS and target.is_dir():
            for ckpt in checkpoints(target):
                shutil.rmtree(ckpt)
            if not any(target.iterdir()):
                target.rmdir()
        elif target.is_file():
            target.unlink()
    return None


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and (p / "state.json").is_file())


@dataclass
class Trainer:
    """Runs optimizer steps of `loss_fn` over `batch_fn(step)` micro-batches.

    Args:
        model: trained in place; its trainable parameters are the float32 master weights.
        loss_fn: `(model, *batch) -> (loss, n_tokens)`.
        optimizer: e.g. from `make_optimizer`.
        compute_dtype: e.g. mx.bfloat16 for mixed precision; None computes in the weights' dtype.
        grad_clip: global gradient-norm clip (0 disables).
        group: an `mx.distributed` group; gradients and losses are averaged over it.
        eval_loss_fn: the loss `evaluate` reports (default: `loss_fn`), e.g. without z-loss.
        weights_file: the name of the trainable weights' file in a checkpoint folder.
    """

    model: nn.Module
    loss_fn: LossFn
    optimizer: optim.Optimizer
    compute_dtype: mx.Dtype | None = None
    grad_clip: float = 1.0
    group: Any = None
    compile: bool = True
    eval_loss_fn: LossFn | None = None
    weights_file: str = "model.safetensors"

    def __post_init__(self) -> None:
        self.rank, self.world = (self.group.rank(), self.group.size()) if self.group is not None else (0, 1)
        self.optimizer.init(self.model.trainable_parameters())
        self._build()

    def _build(self) -> None:
        """(Re)compile the step functions over the current model, optimizer and random state objects.

        The random state (dropout masks) is an input and output, so each step draws fresh keys. The last
        micro-batch's backward pass and the optimizer update are one compiled function: each gradient is
        consumed as it is made (materialising all gradients before the update peaked 0.2-0.6 GB higher at
        270M, measured)."""
        state = [self.model.state, self.optimizer.state, mx.random.state]
        micro = self._grad_fn()

        def update(*batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            loss, n_tokens, grads = micro(*batch)
            if self.world > 1:
                loss, grads, n_tokens = self._mean(*self._weighted(loss, n_tokens, grads))
            return loss, n_tokens, self._apply(grads)

        def update_after(acc_total: mx.array, acc_grads: dict, acc_tokens: mx.array, *batch: mx.array) -> tuple:
            total, grads, tokens = self._weighted(*micro(*batch), (acc_total, acc_grads, acc_tokens))
            loss, grads, tokens = self._mean(total, grads, tokens)
            return loss, tokens, self._apply(grads)

        def compiled(fn: Callable) -> Callable:
            return mx.compile(fn, inputs=state, outputs=state) if self.compile else fn

        self._micro, self._update, self._update_after = compiled(micro), compiled(update), compiled(update_after)

    def _grad_fn(self) -> Callable[..., tuple[mx.array, mx.array, dict]]:
        model, dtype = self.model, self.compute_dtype

        def objective(params: dict, *batch: mx.array) -> tuple[mx.array, mx.array]:
            model.update(tree_map(lambda p: p.astype(dtype), params) if dtype is not None else params)
            return self.loss_fn(model, *batch)

        value_and_grad = mx.value_and_grad(objective)

        def micro(*batch: mx.array) -> tuple[mx.array, mx.array, dict]:
            master = model.trainable_parameters()
            (loss, n_tokens), grads = value_and_grad(master, *batch)
            model.update(master)  # restore the float32 master weights
            return loss, n_tokens, grads

        return micro

    @staticmethod
    def _weighted(
        loss: mx.array, n_tokens: mx.array, grads: dict, acc: tuple[mx.array, dict, mx.array] | None = None
    ) -> tuple[mx.array, dict, mx.array]:
        """A micro-batch's (loss, gradients) as sums over its real tokens, added to `acc`'s sums; and the tokens."""
        n = n_tokens.astype(mx.float32)
        total, grads = loss * n, tree_map(lambda x: x * n, grads)
        if acc is None:
            return total, grads, n
        return acc[0] + total, tree_map(mx.add, acc[1], grads), acc[2] + n

    def _mean(self, total: mx.array, grads: dict, tokens: mx.array) -> tuple[mx.array, dict, mx.array]:
        """The per-token means of summed loss and gradients, over the processes too; and the global tokens."""
        if self.world > 1:
            grads = tree_map(lambda x: x * self.world, nn.average_gradients(grads, group=self.group))
            total = mx.distributed.all_sum(total, group=self.group)
            tokens = mx.distributed.all_sum(tokens, group=self.group)
        scale = 1 / mx.maximum(tokens, 1)
        return total * scale, tree_map(lambda x: x * scale, grads), tokens

    def _apply(self, grads: dict) -> mx.array:
        norm = mx.array(0.0)
        if self.grad_clip:
            grads, norm = optim.clip_grad_norm(grads, self.grad_clip)
        self.optimizer.update(self.model, grads)
        return norm

    def fit(
        self, batches: Callable[[int], Sequence[Batch]], steps: int, start: int = 0, callbacks: Sequence[Callback] = ()
    ) -> dict[str, float]:
        """Run optimizer steps `start` .. `steps - 1`, each over the micro-batches `batches(step)`.

        The loss and gradient norm are checked after every step: the first that is not finite stops the run
        before any callback sees that step (so no checkpoint of diverged weights is written).

        Returns:
            The last step's metrics (step, lr, loss, grad_norm, tokens_per_sec, peak_memory_gb, ...).

        Raises:
            Diverged: at the first step whose loss or gradient norm is not finite.
        """
        metrics: dict[str, float] = {"step": start}
        for step in range(start, steps):
            lr = self.learning_rate
            metrics = {"step": step + 1, "lr": lr, **self.step(batches(step))}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise Diverged(step + 1, metrics["loss"], metrics["grad_norm"])
            for callback in callbacks:
                callback.on_step_end(self, metrics)
        return metrics

    def gradients(self, micro_batches: Sequence[Batch]) -> tuple[mx.array, dict, int]:
        """(loss, gradients, real tokens) over `micro_batches` and over the processes, unapplied.

        Each micro-batch counts by its real (unmasked) tokens, so the result is the mean over every token of
        the global batch, however it is split into micro-batches and processes."""
        total, grads, tokens = self._accumulate(micro_batches)
        loss, grads, tokens = self._mean(total, grads, tokens)
        return loss, grads, int(tokens.item())

    def _accumulate(self, micro_batches: Sequence[Batch]) -> tuple[mx.array, dict, mx.array]:
        """The token-weighted sums (loss, gradients, tokens) of `micro_batches` on this process, evaluated."""
        acc = None
        for batch in micro_batches:
            with row_major_weight_gradients(self.model):
                acc = self._weighted(*self._micro(*batch), acc)
            mx.eval(acc)
        assert acc is not None, "no micro-batches"
        return acc

    def step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation); returns metrics."""
        tic = time.perf_counter()
        *earlier, last = micro_batches
        acc = self._accumulate(earlier) if earlier else None
        with row_major_weight_gradients(self.model):
            loss, tokens, norm = self._update_after(*acc, *last) if acc else self._update(*last)
        mx.eval(self.model.state, self.optimizer.state, loss, tokens, norm)
        seconds = time.perf_counter() - tic
        return {
            "loss": loss.item(),
            "grad_norm": norm.item(),
            "tokens": int(tokens.item()),
            "tokens_per_sec": int(tokens.item()) / seconds,
            "seconds": seconds,
            "peak_memory_gb": peak_memory_gb(),
        }

    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Mean of the evaluation loss over `batches`, weighted by their token counts, in the compute dtype."""
        if not batches:
            return float("nan")
        loss_fn = self.eval_loss_fn or self.loss_fn
        master = self.model.trainable_parameters()
        if self.compute_dtype is not None:
            self.model.update(tree_map(lambda p: p.astype(self.compute_dtype), master))
        total, count = 0.0, 0
        for b in batches:
            loss, n = loss_fn(self.model, *map(mx.array, b))
            total, count = total + loss.item() * n.item(), count + n.item()
        self.model.update(master)
        return total / max(count, 1)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate)

    def save_checkpoint(self, folder: Path, state: dict[str, Any], files: dict[str, str] | None = None) -> None:
        """The trainable weights, optimizer state, `state` (step, seeds...) as state.json and the text
        `files` (name -> text) into `folder`, atomically."""
        with atomic_output_dir(folder, kind="checkpoint") as tmp:
            mx.save_safetensors(str(tmp / self.weights_file), dict(tree_flatten(self.model.trainable_parameters())))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote; returns its `state`.

        Raises:
            CheckpointError: naming the file, when the checkpoint is incomplete, corrupt or does not fit.
        """
        state_file = folder / "state.json"
        try:
            state = json.loads(require_regular_file(state_file).read_text())
        except (ValueError, OSError, RecursionError) as e:
            raise CheckpointError(f"{state_file}: unreadable ({str(e)[:80]})") from None
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f'{state_file}: "step" must be a non-negative integer')
        weights = load_safetensors(folder / self.weights_file)
        check_tensors(weights, dict(tree_flatten(self.model.trainable_parameters())), folder / self.weights_file)
        opt_flat = _merge_split_state(load_safetensors(folder / "optimizer.safetensors"))
        check_tensors(opt_flat, dict(tree_flatten(self.optimizer.state)), folder / "optimizer.safetensors")
        self.model.load_weights(list(weights.items()), strict=False)  # the trainable ones: all checked above
        self.optimizer.state = tree_unflatten(list(opt_flat.items()))
        self._build()  # the compiled steps captured the previous state objects
        mx.eval(self.model.parameters(), self.optimizer.state)
        return state


def micro_batches(batch: Callable[[int], tuple[Any, ...]], grad_accum: int) -> Callable[[int], list[Batch]]:
    """`step -> micro-batches` for `Trainer.fit`: `batch(index)` (arrays) as MLX arrays, for the step's
    `grad_accum` micro-batch indices."""
    return lambda step: [tuple(map(mx.array, batch(step * grad_accum + i))) for i in range(grad_accum)]


def run_training(
    trainer: Trainer,
    batches: Callable[[int], Sequence[Batch]],
    steps: int,
    out: Path,
    ckpt: Path | None,
    *,
    resume: bool = False,
    val_batches: Sequence[Batch] = (),
    eval_every: int = 0,
    save_every: int = 0,
    keep_checkpoints: int = 2,
    state: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    check_state: Callable[[dict[str, Any], Path], None] | None = None,
    steps_option: str = "steps",
    progress: bool = False,
) -> dict[str, float]:
    """A training run in `out`: resume, then `trainer.fit` with evaluation, log.jsonl and checkpoints.

    Rank 0 writes. The run continues from `ckpt` (from `prepare_run_folder`); with several processes
    and `resume`, the other ranks take the newest checkpoint too.

    Args:
        batches: `step -> micro-batches`, depending on the step only (so a resumed run replays it exactly).
        val_batches, eval_every: the held-out loss every `eval_every` steps and at the end (0: never).
        save_every, keep_checkpoints: checkpoint every `save_every` steps (0: never), keeping the newest few.
        state, files: recorded in every checkpoint, as entries of state.json and as text files.
        check_state: `(state, checkpoint)`; raises when the checkpoint's state does not fit this run.
        steps_option: the setting that gives `steps`, named when it is not past the checkpoint.

    Returns:
        The last step's metrics (see `Trainer.fit`).

    Raises:
        OptionError: `steps` is not past the checkpoint's step.
        Diverged: at the first step whose loss is not finite, naming the last good checkpoint (no checkpoint
            of that step or later is written, and the caller saves no final weights).
        CheckpointError: the checkpoint is incomplete, corrupt or does not fit.
    """
    if trainer.world > 1:  # every rank resumes from the checkpoint rank 0 chose
        ckpt = ckpt or (checkpoints(out / CHECKPOINTS)[-1] if resume else None)
    start = 0
    if ckpt is not None:
        saved = trainer.load_checkpoint(ckpt)
        if check_state is not None:
            check_state(saved, ckpt)
        start = saved["step"]
    if start >= steps:
        raise OptionError(steps_option, f"{steps} steps is not past the checkpoint's step {start}; nothing to do")
    writer = trainer.rank == 0
    if writer:
        truncate_log(out / "log.jsonl", start)
    logger = Logger(out / "log.jsonl", steps, start, enabled=writer, progress=progress)
    callbacks = [
        Evaluate(val_batches, eval_every, steps),
        logger,
        Checkpointer(out / CHECKPOINTS, save_every, steps, keep_checkpoints, state, files, enabled=writer),
    ]
    try:
        return trainer.fit(batches, steps, start, callbacks)
    except Diverged as e:
        found = checkpoints(out / CHECKPOINTS)
        raise Diverged(e.step, e.loss, e.grad_norm, found[-1] if found else None) from None
    finally:
        logger.close()
        release_folder(out)  # claimed by `prepare_run_folder`
