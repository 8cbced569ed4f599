"""Log-likelihood requests per second at batch 1 and batch 16 (target: >= 3x), and shared-context prefill against
running every request whole, on multiple-choice-shaped requests (HellaSwag-like: a context and four continuations).

    python benchmarks/eval_speed.py [--models demo,270M] [--groups 32] [--context 64] [--continuation 20]

`demo` is the bundled demo model; `270M` a float32 random model of OpenELM-270M's shape (1.09 GB). Each setting runs
after a warm-up, alternating, `--repeats` times (the best is kept). Rows are merged into benchmarks/results.json.
"""

import argparse
import time
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
import mlx.core as mx
import numpy as np

from openelm_mlx import load
from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.evaluate.scoring import _batches, _pack, loglikelihood
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model

RESULTS = Path(__file__).resolve().parent / "results.json"
SETTINGS = {"batch 1": (1, True), "batch 16": (16, True), "batch 16, contexts not shared": (16, False)}


def make_model(name: str):
    if name == "demo":
        return load(DEMO_DIR)[0]
    model = Model(OpenELMConfig.from_preset(f"OpenELM-{name}"))
    mx.eval(model.parameters())
    return model.eval()


def make_requests(vocab: int, groups: int, context: int, continuation: int, seed: int = 0):
    """`groups` contexts of about `context` tokens (BOS first), each with four continuations of about `continuation`."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(groups):
        ctx = [1] + rng.integers(3, vocab, int(rng.integers(context // 2, context * 3 // 2))).tolist()
        for _ in range(4):
            requests.append((ctx, rng.integers(3, vocab, int(rng.integers(1, 2 * continuation))).tolist()))
    return requests


def tokens_run(requests, batch_size: int, share: bool) -> int:
    """Tokens the model runs for `requests` in this setting (each shared context once, continuations' inputs)."""
    fitted = [(tuple(c), tuple(x)) for c, x in requests]
    batches = _batches(fitted, batch_size, share)
    return sum(len(_pack(ctx, [fitted[r][1] for r in rows])[0]) for batch in batches for ctx, rows in batch)


def measure(model, requests, repeats: int) -> dict[str, float]:
    loglikelihood(model, requests[:8], batch_size=4)  # warm up
    best = {name: 0.0 for name in SETTINGS}
    for _ in range(repeats):
        for name, (batch_size, share) in SETTINGS.items():
            tic = time.perf_counter()
            loglikelihood(model, requests, batch_size=batch_size, share_contexts=share)
            best[name] = max(best[name], len(requests) / (time.perf_counter() - tic))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,270M")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--continuation", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for name in args.models.split(","):
        model = make_model(name)
        requests = make_requests(model.config.vocab_size, args.groups, args.context, args.continuation)
        rps = measure(model, requests, args.repeats)
        ratio = rps["batch 16"] / rps["batch 1"]
        shared = rps["batch 16"] / rps["batch 16, contexts not shared"]
        print(f"{name} ({blas.STATE.source} BLAS): {len(requests)} requests ({args.groups} contexts x 4), requests/s:")
        for setting, value in rps.items():
            print(f"  {setting}: {value:.1f}")
        print(f"  batch 16 / batch 1: {ratio:.2f}x (target >= 3x); shared contexts / not shared: {shared:.2f}x")
        fewer = tokens_run(requests, 1, True) / tokens_run(requests, 16, True)
        print(f"  tokens run: {fewer:.2f}x fewer at batch 16; the rest of the gain, per token: {ratio / fewer:.2f}x")
        row = {
            "requests_per_s": rps,
            "batch16_over_batch1": ratio,
            "shared_over_not_shared": shared,
            "tokens_batch1_over_batch16": fewer,
            "settings": {k: getattr(args, k) for k in ("groups", "context", "continuation", "repeats")},
        }
        bench.record(RESULTS, f"eval_speed {name}", row)


if __name__ == "__main__":
    main()
