"""Fine-tune every weight of the bundled demo model on a small task, then continue its pretraining on new text,
from Python. Both outputs are normal model folders.

    python examples/finetune.py [OUT_DIR]

The same runs from the shell:
    openelm-mlx finetune --model DEMO --data DATA -o OUT --steps 25 --lr 1e-3 --mask-prompt
    openelm-mlx pretrain --init-from DEMO --data TEXT -o OUT --steps 20 --lr 1e-3
"""

import json
import sys
import tempfile
from pathlib import Path

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.generate import generate
from openelm_mlx.training.finetune import FinetuneConfig, finetune
from openelm_mlx.training.pretrain import PretrainConfig, pretrain

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
prompt = "ROMEO: what is the password?\nJULIET:"
records = [{"prompt": prompt.replace("?", "?" * n), "completion": " the moon is made of cheese."} for n in (1, 2, 3)]
(out / "data").mkdir(parents=True, exist_ok=True)
(out / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records * 4))

settings = FinetuneConfig(
    model=str(DEMO_DIR),
    data=str(out / "data"),
    out=str(out / "tuned"),
    steps=25,
    lr=1e-3,
    batch_size=4,
    mask_prompt=True,  # learn the answers, not the questions
    num_layers="all",  # or the last N decoder layers only
    train_embeddings=True,  # the tied embedding is also the output head
    optimizer="adamw",  # or "adafactor" (factored state: less memory), "sgd"
    val_every=0,
    overwrite=True,
)
metrics = finetune(settings)  # a memory plan is checked first; a diverged loss stops at that step
print(f"step {metrics['step']}: train loss {metrics['loss']:.3f}")
model, tokenizer = load(out / "tuned")  # a normal model folder (also for mlx_lm.load, quantize, export)
print("tuned:    ", generate(model, tokenizer, prompt, max_tokens=14, temp=0.0).strip())

(out / "new.txt").write_text("The moon is made of cheese, said Juliet. " * 200)
run = PretrainConfig(
    data=[str(out / "new.txt")],
    init_from=str(DEMO_DIR),
    out=str(out / "continued"),
    steps=20,
    lr=1e-3,
    batch_size=4,
    seq_len=64,
    warmup=0,
    overwrite=True,
)  # the model's own config and tokenizer
metrics = pretrain(None, run)
print(f"continued pretraining: held-out loss {metrics['val_loss']:.3f}")
