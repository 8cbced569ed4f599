"""The generation engine directly: rows with their own settings join a running batch, one is cancelled mid-way, and a
follow-up reuses a finished row's cache (continuous batching, as `openelm-mlx serve` runs it).

python examples/engine.py [MODEL]   # default: the bundled demo model
"""

import sys

from openelm_mlx import GenerationConfig, load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.engine import Engine, Row

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR)
eos = frozenset({tokenizer.eos_id})
engine = Engine(model, max_batch=4, prompt_cache_size=8)

greedy = Row(tokenizer.encode("ROMEO:"), GenerationConfig(max_tokens=24), eos)
sampled = Row(tokenizer.encode("JULIET:"), GenerationConfig(max_tokens=24, temp=0.8, seed=1), eos)
doomed = Row(tokenizer.encode("KING:"), GenerationConfig(max_tokens=200), eos)
for row in (greedy, sampled, doomed):
    engine.add(row)
for _ in range(6):
    engine.step()
late = engine.add(Row(tokenizer.encode("QUEEN:"), GenerationConfig(max_tokens=16), eos))  # joins now
engine.cancel(doomed)  # frees its place at the next step
while engine.busy:
    engine.step()
for name, row in (("greedy", greedy), ("sampled", sampled), ("late", late), ("cancelled", doomed)):
    print(f"[{name}: {row.finish_reason}, {len(row.tokens)} tokens] {tokenizer.decode(row.tokens)!r}")

follow = Row(
    greedy.prompt + greedy.tokens + tokenizer.encode(" And then", add_bos=False), GenerationConfig(max_tokens=8), eos
)
engine.run([follow])
print(f"follow-up reused {follow.cached_tokens} cached prompt tokens: {tokenizer.decode(follow.tokens)!r}")
