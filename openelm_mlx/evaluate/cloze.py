"""The cloze check: multiple choice on a plain text file (the true next line against three lines drawn from
elsewhere in the file), scored with `scoring.loglikelihood`; no lm-eval needed."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ..errors import DataError, check_range
from ..training.data import JSONL_SUFFIXES, read_documents
from .scoring import encode_pair, loglikelihood, mean_stderr

CONTEXT_LINES = 4
NUM_CHOICES = 4
LINE_START = "\n"  # the context of the unconditional score in acc_mi


@dataclass(frozen=True)
class ClozeItem:
    """The lines before a line (`context`), candidate next lines (`choices`), the index of the true one (`gold`)."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ClozeResult:
    """Accuracy by summed log-likelihood (`acc`), by log-likelihood per character of the choice (`acc_norm`,
    lm-eval's rule), and by how much the context raises a choice's log-likelihood over the same line at a line
    start (`acc_mi`, pointwise mutual information: it cancels how likely a line is anyway, which otherwise drowns
    what a small model knows about the context)."""

    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    acc_mi: float
    acc_mi_stderr: float
    items: int


def make_cloze_items(
    text: str, source: str = "text", limit: int | None = None, seed: int = 0, context_lines: int = CONTEXT_LINES
) -> list[ClozeItem]:
    """Items for each non-empty line that follows `context_lines` lines holding some text; the three distractors
    are distinct non-empty lines from outside the item's window, the true line's place among the choices is drawn
    too. All draws use a `random.Random(seed)` of their own. `limit` keeps that many items, drawn evenly at random.

    Raises:
        DataError: naming `source` when it has too few distinct lines to make an item.
    """
    check_range("limit", limit, 1, integer=True)
    lines = text.splitlines()
    pool = [i for i, line in enumerate(lines) if line.strip()]
    targets = [i for i in pool if i >= context_lines and any(s.strip() for s in lines[i - context_lines : i])]
    if len({lines[i] for i in pool}) < 2 * NUM_CHOICES or not targets:
        raise DataError(f"{source}: too few distinct non-empty lines for a cloze test (need {2 * NUM_CHOICES})")
    rng = random.Random(seed)
    if limit is not None and limit < len(targets):
        targets = sorted(rng.sample(targets, limit))
    items = []
    for i in targets:
        distractors = _distractors(lines, pool, i, context_lines, rng)
        if distractors is None:
            continue
        gold = rng.randrange(NUM_CHOICES)
        choices = distractors[:gold] + [lines[i]] + distractors[gold:]
        items.append(ClozeItem("\n".join(lines[i - context_lines : i]) + "\n", tuple(choices), gold))
    if not items:
        raise DataError(f"{source}: no line has three distinct other lines outside its context to compete with")
    return items


def _distractors(
    lines: Sequence[str], pool: Sequence[int], i: int, context_lines: int, rng: random.Random
) -> list[str] | None:
    """Three distinct lines unlike line `i`, from outside its window (None when the file has too few)."""

    def fits(j: int, chosen: list[str]) -> bool:
        return abs(j - i) > context_lines and lines[j] != lines[i] and lines[j] not in chosen

    chosen: list[str] = []
    for _ in range(64 * NUM_CHOICES):  # rejection sampling: quick on any real text
        j = rng.choice(pool)
        if fits(j, chosen):
            chosen.append(lines[j])
            if len(chosen) == NUM_CHOICES - 1:
                return chosen
    rest = [j for j in pool if fits(j, chosen)]  # a small or repetitive file: draw from what is left
    while rest and len(chosen) < NUM_CHOICES - 1:
        j = rest.pop(rng.randrange(len(rest)))
        if fits(j, chosen):
            chosen.append(lines[j])
    return chosen if len(chosen) == NUM_CHOICES - 1 else None


def score_cloze(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[ClozeItem],
    batch_size: int = 16,
    progress: bool = False,
    where: Callable[[str], str] = lambda line: f"the line {line[:40]!r}",
) -> ClozeResult:
    """Accuracy of `model` on `items`: each choice is a continuation of the item's context (BOS once).

    Raises:
        DataError: no items, or a choice longer than the model's context (named by `where(line)`).
    """
    if not items:
        raise DataError("no cloze items to score")
    choices = [c for item in items for c in item.choices]
    requests = [encode_pair(tokenizer, item.context, c) for item in items for c in item.choices]
    requests += [encode_pair(tokenizer, LINE_START, c) for c in choices]
    limit = model.config.max_context_length
    for (_, continuation), line in zip(requests, choices * 2):
        if len(continuation) > limit:  # scoring never cuts a continuation
            raise DataError(
                f"{where(line)}: {len(continuation)} tokens, more than the model's context of {limit}; a line is "
                "scored whole"
            )
    scores = [s.logprob for s in loglikelihood(model, requests, batch_size, progress)]
    conditional, unconditional = scores[: len(choices)], scores[len(choices) :]
    acc: list[float] = []
    acc_norm: list[float] = []
    acc_mi: list[float] = []
    start = 0
    for item in items:
        lls = conditional[start : start + len(item.choices)]
        base = unconditional[start : start + len(item.choices)]
        start += len(item.choices)
        acc.append(_hit(lls, item.gold))
        acc_norm.append(_hit([ll / max(len(c), 1) for ll, c in zip(lls, item.choices)], item.gold))
        acc_mi.append(_hit([ll - b for ll, b in zip(lls, base)], item.gold))
    n = len(items)
    return ClozeResult(
        sum(acc) / n,
        mean_stderr(acc),
        sum(acc_norm) / n,
        mean_stderr(acc_norm),
        sum(acc_mi) / n,
        mean_stderr(acc_mi),
        n,
    )


def _hit(values: Sequence[float], gold: int) -> float:
    return float(max(range(len(values)), key=values.__getitem__) == gold)


def evaluate_cloze(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> ClozeResult:
    """`score_cloze` on the items of a text file (or .jsonl of {"text": ...} lines, read like training data).

    Raises:
        DataError: naming the file when it is missing, empty, binary or too short.
    """
    text = "\n".join(read_documents([path]))
    # a text file's lines, counted as editors count them (make_cloze_items splits as str.splitlines, which also ends a
    # line at a form feed or U+2028: such a line is named by its text instead)
    lines = [] if Path(path).suffix in JSONL_SUFFIXES else [s.removesuffix("\r") for s in text.split("\n")]

    def where(line: str) -> str:
        return f"{path}:{lines.index(line) + 1}" if line in lines else f"{path}: the line {line[:40]!r}"

    items = make_cloze_items(text, str(path), limit, seed)
    return score_cloze(model, tokenizer, items, batch_size, progress, where)
