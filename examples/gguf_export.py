"""Export a model to GGUF for llama.cpp / LM Studio, and import it back.

    python examples/gguf_export.py [MODEL_FOLDER] [--outtype q8_0]

With no folder it uses the bundled demo. When llama-cpp-python is installed, the file is also run
inside llama.cpp and its greedy text is printed next to ours.
"""

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from openelm_mlx.convert import export_gguf, import_gguf

from openelm_mlx import load
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.errors import OptionError
from openelm_mlx.evaluate.llama_cpp import llama_greedy, open_llama
from openelm_mlx.generation.generate import generate

args = sys.argv[1:]
outtype = args[args.index("--outtype") + 1] if "--outtype" in args else "f16"
folder = Path(args[0]) if args and not args[0].startswith("--") else DEMO_DIR
work = Path(tempfile.mkdtemp())

report = export_gguf(folder, work / "model.gguf", outtype)
print(f"wrote {report.output}: {report.bytes_on_disk / 1e6:.1f} MB, {report.outtype}, tensors by type {report.types}")
for note in report.notes:
    print("note:", note)

import_gguf(work / "model.gguf", work / "back")  # GGUF -> MLX, tokenizer.model rebuilt from the vocabulary
(model, tok), (back, _) = load(folder), load(work / "back")
tokens = mx.array([tok.encode("ROMEO: But soft, what light")])
a, b = np.array(model(tokens)), np.array(back(tokens))
print(f"round trip: logits within {np.abs(a - b).max() / np.abs(a).max():.1e} relative")

prompt = "ROMEO:"
print("ours:      ", repr(generate(model, tok, prompt, max_tokens=24, temp=0.0)))
try:
    llm = open_llama(work / "model.gguf", n_ctx=256)  # weight repacking off: see its docstring
except OptionError as e:
    print(f"llama.cpp: skipped ({e})")
    sys.exit()
print("llama.cpp: ", repr(tok.decode(llama_greedy(llm, tok.encode(prompt), 24))))
