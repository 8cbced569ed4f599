"""Generate text from Python: stream pieces as they come, get whole strings, or run a batch.

python examples/generate.py [MODEL]   # default: the bundled demo model
"""

import sys

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.generate import generate, stream_generate

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR)

for step in stream_generate(model, tokenizer, "ROMEO:", max_tokens=48, temp=0.8, seed=0):
    print(step.text, end="", flush=True)
print(f"\n[{step.prompt_tps:.0f} prompt tokens/s, {step.generation_tps:.0f} generation tokens/s]\n")

# A list of prompts runs as one batch; at temp 0 each answer equals its one-by-one run.
prompts = ["JULIET:", "KING HENRY:"]
for prompt, answer in zip(prompts, generate(model, tokenizer, prompts, max_tokens=24)):
    print(f"{prompt}{answer}\n")
