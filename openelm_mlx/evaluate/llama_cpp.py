"""Scores from inside llama.cpp (through the `llama-cpp-python` binding) for a GGUF file, on token ids:
logits, perplexity on `make_windows` windows, and greedy decoding; to check an export against our model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError
from .perplexity import Perplexity


def open_llama(path: str | Path, n_ctx: int = 512, n_threads: int | None = None, repack: bool = False) -> Any:
    """A `llama_cpp.Llama` on `path` that keeps every position's logits (quiet: no llama.cpp log).

    `repack=False` turns off llama.cpp's extra CPU buffer types (weight repacking, `--no-repack` in
    llama-cli): with them, llama-cpp-python 0.3.36's Intel AMX kernels crash (SIGSEGV in
    `ggml_backend_amx_mul_mat`) on quantized OpenELM weights, its own quantizer's output included.

    Raises:
        OptionError: llama-cpp-python is not installed.
    """
    try:
        import llama_cpp.llama_cpp as api
        from llama_cpp import Llama
    except ImportError:
        raise OptionError("llama_cpp", "needs llama-cpp-python: pip install llama-cpp-python") from None
    defaults = api.llama_model_default_params

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = repack
        return p

    api.llama_model_default_params = params  # Llama() takes no such option; restored once it is built
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=n_threads,
            seed=0,
            type_k=0,
            type_v=0,
        )  # a float32 KV cache (GGML type 0), as ours
    finally:
        api.llama_model_default_params = defaults


def llama_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits (L, vocab) for `tokens` from an empty context, as float64."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def llama_perplexity(llm: Any, windows: Any) -> Perplexity:
    """Perplexity through llama.cpp on `make_windows` windows (BOS, then seq_len scored tokens each)."""
    total, count = 0.0, 0
    windows = np.asarray(windows).tolist()
    for window in windows:
        logits = llama_logits(llm, window)[:-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    nll = total / count
    return Perplexity(math.exp(nll) if nll < 700 else math.inf, nll, count, len(windows))


def llama_greedy(llm: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy (argmax) continuation of `prompt` by llama.cpp, `max_tokens` ids."""
    out: list[int] = []
    llm.reset()
    llm.eval(prompt)
    for _ in range(max_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out
