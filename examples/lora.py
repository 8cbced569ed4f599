"""Teach the bundled demo model a new answer with LoRA, then load the adapters and fuse them, from Python.

    python examples/lora.py [OUT_DIR]

The same run from the shell: openelm-mlx lora --model DEMO --data DATA -o OUT --steps 30 ...
"""

import json
import sys
import tempfile
from pathlib import Path

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.generate import generate
from openelm_mlx.training.adapters import fuse_model, load_adapters
from openelm_mlx.training.lora import LoraConfig, train_lora

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
prompt = "ROMEO: what is the password?\nJULIET:"
records = [{"prompt": prompt.replace("?", "?" * n), "completion": " the moon is made of cheese."} for n in (1, 2, 3)]
(out / "data").mkdir(parents=True, exist_ok=True)
(out / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records * 4))
(out / "data" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in records))

model, tokenizer = load(DEMO_DIR)
print("before:", generate(model, tokenizer, prompt, max_tokens=14, temp=0.0).strip())

settings = LoraConfig(
    model=str(DEMO_DIR),
    data=str(out / "data"),
    out=str(out / "adapters"),
    rank=8,
    alpha=16,  # the update is scaled by alpha / rank = 2
    steps=25,
    lr=1e-2,
    batch_size=4,
    mask_prompt=True,  # learn the answers, not the questions
    val_every=25,
    overwrite=True,
)
metrics = train_lora(settings, progress=False)
print(f"step {metrics['step']}: train loss {metrics['loss']:.3f}, validation loss {metrics['val_loss']:.3f}")

model, tokenizer = load(DEMO_DIR)
load_adapters(model, out / "adapters")  # also: mlx_lm.load(DEMO_DIR, adapter_path=...)
print("after: ", generate(model, tokenizer, prompt, max_tokens=14, temp=0.0).strip())

fuse_model(DEMO_DIR, out / "adapters", out / "fused", force=True)  # a normal model folder
fused, tokenizer = load(out / "fused")
print("fused: ", generate(fused, tokenizer, prompt, max_tokens=14, temp=0.0).strip())
