"""LoRA, DoRA and QLoRA runs: their settings (`LoraConfig`, the paper's recipe, YAML files) and the run,
which is the shared fine-tuning run (`tune.py`) with adapters as the trainable weights. The adapters
themselves (swap, save, load, fuse) are in `adapters.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError, check_range, settings_field
from .adapters import DEFAULT_TARGETS, FORMAT_VERSION, TARGETS, fuse_model, load_adapters  # noqa: F401  (their import path before adapters.py)
from .settings import ExampleSettings, merge_settings, read_config_file
from .trainable import AdapterWeights
from .tune import check_paths, prepare_folder, train_on_examples

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


@dataclass(frozen=True, kw_only=True)
class LoraConfig(ExampleSettings):
    """Settings of an adapter fine-tuning run; checked when built. Each field with help is also a CLI option.

    `out` is the adapter folder (formerly `adapter_path`, still accepted by `make_config` and the CLI).
    """

    num_layers: str = settings_field("all", "Adapt the last N decoder layers, or all.")
    rank: int = settings_field(8, "Rank r of the low-rank update.")
    alpha: float = settings_field(16.0, "LoRA alpha: the update B·A is scaled by alpha / rank.")
    dropout: float = settings_field(0.0, "Dropout on the adapters' input while training.")
    dora: bool = settings_field(False, "DoRA: also learn each output row's magnitude.")
    targets: str = settings_field(DEFAULT_TARGETS, f"Comma-separated modules to adapt, from: {', '.join(TARGETS)}.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("rank", self.rank, 1, 4096, integer=True)
        check_range("alpha", self.alpha, 0, 1e6, low_open=True)
        check_range("dropout", self.dropout, 0, 0.99)
        self.target_names  # noqa: B018  (validates)

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


def make_config(
    values: dict[str, Any], explicit: set[str] | None = None, recipe: str | None = None, config_file: Path | None = None
) -> LoraConfig:
    """A `LoraConfig` from, in rising priority: `values` (defaults), the recipe, the YAML file, and the
    `explicit` keys of `values` (settings the user gave directly). Older names (iters, adapter_path) work."""
    from_file = read_config_file(LoraConfig, config_file, ("recipe",)) if config_file is not None else {}
    recipe = recipe or from_file.pop("recipe", None)
    if recipe is not None and recipe not in RECIPES:
        raise OptionError("recipe", f"must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return merge_settings(LoraConfig, values, explicit, from_file, RECIPES[recipe] if recipe else None)


def lora_parameters(config: LoraConfig) -> dict[str, Any]:
    """mlx-lm's `lora_parameters` entry: rank, scale, dropout and the module keys."""
    keys = [TARGETS[t] for t in config.target_names]
    return {"rank": config.rank, "scale": config.scale, "dropout": config.dropout, "keys": keys}


def adapter_weights(config: LoraConfig, model: nn.Module) -> AdapterWeights:
    """The adapters of `config` on `model`: adapter_config.json in mlx-lm's format, plus our keys."""
    extra = {"format_version": FORMAT_VERSION, "alpha": config.alpha, "targets": list(config.target_names)}
    return AdapterWeights(
        config.layers_of(len(model.layers)), lora_parameters(config), config.dora, {**extra, "model": config.model}
    )


def train_lora(
    config: LoraConfig, progress: bool = False, model: Any = None, tokenizer: Any = None
) -> dict[str, float]:
    """Train adapters on `config.data` and save them in `config.out` (rank 0 writes).

    `model`/`tokenizer` default to loading `config.model`. Returns the final metrics (step, loss,
    val_loss, and test_loss / test_perplexity with `config.test`).
    """
    from ..folders.io import load

    check_paths(config)
    rank = mx.distributed.init().rank()
    ckpt = prepare_folder(config, AdapterWeights(0, {})) if rank == 0 else None  # before any loading
    if model is None:
        model, tokenizer = load(config.model, config.tokenizer)
    return train_on_examples(config, adapter_weights(config, model), model, tokenizer, progress, ckpt)
