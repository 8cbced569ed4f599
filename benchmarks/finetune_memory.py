"""The memory plan (openelm_mlx/training/memory.py) against the measured peak of full fine-tuning steps, at two
model sizes, with AdamW and Adafactor, float32 and bfloat16 compute, with and without gradient checkpointing.
Each configuration runs in its own process (clean peak); rows are merged into benchmarks/results.json. The plan
should be within 25% of the peak.

    python benchmarks/finetune_memory.py [--sizes small,medium] [--steps 2]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from openelm_mlx.bench import speed as bench

RESULTS = Path(__file__).resolve().parent / "results.json"
# name -> (OpenELMConfig.from_layerwise arguments, batch size, sequence length)
SIZES = {
    "small": (dict(num_transformer_layers=4, model_dim=256, head_dim=32, vocab_size=4096), 4, 128),
    "medium": (dict(num_transformer_layers=8, model_dim=512, head_dim=64, vocab_size=8192), 4, 256),
    "270M": (dict(preset="OpenELM-270M"), 2, 256),
}
CHILD = """
import json, sys
import openelm_mlx  # first: loads the fast BLAS before mlx.core
import mlx.core as mx
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model
from openelm_mlx.training.loop import enable_grad_checkpoint
from openelm_mlx.training.memory import plan_memory
from openelm_mlx.training.pretrain import init_weights
from openelm_mlx.training.settings import RunSettings
from openelm_mlx.training.trainable import ModelWeights
from openelm_mlx.training.tune import make_trainer
arch, B, L, optimizer, dtype = json.loads(sys.argv[1]), *map(int, sys.argv[2:4]), *sys.argv[4:6]
ckpt, steps = sys.argv[6] == "1", int(sys.argv[7])
preset = arch.pop("preset", None)
config = OpenELMConfig.from_preset(preset) if preset else OpenELMConfig.from_layerwise(
    qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0), num_gqa_groups=4, ffn_dim_divisor=64, **arch)
model = Model(config)
init_weights(model, 0)
weights = ModelWeights(len(model.layers))
weights.apply(model)
model.train()
if ckpt:
    enable_grad_checkpoint(model)
settings = RunSettings(optimizer=optimizer, dtype=dtype, batch_size=B, lr=1e-4)
plan = plan_memory(model, batch_size=B, seq_len=L, optimizer=optimizer, dtype=dtype, grad_checkpoint=ckpt)
trainer = make_trainer(settings, model, 100, None, weights.weights_file)
x = mx.random.randint(0, config.vocab_size, (B, L + 1))
mx.eval(x, trainer.optimizer.state)
mx.clear_cache()
mx.reset_peak_memory()
rates = [trainer.step([(x[:, :-1], x[:, 1:])])["tokens_per_sec"] for _ in range(steps)]
print(json.dumps({"plan_gb": plan.total / 1e9, "peak_gb": mx.get_peak_memory() / 1e9,
                  "tokens_per_sec": max(rates), "parameters": config.num_parameters()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, from: {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    worst = 0.0
    for size in args.sizes.split(","):
        arch, batch, seq = SIZES[size]
        for optimizer, dtype, ckpt in [
            ("adamw", "float32", False),
            ("adamw", "float32", True),
            ("adafactor", "float32", False),
            ("adamw", "bfloat16", False),
        ]:
            cmd = [sys.executable, "-c", CHILD, json.dumps(arch), str(batch), str(seq), optimizer, dtype]
            cmd += ["1" if ckpt else "0", str(args.steps)]
            row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            error = row["plan_gb"] / row["peak_gb"] - 1
            worst = max(worst, abs(error))
            label = f"{size} {batch}x{seq} {optimizer} {dtype} grad-checkpoint={'on' if ckpt else 'off'}"
            print(f"{label:60s} plan {row['plan_gb']:.3f} GB  peak {row['peak_gb']:.3f} GB  ({error:+.0%})", flush=True)
            bench.record(RESULTS, f"finetune memory plan/{label}", {**row, "plan_error": error})
    print(f"largest plan error: {worst:.0%} ({'within' if worst <= 0.25 else 'OUTSIDE'} 25%)")


if __name__ == "__main__":
    main()
