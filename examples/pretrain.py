"""Pretrain a small layer-wise-scaled OpenELM from scratch with CoreNet's recipe, from Python.

    python examples/pretrain.py [TEXT_FILE] [OUT_DIR]   # default: ../shared/data/tinyshakespeare.txt, if present,
                                                        # else a small corpus this script writes

For several processes or Macs, the same run goes through the CLI under `mlx.launch`:
    mlx.launch -n 2 --backend ring $(which openelm-mlx) pretrain ...
"""

import random
import sys
import tempfile
from pathlib import Path

from openelm_mlx import load
from openelm_mlx.generation.generate import generate
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.training.pretrain import PretrainConfig, pretrain, train_tokenizer

out = Path(sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
text = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt")
if not text.is_file() and len(sys.argv) <= 1:  # no ../shared here: make a small corpus of our own
    rng = random.Random(0)
    syllables = "ka lo mi ra ne to su vi de pa gro ther ing ion an ly es ed".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(6000))
    text = out / "corpus.txt"
    text.write_text("\n".join(lines))

tokenizer = train_tokenizer([text], vocab_size=512, output=out / "tokenizer.model")
config = OpenELMConfig.from_layerwise(  # heads and FFN width grow with depth
    num_transformer_layers=4,
    model_dim=64,
    head_dim=16,
    num_gqa_groups=2,
    qkv_multipliers=(0.5, 1.0),
    ffn_multipliers=(0.5, 4.0),
    ffn_dim_divisor=32,
    vocab_size=512,
)
run = PretrainConfig(
    data=[str(text)],
    tokenizer=str(tokenizer),
    out=str(out),
    steps=40,
    batch_size=8,
    seq_len=64,
    lr=5e-3,
    warmup=5,
    val_every=20,
    save_every=20,
)
metrics = pretrain(config, run, progress=False)
print(f"step {metrics['step']}: train loss {metrics['loss']:.3f}, held-out loss {metrics['val_loss']:.3f}")

model, tok = load(out)  # the final model is a normal MLX model folder
print(generate(model, tok, "ROMEO:", max_tokens=20, temp=0.8, seed=0))
