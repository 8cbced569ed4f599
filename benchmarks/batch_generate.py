"""Batched generation on the engine against one prompt at a time, and single-stream speed against an older checkout.

1. `generate(model, tok, [8 prompts])` vs the same 8 prompts one after another (tokens/s of each, alternated).
2. With --baseline OLD_CHECKOUT: single-stream decode tokens/s of this checkout and the old one on the same weights,
   both imported in one process (the old one under another name), whole runs in turn.

    python benchmarks/batch_generate.py [--arch OpenELM-270M | demo] [--prompts 8] [-g 64] [--baseline DIR]
        [--single-tokens 300] [--repeats 3]
"""

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

# isort: off
import openelm_mlx  # first: loads the fast BLAS before mlx.core

# isort: on
from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.model.config import OpenELMConfig

RESULTS = Path(__file__).resolve().parent / "results.json"


def import_beside(checkout: Path, tmp: Path) -> ModuleType:
    """An older checkout's package imported beside ours, as `openelm_baseline` (a copy with its imports renamed), so
    both run in one process and can be measured token by token in turn."""
    copy = tmp / "openelm_baseline"
    shutil.copytree(checkout / "openelm_mlx", copy, ignore=shutil.ignore_patterns("__pycache__"))
    for f in copy.rglob("*.py"):
        f.write_text(f.read_text().replace("openelm_mlx", "openelm_baseline"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("openelm_baseline")


def _generate_tokens(package: ModuleType) -> Callable[..., Iterator[int]]:
    for name in ("generation.generate", "generate"):  # the module moved in round 3
        try:
            return importlib.import_module(f"{package.__name__}.{name}").generate_tokens
        except ImportError:
            continue
    raise ImportError(f"no generate_tokens in {package.__file__}")


def single_stream(baseline: ModuleType, folder: Path, p: int, g: int, repeats: int) -> dict[str, list[float]]:
    """Decode tokens/s of one stream from each package on the same weights, in one process: `repeats` runs of `g`
    tokens after a `p`-token prompt each (the first token, which includes the prompt, not counted), the two packages
    in turn, the order swapped every run. A run goes to its end before the other starts: the steps are launched
    asynchronously, so interleaving the two token by token would time each package's wait for the other's step."""
    packages = {"ours": openelm_mlx, "baseline": baseline}
    models = {k: pkg.load_model(folder) for k, pkg in packages.items()}
    generate_tokens = {k: _generate_tokens(pkg) for k, pkg in packages.items()}
    ids = list(range(3, 3 + p))

    def rate(k: str) -> float:
        stream = generate_tokens[k](models[k], ids, max_tokens=g, eos_ids=())
        next(stream)
        tic = time.perf_counter()
        n = sum(1 for _ in stream)
        return n / (time.perf_counter() - tic)

    rates: dict[str, list[float]] = {k: [] for k in packages}
    for run in range(repeats + 1):  # the first run warms both up (traces)
        for k in ("ours", "baseline") if run % 2 else ("baseline", "ours"):
            tok_s = rate(k)
            if run:
                rates[k].append(tok_s)
    return rates


def batch_vs_sequential(model, n: int, g: int, repeats: int) -> dict[str, float]:
    from openelm_mlx.generation.engine import Engine, Row
    from openelm_mlx.generation.settings import GenerationConfig

    config = GenerationConfig(max_tokens=g)
    prompts = [[1, *range(10 + 7 * i, 30 + 9 * i)] for i in range(n)]

    def run(batched: bool) -> float:
        rows = [Row(p, config, frozenset()) for p in prompts]
        tic = time.perf_counter()
        if batched:
            Engine(model, max_batch=n).run(rows)
        else:
            for row in rows:
                Engine(model, max_batch=1).run([row])
        return sum(len(r.tokens) for r in rows) / (time.perf_counter() - tic)

    run(True), run(False)  # warm up (traces for each batch size)
    seq, bat = [], []
    for _ in range(repeats):
        seq.append(run(False))
        bat.append(run(True))
    return {"sequential_tok_s": statistics.median(seq), "batched_tok_s": statistics.median(bat),
            "ratio": statistics.median(b / s for b, s in zip(bat, seq))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="OpenELM-270M", help="a preset (random float32 weights), or demo")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("-g", "--gen-tokens", type=int, default=64)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="an older checkout of this repo")
    parser.add_argument("--single-tokens", type=int, default=300, help="tokens per single-stream run")
    args = parser.parse_args()
    if args.arch == "demo":
        from openelm_mlx import load_model
        from openelm_mlx.demo import DEMO_DIR

        model = load_model(DEMO_DIR)
    else:
        model = bench.random_model(OpenELMConfig.from_preset(args.arch), "float32")
    row: dict = {"prompts": args.prompts, "gen_tokens": args.gen_tokens}
    row["batch"] = batch_vs_sequential(model, args.prompts, args.gen_tokens, args.repeats)
    b = row["batch"]
    print(f"{args.arch}, {args.prompts} prompts x {args.gen_tokens} tokens, BLAS {blas.STATE.describe()}")
    print(f"one at a time {b['sequential_tok_s']:.1f} tok/s, batched {b['batched_tok_s']:.1f} tok/s: {b['ratio']:.2f}x")
    if args.baseline:
        from openelm_mlx.folders.io import save

        with tempfile.TemporaryDirectory() as tmp:
            folder = DEMO_DIR if args.arch == "demo" else save(model, Path(tmp) / "m")
            baseline = import_beside(args.baseline, Path(tmp))
            rates = single_stream(baseline, folder, args.prompt_tokens, args.single_tokens, args.repeats)
        ours, theirs = rates["ours"], rates["baseline"]
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        row["single_stream"] = {"ours_tok_s": statistics.median(ours), "baseline_tok_s": statistics.median(theirs),
                                "ratio": ratio, "baseline": str(args.baseline)}  # fmt: skip
        print(f"single stream: ours {statistics.median(ours):.2f} tok/s, baseline {statistics.median(theirs):.2f}: "
              f"{ratio:.3f}x")  # fmt: skip
    dtype = "" if args.arch == "demo" else "/float32"
    bench.record(RESULTS, f"batch generate {args.arch}{dtype}/blas={blas.STATE.source}", row)


if __name__ == "__main__":
    main()
