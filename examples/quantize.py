"""Quantize a model in memory with MLX's `nn.quantize`, save it, and compare it with the float model.

python examples/quantize.py [MODEL]   # default: the bundled demo model
"""

import sys
import tempfile

import mlx.core as mx

from openelm_mlx import load, save
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generate import generate
from openelm_mlx.quantize import bits_per_weight, quantize_model

path = sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR
model, tokenizer = load(path)
quantized, _ = load(path)
left_float = quantize_model(quantized, bits=8, group_size=64)
print(f"{bits_per_weight(quantized):.2f} bits per weight; layers left in float: {left_float or 'none'}")

ids = mx.array([tokenizer.encode("ROMEO: What light")])
gap = mx.abs(model(ids) - quantized(ids)).max().item()
print(f"largest logit difference, 8-bit vs float: {gap:.4f}")

out = tempfile.mkdtemp()
save(quantized, out, tokenizer=tokenizer)  # config.json records {"quantization": {"bits": 8, ...}}
print(generate(load(out)[0], tokenizer, "ROMEO:", max_tokens=24))
