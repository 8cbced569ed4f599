"""The cloze check: multiple choice on a plain text file (the true next line against three lines drawn from
elsewhere in the file), scored with `scoring.loglikelihood`; no lm-eval needed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from ..errors import DataError, check_range
from ..training.data import read_documents
from .scoring import encode_pair, loglikelihood, mean_stderr

CONTEXT_LINES = 4
NUM_CHOICES = 4


@dataclass(frozen=True)
class ClozeItem:
    """The lines before a line (`context`), candidate next lines (`choices`), the index of the true one (`gold`)."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ClozeResult:
    """Accuracy by summed log-likelihood (`acc`) and per character of the choice (`acc_norm`, lm-eval's rule)."""

    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
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
        true = lines[i]
        distractors: list[str] = []
        while len(distractors) < NUM_CHOICES - 1:
            j = rng.choice(pool)
            if abs(j - i) > context_lines and lines[j] != true and lines[j] not in distractors:
                distractors.append(lines[j])
        gold = rng.randrange(NUM_CHOICES)
        choices = distractors[:gold] + [true] + distractors[gold:]
        items.append(ClozeItem("\n".join(lines[i - context_lines : i]) + "\n", tuple(choices), gold))
    return items


def score_cloze(
    model: nn.Module, tokenizer: Any, items: Sequence[ClozeItem], batch_size: int = 16, progress: bool = False
) -> ClozeResult:
    """Accuracy of `model` on `items`: each choice is a continuation of the item's context (BOS once)."""
    if not items:
        raise DataError("no cloze items to score")
    requests = [encode_pair(tokenizer, item.context, choice) for item in items for choice in item.choices]
    scores = iter(loglikelihood(model, requests, batch_size, progress))
    acc, acc_norm = [], []
    for item in items:
        lls = [next(scores).logprob for _ in item.choices]
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, item.choices)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == item.gold))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == item.gold))
    return ClozeResult(
        sum(acc) / len(acc), mean_stderr(acc), sum(acc_norm) / len(acc_norm), mean_stderr(acc_norm), len(items)
    )


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
    return score_cloze(model, tokenizer, make_cloze_items(text, str(path), limit, seed), batch_size, progress)
