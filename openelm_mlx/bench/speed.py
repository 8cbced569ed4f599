"""Speed measurements: our decode next to mlx-lm's OpenELM on the same weights (in process, alternating runs,
medians) and mlx-lm's own benchmark CLI out of the box, plus machine figures (matmul GFLOP/s, memory GB/s).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..errors import OpenELMError, OptionError, check_range
from ..folders.fs import write_file_atomic
from ..folders.io import DTYPES as _DTYPES
from ..folders.io import parse_dtype
from ..generation.generate import GenerationConfig, generate_tokens
from ..model.config import OpenELMConfig
from ..model.decoder import Model
from ..model.step import decoder_for
from . import blas

DTYPES = tuple(_DTYPES)


@dataclass
class Speed:
    """One run (or the medians of several): prompt and generation tokens/s, peak MLX memory."""

    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
            "peak_memory_gb": self.peak_memory_gb,
        }


DEFAULT_PROMPT_TOKENS = 128
DEFAULT_GEN_TOKENS = 64


def fit_lengths(prompt_tokens: int | None, gen_tokens: int | None, context: int) -> tuple[int, int, str | None]:
    """The prompt and generation lengths to measure on a model of `context` tokens: the given ones, and for
    None the defaults, shrunk (in proportion when both are defaults) to fit, with a note saying so (else None).

    Raises:
        OptionError: the given lengths leave no room (a prompt of 1 token and 2 new tokens at least).
    """
    p = DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens
    g = DEFAULT_GEN_TOKENS if gen_tokens is None else gen_tokens
    if p + g <= context:
        return p, g, None
    if prompt_tokens is not None and gen_tokens is not None:
        raise OptionError("prompt_tokens", f"{p} + {g} generated tokens is more than the model's context {context}")
    if prompt_tokens is None and gen_tokens is None:
        p = context * DEFAULT_PROMPT_TOKENS // (DEFAULT_PROMPT_TOKENS + DEFAULT_GEN_TOKENS)
        g = context - p
    elif prompt_tokens is None:
        p = context - g
    else:
        g = context - p
    if p < 1 or g < 2:
        name, given = ("gen_tokens", gen_tokens) if gen_tokens is not None else ("prompt_tokens", prompt_tokens)
        why = f"{given} leaves too few tokens of" if given is not None else "too few tokens in"
        raise OptionError(name, f"{why} the model's context {context} to measure")
    note = f"a {p}-token prompt and {g} new tokens, to fit the model's max_context_length {context}"
    return p, g, note + f" (the defaults are {DEFAULT_PROMPT_TOKENS} and {DEFAULT_GEN_TOKENS})"


def check_options(prompt_tokens: int | None, gen_tokens: int | None, repeats: int, dtype: str) -> None:
    """Raise OptionError for a setting out of range (None: a default)."""
    check_range("prompt_tokens", prompt_tokens, 1, 65536, integer=True)
    check_range("gen_tokens", gen_tokens, 2, 65536, integer=True)
    check_range("repeats", repeats, 1, 100, integer=True)
    parse_dtype(dtype)


def machine() -> str:
    """CPU model, core count, OS and MLX device, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.machine()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, MLX {mx.__version__} {mx.default_device()}"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 n x n matmul rate in MLX."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def memory_read_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth of numpy sums over a buffer larger than the caches, the better of one
    thread and one thread per core (a multi-threaded BLAS reads with every core)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = os.cpu_count() or 1
    parts = np.array_split(np.ones(megabytes * (1 << 20) // 4, dtype=np.float32), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for i in range(2 * repeats):
            tic = time.perf_counter()
            list(pool.map(np.sum, parts) if i % 2 else map(np.sum, parts))
            best = min(best, time.perf_counter() - tic)
    return sum(p.nbytes for p in parts) / best / 1e9


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: all of them, less the embedding table unless it is the lm_head."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if getattr(model.config, "share_input_output_layers", True):
        return total
    emb = model.transformer.token_embeddings
    return total - sum(v.nbytes for _, v in tree_flatten(emb.parameters())) + total // max(emb.weight.shape[0], 1)


def random_model(config: OpenELMConfig, dtype: str = "float32", seed: int = 0) -> Model:
    """A model with small random weights (so logits stay varied) in `dtype`."""
    mx.random.seed(seed)
    model = Model(config)
    model.update(tree_map(lambda p: (p * 0.5).astype(parse_dtype(dtype)), model.parameters()))
    mx.eval(model.parameters())
    return model.eval()


def mlx_lm_twin(model: Model) -> nn.Module:
    """mlx-lm's OpenELM model sharing `model`'s weight arrays (and quantization, if any)."""
    from mlx_lm.models.openelm import Model as MlxLmModel
    from mlx_lm.models.openelm import ModelArgs

    from ..folders.io import model_config_dict

    config = model_config_dict(model)
    twin = MlxLmModel(ModelArgs.from_dict(config))
    if q := config.get("quantization"):
        nn.quantize(twin, group_size=q["group_size"], bits=q["bits"])
    twin.update(model.parameters())
    return twin


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab, n)]


def _timed(tokens: Iterator[int], prompt_tokens: int) -> Speed:
    """Prompt tokens/s to the first token, generation tokens/s over the rest (as mlx-lm counts them)."""
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    n, first = 0, 0.0
    for _ in tokens:
        n += 1
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return Speed(prompt_tokens / (first - tic), (n - 1) / max(end - first, 1e-9), mx.get_peak_memory() / 1e9)


def run_ours(model: nn.Module, ids: list[int], gen_tokens: int) -> Speed:
    """Our generation path (`generate_tokens`, greedy, EOS ignored)."""
    config = GenerationConfig(max_tokens=gen_tokens)
    return _timed(generate_tokens(model, ids, config=config, eos_ids=()), len(ids))


def run_mlx_lm(model: nn.Module, ids: list[int], gen_tokens: int) -> Speed:
    """mlx-lm's `generate_step` with its defaults (prefill step 2048, greedy)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=gen_tokens)
    return _timed((int(t) for t, _ in steps), len(ids))


def median(runs: list[Speed]) -> Speed:
    return Speed(
        *(statistics.median(getattr(r, f) for r in runs) for f in ("prompt_tps", "generation_tps", "peak_memory_gb"))
    )


def alternate(runners: dict[str, Callable[[], Speed]], repeats: int) -> dict[str, Speed]:
    """Run each runner once to warm up, then `repeats` rounds in alternating order; medians per runner."""
    for run in runners.values():
        run()
    runs: dict[str, list[Speed]] = {k: [] for k in runners}
    for i in range(repeats):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for k in order:
            runs[k].append(runners[k]())
    return {k: median(v) for k, v in runs.items()}


def paired_decode(models: dict[str, nn.Module], ids: list[int], steps: int) -> dict[str, float]:
    """Greedy decode steps of each model interleaved one token at a time (robust to load from other processes):
    median tokens/s per model and the median of the per-step time ratios, first model over second."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = {k: make_prompt_cache(m) for k, m in models.items()}
    tokens = {k: mx.array([ids]) for k in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 1):
        for k in list(models) if i % 2 == 0 else reversed(list(models)):
            tic = time.perf_counter()
            tokens[k] = mx.argmax(models[k](tokens[k], caches[k])[:, -1:], axis=-1)
            mx.eval(tokens[k])
            if i:  # step 0 is the prompt
                times[k].append(time.perf_counter() - tic)
    a, b = list(models)
    out = {f"{k}_tps": 1 / statistics.median(v) for k, v in times.items()}
    out["ratio"] = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
    return out


def clean_env() -> dict[str, str]:
    """The environment a user has out of the box: none of our BLAS setup."""
    return {k: v for k, v in os.environ.items() if k != blas.ENV and not k.startswith("PYTEST")}


def run_mlx_lm_cli(folder: Path, prompt_tokens: int, gen_tokens: int, repeats: int, timeout: float = 3600) -> Speed:
    """`python -m mlx_lm.benchmark` in a fresh process (averages of `repeats` trials after its warm-up).

    mlx-lm counts generation as `gen_tokens` tokens over the time after the first one; this module counts the
    `gen_tokens - 1` tokens made in that time (as `_timed` does), so its figure is scaled by (g - 1) / g to compare.
    """
    cmd = [sys.executable, "-m", "mlx_lm.benchmark", "--model", str(folder), "-p", str(prompt_tokens)]
    cmd += ["-g", str(gen_tokens), "-n", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=timeout)
    found = re.search(r"Averages: prompt_tps=([\d.]+), generation_tps=([\d.]+), peak_memory=([\d.]+)", out.stdout)
    if out.returncode or not found:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OpenELMError(f"mlx_lm.benchmark failed: {tail[0][:300]}")
    prompt_tps, generation_tps, peak = map(float, found.groups())
    return Speed(prompt_tps, generation_tps * (gen_tokens - 1) / gen_tokens, peak)


def ratio(a: Speed, b: Speed) -> dict[str, float]:
    return {"prompt": a.prompt_tps / b.prompt_tps, "generation": a.generation_tps / b.generation_tps}


def roofline(model: nn.Module, generation_tps: float, gbps: float) -> dict[str, float]:
    """How close decode gets to reading every weight once per token at the measured memory bandwidth."""
    per_token = weight_bytes_per_token(model)
    return {
        "weight_bytes_per_token": per_token,
        "memory_read_gbps": gbps,
        "fraction": generation_tps * per_token / (gbps * 1e9),
    }


def report(
    model: nn.Module,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    cli_folder: Path | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """The whole benchmark as the JSON-able dict that `openelm-mlx bench --json` writes."""
    ids = prompt_ids(prompt_tokens, model.config.vocab_size)
    runners: dict[str, Callable[[], Speed]] = {"ours": lambda: run_ours(model, ids, gen_tokens)}
    if compare:
        twin = mlx_lm_twin(model)
        runners["mlx_lm"] = lambda: run_mlx_lm(twin, ids, gen_tokens)
    speeds = alternate(runners, repeats)
    cli = run_mlx_lm_cli(cli_folder, prompt_tokens, gen_tokens, repeats) if cli_folder else None
    out: dict[str, Any] = {"ours": speeds["ours"].as_dict()}
    out["mlx_lm"] = speeds["mlx_lm"].as_dict() if "mlx_lm" in speeds else None
    out["mlx_lm_cli"] = cli.as_dict() if cli else None
    out["ratio"] = ratio(speeds["ours"], speeds["mlx_lm"]) if "mlx_lm" in speeds else None
    out["ratio_cli"] = ratio(speeds["ours"], cli) if cli else None
    out["decode_paired"] = (
        paired_decode({"ours": decoder_for(model), "mlx_lm": twin}, ids, gen_tokens) if compare else None
    )
    out["roofline"] = roofline(model, speeds["ours"].generation_tps, memory_read_gbps())
    out["blas"] = blas.STATE.describe()
    out["machine"] = machine()
    out["settings"] = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats}
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_file_atomic(path, json.dumps(data, indent=2) + "\n")


def environment() -> dict[str, str]:
    """What every results row names: the machine, MLX's backend, the BLAS in use and the compiled decode step's exp."""
    from ..model.step import default_exp

    env = {"machine": machine(), "backend": str(mx.default_device()), "blas": blas.STATE.describe()}
    return {**env, "decode_exp": default_exp()}


def record(path: Path, key: str, row: dict[str, Any]) -> None:
    """Merge `row` (with the environment) into the JSON results file `path` under `key`."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = {**row, **environment(), "date": time.strftime("%Y-%m-%d")}
    write_json(path, dict(sorted(data.items())))


def quantized_speeds(
    model: Model, variants: list[tuple[int, int]], prompt_tokens: int, gen_tokens: int, repeats: int
) -> dict[str, Speed]:
    """Our decode speed for the float model and for each (bits, group_size) quantization of it, alternating."""
    import copy

    from ..quant.recipes import quantize_model

    ids = prompt_ids(prompt_tokens, model.config.vocab_size)
    models: dict[str, nn.Module] = {"float": model}
    for bits, group in variants:
        q = copy.deepcopy(model)
        quantize_model(q, bits=bits, group_size=group)
        mx.eval(q.parameters())
        models[f"q{bits}-g{group}"] = q
    runners = {k: (lambda m=m: run_ours(m, ids, gen_tokens)) for k, m in models.items()}
    return alternate(runners, repeats)
