"""Convert a checkpoint to MLX and export it back to Apple's Hugging Face format.

    python examples/convert.py SRC DST --tokenizer hf-internal-testing/llama-tokenizer
        (SRC: a Hub repo such as apple/OpenELM-270M-Instruct, a folder, or a CoreNet .pt file)

With no arguments it exports the bundled demo to Hugging Face format first, so it runs offline.
"""

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from openelm_mlx.convert import convert, export

from openelm_mlx import load_model
from openelm_mlx.demo import DEMO_DIR
from openelm_mlx.quant.run import QuantizeOptions

if len(sys.argv) >= 3:
    tokenizer = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
    report = convert(sys.argv[1], sys.argv[2], tokenizer=tokenizer)
    print(f"wrote {report.output} ({report.bytes_on_disk / 1e6:.1f} MB, {report.dtype}) in {report.seconds:.1f}s")
    sys.exit()

work = Path(tempfile.mkdtemp())
export(DEMO_DIR, work / "hf")  # MLX -> Apple's format (config.json with auto_map, model.safetensors)
report = convert(work / "hf", work / "mlx")  # ... and back, tokenizer included
q = convert(work / "hf", work / "mlx-q4", quantize=QuantizeOptions(bits=4))  # as `quantize` takes them
print(
    f"float: {report.bytes_on_disk / 1e6:.1f} MB; 4-bit: {q.bytes_on_disk / 1e6:.1f} MB, "
    f"{q.bits_per_weight:.2f} bits per weight"
)

tokens = mx.array([[1, 100, 200, 300]])
same = mx.array_equal(load_model(DEMO_DIR)(tokens), load_model(work / "mlx")(tokens)).item()
print(f"round trip gives identical logits: {same}")
