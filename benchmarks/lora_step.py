"""Step time, tokens/s and peak memory of LoRA/DoRA steps on a 270M-shaped OpenELM (random weights), float vs
4-bit base, for our model and for mlx-lm's OpenELM with mlx-lm's LoRA layers (same weights, data and loop).
Each configuration runs in its own process (clean peak memory); rows are merged into benchmarks/results.json with
machine, backend and BLAS.

    python benchmarks/lora_step.py [--batch-size 2] [--seq-len 128] [--steps 3]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from openelm_mlx.bench import speed as bench

RESULTS = Path(__file__).resolve().parent / "results.json"

CHILD = """
import json, sys
import openelm_mlx  # first: it loads the fast BLAS before mlx.core
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.training.adapters import add_adapters, TARGETS
from openelm_mlx.model.decoder import Model
from openelm_mlx.training.pretrain import init_weights
from openelm_mlx.quant.recipes import quantize_model
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.training.loop import OptimizerConfig, Trainer, make_optimizer
impl, kind, bits, B, L, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
config = OpenELMConfig.from_preset("OpenELM-270M")
ours = Model(config)
init_weights(ours, 0)
if impl == "ours":
    model = ours
else:
    from mlx_lm.models.openelm import Model as LmModel, ModelArgs
    model = LmModel(ModelArgs.from_dict({**config.to_dict(), "model_type": "openelm"}))
    model.load_weights(tree_flatten(ours.parameters()))
    del ours
mx.eval(model.parameters())
if bits:
    quantize_model(model, bits=bits, group_size=64)
mx.random.seed(0)
keys = [TARGETS[t] for t in ("qkv_proj", "out_proj", "proj_1", "proj_2")]
add_adapters(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}, kind == "dora")
model.train()
trainer = Trainer(model, lm_loss, make_optimizer(OptimizerConfig(1e-4, 100)))
x = mx.random.randint(0, 32000, (B, L + 1))
batch = (x[:, :-1], x[:, 1:], mx.ones((B, L)))
mx.clear_cache()
mx.reset_peak_memory()
results = [trainer.step([batch]) for _ in range(steps)]
best = min(results[1:] if len(results) > 1 else results, key=lambda r: r["seconds"])
print(json.dumps({"seconds": best["seconds"], "tokens_per_sec": best["tokens_per_sec"],
                  "peak_gb": mx.get_peak_memory() / 1e9, "loss": results[-1]["loss"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for kind in ("lora", "dora"):
        for bits in (0, 4):
            for impl in ("ours", "mlx-lm"):
                cmd = [sys.executable, "-c", CHILD, impl, kind, str(bits)]
                cmd += [str(args.batch_size), str(args.seq_len), str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows[(kind, bits, impl)] = json.loads(out.stdout.strip().splitlines()[-1])
                print(kind, bits or "float32", impl, rows[(kind, bits, impl)], file=sys.stderr, flush=True)
                settings = {"rank": 8, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}
                key = f"{kind} step OpenELM-270M/{'4-bit' if bits else 'float32'} base/{impl}"
                bench.record(RESULTS, key, {**rows[(kind, bits, impl)], **settings})
    print(f"270M-shaped adapter step (rank 8, all 4 projections), batch {args.batch_size} x {args.seq_len} tokens")
    print(f"(best of steps 2..{args.steps}); ratio = ours / mlx-lm")
    print(
        "| method | base | ours s/step | ours tok/s | ours peak GB | mlx-lm tok/s | mlx-lm peak GB | speed | memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("lora", "dora"):
        for bits in (0, 4):
            a, b = rows[(kind, bits, "ours")], rows[(kind, bits, "mlx-lm")]
            print(
                f"| {kind} | {'4-bit' if bits else 'float32'} | {a['seconds']:.2f} | {a['tokens_per_sec']:.0f} "
                f"| {a['peak_gb']:.2f} | {b['tokens_per_sec']:.0f} | {b['peak_gb']:.2f} "
                f"| {a['tokens_per_sec'] / b['tokens_per_sec']:.2f}x | {a['peak_gb'] / b['peak_gb']:.2f}x |"
            )
    for kind in ("lora", "dora"):
        f, q = rows[(kind, 0, "ours")], rows[(kind, 4, "ours")]
        print(
            f"{kind}: 4-bit base peak memory {q['peak_gb']:.2f} GB vs float {f['peak_gb']:.2f} GB "
            f"({q['peak_gb'] / f['peak_gb']:.2f}x)"
        )


if __name__ == "__main__":
    main()
