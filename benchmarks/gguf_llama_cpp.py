"""GGUF export checked inside llama.cpp: per --outtype, the file size, llama.cpp's perplexity next to ours on
the same held-out windows (the demo model, last 5% of tiny Shakespeare), and greedy text from both programs.

"ours (same weights)" is our MLX model imported back from that GGUF, so both programs run identical weights;
"ours (float)" is the demo itself. Needs llama-cpp-python (pip install llama-cpp-python).

python benchmarks/gguf_llama_cpp.py [--samples 16] [--outtypes f32,f16,q8_0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from openelm_mlx.convert import export_gguf, import_gguf

from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.evaluate.llama_cpp import llama_greedy, llama_perplexity, open_llama
from openelm_mlx.evaluate.perplexity import make_windows, perplexity
from openelm_mlx.folders.io import load
from openelm_mlx.generation.generate import generate

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
OUTTYPES = "f32,f16,bf16,q8_0,q4_0,q4_k_m,q6_k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=16, help="held-out windows of 256 tokens")
    ap.add_argument("--outtypes", default=OUTTYPES)
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        print(f"skipped: {SHAKESPEARE} is not present")
        return
    text = SHAKESPEARE.read_text()
    model, tok = load(DEMO_DIR)
    windows = make_windows(tok.encode(text[int(len(text) * 0.95) :], add_bos=False), 256, tok.bos_id, args.samples)
    float_ppl = perplexity(model, windows).perplexity
    work = Path(tempfile.mkdtemp(prefix="gguf_llama_cpp-"))
    prompt = "ROMEO:"
    lines = [
        "| --outtype | file MB | tensors by type | llama.cpp ppl | ours (same weights) | ours (float) "
        "| greedy 32 tokens identical |",
        "|---|---|---|---|---|---|---|",
    ]
    texts = {}
    for outtype in args.outtypes.split(","):
        path = work / f"demo-{outtype}.gguf"
        report = export_gguf(DEMO_DIR, path, outtype)
        import_gguf(path, work / outtype)
        back, _ = load(work / outtype)
        llm = open_llama(path, n_ctx=512)
        theirs = llama_perplexity(llm, windows).perplexity
        ours = perplexity(back, windows).perplexity
        ours_text = generate(back, tok, prompt, max_tokens=32, temp=0.0)
        llama_text = tok.decode(llama_greedy(llm, tok.encode(prompt), 32))
        texts[outtype] = (ours_text, llama_text)
        types = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
        lines.append(
            f"| {outtype} | {report.bytes_on_disk / 1e6:.2f} | {types} | {theirs:.3f} | {ours:.3f} | {float_ppl:.3f} "
            f"| {ours_text == llama_text} |"
        )
        print(lines[-1], flush=True)
    print(f"held-out: last 5% of tiny Shakespeare, {windows.shape[0]} windows x 256 tokens")
    print("\n".join(lines))
    for outtype, (a, b) in texts.items():
        print(f"\n{outtype} ours:      {a!r}\n{outtype} llama.cpp: {b!r}")


if __name__ == "__main__":
    main()
