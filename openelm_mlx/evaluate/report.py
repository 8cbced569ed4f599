"""Evaluation results in lm-eval's JSON shape: the cloze entry, the printed table (the paper's row beside ours for
a released size), and the `-o` file, written atomically and only over a results file of our own."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..folders.fs import check_output_file, write_file_atomic
from .cloze import ClozeResult
from .paper import PAPER_TASKS

MARKER = "openelm_mlx"  # the key that makes a results JSON ours (and so replaceable without --force)
MAX_RESULTS_BYTES = 64 << 20


def cloze_entry(result: ClozeResult) -> dict[str, Any]:
    """The cloze result as lm-eval writes a task's metrics (`"acc,none"`, `"acc_stderr,none"`, ...)."""
    return {
        "alias": "cloze",
        "acc,none": result.acc,
        "acc_stderr,none": result.acc_stderr,
        "acc_norm,none": result.acc_norm,
        "acc_norm_stderr,none": result.acc_norm_stderr,
        "acc_mi,none": result.acc_mi,
        "acc_mi_stderr,none": result.acc_mi_stderr,
        "samples": result.items,
    }


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric of every task in lm-eval's results dict."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if "_stderr" in name or not number or name in ("samples", "sample_len"):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            rows.append((task, name, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(results: dict[str, Any], paper: dict[str, float] | None = None, size: str | None = None) -> str:
    """A markdown table of every metric in percent (stderr beside it); with `paper`, its percent on each paper
    task's rows and the averages of both over the paper's tasks."""
    head = "| task | metric | ours (%) | ± |" + (f" paper {size} (%) |" if paper else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task, metric, value, stderr in metric_rows(results):
        err = f"{100 * stderr:.2f}" if stderr is not None and math.isfinite(stderr) else ""
        row = f"| {task} | {metric} | {100 * value:.2f} | {err} |"
        if paper:
            row += f" {paper[task]:.2f} |" if task in paper else " |"
        lines.append(row)
    if paper and all(t in results.get("results", {}) for t in PAPER_TASKS):  # the average over the paper's tasks
        for metric in ("acc", "acc_norm"):
            ours = [results["results"][t].get(f"{metric},none") for t in PAPER_TASKS]
            if all(isinstance(v, (int, float)) for v in ours):
                lines.append(f"| average | {metric} | {100 * sum(ours) / len(ours):.2f} | | {paper['average']:.2f} |")
    return "\n".join(lines)


def is_our_results(path: Path) -> bool:
    """True when `path` is a results JSON this command wrote (it carries the `openelm_mlx` marker)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_RESULTS_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get(MARKER), dict)


def check_results_file(path: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, an `-o` file that would lose something: an input, something not a regular file,
    or an existing file that is not an earlier results file of ours (unless `force`).

    Raises:
        OptionError: naming `output` or `force`.
    """
    path = Path(path)
    if path.is_dir():
        raise OptionError("output", f"{path} is a folder; name a .json file")
    return check_output_file(path, force or is_our_results(path), inputs, "inputs", "results", "output")


def write_results(path: str | Path, results: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Write `results` (lm-eval's dict) as JSON with our marker, through a temporary file and a rename."""
    data = {**results, MARKER: provenance}
    write_file_atomic(path, json.dumps(data, indent=2, default=_plain, ensure_ascii=False) + "\n")


def _plain(value: Any) -> Any:
    """What lm-eval's dicts hold that JSON lacks (numpy numbers, sets, callables) as plain values."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
