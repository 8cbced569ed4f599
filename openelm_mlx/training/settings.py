"""The settings every training command shares (`RunSettings`: schedule, optimizer, precision, run folder),
those of the commands that train on JSONL examples (`ExampleSettings`: lora and finetune), and YAML files
of settings merged under the options a user typed.

Each field with help is also a CLI option of every command whose settings class has it, with the same
name everywhere; the older spellings stay as aliases (`--iters`, `--eval-every`, `--adapter-path`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OptionError, check_range, settings_field
from ..folders.fs import require_regular_file

OPTIMIZERS = ("adamw", "adafactor", "sgd")
DTYPES = ("float32", "bfloat16")
# older setting names (CLI options, YAML keys, keyword arguments) -> the shared names
ALIASES = {"iters": "steps", "eval_every": "val_every", "adapter_path": "out"}
KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The schedule and run settings of every training command; checked when built.

    Subclasses change a default by declaring the field again (e.g. pretraining's learning rate).
    """

    out: str = ""
    steps: int | None = settings_field(1000, "Optimizer steps.", ("--iters",))
    batch_size: int = settings_field(4, "Sequences per micro-batch per process.")
    grad_accum: int = settings_field(1, "Micro-batches per optimizer step (global batch: x batch-size x processes).")
    lr: float = settings_field(1e-4, "Peak learning rate (after warmup; cosine decay to min_lr).")
    min_lr: float | None = settings_field(None, "Final cosine learning rate (default lr/10).")
    warmup: int = settings_field(0, "Linear warmup steps from 1e-6.")
    weight_decay: float = settings_field(0.0, "Decoupled weight decay (not on 1-D parameters such as norms).")
    grad_clip: float = settings_field(1.0, "Gradient-norm clip (0: off).")
    optimizer: str = settings_field(
        "adamw", "adamw, adafactor (factored second moments: the memory option) or sgd (momentum 0.9)."
    )
    dtype: str = settings_field(
        "float32", "Compute dtype: float32 or bfloat16 (master weights and optimizer state stay float32)."
    )
    grad_checkpoint: bool = settings_field(False, "Recompute each layer's activations in the backward pass.")
    val_every: int = settings_field(100, "Held-out loss every N steps and at the end (0: never).", ("--eval-every",))
    save_every: int = settings_field(100, "Checkpoint every N steps (0: never).")
    keep_checkpoints: int = settings_field(2, "How many of the newest checkpoints to keep.")
    seed: int = settings_field(0, "Seed for initialisation, dropout and data order.")
    resume: bool = settings_field(False, "Continue from the latest checkpoint in the output folder.")
    overwrite: bool = settings_field(False, "Start afresh in an output folder that holds an earlier run.")
    force: bool = settings_field(False, "Train even when the memory plan says the run does not fit this machine.")

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = expected_kind(type(self), f.name, getattr(self, f.name)) if "help" in f.metadata else None
            if kind is not None:
                raise OptionError(f.name, f"must be {kind}, got {getattr(self, f.name)!r}")
        check_range("steps", self.steps, 1, integer=True)
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("warmup", self.warmup, 0, integer=True)
        check_range("lr", self.lr, 0, 10, low_open=True)
        check_range("min_lr", self.min_lr, 0, self.lr)
        check_range("weight_decay", self.weight_decay, 0, 10)
        check_range("grad_clip", self.grad_clip, 0)
        for name in ("val_every", "save_every", "seed"):
            check_range(name, getattr(self, name), 0, integer=True)
        if self.optimizer not in OPTIMIZERS:
            raise OptionError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise OptionError(
                "dtype", f"must be float32 or bfloat16 (float16 overflows in training), got {self.dtype!r}"
            )
        if self.resume and self.overwrite:
            raise OptionError("resume", "and overwrite cannot both be given")


@dataclass(frozen=True, kw_only=True)
class ExampleSettings(RunSettings):
    """Settings of the runs on a folder of JSONL examples (train.jsonl, valid.jsonl, test.jsonl): lora, finetune."""

    model: str = ""
    data: str = ""
    tokenizer: str | None = None
    num_layers: str = settings_field("all", "Train the last N decoder layers, or all.")
    steps: int | None = settings_field(None, "Optimizer steps (instead of epochs).", ("--iters",))
    epochs: float | None = settings_field(None, "Passes over train.jsonl (default 3 when steps is not given).")
    max_seq_len: int | None = settings_field(
        None, "Longer examples are truncated (default: the model's context length)."
    )
    mask_prompt: bool = settings_field(False, "Loss on completion / assistant tokens only.")
    val_batches: int = settings_field(25, "Validation batches per evaluation (0: all of valid.jsonl).")
    test: bool = settings_field(False, "After training, report the loss and perplexity on test.jsonl.")

    def __post_init__(self) -> None:
        if isinstance(self.num_layers, int) and not isinstance(self.num_layers, bool):
            object.__setattr__(self, "num_layers", str(self.num_layers))
        super().__post_init__()
        if self.num_layers != "all" and not (self.num_layers.isdigit() and int(self.num_layers) >= 1):
            raise OptionError("num_layers", f"must be a positive whole number or 'all', got {self.num_layers!r}")
        if self.steps is not None and self.epochs is not None:
            raise OptionError("steps", "and epochs cannot both be given")
        check_range("epochs", self.epochs, 0, 1e6, low_open=True)
        check_range("val_batches", self.val_batches, 0, integer=True)
        check_range("max_seq_len", self.max_seq_len, 2, integer=True)

    def layers_of(self, n_layers: int) -> int:
        """How many of a model's `n_layers` decoder layers train (the last ones).

        Raises:
            OptionError: num_layers is more than the model has.
        """
        if self.num_layers == "all":
            return n_layers
        if int(self.num_layers) > n_layers:
            raise OptionError("num_layers", f"{self.num_layers} is more than the model's {n_layers} decoder layers")
        return int(self.num_layers)


def expected_kind(cls: type, name: str, value: Any) -> str | None:
    """What the settings field `name` of `cls` must hold, when `value` is of the wrong type (None when it fits)."""
    if name == "num_layers":
        fits = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return None if fits else "a positive whole number or 'all'"
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) or (hint,)
    kind = next(a for a in args if a is not type(None))
    if value is None and type(None) in args:
        return None
    if kind not in KINDS:
        return None
    wanted = (int, float) if kind is float else kind
    fits = isinstance(value, wanted) and (kind is bool or not isinstance(value, bool))
    return None if fits else KINDS[kind]


def canonical(values: dict[str, Any], where: str = "settings") -> dict[str, Any]:
    """`values` with the older names (`ALIASES`) replaced by the shared ones.

    Raises:
        OptionError: an old and a new name of the same setting are both given.
    """
    out = dict(values)
    for old, new in ALIASES.items():
        if old in out:
            if out.get(new) is not None and out[old] is not None:
                raise OptionError(new, f"is given twice in {where} (also as {old})")
            value = out.pop(old)
            if out.get(new) is None:
                out[new] = value
    return out


def read_config_file(cls: type, path: str | Path, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Settings from a YAML file whose keys are field names of `cls` (dashes and older names allowed),
    or `extra_keys` (strings).

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
    known = {f.name for f in fields(cls)} | set(extra_keys)
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for key in values:
        if key not in known and ALIASES.get(key) not in known:
            raise OptionError("config", f"{path}: unknown setting {key!r}")
    try:
        values = canonical(values, str(path))
    except OptionError as e:
        raise OptionError("config", f"{path}: {e.option} {e.detail}") from None
    if isinstance(values.get("targets"), list):
        values["targets"] = ",".join(map(str, values["targets"]))
    for key, value in values.items():
        kind = (None if isinstance(value, str) else "a string") if key in extra_keys else expected_kind(cls, key, value)
        if kind is not None:
            note = " (YAML reads 1e-4 as text: write 1.0e-4)" if kind == KINDS[float] and _is_number(value) else ""
            raise OptionError("config", f"{path}: {key} must be {kind}, got {value!r}{note}")
    return values


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def merge_settings(
    cls: type,
    values: dict[str, Any],
    explicit: set[str] | None = None,
    from_file: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Any:
    """A `cls` from, in rising priority: `values` (defaults), the `recipe`, the file's settings, and the
    `explicit` keys of `values` (settings the user gave directly)."""
    values = canonical(values)
    explicit = {ALIASES.get(k, k) for k in (explicit if explicit is not None else set(values))}
    chosen = {k: values[k] for k in explicit if k in values}
    sources = [chosen, from_file or {}, recipe or {}]
    merged = {**values, **sources[2], **sources[1], **chosen}
    for source in sources if "epochs" in {f.name for f in fields(cls)} else ():
        # steps and epochs from different sources: the higher-priority one wins
        has_steps, has_epochs = source.get("steps") is not None, source.get("epochs") is not None
        if has_steps != has_epochs:
            merged["epochs" if has_steps else "steps"] = None
        if has_steps or has_epochs:
            break
    return cls(**merged)
