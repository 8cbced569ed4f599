"""Full fine-tuning side by side with mlx-lm (`mlx_lm lora --fine-tune-type full`, through its `train_model`):
tokens/s and peak memory on a 270M-shaped float32 model (16 layers, random weights, the demo's tokenizer),
batch 2 x 256, the same data, with AdamW, with Adafactor and with gradient checkpointing. Both train the decoder
layers (not the embedding), no gradient clipping, learning rate 1e-5. Each run is its own process (clean peak);
rows are merged into benchmarks/results.json.

    python benchmarks/finetune_step.py [--steps 6] [--size 270M|small] [--no-record]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from openelm_mlx.bench import speed as bench

RESULTS = Path(__file__).resolve().parent / "results.json"
SETUP = """
import dataclasses, json, random, sys
from pathlib import Path
import openelm_mlx  # first: loads the fast BLAS before mlx.core
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.folders.io import load, save
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model
from openelm_mlx.training.pretrain import init_weights
size, folder = sys.argv[1], Path(sys.argv[2])
_, tok = load(DEMO_DIR)
# the 270M shapes with the demo tokenizer's vocabulary (a model may not have more rows than its tokenizer pieces)
preset = OpenELMConfig.from_preset("OpenELM-270M") if size == "270M" else OpenELMConfig.tiny()
config = dataclasses.replace(preset, vocab_size=tok.vocab_size)
model = Model(config)
init_weights(model, 0)
save(model, folder / "model", tokenizer=tok)
words = [tok.decode([i]) for i in range(300, 1800)]
rng = random.Random(0)
records = [{"text": " ".join(rng.choice(words).strip() or "a" for _ in range(400))} for _ in range(64)]
(folder / "data").mkdir()
for split in ("train", "valid"):
    (folder / "data" / f"{split}.jsonl").write_text("\\n".join(map(json.dumps, records)) + "\\n")
"""
OURS = """
import json, sys
from pathlib import Path
import openelm_mlx  # first: loads the fast BLAS before mlx.core
from openelm_mlx.training.finetune import FinetuneConfig, finetune
folder, optimizer, ckpt, steps, B, L = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", *map(int, sys.argv[4:7])
config = FinetuneConfig(model=str(folder / "model"), data=str(folder / "data"), out=str(folder / "ours"), steps=steps,
                        batch_size=B, max_seq_len=L + 1, lr=1e-5, optimizer=optimizer, grad_checkpoint=ckpt,
                        grad_clip=0.0, train_embeddings=False, val_every=0, save_every=0, overwrite=True)
finetune(config)
rows = [json.loads(line) for line in (folder / "ours" / "log.jsonl").read_text().splitlines()]
print(json.dumps({"tokens_per_sec": max(r["tokens_per_sec"] for r in rows[1:]),
                  "peak_gb": max(r["peak_memory_gb"] for r in rows), "loss": rows[-1]["loss"]}))
"""
THEIRS = """
import json, sys, types
from pathlib import Path
import openelm_mlx  # the same BLAS as ours
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback
folder, optimizer, ckpt, steps, B, L = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", *map(int, sys.argv[4:7])
reports = []

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        reports.append(info)

args = {**lora.CONFIG_DEFAULTS, "model": str(folder / "model"), "train": True, "data": str(folder / "data"),
        "fine_tune_type": "full", "optimizer": optimizer, "num_layers": -1, "batch_size": B, "iters": steps,
        "val_batches": 1, "learning_rate": 1e-5, "steps_per_report": 1, "steps_per_eval": 10**6,
        "adapter_path": str(folder / "theirs"), "save_every": 10**6, "max_seq_length": L + 1, "grad_checkpoint": ckpt,
        "seed": 0}
# what `mlx_lm lora --train` runs (lora.run drops a training_callback passed to it: call its steps)
args = types.SimpleNamespace(**args)
model, tokenizer = lora.load(args.model)
train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
lora.train_model(args, model, train_set, valid_set, Record())
print(json.dumps({"tokens_per_sec": max(r["tokens_per_second"] for r in reports[1:]),
                  "peak_gb": max(r["peak_memory"] for r in reports), "loss": reports[-1]["train_loss"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", default="270M", choices=("270M", "small"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-record", action="store_true", help="Print only (e.g. a smoke test at --size small).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", SETUP, args.size, tmp], check=True, capture_output=True, text=True)
        print(f"full fine-tuning, {args.size}-shaped float32, batch {args.batch_size} x {args.seq_len}:")
        for optimizer, ckpt in [("adamw", False), ("adafactor", False), ("adamw", True)]:
            rows = {}
            for impl, code in (("ours", OURS), ("mlx-lm", THEIRS)):
                cmd = [sys.executable, "-c", code, tmp, optimizer, "1" if ckpt else "0"]
                cmd += [str(args.steps), str(args.batch_size), str(args.seq_len)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{impl} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            ours, theirs = rows["ours"], rows["mlx-lm"]
            label = f"{optimizer} grad-checkpoint={'on' if ckpt else 'off'}"
            print(
                f"  {label:28s} ours {ours['tokens_per_sec']:8.1f} tok/s, peak {ours['peak_gb']:.2f} GB | mlx-lm "
                f"{theirs['tokens_per_sec']:8.1f} tok/s, peak {theirs['peak_gb']:.2f} GB | "
                f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}x speed, "
                f"{ours['peak_gb'] / theirs['peak_gb']:.2f}x memory",
                flush=True,
            )
            if not args.no_record:
                shape = f"OpenELM-{args.size}/float32/{args.batch_size}x{args.seq_len}/{label}"
                settings = {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}
                for impl, row in rows.items():
                    bench.record(RESULTS, f"finetune step {shape}/{impl}", {**row, **settings})


if __name__ == "__main__":
    main()
