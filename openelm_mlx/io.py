"""MLX-format model folders: config.json + (sharded) safetensors, read strictly, written atomically.

The format is the one `mlx_lm.load` reads; Apple's own Hugging Face folders load directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import OpenELMConfig
from .model import Model

MAX_SHARD_BYTES = 5 << 30
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Apple's untied checkpoints carry this unused tensor next to `lm_head.weight`.
UNUSED_KEYS = frozenset({"transformer.classifier.weight"})
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(ValueError):
    """A model file is missing, corrupt, or disagrees with its config; the message names it."""


def parse_dtype(name: str) -> mx.Dtype:
    """`float32`, `float16` or `bfloat16` as an MLX dtype; anything else raises a ValueError."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising CheckpointError naming the file on any problem."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(model_dir: Path) -> tuple[OpenELMConfig, dict[str, Any]]:
    """The architecture config and the raw config.json dict of a model folder."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path)
    try:
        return OpenELMConfig.from_dict(raw), raw
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises:
        CheckpointError: naming the file (and tensor) if the header is corrupt or the file truncated.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info["data_offsets"]
        itemsize = _DTYPE_BYTES.get(info["dtype"])
        if itemsize is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if end - start != math.prod(info["shape"]) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {info['shape']}")
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {8 + n + end}, file has {size}"
            )
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, following model.safetensors.index.json if present."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        return files
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model*.safetensors files")
    return files


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """Load one safetensors file after validating its header."""
    safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with no file name
        raise CheckpointError(f"{path}: could not be read ({e})") from None


def _quantize_like(model: Model, weights: dict[str, mx.array], quantization: dict[str, Any]) -> None:
    """Quantize exactly the modules whose weights carry `.scales` (per-module settings honoured)."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], sources: dict[str, Path]) -> None:
    """Every expected tensor present with the right shape, and nothing unknown.

    Raises:
        CheckpointError: naming the tensor and the file it came from.
    """
    expected = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        where = sources.get(name, "weights")
        if name not in expected:
            raise CheckpointError(f"{where}: unknown tensor {name!r} for this OpenELM config")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(value.shape)}, config expects {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(
            f"{', '.join(map(str, set(sources.values())))}: missing tensor(s) {', '.join(missing[:5])}"
        )


def load_model(path: str | Path, lazy: bool = False) -> Model:
    """Load an OpenELM model from a local folder (MLX format or Apple's Hugging Face safetensors).

    Args:
        path: folder with config.json and model*.safetensors (sharded with an index or not).
        lazy: leave weights memory-mapped until first use.

    Raises:
        CheckpointError: missing/corrupt files, unknown or missing tensors, wrong shapes.
    """
    path = Path(path)
    config, raw = read_config(path)
    weights: dict[str, mx.array] = {}
    sources: dict[str, Path] = {}
    for f in weight_files(path):
        for name, value in load_safetensors(f).items():
            if name not in UNUSED_KEYS:
                weights[name], sources[name] = value, f
    model = Model(config)
    if raw.get("quantization"):
        _quantize_like(model, weights, raw["quantization"])
    check_weights(model, weights, sources)
    model.load_weights(list(weights.items()))
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def quantization_settings(model: nn.Module) -> dict[str, Any] | None:
    """The mlx-lm `quantization` config entry for a model quantized with `nn.quantize`, or None.

    The most common (group_size, bits) is the default; modules that differ get their own entry.
    """
    found = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not found:
        return None
    settings = list(found.values())
    default = max(settings, key=settings.count)
    return {**default, **{p: s for p, s in found.items() if s != default}}


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success move its files into `dest`.

    A new `dest` appears whole with a single rename. An existing folder has each file replaced
    by rename, and files matching the `stale` globs that the new output lacks are removed
    (other files, e.g. training logs, are kept). On error nothing in `dest` changes.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if not dest.exists():
            os.replace(tmp, dest)
            return
        new_names = {f.name for f in tmp.iterdir()}
        for pattern in stale:
            for old in dest.glob(pattern):
                if old.name not in new_names and old.is_file():
                    old.unlink()
        for f in tmp.iterdir():
            target = dest / f.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_bytes` (one oversized tensor per shard)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def write_shards(
    out_dir: Path,
    sizes: dict[str, int],
    read: Callable[[list[str]], dict[str, mx.array]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index past the shard size.

    `read(names)` supplies one shard's tensors at a time, so a caller can stream them from disk.
    """
    plan = plan_shards(sizes, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(plan, 1):
        file = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        mx.save_safetensors(str(out_dir / file), read(names), metadata=metadata or {"format": "mlx"})
        weight_map.update(dict.fromkeys(names, file))
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_weights(
    out_dir: Path,
    weights: dict[str, mx.array],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write in-memory weights as (sharded) safetensors; see `write_shards`."""
    sizes = {name: value.nbytes for name, value in weights.items()}
    write_shards(out_dir, sizes, lambda names: {n: weights[n] for n in names}, max_shard_bytes, metadata)


def model_config_dict(model: Model, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for a model: Apple's fields, dtype, and quantization settings if any."""
    d = model.config.to_dict()
    d["torch_dtype"] = str(model.transformer.norm.weight.dtype).removeprefix("mlx.core.")
    if (q := quantization_settings(model)) is not None:
        d["quantization"] = q
    return {**d, **(extra or {})}


def save(
    model: Model,
    path: str | Path,
    tokenizer: Any = None,
    config_extra: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Save in the MLX community format (`load_model` and `mlx_lm.load` read it), atomically.

    Args:
        model: the model (float or quantized with `nn.quantize`).
        path: output folder.
        tokenizer: optional; anything with `save(folder)` (see `openelm_mlx.tokenizer.Tokenizer`).
        config_extra: extra config.json entries.

    Returns:
        The output folder.
    """
    weights = dict(tree_flatten(model.parameters()))
    with atomic_output_dir(path, stale=("model*.safetensors", "model.safetensors.index.json")) as tmp:
        write_weights(tmp, weights, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(model_config_dict(model, config_extra), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


def load(
    path_or_repo: str | Path, tokenizer: str | Path | None = None, chat_template: bool | None = None, lazy: bool = False
) -> tuple[Model, Any]:
    """Load a model and its tokenizer from a folder or a Hugging Face repo id.

    Args:
        path_or_repo: local model folder, or a Hub repo id (only the needed files are fetched).
        tokenizer: a tokenizer.model path, a folder holding one, or a Hub repo id; default: the
            model folder's own (Apple's repos ship none: pass e.g. "hf-internal-testing/llama-tokenizer").
        chat_template: force the Instruct template on/off; default: recorded or named "Instruct".

    Returns:
        (model, tokenizer)

    Raises:
        CheckpointError, TokenizerNotFoundError, HubError: with what to do.
    """
    from .hub import resolve
    from .tokenizer import find_tokenizer

    folder = resolve(path_or_repo)
    model = load_model(folder, lazy=lazy)
    if chat_template is None and "instruct" in str(path_or_repo).lower():
        chat_template = True
    return model, find_tokenizer(folder, tokenizer, chat_template)


def read_arch_config(path: str | Path) -> OpenELMConfig:
    """An architecture from a JSON or YAML file.

    Accepts a flat dict with CoreNet's GPTConfig / Apple's config.json field names, or a CoreNet
    training YAML naming a released size (`model.language_modeling.general_gpt.model_name`).

    Raises:
        CheckpointError: naming the file, when it cannot be read or is not a valid config.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid JSON/YAML ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of config fields")
    try:
        gpt = data.get("model", {}).get("language_modeling", {}).get("general_gpt", {})
        if isinstance(gpt, dict) and "model_name" in gpt:
            # Next to model_name CoreNet keeps vocab_size (padded), max_context_length and training-only
            # entries such as padding_index; only architecture fields are taken.
            fields = {f.name for f in dataclasses.fields(OpenELMConfig) if f.init}
            overrides = {k: v for k, v in gpt.items() if k in fields}
            return OpenELMConfig.from_preset(gpt["model_name"], **overrides)
        return OpenELMConfig.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def resolve_arch(arch: str | None, arch_config: str | Path | None) -> OpenELMConfig | None:
    """The architecture named by `--arch` (a released size) or `--arch-config` (a file), or None."""
    if arch and arch_config:
        raise ValueError("give --arch or --arch-config, not both")
    if arch:
        return OpenELMConfig.from_preset(arch)
    return read_arch_config(arch_config) if arch_config else None
