"""Quantize a model in memory (round to nearest and a mixed recipe), save it, and measure perplexity and KL.

python examples/quantize.py [MODEL]   # default: the bundled demo model, scored on a few built-in sentences
"""

import sys
import tempfile

from openelm_mlx import load, save
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.evaluate.perplexity import make_windows, mean_kl, perplexity
from openelm_mlx.quant.recipes import QuantRecipe, bits_per_weight, mixed_recipe, quantize_model
from openelm_mlx.quant.run import BUILTIN_TEXT

path = sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR
model, tokenizer = load(path)
windows = make_windows(tokenizer.encode(BUILTIN_TEXT, add_bos=False), 64, tokenizer.bos_id)
print(f"float: perplexity {perplexity(model, windows).perplexity:.2f}")

for name in ("4-bit", "mixed_3_6"):
    quantized, _ = load(path)
    recipe = QuantRecipe(4, 64) if name == "4-bit" else mixed_recipe(name, quantized, 64)
    left_float = quantize_model(quantized, recipe=recipe)
    print(
        f"{name}: {bits_per_weight(quantized):.2f} bits per weight, "
        f"perplexity {perplexity(quantized, windows).perplexity:.2f}, "
        f"KL from float {mean_kl(model, quantized, windows):.4f}; layers left in float: {left_float or 'none'}"
    )

out = tempfile.mkdtemp()
save(quantized, out, tokenizer=tokenizer, force=True)  # config.json records bits, group size and overrides
print(f"saved to {out}; reloaded perplexity {perplexity(load(out)[0], windows).perplexity:.2f}")
