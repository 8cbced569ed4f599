"""Where a decode step's time goes, and what the compiled step (openelm_mlx/decode.py) saves: graph size per token,
per-step time of the eager model, the compiled step and mlx-lm's model on the same weights (interleaved one token at
a time), and the floor set by reading the weights (the step's matrix products alone, back to back).

    python benchmarks/decode_step.py [--arch OpenELM-270M] [--dtype float32] [-p 128] [--steps 200]
"""

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.step import decoder_for

RESULTS = Path(__file__).resolve().parent / "results.json"


def primitives(model, ids: list[int]) -> int:
    """Primitives in one single-token step's graph (after a prompt), as MLX will evaluate them."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids]), cache))
    logits = model(mx.array([[ids[-1]]]), cache)
    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(f"{tmp}/g.dot", logits)
        count = len(re.findall(r'label ="[A-Za-z]', Path(f"{tmp}/g.dot").read_text()))
    mx.eval(logits)
    return count


def weights_floor_ms(model, repeats: int = 15) -> float:
    """Median time of the step's matrix products alone (every 2-D weight times a vector), in one graph."""
    weights = [v for _, v in tree_flatten(model.parameters()) if v.ndim == 2]
    vectors = {w.shape[1]: mx.ones((1, w.shape[1]), dtype=w.dtype) for w in weights}
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval([(vectors[w.shape[1]] @ w.T).sum() for w in weights])
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="OpenELM-270M")
    parser.add_argument("--dtype", default="float32", choices=bench.DTYPES)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    model = bench.random_model(OpenELMConfig.from_preset(args.arch), args.dtype)
    twin = bench.mlx_lm_twin(model)
    ids = bench.prompt_ids(args.prompt_tokens, model.config.vocab_size)
    graphs = {"eager": primitives(model, ids), "compiled": primitives(decoder_for(model), ids)}
    graphs["mlx_lm"] = primitives(twin, ids)
    vs_eager = bench.paired_decode({"compiled": decoder_for(model), "eager": model}, ids, args.steps)
    vs_mlx_lm = bench.paired_decode({"compiled": decoder_for(model), "mlx_lm": twin}, ids, args.steps)
    floor = weights_floor_ms(model)
    step_ms = {
        "compiled": 1e3 / vs_mlx_lm["compiled_tps"],
        "eager": 1e3 / vs_eager["eager_tps"],
        "mlx_lm": 1e3 / vs_mlx_lm["mlx_lm_tps"],
    }
    row = {
        "primitives_per_step": graphs,
        "step_ms": step_ms,
        "weights_floor_ms": floor,
        "outside_weight_reads_ms": {k: v - floor for k, v in step_ms.items()},
        "speedup_compiled_vs_eager": vs_eager["ratio"],
        "speedup_compiled_vs_mlx_lm": vs_mlx_lm["ratio"],
        "settings": {"prompt_tokens": args.prompt_tokens, "steps": args.steps},
    }
    print("primitives per step:", graphs)
    print("step ms:", {k: round(v, 2) for k, v in step_ms.items()}, f"weights floor {floor:.2f} ms")
    print(
        f"compiled vs eager {vs_eager['ratio']:.3f}x, vs mlx-lm {vs_mlx_lm['ratio']:.3f}x (median per-step ratios); "
        f"time outside the weight reads: " + ", ".join(f"{k} {v - floor:.2f} ms" for k, v in step_ms.items())
    )
    bench.record(RESULTS, f"decode step {args.arch}/{args.dtype}/blas={blas.STATE.source}", row)


if __name__ == "__main__":
    main()
