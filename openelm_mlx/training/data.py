"""Training data. Pretraining: documents tokenized once into a memory-mapped token file, batches of
random windows. Fine-tuning: JSONL examples (text, prompt/completion or chat) with loss masks, padded
into batches. Either way a batch depends only on (seed, step), so resumed and multi-rank runs match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataError, OptionError
from ..folders.fs import entry_problem
from ..generation.template import check_message, split_replies
from ..generation.tokenizer import valid_unicode

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
log = logging.getLogger("openelm_mlx")


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
            problem = entry_problem(p)
            raise DataError(f"{p}: {'no such file or folder' if problem == 'no such file' else problem}")
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
        for where, record in jsonl_lines(path, text):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{where}: no string "text" field')
            yield valid_unicode(record["text"])  # a JSON "\\ud800" is not text SentencePiece can take


def jsonl_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) for each non-empty line of a JSONL file's `text`, `where` being "file, line N".

    Raises:
        DataError: naming the line, for invalid or runaway-nested JSON.
    """
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{where}: invalid JSON ({getattr(e, 'msg', 'too deeply nested')})") from None
        yield where, value


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


# ---------------------------------------------------------------------------------------------
# Fine-tuning data: {"text"}, {"prompt", "completion"} or {"messages"} lines of train/valid/test.jsonl.

PAD_MULTIPLE = 8  # batch lengths are rounded up to this, so the compiled step sees few shapes


class FinetuneTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def encode_chat_text(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One tokenized example: `ids` and, for each target `ids[1:]`, whether it counts in the loss."""

    ids: np.ndarray  # int32 (L,)
    weights: np.ndarray  # float32 (L - 1,)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        try:
            check_message(m, i)
        except OptionError as e:
            raise DataError(f"{where}: {e.detail}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant turn (nothing to learn)")


def check_record(record: Any, where: str) -> str:
    """The record's kind ("text", "completion" or "chat"); DataError naming `where` if malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in record:
        _check_messages(record["messages"], where)
        return "chat"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f'{where}: "{key}" must be a string')
        return "completion"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f'{where}: "text" must be a string')
        return "text"
    raise DataError(f'{where}: needs "text", "prompt" and "completion", or "messages"')


def read_records(path: Path) -> list[tuple[str, dict]]:
    """The JSONL records of `path` as (where, record), `where` being "file, line N".

    Raises:
        DataError: missing, empty or binary file; invalid JSON, missing keys or wrong types on line N.
    """
    if (problem := entry_problem(path)) is not None:
        raise DataError(f"{path}: {problem}")
    records = list(jsonl_lines(path, _read_text(path)))
    for where, record in records:
        check_record(record, where)
    return records


def _chat_segments(messages: list[dict], tok: FinetuneTokenizer) -> list[tuple[list[int], bool]]:
    """Token segments of a chat, (ids, is_assistant_reply): each prompt part is tokenized exactly as the
    Instruct template renders it at inference, each reply as its text followed by EOS."""
    segments = []
    for prompt, reply in split_replies(messages):
        segments.append((tok.encode_chat_text(prompt), False))
        segments.append(([*tok.encode(reply, add_bos=False), tok.eos_id], True))
    return segments


def encode_record(record: dict, tok: FinetuneTokenizer, mask_prompt: bool) -> tuple[list[int], list[bool]]:
    """Token ids (BOS first, EOS last) and a per-token "counts in the loss" flag.

    With `mask_prompt`, only completion / assistant tokens count; otherwise every token does.
    """
    if "messages" in record:
        segments = _chat_segments(record["messages"], tok)
    elif "prompt" in record:
        segments = [
            (tok.encode(record["prompt"], add_bos=False), False),
            ([*tok.encode(record["completion"], add_bos=False), tok.eos_id], True),
        ]
    else:
        segments = [([*tok.encode(record["text"], add_bos=False), tok.eos_id], True)]
    ids, counts = [tok.bos_id], [False]
    for seg, learn in segments:
        ids.extend(seg)
        counts.extend([learn or not mask_prompt] * len(seg))
    return ids, counts


def load_split(path: Path, tok: FinetuneTokenizer, max_seq_len: int, mask_prompt: bool = False) -> FinetuneData:
    """Read and tokenize one JSONL split; examples longer than `max_seq_len` tokens are cut (one warning)."""
    examples, cut = [], 0
    for _, record in read_records(path):
        ids, counts = encode_record(record, tok, mask_prompt)
        if len(ids) > max_seq_len:
            ids, counts, cut = ids[:max_seq_len], counts[:max_seq_len], cut + 1
        examples.append(Example(np.asarray(ids, np.int32), np.asarray(counts[1:], np.float32)))
    if not examples:
        raise DataError(f"{path}: file has no examples")
    if not any(e.weights.any() for e in examples):
        raise DataError(f"{path}: no token is left to learn from (the completions are masked or cut at {max_seq_len})")
    if cut:
        log.warning(
            "%s: %d of %d examples are longer than %d tokens and were truncated", path, cut, len(examples), max_seq_len
        )
    return FinetuneData(examples, str(path))


def collate(examples: Sequence[Example], pad_multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, ...]:
    """(inputs, targets, loss weights), each (B, L): right-padded with id 0 and weight 0."""
    longest = max(len(e.weights) for e in examples)
    length = max(1, math.ceil(longest / pad_multiple) * pad_multiple)
    inputs = np.zeros((len(examples), length), np.int32)
    targets = np.zeros((len(examples), length), np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for i, e in enumerate(examples):
        n = len(e.weights)
        inputs[i, :n], targets[i, :n], weights[i, :n] = e.ids[:-1], e.ids[1:], e.weights
    return inputs, targets, weights


@dataclass
class FinetuneData:
    """Tokenized fine-tuning examples; each epoch visits them in an order seeded by (seed, epoch)."""

    examples: list[Example]
    source: str = "data"
    # the order of the last (seed, epoch) asked for: a batch's examples mostly share one epoch
    _order_cache: dict[tuple[int, int], np.ndarray] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of the examples that epoch `epoch` visits."""
        if (seed, epoch) not in self._order_cache:
            self._order_cache.clear()
            self._order_cache[(seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(len(self.examples))
        return self._order_cache[(seed, epoch)]

    def batch(self, index: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> tuple[np.ndarray, ...]:
        """This rank's part of global micro-batch `index` (batch_size * world examples): see `collate`."""
        n, size = len(self.examples), batch_size * world
        positions = range(index * size + rank * batch_size, index * size + (rank + 1) * batch_size)
        return collate([self.examples[self._order(seed, p // n)[p % n]] for p in positions])

    def eval_batches(self, batch_size: int, max_batches: int = 0) -> list[tuple[np.ndarray, ...]]:
        """Fixed batches in file order (all of them when `max_batches` is 0)."""
        starts = range(0, len(self.examples), batch_size)
        if max_batches:
            starts = starts[:max_batches]
        return [collate(self.examples[s : s + batch_size]) for s in starts]
