"""Reading torch zip checkpoints (`pytorch_model.bin`, CoreNet `*.pt`) without torch and without
running pickle code: a restricted unpickler rebuilds tensors from the zip's storages, nothing else.

The file is hostile until proven otherwise: only regular files are opened; the pickle is scanned
(without running it) for memo abuse and keys that are unsafe to hash before it is loaded; every zip
entry's sizes are checked before it is read, and only the bytes a tensor needs are read; every view
is checked against its storage's real length before it is made. Errors name the file and the tensor,
storage or entry, as one `CheckpointError` (a ValueError) the CLI prints as one line.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import pickletools
import stat
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from openelm_mlx.errors import CheckpointError

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
_MAX_PICKLE = 4 << 20  # real data.pkl files are < 1 MiB with optimizer state; scanning 4 MiB takes ~3 s
_MAX_DEPTH = 200  # real checkpoints nest < 20 deep
_MAX_RATIO = 100  # float weights barely compress; more than this (above 1 MiB) is a zip bomb
_MAX_DIMS = 32  # numpy's limit
_HASHED = {"SETITEM": slice(1, None, 2), "SETITEMS": slice(1, None, 2), "DICT": slice(0, None, 2)}
_HASHED |= {"ADDITEMS": slice(1, None), "FROZENSET": slice(0, None)}  # which popped items get hashed
_SCALARS = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_SCALARS |= {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_CONTAINERS = {("collections", "OrderedDict"): OrderedDict, ("torch", "Size"): tuple}
_CONTAINERS |= {("builtins", "set"): set, ("builtins", "frozenset"): frozenset}


class UnsafeCheckpointError(CheckpointError):
    """The pickle asked for something other than tensors and plain containers; nothing was run."""


class CorruptCheckpointError(CheckpointError):
    """The file is not a well-formed torch zip checkpoint; the message starts with its path."""


# The objects the pickle makes. `__slots__` without dataclass(slots=True), which would add a
# `__setstate__`: a pickle BUILD opcode then has neither a __dict__ nor a setter to rewrite them with.
@dataclass(frozen=True)
class _StorageType:
    __slots__ = ("name",)
    name: str


@dataclass(frozen=True)
class _StorageRef:
    __slots__ = ("key", "storage", "numel")
    key: str
    storage: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    __slots__ = ("args",)
    args: tuple  # as the pickle gave them: validated when materialized, where the tensor's name is known


@dataclass(frozen=True)
class _Call:
    """A callable the pickle may use, wrapped: BUILD could set attributes (`__defaults__`) on a function."""

    __slots__ = ("fn",)
    fn: Any

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


@dataclass(frozen=True)
class _Zip:
    path: Path
    size: int  # of the file, in bytes
    prefix: str
    big_endian: bool
    infos: dict[str, zipfile.ZipInfo]


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0  # not bool, not a float


def _plain_key(x: Any) -> bool:
    """A str (its hash is salted) or a small int: what a crafted hash collision cannot be made of."""
    return type(x) is str or (type(x) is int and -(2**31) <= x < 2**31)


def _show(x: Any, inner: bool = False) -> str:
    """A short repr of an untrusted value: a whole repr could be huge (a pickle can share one list
    a million times), deeper than the recursion limit, or an int too long to print."""
    if x is None or type(x) in (bool, float) or (type(x) is int and x.bit_length() <= 64):
        return repr(x)
    if type(x) is str:
        return repr(x[:40])
    if type(x) in (tuple, list) and len(x) <= 40 and not inner:
        items = ", ".join(_show(i, True) for i in x) + ("," if len(x) == 1 and type(x) is tuple else "")
        return f"({items})" if type(x) is tuple else f"[{items}]"
    return f"<{type(x).__name__}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path, file_size: int):
        super().__init__(io.BytesIO(data))
        self.source, self.file_size, self.budget = source, file_size, len(data)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _Call(lambda *args: _TensorRef(args))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _Call(lambda tensor, *_: tensor)
        if (module, name) in _CONTAINERS:
            return _Call(functools.partial(self._container, _CONTAINERS[module, name]))
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load: the pickle asks for {module}.{name}, which is not a tensor "
            "or plain container (nothing from the file was run)"
        )

    def _container(self, kind: type, *args: Any) -> Any:
        """`kind(items)`, as pickles call it (OrderedDict with no items: SETITEMS fills it). The copies
        are charged to a budget of the pickle's length (a memoized list copied a million times would
        be quadratic), and what a set hashes must be plain keys (crafted collisions are quadratic)."""
        items = args[0] if args else ()
        self.budget -= len(items) if type(items) in (tuple, list) else 0
        ok = len(args) <= 1 and type(items) in (tuple, list) and self.budget >= 0
        if not (ok and (kind is tuple or all(map(_plain_key, items))) and (kind is not OrderedDict or not items)):
            raise CorruptCheckpointError(f"{self.source}: data.pkl: refusing {kind.__name__}() of {_show(items)}")
        return kind(items)

    def persistent_load(self, pid: Any) -> _StorageRef:
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
        if not (ok and _plain_key(pid[2]) and _is_count(pid[4])):
            raise CorruptCheckpointError(f"{self.source}: unsupported persistent id {_show(pid)}")
        if len(str(pid[2])) > 64:  # torch's keys are "0", "1"...; each tensor's entry name repeats it
            raise CorruptCheckpointError(f"{self.source}: storage key {_show(pid[2])} is too long")
        if pid[4] > self.file_size * _MAX_RATIO:  # itemsize >= 1: more bytes than the file could hold
            raise CorruptCheckpointError(f"{self.source}: storage {pid[2]!r} claims {_show(pid[4])} elements")
        return _StorageRef(key=str(pid[2]), storage=pid[1], numel=pid[4])


@contextmanager
def _errors(path: Path, what: str) -> Iterator[None]:
    """Whatever reading untrusted bytes raises (BadZipFile, zlib.error, EOFError, OSError, a CRC
    mismatch...) becomes one CorruptCheckpointError naming the file and what was being read."""
    try:
        yield
    except (CorruptCheckpointError, UnsafeCheckpointError):
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:200]})") from None


def _open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file (a FIFO would hang, a device never end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CorruptCheckpointError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:  # missing, ELOOP, permissions
        raise CorruptCheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped after the first check
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def _check_entry(path: Path, size: int, info: zipfile.ZipInfo, nbytes: int | None = None) -> None:
    """Refuse an entry before reading it: encrypted, unknown compression, past the end of the file,
    a zip bomb, or (for a storage) not exactly the `nbytes` the pickle declares."""
    where = f"{path}: entry {info.filename}"
    if info.flag_bits & 0x1:
        raise CorruptCheckpointError(f"{where} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CorruptCheckpointError(f"{where} uses unsupported compression method {info.compress_type}")
    if info.header_offset + info.compress_size > size:
        raise CorruptCheckpointError(f"{where} runs past the end of the file (truncated?)")
    stored_mismatch = info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size
    if stored_mismatch or info.file_size > max(_MAX_RATIO * info.compress_size, 1 << 20):
        raise CorruptCheckpointError(
            f"{where} declares {info.file_size} bytes from {info.compress_size} (zip bomb or corrupt)"
        )
    if nbytes is not None and info.file_size != nbytes:
        raise CorruptCheckpointError(f"{where} holds {info.file_size} bytes, but its storage declares {nbytes}")


def _read_entry(zf: zipfile.ZipFile, path: Path, size: int, info: zipfile.ZipInfo, limit: int) -> bytes:
    _check_entry(path, size, info)
    if info.file_size > limit:
        raise CorruptCheckpointError(f"{path}: entry {info.filename} is {info.file_size} bytes, more than {limit}")
    with _errors(path, info.filename), zf.open(info) as f:
        return f.read(limit)


def _scan(data: bytes, path: Path) -> None:
    """Walk the pickle's opcodes without running them. Refuse memo indices no pickler writes (the
    unpickler would allocate them), and dict keys or set elements that are not plain keys: hashing
    a 100k-deep tuple overflows the C stack, and crafted hash collisions make inserts quadratic."""
    stack: list[bool] = []  # per object on the unpickler's stack: is it a plain key?
    marks: list[int] = []
    memo: dict[int, bool] = {}
    with _errors(path, "data.pkl"):
        for op, arg, pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                arg = len(memo) if op.name == "MEMOIZE" else arg
                if not 0 <= arg <= len(memo):  # the pickler numbers its memo 0, 1, 2...
                    raise CorruptCheckpointError(f"{path}: data.pkl: memo index {arg} at byte {pos}")
                memo[arg] = stack[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif op.name == "MARK":
                marks.append(len(stack))
            elif op.name == "DUP":
                stack.append(stack[-1])
            else:
                popped = _pop(op, stack, marks)
                if op.name in _HASHED and not all(popped[_HASHED[op.name]]):
                    raise CorruptCheckpointError(f"{path}: data.pkl: a key at byte {pos} is not a str or small int")
                if op.stack_after:  # a new object, or the container an APPEND... filled
                    stack.append(op.name in _SCALARS and _plain_key(arg))


def _pop(op: pickletools.OpcodeInfo, stack: list[bool], marks: list[int]) -> list[bool]:
    """The objects `op` takes off the stack (from the last mark for APPENDS, TUPLE...)."""
    if pickletools.markobject in op.stack_before:  # APPENDS etc.: the list below the mark, then the items
        start = marks.pop() - op.stack_before.index(pickletools.markobject)
    else:
        start = len(stack) - len(op.stack_before)
    if start < 0:
        raise IndexError("stack underflow")
    popped = stack[start:]
    del stack[start:]
    return popped


def _open_zip(f: BinaryIO, path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except Exception:
        raise CorruptCheckpointError(
            f"{path}: not a torch zip checkpoint (truncated, or saved by torch < 1.6 in the legacy format: "
            "re-save it with a current torch)"
        ) from None


def _prefix(names: list[str], source: Path) -> str:
    pickles = [n for n in names if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CorruptCheckpointError(f"{source}: not a torch zip checkpoint (found {len(pickles)} data.pkl entries)")
    return pickles[0][: -len("data.pkl")]


def load_torch_zip(path: str | Path) -> dict:
    """Unpickle a torch zip checkpoint; tensors come back as `LazyTensor`s that read on demand.

    Raises:
        UnsafeCheckpointError: the pickle references anything but tensors and containers.
        CorruptCheckpointError (a ValueError): naming the file (and tensor, storage or entry) when
            it is not a regular file holding a complete, well-formed torch zip checkpoint.
    """
    path = Path(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        with _open_zip(f, path) as zf, _errors(path, "the zip directory"):
            infos = {i.filename: i for i in zf.infolist()}
            prefix = _prefix(list(infos), path)
            order = b"little"  # torch < 1.10 wrote no byteorder entry
            if f"{prefix}byteorder" in infos:
                order = _read_entry(zf, path, size, infos[f"{prefix}byteorder"], 16).strip()
            if order not in (b"little", b"big"):
                raise CorruptCheckpointError(f"{path}: entry {prefix}byteorder is {order!r}")
            data = _read_entry(zf, path, size, infos[f"{prefix}data.pkl"], _MAX_PICKLE)
    _scan(data, path)
    with _errors(path, "data.pkl"):
        obj = _RestrictedUnpickler(data, path, size).load()
    obj = _materialize(obj, _Zip(path, size, prefix, order == b"big", infos), "", 0, {})
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path}: expected a dict at the top of data.pkl, found {type(obj).__name__}")
    return obj


def _materialize(obj: Any, z: _Zip, name: str, depth: int, done: dict[int, Any]) -> Any:
    """Tensor references -> LazyTensors, in fresh plain containers (attributes a pickle BUILD put on
    an OrderedDict are dropped); shared containers are converted once, so sharing cannot blow up."""
    if isinstance(obj, _TensorRef):
        return _lazy(obj, z, name)
    if not isinstance(obj, (dict, list, tuple)) or id(obj) in done:
        return done.get(id(obj), obj)
    if depth > _MAX_DEPTH:  # or a cycle: the recursion stays far from Python's limit
        raise CorruptCheckpointError(f"{z.path}: data.pkl nests deeper than {_MAX_DEPTH} levels at {name!r}")
    if isinstance(obj, dict):
        for k, v in dict.items(obj):
            if isinstance(v, _TensorRef) and type(k) is not str:
                raise CorruptCheckpointError(
                    f"{z.path}: tensor key {_show(k)} in {name or 'the top dict'!r} is not a string"
                )
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        out = kind((k, _materialize(v, z, _child(name, k), depth + 1, done)) for k, v in dict.items(obj))
    else:
        items = [_materialize(v, z, f"{name}[{i}]"[:200], depth + 1, done) for i, v in enumerate(obj)]
        out = tuple(items) if isinstance(obj, tuple) else items
    done[id(obj)] = out
    return out


def _child(name: str, key: Any) -> str:
    """`name.key`, for messages, cut short: a pickle can repeat one 4 MB key at every level."""
    key = key[:60] if type(key) is str else _show(key)
    return (f"{name}.{key}" if name else key)[:200]


def _view(ref: _TensorRef, z: _Zip, name: str) -> tuple[_StorageRef, int, tuple, tuple, int]:
    """(storage, offset, shape, stride, end): the view's arguments, checked against its storage so
    that every element read lies in [offset, end) within the storage's numel."""
    bad = f"{z.path}: tensor {name!r}:"
    if len(ref.args) < 4 or not isinstance(ref.args[0], _StorageRef):
        raise CorruptCheckpointError(f"{bad} _rebuild_tensor called without a storage")
    storage, offset, shape, stride = ref.args[:4]
    if not _is_count(offset):
        raise CorruptCheckpointError(f"{bad} storage offset {_show(offset)} is not a non-negative int")
    for what, dims in (("shape", shape), ("stride", stride)):
        if type(dims) is not tuple or len(dims) > _MAX_DIMS or not all(_is_count(d) for d in dims):
            raise CorruptCheckpointError(f"{bad} {what} {_show(dims)} is not a tuple of non-negative ints")
    if len(stride) != len(shape):
        raise CorruptCheckpointError(f"{bad} stride {stride} does not match shape {shape}")
    count = math.prod(shape)
    end = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if count else offset
    if end > storage.numel or count > storage.numel:
        raise CorruptCheckpointError(
            f"{bad} view (offset {offset}, shape {shape}, stride {stride}) runs past its storage "
            f"{storage.key} of {storage.numel} elements"
        )
    return storage, offset, shape, stride, end


def _lazy(ref: _TensorRef, z: _Zip, name: str) -> LazyTensor:
    storage, offset, shape, stride, end = _view(ref, z, name)
    np_dtype, dtype = _STORAGES[storage.storage.name]
    item = np.dtype(np_dtype).itemsize
    entry = f"{z.prefix}data/{storage.key}"
    if entry not in z.infos:
        raise CorruptCheckpointError(f"{z.path}: tensor {name!r}: storage {entry} is missing from the zip")
    _check_entry(z.path, z.size, z.infos[entry], storage.numel * item)

    def load() -> np.ndarray:
        if not math.prod(shape):
            return np.zeros(shape, np_dtype)
        with _errors(z.path, entry), _open_regular(z.path) as f, zipfile.ZipFile(f) as zf:
            info = zf.getinfo(entry)
            _check_entry(z.path, os.fstat(f.fileno()).st_size, info, storage.numel * item)  # may have changed
            with zf.open(info) as s:  # keep only [offset, end) of the storage: memory is the view's
                s.seek(offset * item)
                raw = s.read((end - offset) * item)
                while s.read(1 << 20):  # read the rest in bounded chunks, so that the CRC is checked
                    pass
        if len(raw) != (end - offset) * item:
            raise CorruptCheckpointError(f"{z.path}: storage {entry} is truncated")
        data = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder(">" if z.big_endian else "<"))
        view = np.lib.stride_tricks.as_strided(data, shape=shape, strides=tuple(s * item for s in stride))
        # a copy in native byte order (ascontiguousarray would make a 0-d tensor 1-d); bools are 0/1
        return view.view(np.uint8) != 0 if np_dtype is np.bool_ else np.array(view, dtype=np_dtype)

    return LazyTensor(shape=shape, dtype=dtype, load=load, source=str(z.path))
