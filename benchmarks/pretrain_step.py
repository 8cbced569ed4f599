"""Tokens/s and peak memory of one 270M-shaped pretraining step: float32 vs bfloat16, with and
without gradient checkpointing. Each configuration runs in its own process (clean peak memory); rows are merged
into benchmarks/results.json with machine, backend and BLAS.

    python benchmarks/pretrain_step.py [--batch-size 2] [--seq-len 256] [--steps 3]
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
import openelm_mlx  # first: loads the fast BLAS before mlx.core
import mlx.core as mx
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model
from openelm_mlx.training.pretrain import init_weights
from openelm_mlx.model.loss import lm_loss
from openelm_mlx.training.loop import OptimizerConfig, Trainer, enable_grad_checkpoint, make_optimizer
dtype, ckpt, B, L, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = Model(OpenELMConfig.from_preset("OpenELM-270M"))
init_weights(model, 0)
if ckpt:
    enable_grad_checkpoint(model)
trainer = Trainer(model, lambda m, x, y: lm_loss(m, x, y, z_loss=1e-4), make_optimizer(OptimizerConfig(5.3e-3, 100)),
                  compute_dtype=None if dtype == "float32" else mx.bfloat16)
x = mx.random.randint(0, 32000, (B, L + 1))
rates = [trainer.step([(x[:, :-1], x[:, 1:])])["tokens_per_sec"] for _ in range(steps)]
print(json.dumps({"tokens_per_sec": max(rates[1:]) if len(rates) > 1 else rates[0],
                  "peak_gb": mx.get_peak_memory() / 1e9}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    args = parser.parse_args()
    rows = {}
    for dtype in args.dtypes.split(","):
        for ckpt in (False, True):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    dtype,
                    "1" if ckpt else "0",
                    str(args.batch_size),
                    str(args.seq_len),
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[(dtype, ckpt)] = json.loads(out.stdout.strip().splitlines()[-1])
    base = next(iter(rows.values()))
    print(f"270M-shaped step, batch {args.batch_size} x {args.seq_len} tokens (best of steps 2..{args.steps}):")
    for (dtype, ckpt), r in rows.items():
        print(
            f"  {dtype:8s} grad-checkpoint={'on ' if ckpt else 'off'}  {r['tokens_per_sec']:8.1f} tok/s "
            f"({r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x)  peak {r['peak_gb']:.2f} GB "
            f"({r['peak_gb'] / base['peak_gb']:.2f}x)"
        )
        shape = f"{args.batch_size}x{args.seq_len}"
        key = f"pretrain step OpenELM-270M/{dtype}/{shape}/grad-checkpoint={'on' if ckpt else 'off'}"
        bench.record(RESULTS, key, {**r, "batch_size": args.batch_size, "seq_len": args.seq_len})


if __name__ == "__main__":
    main()
