"""LoRA, DoRA and QLoRA fine-tuning of OpenELM: the settings (`LoraConfig`), mlx-lm's adapter layers swapped
into the one model, training on the shared `Trainer`, mlx-lm's adapter folder format, loading and fusing."""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import CheckpointError, OptionError, check_range, settings_field
from ..folders.fs import atomic_output_dir, check_output, require_regular_file
from ..folders.io import read_json
from ..folders.weights import check_tensors, load_safetensors
from ..quant.recipes import QUANTIZED
from .adapter_config import check_finite, parse_adapter_config
from .data import FinetuneData, load_split
from .loop import (
    CHECKPOINTS,
    Batch,
    OptimizerConfig,
    Trainer,
    check_schedule,
    enable_grad_checkpoint,
    lm_loss,
    make_optimizer,
    micro_batches,
    prepare_run_folder,
    run_training,
)

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
RUN_FILES = (ADAPTERS_FILE, ADAPTER_CONFIG_FILE, "train_config.json", "log.jsonl", CHECKPOINTS)
# target name -> mlx-lm key: relative to a decoder layer, or the full path for the embedding
TARGETS = {
    "qkv_proj": "attn.qkv_proj",
    "out_proj": "attn.out_proj",
    "proj_1": "ffn.proj_1",
    "proj_2": "ffn.proj_2",
    "token_embeddings": "transformer.token_embeddings",
}
DEFAULT_TARGETS = "qkv_proj,out_proj,proj_1,proj_2"
_DEFAULT_KEYS = [TARGETS[t] for t in DEFAULT_TARGETS.split(",")]
ADAPTER_TYPES = (LoRALinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
# The paper's PEFT recipe (commonsense reasoning): every value here replaces the default.
PAPER_RECIPE: dict[str, Any] = {
    "rank": 32,
    "alpha": 32.0,
    "dropout": 0.1,
    "targets": DEFAULT_TARGETS + ",token_embeddings",
    "epochs": 3.0,
    "batch_size": 8,
    "grad_accum": 2,
    "warmup": 1000,
    "lr": 3e-4,
    "min_lr": 3e-5,
    "weight_decay": 0.0,
}
RECIPES = {"paper": PAPER_RECIPE}
FUSE_TOLERANCE = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}  # relative, by weight dtype
KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


@dataclass(frozen=True)
class LoraConfig:
    """Settings of an adapter fine-tuning run; checked when built. Each field with help is also a CLI option."""

    model: str = ""
    data: str = ""
    adapter_path: str = ""
    tokenizer: str | None = None
    rank: int = settings_field(8, "Rank r of the low-rank update.")
    alpha: float = settings_field(16.0, "LoRA alpha: the update B·A is scaled by alpha / rank.")
    dropout: float = settings_field(0.0, "Dropout on the adapters' input while training.")
    dora: bool = settings_field(False, "DoRA: also learn each output row's magnitude.")
    targets: str = settings_field(DEFAULT_TARGETS, f"Comma-separated modules to adapt, from: {', '.join(TARGETS)}.")
    num_layers: str = settings_field("all", "Adapt the last N decoder layers, or all.")
    iters: int | None = settings_field(None, "Optimizer steps (instead of epochs).")
    epochs: float | None = settings_field(None, "Passes over train.jsonl (default 3 when iters is not given).")
    batch_size: int = settings_field(4, "Examples per micro-batch per process.")
    grad_accum: int = settings_field(1, "Micro-batches per optimizer step.")
    lr: float = settings_field(1e-4, "Peak learning rate (after warmup; cosine decay to min_lr).")
    min_lr: float | None = settings_field(None, "Final cosine learning rate (default lr/10).")
    warmup: int = settings_field(0, "Linear warmup steps.")
    weight_decay: float = settings_field(0.0, "AdamW weight decay (not on 1-D parameters).")
    grad_clip: float = settings_field(1.0, "Gradient-norm clip (0: off).")
    max_seq_len: int | None = settings_field(
        None, "Longer examples are truncated (default: the model's context length)."
    )
    mask_prompt: bool = settings_field(False, "Loss on completion / assistant tokens only.")
    grad_checkpoint: bool = settings_field(False, "Recompute activations to save memory.")
    val_every: int = settings_field(100, "Validation loss on valid.jsonl every N steps and at the end (0: never).")
    val_batches: int = settings_field(25, "Validation batches per evaluation (0: all of valid.jsonl).")
    save_every: int = settings_field(100, "Checkpoint every N steps (0: never).")
    keep_checkpoints: int = settings_field(2, "How many of the newest checkpoints to keep.")
    seed: int = settings_field(0, "Seed for adapter initialisation, dropout and data order.")
    resume: bool = settings_field(False, "Continue from the latest checkpoint in the adapter folder.")
    overwrite: bool = settings_field(False, "Start afresh in an adapter folder that holds an earlier run.")
    test: bool = settings_field(False, "After training, report the loss and perplexity on test.jsonl.")

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, int) and not isinstance(self.num_layers, bool):
            object.__setattr__(self, "num_layers", str(self.num_layers))
        for f in fields(self):
            kind = expected_kind(f.name, getattr(self, f.name)) if "help" in f.metadata else None
            if kind is not None:
                raise OptionError(f.name, f"must be {kind}, got {getattr(self, f.name)!r}")
        check_range("rank", self.rank, 1, 4096, integer=True)
        check_range("alpha", self.alpha, 0, 1e6, low_open=True)
        check_range("dropout", self.dropout, 0, 0.99)
        self.target_names  # noqa: B018  (validates)
        if self.num_layers != "all" and not (self.num_layers.isdigit() and int(self.num_layers) >= 1):
            raise OptionError("num_layers", f"must be a positive whole number or 'all', got {self.num_layers!r}")
        if self.iters is not None and self.epochs is not None:
            raise OptionError("iters", "and epochs cannot both be given")
        check_range("iters", self.iters, 1, integer=True)
        check_range("epochs", self.epochs, 0, 1e6, low_open=True)
        check_schedule(self)
        check_range("keep_checkpoints", self.keep_checkpoints, 1, integer=True)
        for name in ("val_every", "val_batches", "save_every", "seed"):
            check_range(name, getattr(self, name), 0, integer=True)
        check_range("max_seq_len", self.max_seq_len, 2, integer=True)
        if self.resume and self.overwrite:
            raise OptionError("resume", "and overwrite cannot both be given")

    @property
    def scale(self) -> float:
        """The factor on the low-rank update: alpha / rank."""
        return self.alpha / self.rank

    @property
    def target_names(self) -> tuple[str, ...]:
        names = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        unknown = [t for t in names if t not in TARGETS]
        if not names or unknown or len(set(names)) != len(names):
            raise OptionError("targets", f"must be distinct names from {', '.join(TARGETS)}, got {self.targets!r}")
        return names


def expected_kind(name: str, value: Any) -> str | None:
    """What the `LoraConfig` field `name` must hold, when `value` is of the wrong type (None when it fits)."""
    if name == "num_layers":
        fits = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return None if fits else "a positive whole number or 'all'"
    hint = typing.get_type_hints(LoraConfig)[name]
    args = typing.get_args(hint) or (hint,)
    kind = next(a for a in args if a is not type(None))
    if value is None and type(None) in args:
        return None
    wanted = (int, float) if kind is float else kind
    fits = isinstance(value, wanted) and (kind is bool or not isinstance(value, bool))
    return None if fits else KINDS[kind]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML file whose keys are `LoraConfig` field names (dashes allowed) or `recipe`.

    Raises:
        OptionError: for the setting "config", naming the file and the key that is unknown or of the wrong type.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(require_regular_file(path).read_text())
    except (OSError, CheckpointError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionError("config", f"{path}: cannot be read ({str(e)[:120]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OptionError("config", f"{path}: expected a mapping of settings")
    known = {f.name for f in fields(LoraConfig)} | {"recipe"}
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for key in values:
        if key not in known:
            raise OptionError("config", f"{path}: unknown setting {key!r}")
    if isinstance(values.get("targets"), list):
        values["targets"] = ",".join(map(str, values["targets"]))
    for key, value in values.items():
        kind = (None if isinstance(value, str) else "a string") if key == "recipe" else expected_kind(key, value)
        if kind is not None:
            note = " (YAML reads 1e-4 as text: write 1.0e-4)" if kind == KINDS[float] and _is_number(value) else ""
            raise OptionError("config", f"{path}: {key} must be {kind}, got {value!r}{note}")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def make_config(
    values: dict[str, Any], explicit: set[str] | None = None, recipe: str | None = None, config_file: Path | None = None
) -> LoraConfig:
    """A `LoraConfig` from, in rising priority: `values` (defaults), the recipe, the YAML file, and the
    `explicit` keys of `values` (settings the user gave directly)."""
    from_file = read_config_file(config_file) if config_file is not None else {}
    file_recipe = from_file.pop("recipe", None)
    recipe = recipe or file_recipe
    if recipe is not None and recipe not in RECIPES:
        raise OptionError("recipe", f"must be one of {', '.join(RECIPES)}, got {recipe!r}")
    chosen = {k: values[k] for k in (explicit if explicit is not None else set(values)) if k in values}
    sources = [chosen, from_file, RECIPES[recipe] if recipe else {}]
    merged = {**values, **sources[2], **from_file, **chosen}
    for source in sources:  # iters and epochs from different sources: the higher-priority one wins
        has_iters, has_epochs = source.get("iters") is not None, source.get("epochs") is not None
        if has_iters != has_epochs:
            merged["epochs" if has_iters else "iters"] = None
        if has_iters or has_epochs:
            break
    return LoraConfig(**merged)


# --- adapter layers ------------------------------------------------------------------------------


def lora_parameters(config: LoraConfig) -> dict[str, Any]:
    """mlx-lm's `lora_parameters` entry: rank, scale, dropout and the module keys."""
    keys = [TARGETS[t] for t in config.target_names]
    return {"rank": config.rank, "scale": config.scale, "dropout": config.dropout, "keys": keys}


def num_adapted_layers(config: LoraConfig, model: nn.Module) -> int:
    n = len(model.layers)
    if config.num_layers == "all":
        return n
    if int(config.num_layers) > n:
        raise OptionError("num_layers", f"{config.num_layers} is more than the model's {n} decoder layers")
    return int(config.num_layers)


def add_adapters(model: nn.Module, num_layers: int, params: dict[str, Any], dora: bool = False) -> nn.Module:
    """Freeze `model` and swap its target modules (in the last `num_layers` layers) for mlx-lm's LoRA or DoRA
    layers wrapping them, in place: only the adapters train; a quantized base gives QLoRA."""
    embedding = model.transformer.token_embeddings
    if dora and TARGETS["token_embeddings"] in params["keys"] and isinstance(embedding, nn.QuantizedEmbedding):
        raise OptionError("dora", "DoRA on a quantized token embedding is not supported: drop token_embeddings")
    if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
        raise OptionError("adapter_path", "the model already has adapters")
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    return model


def adapter_config(config: LoraConfig, model: nn.Module) -> dict[str, Any]:
    """adapter_config.json in mlx-lm's format (what `mlx_lm.load(..., adapter_path=)` reads), plus our keys."""
    return {
        "format_version": FORMAT_VERSION,
        "fine_tune_type": "dora" if config.dora else "lora",
        "num_layers": num_adapted_layers(config, model),
        "lora_parameters": lora_parameters(config),
        "alpha": config.alpha,
        "targets": list(config.target_names),
        "model": config.model,
    }


def save_adapters(
    model: nn.Module, folder: str | Path, config: dict[str, Any], extra: dict[str, str] | None = None
) -> Path:
    """Write the trainable (adapter) weights and `config` to `folder` atomically (plus `extra` text files)."""
    with atomic_output_dir(folder, force=True, kind="adapters") as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS_FILE), dict(tree_flatten(model.trainable_parameters())))
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply the adapters saved in `adapter_path` to a loaded model, in place (unfused; eval mode).

    Raises:
        CheckpointError: naming the file, when the folder is incomplete or does not fit this model.
    """
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not an adapter folder (expected {ADAPTER_CONFIG_FILE}, {ADAPTERS_FILE})")
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTERS_FILE
    num_layers, params, dora = parse_adapter_config(
        read_json(config_path), config_path, len(model.layers), TARGETS.values(), _DEFAULT_KEYS, FORMAT_VERSION
    )
    weights = load_safetensors(require_regular_file(weights_path))
    check_finite(weights, weights_path)
    try:
        add_adapters(model, num_layers, params, dora)
    except OptionError as e:
        raise CheckpointError(f"{config_path}: {e.detail}") from None
    check_tensors(weights, dict(tree_flatten(model.trainable_parameters())), weights_path, "these adapters")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model


# --- fusing --------------------------------------------------------------------------------------


def _relative_difference(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def _requantize(module: nn.Module, like: nn.Module) -> nn.Module:
    if isinstance(like, nn.QuantizedEmbedding):
        return nn.QuantizedEmbedding.from_embedding(module, like.group_size, like.bits, mode=like.mode)
    return nn.QuantizedLinear.from_linear(module, like.group_size, like.bits, mode=like.mode)


def fuse_adapters(model: nn.Module, probe: mx.array, dequantize: bool = False) -> dict[str, float]:
    """Merge every adapter into the layer it wraps, in place, and check the result on `probe` token ids.

    Adapted layers over a quantized base are merged in float, checked, then quantized again with the
    same settings (a lossy step, measured as "requantize_error"), or the whole model is dequantized.

    Returns:
        {"fuse_error": relative max logit difference of the float merge, "requantize_error" (if any)}.

    Raises:
        CheckpointError: the merged model's logits differ from the adapted model's beyond float rounding.
    """
    model.eval()
    before = model(probe)
    if not mx.all(mx.isfinite(before)).item():
        raise CheckpointError(
            "the adapted model's logits are NaN or infinite: these adapters or their scale are unusable"
        )
    fused, bases = [], {}
    for name, m in model.named_modules():
        if isinstance(m, ADAPTER_TYPES):
            fused.append((name, m.fuse(dequantize=True)))
            base = m.embedding if isinstance(m, (LoRAEmbedding, DoRAEmbedding)) else m.linear
            if isinstance(base, QUANTIZED):
                bases[name] = base
    model.update_modules(tree_unflatten(fused))
    error = _relative_difference(model(probe), before)
    tolerance = FUSE_TOLERANCE.get(model.transformer.norm.weight.dtype, 3e-2)
    if not error <= tolerance:
        raise CheckpointError(f"fused logits differ from the adapted model's by {error:.2e} (allowed {tolerance:.0e})")
    result = {"fuse_error": error}
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    elif bases:
        model.update_modules(tree_unflatten([(n, _requantize(m, bases[n])) for n, m in fused if n in bases]))
        result["requantize_error"] = _relative_difference(model(probe), before)
    mx.eval(model.parameters())
    return result


# --- training ------------------------------------------------------------------------------------


def prepare_adapter_folder(out: Path, config: LoraConfig) -> Path | None:
    """The training run-folder rules (`train.prepare_run_folder`) applied to the adapter folder."""
    inputs = (config.model, config.data)
    return prepare_run_folder(
        out,
        RUN_FILES,
        resume=config.resume,
        overwrite=config.overwrite,
        option="adapter_path",
        kind="adapters",
        inputs=inputs,
        writes=(ADAPTERS_FILE, ADAPTER_CONFIG_FILE),
    )


def load_splits(config: LoraConfig, tokenizer: Any, max_seq_len: int) -> dict[str, FinetuneData]:
    """train (required), valid and test (when present and needed) of the data folder."""
    folder = Path(config.data)
    if not folder.is_dir():
        raise OptionError("data", f"{folder} is not a folder (expected train.jsonl, valid.jsonl, test.jsonl)")
    wanted = ["train", "valid"] + (["test"] if config.test else [])
    splits = {}
    for name in wanted:
        path = folder / f"{name}.jsonl"
        if name == "train" or path.exists():
            splits[name] = load_split(path, tokenizer, max_seq_len, config.mask_prompt)
    if config.test and "test" not in splits:
        raise OptionError("test", f"{folder / 'test.jsonl'} does not exist")
    return splits


def total_steps(config: LoraConfig, n_train: int, world: int = 1) -> int:
    """`iters`, or the steps of `epochs` (default 3) passes over `n_train` examples."""
    if config.iters is not None:
        return config.iters
    per_step = config.batch_size * config.grad_accum * world
    return max(1, math.ceil((config.epochs or 3.0) * n_train / per_step))


def eval_loss(model: nn.Module, *batch: mx.array) -> tuple[mx.array, mx.array]:
    """`lm_loss` over the weighted tokens (inputs, targets, weights), with dropout off."""
    model.eval()
    try:
        return lm_loss(model, *batch)
    finally:
        model.train()


def _check_resume(expected: dict[str, Any], state: dict[str, Any], folder: Path) -> None:
    """The checkpoint in `folder` was made with the adapter settings `expected` (an `adapter_config`)."""
    saved, keys = state.get("adapter_config"), ("fine_tune_type", "num_layers", "lora_parameters")
    if not isinstance(saved, dict) or not all(k in saved for k in keys):
        raise CheckpointError(f'{folder / "state.json"}: "adapter_config" must be an object with {", ".join(keys)}')
    if any(saved[k] != expected[k] for k in keys):
        raise OptionError("resume", f"{folder} was made with other adapter settings ({saved['lora_parameters']})")


def finetune(config: LoraConfig, progress: bool = False, model: Any = None, tokenizer: Any = None) -> dict[str, float]:
    """Train adapters on `config.data` and save them in `config.adapter_path` (rank 0 writes).

    `model`/`tokenizer` default to loading `config.model`. Returns the final metrics (step, loss,
    val_loss, and test_loss / test_perplexity with `config.test`).
    """
    from ..folders.io import load

    for name in ("model", "data", "adapter_path"):
        if not getattr(config, name):
            raise OptionError(name, "is needed (as a setting or in the config file)")
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(config.adapter_path)
    ckpt = prepare_adapter_folder(out, config) if rank == 0 else None  # before any loading or tokenizing
    if model is None:
        model, tokenizer = load(config.model, config.tokenizer)
    splits = load_splits(config, tokenizer, config.max_seq_len or model.config.max_context_length)
    steps = total_steps(config, len(splits["train"]), world)
    mx.random.seed(config.seed)
    add_adapters(model, num_adapted_layers(config, model), lora_parameters(config), config.dora)
    model.train()
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    trainer = _make_trainer(config, model, steps, group if world > 1 else None)
    settings = adapter_config(config, model)
    metrics = run_training(
        trainer,
        _train_batches(config, splits["train"], rank, world),
        steps,
        out,
        ckpt,
        resume=config.resume,
        val_batches=splits["valid"].eval_batches(config.batch_size, config.val_batches) if "valid" in splits else [],
        eval_every=config.val_every,
        save_every=config.save_every,
        keep_checkpoints=config.keep_checkpoints,
        state={"seed": config.seed, "adapter_config": settings},
        files={ADAPTER_CONFIG_FILE: json.dumps(settings, indent=2)},  # a checkpoint is also an adapter folder
        check_state=partial(_check_resume, settings),
        steps_option="iters",
        progress=progress,
    )
    if rank == 0:
        save_adapters(model, out, settings, {"train_config.json": json.dumps(asdict(config), indent=2)})
    if config.test:
        metrics["test_loss"] = trainer.evaluate(splits["test"].eval_batches(config.batch_size))
        metrics["test_perplexity"] = math.exp(min(metrics["test_loss"], 700.0))
    model.eval()
    return metrics


def _make_trainer(config: LoraConfig, model: nn.Module, steps: int, group: Any) -> Trainer:
    """The shared trainer on the adapters (the only trainable weights), saved as adapters.safetensors."""
    return Trainer(
        model,
        lm_loss,
        make_optimizer(OptimizerConfig.from_settings(config, steps)),
        grad_clip=config.grad_clip,
        group=group,
        eval_loss_fn=eval_loss,
        weights_file=ADAPTERS_FILE,
    )


def _train_batches(config: LoraConfig, train: FinetuneData, rank: int, world: int) -> Callable[[int], list[Batch]]:
    """`step -> micro-batches`, seeding the dropout masks by (seed, step) too, so a resumed run is exact."""
    fetch = micro_batches(lambda i: train.batch(i, config.seed, config.batch_size, rank, world), config.grad_accum)

    def batches(step: int) -> list[Batch]:
        mx.random.seed(config.seed * 1_000_003 + step + 1)
        return fetch(step)

    return batches


def probe_tokens(vocab_size: int, seed: int = 0) -> mx.array:
    """A fixed (2, 24) batch of token ids for checking a fused model."""
    return mx.array(np.random.default_rng(seed).integers(3, max(4, vocab_size), (2, 24)).astype(np.int32))


def fuse_model(
    model_path: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    dequantize: bool = False,
    tokenizer: str | Path | None = None,
    force: bool = False,
) -> dict[str, float]:
    """Load a model, apply and fuse the adapters in `adapter_path`, check, and save a normal model folder."""
    from ..folders.io import load, save

    check_output(output, force, "model", (model_path, adapter_path))
    model, tok = load(model_path, tokenizer)
    load_adapters(model, adapter_path)
    result = fuse_adapters(model, probe_tokens(tok.vocab_size), dequantize)
    save(model, output, tokenizer=tok, force=force, inputs=(model_path, adapter_path))
    return result
