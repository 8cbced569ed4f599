"""Full fine-tuning: the model's own weights (all of them, or the last N layers) trained on the JSONL examples
`lora` reads, in float32 master weights; the output is a normal model folder. The run is the shared one
(`tune.py`) with `trainable.ModelWeights` as the trainable-parameter choice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError, settings_field
from ..model.config import OpenELMConfig
from ..quant.recipes import QUANTIZED
from .settings import ExampleSettings, merge_settings, read_config_file
from .trainable import ModelWeights
from .tune import check_paths, prepare_folder, train_on_examples

QUANTIZED_BASE = "is quantized: train adapters on it with `openelm-mlx lora` (QLoRA), or make a float copy first "
QUANTIZED_BASE += "with `openelm-mlx quantize --dequantize`"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(ExampleSettings):
    """Settings of a full fine-tuning run; checked when built. Each field with help is also a CLI option."""

    lr: float = settings_field(1e-5, "Peak learning rate (after warmup; cosine decay to min_lr).")
    train_embeddings: bool = settings_field(
        True, "Train the token embedding (it is tied: also the output head, so this changes every logit)."
    )
    train_norms: bool = settings_field(True, "Train the RMSNorm weights (of the trained layers, and the final one).")


def make_config(
    values: dict[str, Any], explicit: set[str] | None = None, config_file: Path | None = None
) -> FinetuneConfig:
    """A `FinetuneConfig` from `values`, under the YAML file's settings, under the `explicit` ones."""
    from_file = read_config_file(FinetuneConfig, config_file) if config_file is not None else {}
    return merge_settings(FinetuneConfig, values, explicit, from_file)


def model_weights(config: FinetuneConfig, model: nn.Module) -> ModelWeights:
    return ModelWeights(config.layers_of(len(model.layers)), config.train_embeddings, config.train_norms)


def check_float(model: nn.Module, name: str) -> None:
    """Full fine-tuning needs float weights.

    Raises:
        OptionError: the model is quantized, with where to go instead.
    """
    if any(isinstance(m, QUANTIZED) for _, m in model.named_modules()):
        raise OptionError("model", f"{name} {QUANTIZED_BASE}")


def read_base(path: str) -> OpenELMConfig | None:
    """Before loading: the config of a local model folder (None for a Hub repo), refused when quantized.

    Raises:
        OptionError: the model is quantized, with where to go instead.
        CheckpointError: a corrupt config.json.
    """
    from ..folders.io import read_config

    if not (Path(path) / "config.json").is_file():
        return None
    config, raw = read_config(Path(path))
    if raw.get("quantization"):
        raise OptionError("model", f"{path} {QUANTIZED_BASE}")
    return config


def finetune(
    config: FinetuneConfig, progress: bool = False, model: Any = None, tokenizer: Any = None
) -> dict[str, float]:
    """Train `config.model`'s weights on `config.data`; the model folder is written in `config.out` (rank 0).

    `model`/`tokenizer` default to loading `config.model` in float32. Returns the final metrics.
    """
    from ..folders.io import cast_floating, load

    check_paths(config)
    if (base := read_base(config.model)) is not None:
        config.layers_of(base.num_transformer_layers)  # before anything is loaded
    rank = mx.distributed.init().rank()
    ckpt = prepare_folder(config, ModelWeights(0)) if rank == 0 else None  # before any loading
    if model is None:
        model, tokenizer = load(config.model, config.tokenizer, dtype="float32")
    check_float(model, config.model)
    cast_floating(model, mx.float32)  # float32 master weights
    return train_on_examples(config, model_weights(config, model), model, tokenizer, progress, ckpt)
