"""Prompt and generation tokens/s of openelm-mlx next to mlx-lm (same weights, in process, and its CLI out of the
box), and float vs 8-/4-bit decode; rows are merged into benchmarks/results.json with machine, backend and BLAS.

    python benchmarks/generate_speed.py [--arch OpenELM-270M] [--dtype float32] [-p 128] [-g 32] [--repeats 3]
        [--tokenizer ../shared/data/llama-tokenizer/tokenizer.model] [--quantized]

Set OPENELM_MLX_BLAS=none for the rows without a fast BLAS (the loader is process-wide).
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)
from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench
from openelm_mlx.folders.io import save
from openelm_mlx.generation.tokenizer import Tokenizer
from openelm_mlx.model.config import OpenELMConfig

RESULTS = Path(__file__).resolve().parent / "results.json"
TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/llama-tokenizer/tokenizer.model"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="OpenELM-270M")
    parser.add_argument("--dtype", default="float32", choices=bench.DTYPES)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("-g", "--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="for mlx-lm's CLI (vocab >= the model's)")
    parser.add_argument("--quantized", action="store_true", help="float vs 8-/4-bit decode (group sizes 32/64/128)")
    args = parser.parse_args()
    model = bench.random_model(OpenELMConfig.from_preset(args.arch), args.dtype)
    tag = f"{args.arch}/{args.dtype}/blas={blas.STATE.source}"
    settings = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats}
    if args.quantized:
        variants = [(8, 64), (4, 32), (4, 64), (4, 128)]
        speeds = bench.quantized_speeds(model, variants, args.prompt_tokens, args.gen_tokens, args.repeats)
        row = {k: v.as_dict() for k, v in speeds.items()}
        for k, v in speeds.items():
            print(
                f"{k:10s} prompt {v.prompt_tps:8.1f} tok/s  generation {v.generation_tps:6.2f} tok/s "
                f"({v.generation_tps / speeds['float'].generation_tps:.2f}x float)"
            )
        bench.record(RESULTS, f"quantized decode {tag}", {**row, "settings": settings})
        return
    work = Path(tempfile.mkdtemp(prefix="openelm-speed-"))
    try:
        folder = save(model, work / "model", tokenizer=Tokenizer(args.tokenizer)) if args.tokenizer.is_file() else None
        r = bench.report(model, args.prompt_tokens, args.gen_tokens, args.repeats, cli_folder=folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k in ("ours", "mlx_lm", "mlx_lm_cli", "ratio", "ratio_cli", "decode_paired", "roofline"):
        print(f"{k:11s}", {a: round(b, 3) for a, b in (r[k] or {}).items()})
    bench.record(RESULTS, f"generate {tag}", r)


if __name__ == "__main__":
    main()
