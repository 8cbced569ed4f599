"""Batched generation on the engine against one prompt at a time, and single-stream speed against an older checkout.

1. `generate(model, tok, [8 prompts])` vs the same 8 prompts one after another (tokens/s of each, alternated).
2. With --baseline OLD_CHECKOUT: single-stream tokens/s of this checkout and the old one on the same random model, in
   fresh processes alternated, so a change to the decode path is measured side by side.

    python benchmarks/batch_generate.py [--arch OpenELM-270M | demo] [--prompts 8] [-g 64] [--baseline DIR]
        [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.model.config import OpenELMConfig

RESULTS = Path(__file__).resolve().parent / "results.json"
ROOT = Path(__file__).resolve().parents[1]

SINGLE = """
import sys, time, json
sys.path.insert(0, {root!r})
import openelm_mlx
import mlx.core as mx
from openelm_mlx import load_model
try:
    from openelm_mlx.generation.generate import generate_tokens
except ImportError:
    from openelm_mlx.generate import generate_tokens
model = load_model({folder!r})
ids = list(range(3, 3 + {p}))
list(generate_tokens(model, ids, max_tokens=8))
tic = time.perf_counter(); n = 0
first = None
for t in generate_tokens(model, ids, max_tokens={g}, eos_ids=()):
    n += 1
    if first is None:
        first = time.perf_counter()
print(json.dumps({{"tok_s": (n - 1) / (time.perf_counter() - first)}}))
"""


def single_stream(root: Path, folder: Path, p: int, g: int) -> float:
    code = SINGLE.format(root=str(root), folder=str(folder), p=p, g=g)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]


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
            ours, theirs = [], []
            for _ in range(args.repeats):
                theirs.append(single_stream(args.baseline, folder, args.prompt_tokens, args.gen_tokens))
                ours.append(single_stream(ROOT, folder, args.prompt_tokens, args.gen_tokens))
        ratio = statistics.median(o / t for o, t in zip(ours, theirs))
        row["single_stream"] = {"ours_tok_s": statistics.median(ours), "baseline_tok_s": statistics.median(theirs),
                                "ratio": ratio, "baseline": str(args.baseline)}  # fmt: skip
        print(f"single stream: ours {statistics.median(ours):.2f} tok/s, baseline {statistics.median(theirs):.2f}: "
              f"{ratio:.3f}x")  # fmt: skip
    dtype = "" if args.arch == "demo" else "/float32"
    bench.record(RESULTS, f"batch generate {args.arch}{dtype}/blas={blas.STATE.source}", row)


if __name__ == "__main__":
    main()
