"""Reading torch zip checkpoints (`pytorch_model.bin`, CoreNet `*.pt`) without torch and without
running pickle code: a restricted unpickler rebuilds tensors from the zip's storages, nothing else.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tensors import LazyTensor

# torch storage class name -> (numpy dtype used to hold the bytes, our dtype name)
_STORAGES = {
    "FloatStorage": (np.float32, "float32"),
    "HalfStorage": (np.float16, "float16"),
    "BFloat16Storage": (np.uint16, "bfloat16"),
    "DoubleStorage": (np.float64, "float64"),
    "LongStorage": (np.int64, "int64"),
    "IntStorage": (np.int32, "int32"),
    "ShortStorage": (np.int16, "int16"),
    "CharStorage": (np.int8, "int8"),
    "ByteStorage": (np.uint8, "uint8"),
    "BoolStorage": (np.bool_, "bool"),
}


class UnsafeCheckpointError(ValueError):
    """The pickle asked for something other than tensors and plain containers; nothing was run."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    storage: _StorageType
    numel: int


def _rebuild_tensor(storage: _StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor: _TensorRef, *_: Any) -> _TensorRef:
    return tensor


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load: the pickle asks for {module}.{name}, which is not a tensor "
            "or plain container (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.source}: unsupported persistent id {pid!r:.80}")
        return _StorageRef(key=str(pid[2]), storage=pid[1], numel=int(pid[4]))


def _prefix(names: list[str], source: Path) -> str:
    pickles = [n for n in names if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{source}: not a torch zip checkpoint (found {len(pickles)} data.pkl entries)")
    return pickles[0][: -len("data.pkl")]


def load_torch_zip(path: str | Path) -> Any:
    """Unpickle a torch zip checkpoint; tensors come back as `LazyTensor`s that read on demand.

    Raises:
        UnsafeCheckpointError: the pickle references anything but tensors and containers.
        ValueError: naming the file, when it is not a (complete) torch zip checkpoint.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a torch zip checkpoint (truncated, or saved by torch < 1.6 in the legacy format: "
            "re-save it with a current torch)"
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = _prefix(names, path)
        big_endian = f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() == b"big"
        with zf.open(f"{prefix}data.pkl") as f:
            try:
                obj = _RestrictedUnpickler(f, path).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
                raise ValueError(f"{path}: corrupt checkpoint pickle ({e})") from None
    return _materialize(obj, path, prefix, big_endian, set(names))


def _materialize(obj: Any, path: Path, prefix: str, big_endian: bool, names: set[str]) -> Any:
    if isinstance(obj, _TensorRef):
        return _lazy(obj, path, prefix, big_endian, names)
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, path, prefix, big_endian, names)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path, prefix, big_endian, names) for v in obj)
    return obj


def _lazy(ref: _TensorRef, path: Path, prefix: str, big_endian: bool, names: set[str]) -> LazyTensor:
    np_dtype, dtype = _STORAGES[ref.storage.storage.name]
    entry = f"{prefix}data/{ref.storage.key}"
    if entry not in names:
        raise ValueError(f"{path}: storage {entry} is missing from the zip")

    def load() -> np.ndarray:
        with zipfile.ZipFile(path) as zf:
            try:
                raw = zf.read(entry)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{path}: cannot read {entry} ({e})") from None
        item = np.dtype(np_dtype).itemsize
        if len(raw) < ref.storage.numel * item:
            raise ValueError(f"{path}: storage {entry} is truncated")
        data = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder(">" if big_endian else "<"))
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :], shape=ref.shape, strides=tuple(s * item for s in ref.stride)
        )
        return np.ascontiguousarray(view).astype(np_dtype, copy=False)

    return LazyTensor(shape=ref.shape, dtype=dtype, load=load, source=str(path))
