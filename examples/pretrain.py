"""Pretrain a small layer-wise-scaled OpenELM from scratch with CoreNet's recipe, from Python.

    python examples/pretrain.py [TEXT_FILE] [OUT_DIR]   # default: ../shared/data/tinyshakespeare.txt

For several processes or Macs, the same run goes through the CLI under `mlx.launch`:
    mlx.launch -n 2 --backend ring $(which openelm-mlx) pretrain ...
"""

import sys
import tempfile
from pathlib import Path

from openelm_mlx import load
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.generate import generate
from openelm_mlx.pretrain import PretrainConfig, pretrain, train_tokenizer

text = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt")
out = Path(sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())

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
    eval_every=20,
    save_every=20,
)
metrics = pretrain(config, run, progress=False)
print(f"step {metrics['step']}: train loss {metrics['loss']:.3f}, held-out loss {metrics['val_loss']:.3f}")

model, tok = load(out)  # the final model is a normal MLX model folder
print(generate(model, tok, "ROMEO:", max_tokens=20, temp=0.8, seed=0))
