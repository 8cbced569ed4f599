"""Log-likelihood of (context, continuation) requests on token ids, as lm-eval-harness asks for them: BOS once,
the context/continuation split made on token ids, shared contexts prefilled once, rows batched with right padding,
left truncation only when the whole continuation still fits, and rolling windows for long documents."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..errors import DataError, check_range
from ..model.decoder import Kernels
from ..model.step import RopeTables, default_exp, exp_kernels, power_exp

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, BOS included; continuation ids)
LOGITS_BUDGET = 1 << 26  # floats of logits held at once (256 MB in float32): rows are scored in slices


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability (nats), whether greedy decoding would produce it, its token count."""

    logprob: float
    is_greedy: bool
    tokens: int


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context ids, continuation ids) for a request, split on token ids.

    The text `context + continuation` is encoded once; the context is the longest common token prefix of that
    encoding and of `context` encoded alone, the continuation the rest. So the two parts always concatenate to the
    text's own tokenization: where SentencePiece merges characters across the boundary ("foo" + "bar" -> "foobar"),
    the merged token belongs to the continuation and is scored, never silently dropped or split. Trailing spaces of
    the context move to the continuation by the same rule. BOS is prepended exactly once, as Apple evaluated
    (lm-eval's `add_bos_token=True`); an empty context is BOS alone.

    Raises:
        DataError: the continuation has no tokens of its own.
    """
    whole = tokenizer.encode(context + continuation, add_bos=False)
    n = common_prefix_length(tokenizer.encode(context, add_bos=False), whole)
    if n == len(whole):
        raise DataError(f"the continuation {continuation[:40]!r} has no tokens of its own (context {context[-40:]!r})")
    return [tokenizer.bos_id, *whole[:n]], whole[n:]


def fit_context(context: Sequence[int], continuation: Sequence[int], max_length: int, index: int = 0) -> list[int]:
    """`context` cut from the left so that the model's input (context + continuation minus its last token) fits
    `max_length` tokens; the continuation is never cut.

    Raises:
        DataError: naming request `index` when even one context token and the whole continuation do not fit.
    """
    excess = len(context) + len(continuation) - 1 - max_length
    if excess <= 0:
        return list(context)
    if len(continuation) > max_length:
        raise DataError(
            f"request {index}: its continuation has {len(continuation)} tokens, more than the model's context of "
            f"{max_length}; it cannot be scored without cutting it"
        )
    return list(context[excess:])


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> None:
    if not ids:
        raise DataError(f"{what} is empty")
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab for t in ids):
        raise DataError(f"{what}: token ids must be whole numbers in [0, {vocab})")


def loglikelihood(
    model: nn.Module,
    requests: Sequence[Request],
    batch_size: int = 16,
    progress: bool = False,
    max_length: int | None = None,
    share_contexts: bool = True,
) -> list[Score]:
    """Score each continuation given its context (ids; the context carries its own BOS, see `encode_pair`).

    Requests that share a context form a group, packed together (`_pack`): the context runs once and each
    continuation sees it and itself only, at the positions after the context (so no position passes the window).
    Up to `batch_size` continuations go through the model together, their packs end to end in one row with no
    padding (`_flat_kernels`). Contexts longer than the window are cut from the left (`fit_context`; a warning counts
    them).

    Args:
        model: an OpenELM `Model` (its `transformer` and `head` are called, so only scored positions get logits).
        max_length: the window (default: the model's `max_context_length`).
        progress: a tqdm bar on stderr with requests done and tokens/s.
        share_contexts: False runs every request as its own row, its context included (benchmarks/eval_speed.py
            measures both ways).

    Raises:
        DataError: naming a request whose ids are bad or whose continuation cannot fit.
    """
    check_range("batch_size", batch_size, 1, integer=True)
    max_length = max_length or model.config.max_context_length
    vocab = model.config.vocab_size
    fitted: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    cut = 0
    for i, (ctx, cont) in enumerate(requests):
        _check_ids(ctx, vocab, f"request {i}: the context")
        _check_ids(cont, vocab, f"request {i}: the continuation")
        kept = fit_context(ctx, cont, max_length, i)
        cut += len(kept) < len(ctx)
        fitted.append((tuple(int(t) for t in kept), tuple(int(t) for t in cont)))
    if cut:
        warnings.warn(
            f"{cut} context(s) longer than the model's window of {max_length} tokens were cut from the left",
            stacklevel=2,
        )
    results: list[Score | None] = [None] * len(fitted)
    bar = tqdm(total=len(fitted), desc="loglikelihood", unit="req", disable=not progress, leave=False)
    tic, tokens = time.perf_counter(), 0
    for batch in _batches(fitted, batch_size, share_contexts):
        tokens += _score_batch(model, batch, fitted, results)
        bar.update(sum(len(rows) for _, rows in batch))
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - tic, 1e-9):.0f} tok/s", refresh=False)
    bar.refresh()  # tqdm draws at most every 0.1 s: without this the last drawn state (e.g. 75%) is what stays
    bar.close()
    return results  # type: ignore[return-value]


Piece = tuple[tuple[int, ...], list[int]]  # a context and the indices of (some of) its requests


def _batches(
    fitted: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], batch_size: int, share: bool = True
) -> list[list[Piece]]:
    """Groups of requests sharing a context, cut to at most `batch_size` rows, packed into batches longest first."""
    groups: dict[Any, list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(ctx if share else i, []).append(i)
    pieces: list[Piece] = []
    for rows in groups.values():
        ctx = fitted[rows[0]][0]
        rows.sort(key=lambda r: -len(fitted[r][1]))
        pieces += [(ctx, rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]
    pieces.sort(key=lambda p: -(len(p[0]) + len(fitted[p[1][0]][1])))
    batches: list[list[Piece]] = [[]]
    for piece in pieces:
        if batches[-1] and sum(len(r) for _, r in batches[-1]) + len(piece[1]) > batch_size:
            batches.append([])
        batches[-1].append(piece)
    return [b for b in batches if b]


def _pack(ctx: Sequence[int], conts: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """One row holding a context and its continuations' inputs, `ctx + c1[:-1] + c2[:-1] + ...`: the tokens, their
    positions (each continuation goes on from the context's end) and, per continuation, the row index whose hidden
    state predicts each of its tokens (the first from the context's last token)."""
    tokens, positions, predictors = list(ctx), list(range(len(ctx))), []
    for cont in conts:
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(ctx), len(ctx) + len(cont) - 1)
        predictors.append([len(ctx) - 1] + list(range(start, start + len(cont) - 1)))
    return tokens, positions, predictors


@dataclass(frozen=True)
class _Attend:
    """One block of a flat batch's attention: queries `[start, stop)` see the keys of `keys` (ranges of the flat
    sequence, concatenated) under `mask` (queries, keys)."""

    start: int
    stop: int
    keys: tuple[tuple[int, int], ...]
    mask: mx.array


def _plan(offset: int, context: int, lengths: Sequence[int]) -> list[_Attend]:
    """The attention blocks of one pack at `offset` (`_pack`'s layout: `context` tokens, then continuation inputs
    of `lengths`): a lone continuation is one causal row; otherwise the context is causal on itself and each
    continuation sees the whole context and its own earlier tokens, so no score is made between two continuations
    (at four continuations per context that is under half the scores of the pack's full square)."""
    total = context + sum(lengths)
    if len(lengths) == 1:
        return [_Attend(offset, offset + total, ((offset, offset + total),), _causal(total, 0))]
    blocks = [_Attend(offset, offset + context, ((offset, offset + context),), _causal(context, 0))]
    start = offset + context
    for n in lengths:
        if n:
            keys = ((offset, offset + context), (start, start + n))
            blocks.append(_Attend(start, start + n, keys, _causal(n, context)))
        start += n
    return blocks


def _causal(queries: int, seen: int) -> mx.array:
    """(queries, seen + queries): every query sees the first `seen` keys and the keys up to its own."""
    return mx.array(np.tri(queries, seen + queries, seen, dtype=bool))


def _flat_kernels(positions: mx.array, blocks: Sequence[_Attend]) -> Kernels:
    """Kernels for a batch laid end to end in one row (no padding): RoPE at each token's own position, attention
    block by block (`_Attend`). SiLU and softmax use the decode step's exp choice (`model.step.default_exp`: on
    x86-64 CPUs MLX's exp is 3x slower than a power; softmax was most of the time)."""
    kernels, tables = exp_kernels(default_exp()), RopeTables()

    def rope(x: mx.array, head_dim: int, base: float, _offset: Any) -> mx.array:
        return tables(x, head_dim, base, positions)

    def attention(q: mx.array, k: mx.array, v: mx.array, cache: Any, scale: float, **_: Any) -> mx.array:
        def gather(x: mx.array, ranges: tuple[tuple[int, int], ...]) -> mx.array:
            parts = [x[:, :, a:b] for a, b in ranges]
            return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

        outs = [
            kernels.attention(q[:, :, b.start : b.stop], gather(k, b.keys), gather(v, b.keys), None, scale, b.mask)
            for b in blocks
        ]
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    return Kernels(silu=kernels.silu, rope=rope, attention=attention)


def _score_batch(
    model: nn.Module,
    batch: list[Piece],
    fitted: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    results: list[Score | None],
) -> int:
    """Score one batch into `results`. Each context and its continuations are packed (`_pack`), so a shared context
    runs once, and the packs are laid end to end in one row (`_flat_kernels`), so no token is padding. Returns the
    tokens run."""
    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[_Attend] = []
    rows_index, targets, owners = [], [], []
    for ctx, rows in batch:
        conts = [fitted[r][1] for r in rows]
        t, p, preds = _pack(ctx, conts)
        offset = len(tokens)
        blocks += _plan(offset, len(ctx), [len(c) - 1 for c in conts])
        for r, pred in zip(rows, preds):
            rows_index += [offset + i for i in pred]
            targets += fitted[r][1]
            owners += [r] * len(pred)
        tokens += t
        positions += p
    kernels = _flat_kernels(mx.array([positions], mx.int32), blocks)
    hidden = model.transformer(mx.array([tokens], mx.uint32), kernels=kernels)[0]  # (N, D)
    logprobs, hits = _token_scores(model, hidden[mx.array(rows_index)], mx.array(targets))
    sums: dict[int, float] = {}
    greedy: dict[int, bool] = {}
    for r, lp, hit in zip(owners, logprobs, hits):
        sums[r] = sums.get(r, 0.0) + lp
        greedy[r] = greedy.get(r, True) and hit
    for r, total in sums.items():
        results[r] = Score(total, greedy[r], len(fitted[r][1]))
    return len(tokens)


def _logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis with the decode step's exp choice (over a 32k vocabulary MLX's scalar exp was
    most of the scoring time on x86-64)."""
    if default_exp() == "native":
        return mx.logsumexp(x, axis=-1)
    m = x.max(axis=-1)
    return m + mx.log(power_exp(x - m[:, None]).sum(axis=-1))


def _token_scores(model: nn.Module, hidden: mx.array, targets: mx.array) -> tuple[list[float], list[bool]]:
    """Per scored token (hidden (N, D), targets (N,)): its float32 log-probability, and whether it was the argmax."""
    step = max(1, LOGITS_BUDGET // model.config.vocab_size)
    logprobs: list[float] = []
    hits: list[bool] = []
    for s in range(0, hidden.shape[0], step):
        logits = model.head(hidden[s : s + step]).astype(mx.float32)  # (n, vocab)
        chosen = mx.take_along_axis(logits, targets[s : s + step, None], axis=-1)[:, 0]
        lp = chosen - _logsumexp(logits)
        hit = logits.argmax(-1) == targets[s : s + step]
        mx.eval(lp, hit)
        logprobs += lp.tolist()
        hits += hit.tolist()
    return logprobs, hits


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Request]:
    """lm-eval's rolling windows (`get_rolling_token_windows` with context_len=1, made disjoint): every token is
    predicted exactly once; the first window is conditioned on `prefix_token` (BOS), every later one on as many of
    the preceding tokens as fit the window, so each input is `max_length` tokens."""
    check_range("max_length", max_length, 1, integer=True)
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows: list[Request] = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        windows.append((tokens[end - max_length - 1 : end - n], tokens[end - n : end]))
        predicted = end
    return windows


def loglikelihood_rolling(
    model: nn.Module,
    documents: Sequence[Sequence[int]],
    bos_id: int,
    batch_size: int = 16,
    progress: bool = False,
    max_length: int | None = None,
) -> list[float]:
    """The log-likelihood of each whole document (ids without BOS), over `rolling_windows` of the model's context.

    Raises:
        DataError: a document is empty or holds bad ids.
    """
    max_length = max_length or model.config.max_context_length
    requests: list[Request] = []
    owner: list[int] = []
    for d, doc in enumerate(documents):
        _check_ids(doc, model.config.vocab_size, f"document {d}")
        windows = rolling_windows(doc, bos_id, max_length)
        requests += windows
        owner += [d] * len(windows)
    totals = [0.0] * len(documents)
    for d, score in zip(owner, loglikelihood(model, requests, batch_size, progress, max_length)):
        totals[d] += score.logprob
    return totals


def mean_stderr(values: Sequence[float]) -> float:
    """The standard error of a mean (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
