"""Your own decode loop with the compiled single-token step (what `generate` uses on the CPU backend), checked
against the eager model, with the time per token of each.

python examples/decode_loop.py [MODEL]   # default: the bundled demo model
"""

import sys
import time

# isort: off
import openelm_mlx  # noqa: F401  (first: on Linux it loads a fast BLAS before mlx.core)

# isort: on
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.model.step import decoder_for

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else DEMO_DIR)


def greedy(step, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after `prompt` through `step(tokens, cache) -> logits`; seconds per token after the first."""
    cache = make_prompt_cache(model)
    y = mx.argmax(step(mx.array([prompt]), cache)[:, -1], axis=-1)
    tokens, tic = [y.item()], time.perf_counter()
    for _ in range(n - 1):
        y = mx.argmax(step(y[:, None], cache)[:, -1], axis=-1)
        tokens.append(y.item())
    return tokens, (time.perf_counter() - tic) / (n - 1)


prompt = tokenizer.encode("ROMEO:")
greedy(decoder_for(model), prompt, 4)  # the first single-token step traces and compiles the step
compiled, t_compiled = greedy(decoder_for(model), prompt, 64)
eager, t_eager = greedy(model, prompt, 64)
print(tokenizer.decode(compiled))
print(f"same tokens as the eager model: {compiled == eager}")
print(f"ms per token: compiled {t_compiled * 1e3:.2f}, eager {t_eager * 1e3:.2f} ({mx.default_device()})")
