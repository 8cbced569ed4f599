"""Lazily read tensors: a source file is only read tensor by tensor, when converted."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from openelm_mlx.io import safetensors_header

_SAFETENSORS_DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, "float64"),
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "U8": (np.uint8, "uint8"),
    "I8": (np.int8, "int8"),
    "BOOL": (np.bool_, "bool"),
    "U32": (np.uint32, "uint32"),
}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor's shape and dtype, and how to read it (bfloat16 is held as uint16 bytes)."""

    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray]
    source: str

    def to_mx(self) -> mx.array:
        data = self.load()
        if self.dtype == "bfloat16":
            return mx.array(data.view(np.uint16)).view(mx.bfloat16)
        return mx.array(data)


def open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Memory-map a safetensors file (header validated first); tensors read on demand."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        np_dtype, dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])

        def load(start: int = start, end: int = end, np_dtype: type = np_dtype, shape: tuple = shape) -> np.ndarray:
            mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
            return np.array(mm.view(np_dtype).reshape(shape))

        tensors[name] = LazyTensor(shape=shape, dtype=dtype, load=load, source=str(path))
    return tensors


def read_index(path: Path) -> list[Path]:
    """Shard files named by a `*.index.json` weight map, each checked to exist."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid shard index ({e})") from None
    files = [path.parent / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{path}: lists {f.name}, which is missing")
    return files
