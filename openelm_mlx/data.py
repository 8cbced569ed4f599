"""Pretraining data: documents from text/JSONL files, tokenized once into a memory-mapped token file.

Batches are random `seq_len + 1` windows drawn from a generator seeded by (seed, step), so a
resumed run or a run split over ranks sees exactly the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


def data_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively: .txt/.md/.text/.jsonl/.json) into a sorted file list."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder has no .txt or .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: looks binary (NUL bytes); expected UTF-8 text or JSONL")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_documents(paths: Sequence[str | Path]) -> Iterator[str]:
    """Yield documents: a whole text file each, or the "text" field of each JSONL line.

    Raises:
        DataError: empty or binary file, bad JSON or missing "text" on line N.
    """
    for path in data_files(paths):
        text = _read_text(path)
        if path.suffix not in JSONL_SUFFIXES:
            yield text
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}, line {n}: no string "text" field')
            yield record["text"]


def _fingerprint(files: Sequence[Path], tokenizer_file: Path) -> str:
    h = hashlib.sha256(tokenizer_file.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenize_to_file(
    paths: Sequence[str | Path],
    encode: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
    vocab_size: int,
    tokenizer_file: Path,
    cache_dir: Path,
) -> Path:
    """Tokenize all documents as `BOS ids EOS` into `cache_dir/tokens-<hash>.bin`, reused if present.

    uint16 when the vocabulary fits, else uint32; written to a temporary file, then renamed.
    """
    files = data_files(paths)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    out = Path(cache_dir) / f"tokens-{_fingerprint(files, tokenizer_file)}.bin"
    if out.exists() and _token_meta(out) is not None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for doc in read_documents(files):
                f.write(np.asarray([bos_id, *encode(doc), eos_id], dtype=dtype).tobytes())
        meta = {"dtype": dtype.name, "tokens": tmp.stat().st_size // dtype.itemsize, "vocab_size": vocab_size}
        out.with_suffix(".json").write_text(json.dumps(meta))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _token_meta(path: Path) -> dict | None:
    """The token file's recorded dtype and length, or None when missing or not matching the file."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        dtype = np.dtype({"uint16": np.uint16, "uint32": np.uint32}[meta["dtype"]])
        ok = isinstance(meta["tokens"], int) and meta["tokens"] * dtype.itemsize == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**meta, "dtype": dtype} if ok else None


@dataclass
class TokenData:
    """Train/held-out token streams over a memory-mapped token file."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def open(cls, path: Path, val_fraction: float, seq_len: int) -> TokenData:
        """Memory-map a token file written by `tokenize_to_file`."""
        meta = _token_meta(path)
        if meta is None:
            raise DataError(f"{path}: token file without valid metadata ({path.with_suffix('.json').name}); delete it")
        dtype = meta["dtype"]
        return cls.from_tokens(np.memmap(path, dtype=dtype, mode="r"), val_fraction, seq_len, str(path))

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float, seq_len: int, source: str = "data") -> TokenData:
        """Hold out the last `val_fraction` of the stream (at least one window)."""
        n_val = int(len(tokens) * val_fraction) if val_fraction > 0 else 0
        if n_val and n_val < seq_len + 1:
            n_val = seq_len + 1
        if len(tokens) - n_val < seq_len + 2:
            raise DataError(f"{source}: {len(tokens)} tokens is too few for seq_len {seq_len} (+ held-out split)")
        return cls(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val :])

    def batch(
        self, step: int, seed: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """This rank's slice of the global batch for `step`: (inputs, targets), each (batch_size, seq_len).

        The global batch (batch_size * world windows) depends only on (seed, step).
        """
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq_len - 1, size=batch_size * world)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        windows = np.stack([self.train[s : s + seq_len + 1] for s in mine]).astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fixed, evenly spaced held-out windows (the same every evaluation)."""
        n = len(self.val) - seq_len - 1
        if n < 0:
            return []
        count = min(max_batches * batch_size, max(1, n // seq_len + 1))
        starts = np.linspace(0, n, num=count).astype(np.int64)
        windows = np.stack([self.val[s : s + seq_len + 1] for s in starts]).astype(np.int32)
        return [
            (windows[i : i + batch_size, :-1], windows[i : i + batch_size, 1:])
            for i in range(0, len(windows), batch_size)
        ]
