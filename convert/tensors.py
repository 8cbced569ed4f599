"""Lazily read tensors: a source file is only read tensor by tensor, when converted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from openelm_mlx.folders.weights import SAFETENSORS_DTYPES, safetensors_header


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
    base, header = safetensors_header(path)
    tensors = {}
    for name, info in header.items():
        dtype, np_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])

        def load(start: int = start, end: int = end, np_dtype: type = np_dtype, shape: tuple = shape) -> np.ndarray:
            if end == start:
                return np.zeros(shape, dtype=np_dtype)
            mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
            return np.array(mm.view(np_dtype).reshape(shape))

        tensors[name] = LazyTensor(shape=shape, dtype=dtype, load=load, source=str(path))
    return tensors
