"""Peak memory and time of converting a 1.1B-shaped checkpoint (random weights, made here, not kept).

    python benchmarks/convert_memory.py [--dtype float32] [--workdir DIR]

Writes an Apple-format `model.safetensors` (4.3 GB at float32) and, for the streaming claim,
converts it in a child process whose peak resident memory (max RSS) is reported next to the
sizes of the source file and of the largest output shard. Rows are merged into benchmarks/results.json with
machine, backend and BLAS.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
import mlx.core as mx
import numpy as np

from openelm_mlx.bench import speed as bench
from openelm_mlx.model.config import OpenELMConfig
from openelm_mlx.model.decoder import Model

RESULTS = Path(__file__).resolve().parent / "results.json"

CHILD = """
import sys, json, resource
from openelm_mlx.convert import convert
from openelm_mlx.quant.run import QuantizeOptions
r = convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], quantize=QuantizeOptions() if sys.argv[4] == "1" else None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": r.seconds, "bytes": r.bytes_on_disk, "peak_rss": peak}))
"""


def make_checkpoint(folder: Path, dtype: str) -> Path:
    """A random 1.1B-shaped Apple checkpoint written tensor by tensor (never all in memory)."""
    from mlx.utils import tree_flatten

    config = OpenELMConfig.from_preset("OpenELM-1_1B")
    shapes = {k: v.shape for k, v in tree_flatten(Model(config).parameters())}  # lazy: nothing allocated
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": dtype}))
    itemsize = {"float32": 4, "bfloat16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": {"float32": "F32", "bfloat16": "BF16"}[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            a = rng.standard_normal(shape, dtype=np.float32) * 0.02
            f.write(a.tobytes() if dtype == "float32" else (a.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return folder


def convert_in_child(src: Path, dst: Path, dtype: str, quantize: bool) -> dict:
    tic = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), dtype, "1" if quantize else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - tic
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shards = sorted(dst.glob("model*.safetensors"), key=lambda p: p.stat().st_size)
    return {**result, "wall": wall, "largest_output_shard": shards[-1].stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="openelm-convert-bench-"))
    try:
        tic = time.perf_counter()
        src = make_checkpoint(work / "hf", args.dtype)
        size = (src / "model.safetensors").stat().st_size
        print(f"made a 1.1B-shaped {args.dtype} checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - tic:.0f}s")
        for quantize in (False, True):
            dst = work / ("mlx-q4" if quantize else "mlx")
            r = convert_in_child(src, dst, args.dtype, quantize)
            label = "convert -q (4-bit)" if quantize else "convert"
            print(
                f"{label}: {r['wall']:.1f}s wall; peak RSS {r['peak_rss'] / 1e9:.2f} GB = "
                f"{r['peak_rss'] / size:.2f} x the source shard; output {r['bytes'] / 1e9:.2f} GB, "
                f"largest output shard {r['largest_output_shard'] / 1e9:.2f} GB; "
                f"peak / (source + output shard) = {r['peak_rss'] / (size + r['largest_output_shard']):.2f}"
            )
            row = {**r, "source_bytes": size, "peak_over_source": r["peak_rss"] / size}
            bench.record(RESULTS, f"{label} OpenELM-1_1B/{args.dtype}", row)
            shutil.rmtree(dst)
        mx.clear_cache()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
