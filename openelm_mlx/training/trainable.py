"""What a run trains, as one strategy the shared run takes: adapters (lora), or the model's own weights
(finetune: all of them or the last N layers, with or without the embedding and the norms; pretrain: all).

A strategy chooses the trainable parameters, names the files its run folder holds, records its settings in
every checkpoint (checked on resume), and writes the final output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.nn as nn

from ..errors import CheckpointError, OptionError
from ..generation.tokenizer import TOKENIZER_FILE
from .adapters import ADAPTER_CONFIG_FILE, ADAPTERS_FILE, add_adapters, save_adapters
from .loop import CHECKPOINTS

TRAIN_CONFIG_FILE = "train_config.json"
MODEL_FILES = ("config.json", "tokenizer_config.json")


class Trainable(Protocol):
    """The trainable-parameter choice of a run (see `AdapterWeights`, `ModelWeights`)."""

    kind: str  # what the output folder is: "adapters" or "model"
    weights_file: str  # the trainable weights' file in a checkpoint
    run_files: tuple[str, ...]  # files and folders of a run (replaced by overwrite)

    def apply(self, model: nn.Module) -> None:
        """Make exactly the chosen parameters trainable (in place)."""

    def record(self, model: nn.Module) -> dict[str, Any]:
        """The settings saved in each checkpoint's state.json (and compared on resume)."""

    def check_resume(self, record: dict[str, Any], state: dict[str, Any], folder: Path) -> None:
        """Raise when the checkpoint in `folder` (its `state`) was made with other settings than `record`."""

    def checkpoint_files(self, record: dict[str, Any]) -> dict[str, str]:
        """Text files written into each checkpoint."""

    def writes(self, out: Path, tokenizer_file: str | Path | None) -> tuple[str, ...]:
        """The entries the final save writes in `out` (none may be someone else's) with this tokenizer."""

    def save(self, model: nn.Module, out: Path, tokenizer: Any, record: dict[str, Any], files: dict[str, str]) -> None:
        """Write the final output into `out` (atomically), with the text `files`."""


@dataclass(frozen=True)
class AdapterWeights:
    """LoRA / DoRA adapters on a frozen model (a quantized base gives QLoRA); the output is an adapter folder."""

    num_layers: int
    parameters: dict[str, Any]  # mlx-lm's lora_parameters: rank, scale, dropout, keys
    dora: bool = False
    extra: dict[str, Any] | None = None  # more adapter_config.json entries (format_version, alpha, model...)

    kind = "adapters"
    weights_file = ADAPTERS_FILE
    run_files = (ADAPTERS_FILE, ADAPTER_CONFIG_FILE, TRAIN_CONFIG_FILE, "log.jsonl", CHECKPOINTS)

    def apply(self, model: nn.Module) -> None:
        add_adapters(model, self.num_layers, self.parameters, self.dora)

    def record(self, model: nn.Module) -> dict[str, Any]:
        config = {
            "fine_tune_type": "dora" if self.dora else "lora",
            "num_layers": self.num_layers,
            "lora_parameters": self.parameters,
        }
        return {"adapter_config": {**(self.extra or {}), **config}}

    def check_resume(self, record: dict[str, Any], state: dict[str, Any], folder: Path) -> None:
        saved, expected = state.get("adapter_config"), record["adapter_config"]
        keys = ("fine_tune_type", "num_layers", "lora_parameters")
        if not isinstance(saved, dict) or not all(k in saved for k in keys):
            raise CheckpointError(f'{folder / "state.json"}: "adapter_config" must be an object with {", ".join(keys)}')
        if any(saved[k] != expected[k] for k in keys):
            raise OptionError("resume", f"{folder} was made with other adapter settings ({saved['lora_parameters']})")

    def checkpoint_files(self, record: dict[str, Any]) -> dict[str, str]:
        return {
            ADAPTER_CONFIG_FILE: json.dumps(record["adapter_config"], indent=2)
        }  # a checkpoint is an adapter folder

    def writes(self, out: Path, tokenizer_file: str | Path | None) -> tuple[str, ...]:
        return (ADAPTERS_FILE, ADAPTER_CONFIG_FILE)

    def save(self, model: nn.Module, out: Path, tokenizer: Any, record: dict[str, Any], files: dict[str, str]) -> None:
        save_adapters(model, out, record["adapter_config"], files)


@dataclass(frozen=True)
class ModelWeights:
    """The model's own weights: the last `num_layers` decoder layers, the (tied) token embedding and the
    norms as chosen; the output is a normal model folder (float32), with the tokenizer and its template."""

    num_layers: int
    embeddings: bool = True
    norms: bool = True

    kind = "model"
    weights_file = "model.safetensors"
    run_files = ("log.jsonl", TRAIN_CONFIG_FILE, CHECKPOINTS)

    def apply(self, model: nn.Module) -> None:
        model.freeze()
        if self.num_layers:
            for layer in model.layers[len(model.layers) - self.num_layers :]:
                layer.unfreeze()
                if not self.norms:
                    for name, module in layer.named_modules():
                        if name.endswith("norm"):
                            module.freeze()
        if self.embeddings:
            model.transformer.token_embeddings.unfreeze()
        if self.norms:
            model.transformer.norm.unfreeze()

    def record(self, model: nn.Module) -> dict[str, Any]:
        return {"trainable": {"num_layers": self.num_layers, "embeddings": self.embeddings, "norms": self.norms}}

    def check_resume(self, record: dict[str, Any], state: dict[str, Any], folder: Path) -> None:
        saved = state.get("trainable", record["trainable"])  # pretraining checkpoints of older releases: all
        if saved != record["trainable"]:
            raise OptionError("resume", f"{folder} was made training other weights ({saved})")

    def checkpoint_files(self, record: dict[str, Any]) -> dict[str, str]:
        return {}

    def writes(self, out: Path, tokenizer_file: str | Path | None) -> tuple[str, ...]:
        """The model files; the tokenizer too unless it is already the folder's own (a pretraining run's)."""
        own = tokenizer_file is not None and (out / TOKENIZER_FILE).exists()
        own = own and os.path.samefile(out / TOKENIZER_FILE, tokenizer_file)
        return MODEL_FILES + (() if own else (TOKENIZER_FILE,))

    def save(self, model: nn.Module, out: Path, tokenizer: Any, record: dict[str, Any], files: dict[str, str]) -> None:
        from ..folders.fs import write_file_atomic
        from ..folders.io import save

        save(model, out, tokenizer=tokenizer, config_extra={"torch_dtype": "float32"}, force=True)
        for name, text in files.items():
            write_file_atomic(out / name, text)
