"""Prompt tokens/s by prefill chunk size (the prompt fed in pieces of N positions), which sets
`generate.prefill_step()` per backend; rows go to benchmarks/results.json.

    python benchmarks/prefill_chunks.py [--arch OpenELM-270M] [-p 1024] [--chunks 128 256 512 2048]
"""

import argparse
import time
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.model.config import OpenELMConfig

RESULTS = Path(__file__).resolve().parent / "results.json"


def prefill_tps(model, ids: mx.array, chunk: int) -> float:
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    for start in range(0, ids.size, chunk):
        model(ids[None, start : start + chunk], cache)
        mx.eval([c.state for c in cache])
    return ids.size / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="OpenELM-270M")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = bench.random_model(OpenELMConfig.from_preset(args.arch))
    ids = mx.array(bench.prompt_ids(args.prompt_tokens, model.config.vocab_size))
    prefill_tps(model, ids[:64], 64)  # warm-up
    runs: dict[int, list[float]] = {c: [] for c in args.chunks}
    for i in range(args.repeats):  # alternating order, medians
        for chunk in args.chunks if i % 2 == 0 else reversed(args.chunks):
            runs[chunk].append(prefill_tps(model, ids, chunk))
    tps = {str(c): sorted(v)[len(v) // 2] for c, v in runs.items()}
    print(f"{args.prompt_tokens}-token prompt, tok/s by chunk:", {k: round(v, 1) for k, v in tps.items()})
    row = {"prompt_tps_by_chunk": tps, "settings": vars(args)}
    bench.record(RESULTS, f"prefill chunks {args.arch}/{args.prompt_tokens}/blas={blas.STATE.source}", row)


if __name__ == "__main__":
    main()
