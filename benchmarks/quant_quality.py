"""Quantization quality table: perplexity, bits per weight and size of the bundled demo model on held-out
tiny Shakespeare (last 5%), for RTN bits, mixed recipes, GPTQ and a bits target, against `mlx_lm.convert -q`.

LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/quant_quality.py [--samples N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.evaluate.perplexity import make_windows, perplexity
from openelm_mlx.folders.io import load
from openelm_mlx.quant.recipes import bits_per_weight
from openelm_mlx.quant.run import QuantizeOptions, quantize_folder

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
RUNS = [  # (label, QuantizeOptions fields)
    ("RTN 8-bit", {"bits": 8}),
    ("RTN 6-bit", {"bits": 6}),
    ("RTN 4-bit", {"bits": 4}),
    ("RTN 3-bit", {"bits": 3}),
    ("mixed_4_6", {"recipe": "mixed_4_6"}),
    ("mixed_3_6", {"recipe": "mixed_3_6"}),
    ("GPTQ 4-bit", {"bits": 4, "method": "gptq"}),
    ("GPTQ 3-bit", {"bits": 3, "method": "gptq"}),
    ("GPTQ 3-bit, 6-bit embedding", {"bits": 3, "method": "gptq", "embedding_bits": "6"}),
    ("--target-bpw 4.5 (RTN)", {"target_bpw": 4.5}),
]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("model*.safetensors"))


def row(label: str, model, path: Path, windows: mx.array, seconds: float) -> str:
    ppl = perplexity(model, windows, batch_size=4).perplexity
    return f"| {label} | {bits_per_weight(model):.2f} | {folder_bytes(path) / 1e6:.2f} | {ppl:.2f} | {seconds:.0f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=16, help="held-out windows of 256 tokens")
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        print(f"skipped: {SHAKESPEARE} is not present")
        return
    text = SHAKESPEARE.read_text()
    cut = int(len(text) * 0.95)
    work = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    (work / "heldout.txt").write_text(text[cut:])
    (work / "calib.txt").write_text(text[:100_000])  # from the training part
    model, tok = load(DEMO_DIR)
    windows = make_windows(tok.encode(text[cut:], add_bos=False), 256, tok.bos_id, args.samples)
    lines = ["| model | bits/weight | weights MB | perplexity | seconds |", "|---|---|---|---|---|"]
    lines.append(row("float32 (demo)", model, DEMO_DIR, windows, 0))
    for label, fields in RUNS:
        opts = QuantizeOptions(calib=(str(work / "calib.txt"),), seq_len=256, num_samples=16, **fields)
        tic = time.perf_counter()
        quantize_folder(DEMO_DIR, work / label.replace(" ", "_"), opts)
        q, _ = load(work / label.replace(" ", "_"))
        lines.append(row(label, q, work / label.replace(" ", "_"), windows, time.perf_counter() - tic))
        print(lines[-1], file=sys.stderr)
    from mlx_lm import load as lm_load
    from mlx_lm.convert import convert

    for bits in (4, 3):
        out = work / f"mlx_lm_q{bits}"
        tic = time.perf_counter()
        convert(str(DEMO_DIR), str(out), quantize=True, q_bits=bits, q_group_size=64)
        q, _ = lm_load(str(out))
        lines.append(row(f"mlx_lm.convert -q --q-bits {bits}", q, out, windows, time.perf_counter() - tic))
        print(lines[-1], file=sys.stderr)
    print(f"held-out: last 5% of tiny Shakespeare, {windows.shape[0]} windows x 256 tokens; group size 64")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
