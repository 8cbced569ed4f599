"""Speculative decoding on a real pair: acceptance rate, speed, and that greedy text is unchanged.

    python benchmarks/speculative.py [TARGET] [--draft DRAFT] [--num-draft-tokens 3] [--max-tokens 200]

Default pair: the bundled demo model drafted by its own 4-bit quantization (same vocabulary). The row is merged into
benchmarks/results.json with machine, backend and BLAS.
"""

import argparse
from pathlib import Path

from openelm_mlx import load
from openelm_mlx.bench import speed as bench
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.generation.generate import stream_generate
from openelm_mlx.quant.recipes import quantize_model

RESULTS = Path(__file__).resolve().parent / "results.json"
PROMPTS = ["ROMEO:", "First Citizen:\nWe are accounted poor citizens", "KING RICHARD III:\nNow is the winter"]


def run(model, tok, prompt, max_tokens, draft=None, k=3):
    text, accepted = "", 0
    for step in stream_generate(model, tok, prompt, max_tokens=max_tokens, draft_model=draft, num_draft_tokens=k):
        text += step.text
        accepted += step.from_draft
        last = step
    return text, accepted, last.generation_tokens, last.generation_tps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", nargs="?", default=str(DEMO_DIR))
    parser.add_argument("--draft", default=None)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    model, tok = load(args.target)
    if args.draft:
        draft = load(args.draft, tokenizer=tok.model_file)[0]
        name = args.draft
    else:
        draft = load(args.target)[0]
        quantize_model(draft, bits=4, group_size=64)
        name = "its own 4-bit quantization"
    run(model, tok, "Hi", 8)  # warm up
    total_acc = total_gen = 0
    plain_tps, spec_tps, same = [], [], True
    for prompt in PROMPTS:
        plain, _, _, ptps = run(model, tok, prompt, args.max_tokens)
        spec, acc, n, stps = run(model, tok, prompt, args.max_tokens, draft, args.num_draft_tokens)
        same &= plain == spec
        total_acc, total_gen = total_acc + acc, total_gen + n
        plain_tps.append(ptps)
        spec_tps.append(stps)
    print(f"target {args.target}, draft {name}, {args.num_draft_tokens} draft tokens per step, temp 0")
    print(f"  tokens from the draft: {total_acc}/{total_gen} = {100 * total_acc / total_gen:.1f}%")
    print(
        f"  generation tok/s plain {sum(plain_tps) / len(plain_tps):.1f}, speculative "
        f"{sum(spec_tps) / len(spec_tps):.1f} ({sum(spec_tps) / sum(plain_tps):.2f}x)"
    )
    print(f"  text identical to plain decoding: {same}")
    row = {
        "target": Path(args.target).name,
        "draft": name,
        "num_draft_tokens": args.num_draft_tokens,
        "max_tokens": args.max_tokens,
        "from_draft": total_acc / total_gen,
        "plain_tps": sum(plain_tps) / len(plain_tps),
        "speculative_tps": sum(spec_tps) / len(spec_tps),
        "speedup": sum(spec_tps) / sum(plain_tps),
        "text_identical": same,
    }
    bench.record(RESULTS, f"speculative {Path(args.target).name}/draft={Path(name).name}", row)


if __name__ == "__main__":
    main()
