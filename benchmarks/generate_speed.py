"""Prompt and generation tokens/s of openelm-mlx next to mlx-lm on the same 270M-shaped random weights.

    python benchmarks/generate_speed.py [--prompt-tokens 256] [--max-tokens 64] [--rounds 3]

Runs alternate (ours, mlx-lm, ours, ...) in one process; medians and ratios are printed.
Needs ../shared/data/llama-tokenizer (mlx-lm loads the tokenizer through transformers).
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_map

from openelm_mlx import load, save
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.generate import stream_generate
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/llama-tokenizer/tokenizer.model"


def ours(model, tok, ids, max_tokens):
    for step in stream_generate(model, tok, ids, max_tokens):
        last = step
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def theirs(model, tokenizer, ids, max_tokens):
    for response in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
        last = response
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()

    mx.random.seed(0)
    model = Model(OpenELMConfig.from_preset("OpenELM-270M"))
    # Small weights keep random logits from collapsing onto EOS, so both runs generate every token.
    model.update(tree_map(lambda p: (p * 0.5).astype(getattr(mx, args.dtype)), model.parameters()))
    folder = Path(tempfile.mkdtemp()) / "OpenELM-270M-random"
    save(model, folder, tokenizer=Tokenizer(TOKENIZER))
    our_model, our_tok = load(folder)
    their_model, their_tok = mlx_lm.load(str(folder))
    ids = [1] + [(i * 7919) % 31000 + 3 for i in range(args.prompt_tokens - 1)]

    results = {"openelm-mlx": [], "mlx-lm": []}
    ours(our_model, our_tok, ids[:16], 4)  # warm up both
    theirs(their_model, their_tok, ids[:16], 4)
    for _ in range(args.rounds):
        results["openelm-mlx"].append(ours(our_model, our_tok, ids, args.max_tokens))
        results["mlx-lm"].append(theirs(their_model, their_tok, ids, args.max_tokens))
    med = {
        k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), v[-1][2])
        for k, v in results.items()
    }
    print(
        f"270M-shaped, {args.dtype}, {args.prompt_tokens}-token prompt, {args.max_tokens} new tokens, "
        f"median of {args.rounds} alternating rounds on {mx.default_device()}"
    )
    for name, (ptps, gtps, n) in med.items():
        print(f"  {name:12s} prompt {ptps:8.1f} tok/s   generation {gtps:7.2f} tok/s   ({n} tokens)")
    o, t = med["openelm-mlx"], med["mlx-lm"]
    print(f"  ratio ours/mlx-lm: prompt {o[0] / t[0]:.2f}x, generation {o[1] / t[1]:.2f}x")


if __name__ == "__main__":
    main()
