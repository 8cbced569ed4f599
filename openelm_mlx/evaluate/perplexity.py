"""Language-model quality on text: token windows with BOS, perplexity, and the KL divergence of one
model's next-token distribution from another's (the float model's, for quantization)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..errors import DataError, OptionError, check_range
from ..model.loss import lm_loss
from ..training.data import read_documents


@dataclass
class Perplexity:
    """Perplexity over `tokens` scored tokens in `windows` windows; `nll` is the mean loss (nats)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int


def read_tokens(tokenizer: Any, paths: Sequence[str | Path]) -> list[int]:
    """Token ids of the documents in `paths` (no BOS; EOS between documents).

    Raises:
        DataError: naming the file when it is missing, empty, binary or bad JSONL.
    """
    ids: list[int] = []
    for doc in read_documents(paths):
        if ids:
            ids.append(tokenizer.eos_id)
        ids.extend(tokenizer.encode(doc, add_bos=False))
    return ids


def make_windows(
    tokens: Sequence[int], seq_len: int, bos_id: int, num_samples: int | None = None, source: str = "text"
) -> mx.array:
    """Non-overlapping windows `[BOS, t_1 .. t_seq_len]`, shape (N, seq_len + 1); every t_i is scored.

    Args:
        num_samples: keep this many windows, evenly spaced over the text (default: all).

    Raises:
        DataError: naming `source` when it holds fewer than 2 tokens.
    """
    check_range("seq_len", seq_len, 1, integer=True)
    check_range("num_samples", num_samples, 1, integer=True)
    if len(tokens) < 2:
        raise DataError(f"{source}: {len(tokens)} tokens is too few to measure perplexity")
    seq_len = min(seq_len, len(tokens))
    n = len(tokens) // seq_len
    body = np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    if num_samples is not None and num_samples < n:
        body = body[np.linspace(0, n - 1, num=num_samples).astype(np.int64)]
    return mx.array(np.concatenate([np.full((len(body), 1), bos_id, np.int32), body], axis=1))


def text_windows(tokenizer: Any, paths: Sequence[str | Path], seq_len: int, num_samples: int | None = None) -> mx.array:
    """`make_windows` over the documents in `paths`."""
    return make_windows(read_tokens(tokenizer, paths), seq_len, tokenizer.bos_id, num_samples, str(paths[0]))


DEFAULT_SEQ_LEN = 256  # tokens per window, unless the model's context is shorter
SEQ_LEN_HELP = f"Tokens per window (default: {DEFAULT_SEQ_LEN}, or the model's context if shorter)."


def window_length(config: Any, seq_len: int | None = None) -> tuple[int, str | None]:
    """The window length for a model: `seq_len` checked against its context, or by default DEFAULT_SEQ_LEN
    shrunk to the context, with a note saying so (else None).

    Raises:
        OptionError: a given `seq_len` past the model's context.
    """
    if seq_len is not None:
        check_context(config, seq_len)
        return seq_len, None
    limit = config.max_context_length
    if DEFAULT_SEQ_LEN <= limit:
        return DEFAULT_SEQ_LEN, None
    return limit, f"windows of {limit} tokens, the model's max_context_length (the default is {DEFAULT_SEQ_LEN})"


def check_context(config: Any, seq_len: int) -> None:
    """Windows must fit the model's context (`config.max_context_length`): past it, RoPE runs but the
    scores mean nothing, and training there teaches nothing the model will use."""
    limit = config.max_context_length
    if seq_len > limit:
        raise OptionError("seq_len", f"{seq_len} is more than the model's max_context_length {limit}")


def _batches(windows: mx.array, batch_size: int, progress: bool, desc: str):
    check_range("batch_size", batch_size, 1, integer=True)
    starts = range(0, len(windows), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield windows[s : s + batch_size]


def perplexity(model: nn.Module, windows: mx.array, batch_size: int = 8, progress: bool = False) -> Perplexity:
    """Perplexity of `model` on `windows` (from `make_windows`); a tqdm bar on stderr with `progress`.

    Raises:
        OptionError: windows longer than the model's context (`seq_len`).
    """
    check_context(model.config, windows.shape[1] - 1)
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size, progress, "perplexity"):
        loss, n = lm_loss(model, batch[:, :-1], batch[:, 1:])
        total += loss.item() * n.item()
        count += n.item()
    nll = total / count
    return Perplexity(math.exp(nll) if nll < 700 else math.inf, nll, count, len(windows))


def log_probs(logits: mx.array) -> mx.array:
    """Next-token log-probabilities (float32) from logits (..., vocab)."""
    return nn.log_softmax(logits.astype(mx.float32), axis=-1)


def kl_divergence(ref_logprobs: mx.array, logits: mx.array) -> mx.array:
    """KL(reference || model) in nats per position, from the reference's `log_probs` and the model's logits.

    Returns:
        Shape of `logits` without its last (vocab) axis.
    """
    return (mx.exp(ref_logprobs) * (ref_logprobs - log_probs(logits))).sum(-1)


def mean_kl(
    reference: nn.Module, model: nn.Module, windows: mx.array, batch_size: int = 8, progress: bool = False
) -> float:
    """Mean over tokens of KL(reference's next-token distribution || model's), in nats."""
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size, progress, "KL divergence"):
        total += kl_divergence(log_probs(reference(batch[:, :-1])), model(batch[:, :-1])).sum().item()
        count += batch[:, 1:].size
    return total / count
