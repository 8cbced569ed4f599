"""The weight files of a model folder: strict safetensors headers, shard indexes, sharded writing.

Every size and offset a file declares is checked against the file's real bytes before anything
is read, and every tensor is checked against the shapes the config expects.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from .fs import require_regular_file

T = TypeVar("T")
MAX_SHARD_BYTES = 5 << 30
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype -> (our dtype name, numpy dtype holding its bytes; bfloat16 is held as uint16)
SAFETENSORS_DTYPES: dict[str, tuple[str, Any]] = {
    "F64": ("float64", np.float64),
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "I64": ("int64", np.int64),
    "U64": ("uint64", np.uint64),
    "I32": ("int32", np.int32),
    "U32": ("uint32", np.uint32),
    "I16": ("int16", np.int16),
    "U16": ("uint16", np.uint16),
    "I8": ("int8", np.int8),
    "U8": ("uint8", np.uint8),
    "BOOL": ("bool", np.bool_),
}
# Apple's untied checkpoints carry this unused tensor next to `lm_head.weight`.
UNUSED_KEYS = frozenset({"transformer.classifier.weight"})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CheckpointError(f"key {dup!r} appears twice")
    return dict(pairs)


def parse_json(path: Path, data: bytes | str) -> Any:
    """JSON with duplicate keys and runaway nesting refused; errors name the file."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> tuple[int, int]:
    """Validate one header entry; return its (start, end) byte range in the data section."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape) or len(shape) > 8:
        raise CheckpointError(f"{path}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets must be two non-negative integers")
    start, end = offsets
    nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype][1]).itemsize
    if end < start or end - start != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes for shape {shape} ({dtype})")
    if end > data_bytes:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} needs {end} data bytes, file has {data_bytes}")
    return start, end


def safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns:
        (offset of the data section, {tensor name: header entry}).

    Raises:
        CheckpointError: naming the file (and tensor): corrupt header, bad dtype/shape/offsets,
            overlapping tensors, or a file shorter than its header says.
    """
    path = require_regular_file(Path(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size})")
        header = parse_json(path, f.read(n))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}  # MLX writes null when there is none
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    ranges = sorted((_check_entry(path, name, info, size - 8 - n), name) for name, info in header.items())
    for (a, name_a), (b, name_b) in zip(ranges, ranges[1:]):
        if b[0] < a[1]:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the file")
    return 8 + n, header


def read_index(index: Path) -> dict[str, Path]:
    """The weight map of a shard index: tensor name -> shard file, each a regular file in the same folder.

    Raises:
        CheckpointError: naming the index: bad JSON or types, a shard outside the folder, a missing shard.
    """
    weight_map = parse_json(index, require_regular_file(index).read_bytes())
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index}: no "weight_map" object of tensor names to shard files')
    shards: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}; shards must be files in the same folder")
        shards[name] = index.parent / file
    for f in set(shards.values()):
        if not f.exists():
            raise CheckpointError(f"{index}: lists {f.name}, which is missing")
        require_regular_file(f)
    return shards


def weight_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a model folder and, when sharded with an index, its weight map."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        shards = read_index(index)
        return sorted(set(shards.values())), shards
    files = [require_regular_file(f) for f in sorted(model_dir.glob("model*.safetensors"))]
    if not files:
        raise CheckpointError(f"{model_dir}: no model*.safetensors files")
    return files, None


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """Load one safetensors file after validating its header."""
    safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with no file name
        raise CheckpointError(f"{path}: could not be read ({e})") from None


def merge_shards(
    files: list[Path],
    read: Callable[[Path], dict[str, T]],
    shards: dict[str, Path] | None = None,
    index: Path | None = None,
) -> tuple[dict[str, T], dict[str, Path]]:
    """The tensors of several files and the file each came from; with a shard index, the index is obeyed.

    Raises:
        CheckpointError: a tensor in two files, a tensor in a shard the index does not place it in, or a
            tensor the index lists that no shard holds.
    """
    state: dict[str, T] = {}
    sources: dict[str, Path] = {}
    for f in files:
        for name, value in read(f).items():
            if name in sources:
                raise CheckpointError(f"{f}: tensor {name!r} is also in {sources[name]}")
            if shards is not None and shards.get(name) != f:
                raise CheckpointError(f"{f}: holds tensor {name!r}, which the shard index does not place there")
            state[name], sources[name] = value, f
    missing = sorted(set(shards or ()) - set(state))
    if missing:
        raise CheckpointError(f"{index}: lists tensor {missing[0]!r}, which {shards[missing[0]].name} lacks")
    return state, sources


def read_weights(model_dir: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of a model folder (lazily mapped) and the file each came from.

    Raises:
        CheckpointError: see `merge_shards`.
    """
    files, shards = weight_files(model_dir)
    weights, sources = merge_shards(files, load_safetensors, shards, Path(model_dir) / INDEX_FILE)
    for name in UNUSED_KEYS & set(weights):
        del weights[name], sources[name]
    return weights, sources


def check_tensors(
    tensors: dict[str, Any], expected: dict[str, Any], where: Path | str | dict[str, Path], context: str = "this run"
) -> None:
    """Every tensor of `expected` is in `tensors` with the same shape, and nothing else.

    Args:
        where: the file the tensors came from, or one file per tensor name.

    Raises:
        CheckpointError: naming the file and the first tensor that is unknown, misshapen or missing.
    """

    def at(name: str) -> Path | str:
        return where.get(name, "weights") if isinstance(where, dict) else where

    for name, value in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{at(name)}: unknown tensor {name!r} for {context}")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{at(name)}: tensor {name!r} has shape {tuple(value.shape)}, {context} expects "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        files = ", ".join(sorted(map(str, set(where.values())))) if isinstance(where, dict) else str(where)
        raise CheckpointError(f"{files or 'weights'}: missing tensor(s) {', '.join(missing[:5])}")


def check_weights(model: nn.Module, weights: dict[str, Any], sources: dict[str, Path]) -> None:
    """A model's weights: every parameter present with its shape, nothing unknown (see `check_tensors`)."""
    check_tensors(weights, dict(tree_flatten(model.parameters())), sources, "this OpenELM config")


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
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_weights(
    out_dir: Path,
    weights: dict[str, mx.array],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write in-memory weights as (sharded) safetensors; see `write_shards`."""
    sizes = {name: value.nbytes for name, value in weights.items()}
    write_shards(out_dir, sizes, lambda names: {n: weights[n] for n in names}, max_shard_bytes, metadata)
