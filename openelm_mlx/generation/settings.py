"""Generation settings: `GenerationConfig` (every default once, checked when built) and the checks and sizes that
every generation path shares."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OptionError, check_range, settings_field

KV_BITS = (2, 4, 8)  # mlx-lm's QuantizedKVCache packs head_dim // (32 // bits) words: exact only when bits divides 32
KV_GROUP_SIZES = (32, 64, 128)
MAX_TOKENS = 1 << 31  # far past any context; beyond it a number is a typo, not a request
MIN_KV_SIZE = 8  # a rotating cache keeps the first 4 tokens and needs room to rotate


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation setting, checked once when built (an out-of-range value raises OptionError).

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temp: sampling temperature (0: greedy); top_p: nucleus mass in (0, 1] (1: off);
            top_k: k likeliest tokens (0: off); min_p: drop tokens below min_p x the top probability.
        repetition_penalty: e.g. 1.2 (None: off) over the last `repetition_context_size` tokens.
        seed: the row's own random key (MLX's global random state is never touched): the same seed gives the
            same sample, alone or in a batch.
        stop: strings that end generation (not included in the text).
        max_kv_size: a rotating KV cache of this many tokens (None: unbounded).
        kv_bits / kv_group_size: a quantized KV cache (group size default: the largest of 64, 32
            that divides the model's head_dim).
        num_draft_tokens: tokens a draft model proposes per step (speculative decoding).
    """

    max_tokens: int = settings_field(512, "Most tokens to generate.")
    temp: float = settings_field(0.0, "Sampling temperature (0: greedy).")
    top_p: float = settings_field(1.0, "Nucleus sampling mass in (0, 1] (1: off).")
    top_k: int = settings_field(0, "Sample among the k likeliest tokens (0: off).")
    min_p: float = settings_field(0.0, "Drop tokens below min_p x the top probability (0: off).")
    repetition_penalty: float | None = settings_field(
        None, "Penalty for repeating recent tokens; Apple's model card suggests 1.2."
    )
    repetition_context_size: int = settings_field(20, "How many recent tokens the repetition penalty looks at.")
    seed: int | None = settings_field(None, "Random seed (same seed, same sample).")
    stop: tuple[str, ...] = settings_field((), "Stop at this string (repeatable; not printed).")
    max_kv_size: int | None = settings_field(None, "Rotating KV cache of this many tokens (>= 8), for long runs.")
    kv_bits: int | None = settings_field(None, "Quantize the KV cache to this many bits (4 or 8 are typical).")
    kv_group_size: int | None = settings_field(
        None, "Group size of the quantized KV cache (default: 64, or 32 when 64 does not divide head_dim)."
    )
    num_draft_tokens: int = settings_field(3, "Tokens the draft model proposes per step.")

    def __post_init__(self) -> None:
        check_range("max_tokens", self.max_tokens, 1, MAX_TOKENS, integer=True)
        check_range("temp", self.temp, 0, 100)
        check_range("top_p", self.top_p, 0, 1, low_open=True)
        check_range("top_k", self.top_k, 0, integer=True)
        check_range("min_p", self.min_p, 0, 1)
        check_range("repetition_penalty", self.repetition_penalty, 0, 100, low_open=True)
        check_range("repetition_context_size", self.repetition_context_size, 1, integer=True)
        check_range("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_range("max_kv_size", self.max_kv_size, MIN_KV_SIZE, integer=True)
        check_range("num_draft_tokens", self.num_draft_tokens, 1, 64, integer=True)
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise OptionError("kv_bits", f"must be one of {KV_BITS}, got {self.kv_bits!r}")
        if self.kv_group_size is not None and self.kv_group_size not in KV_GROUP_SIZES:
            raise OptionError("kv_group_size", f"must be one of {KV_GROUP_SIZES}, got {self.kv_group_size!r}")
        if self.kv_group_size is not None and self.kv_bits is None:
            raise OptionError("kv_group_size", "takes effect only with kv_bits (a quantized KV cache)")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise OptionError("kv_bits", "cannot be combined with max_kv_size (a rotating cache cannot be quantized)")
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) for s in stops):
            raise OptionError("stop", f"must be strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in stops if s))

    def replace(self, **settings: Any) -> GenerationConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **settings) if settings else self


def prefill_step() -> int:
    """Prompt tokens per forward pass. On the CPU backend 256 (a 1024-token prompt of the 270M model: 210 tok/s,
    against 191 at 512 and 165 in one pass; `benchmarks/prefill_chunks.py`), 512 on the GPU."""
    return 256 if mx.default_device() == mx.cpu else 512


def resolve_config(config: GenerationConfig | None, settings: dict[str, Any]) -> GenerationConfig:
    """`config` (default: all defaults) with keyword `settings` applied; unknown names raise TypeError."""
    unknown = set(settings) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    return (config or GenerationConfig()).replace(**settings)


def kv_group_size_for(config: GenerationConfig, head_dim: int) -> int:
    """The quantized-KV group size: the configured one (checked against head_dim), or the largest of 64/32 that fits."""
    if config.kv_group_size is not None:
        if head_dim % config.kv_group_size:
            raise OptionError("kv_group_size", f"{config.kv_group_size} must divide the model's head_dim {head_dim}")
        return config.kv_group_size
    for size in (64, 32):
        if head_dim % size == 0:
            return size
    raise OptionError("kv_bits", f"needs a head_dim divisible by 32; this model's is {head_dim}")


def check_prompt_ids(model: nn.Module, prompt_ids: Sequence[int]) -> None:
    """A prompt is at least one token, each an int id in the model's vocabulary.

    Raises:
        OptionError: naming the prompt.
    """
    if not prompt_ids:
        raise OptionError("prompt", "is empty")
    vocab = model.config.vocab_size
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab for t in prompt_ids):
        raise OptionError("prompt", f"token ids must be whole numbers in [0, {vocab})")


def context_room(model: nn.Module, cache: list[Any] | None, prompt_tokens: int, max_kv_size: int | None) -> int | None:
    """Tokens that can be generated after a prompt (and what `cache` holds before it) before the model's context is
    full, or None with a rotating cache (`max_kv_size`), which never fills."""
    if max_kv_size is not None:
        return None
    return model.config.max_context_length - (cache[0].offset if cache else 0) - prompt_tokens


def check_context(model: nn.Module, prompt_ids: Sequence[int]) -> None:
    """A prompt must fit the model's context, with room for one generated token (the same rule as the server's).

    Raises:
        OptionError: naming the prompt, its length and the context.
    """
    limit = model.config.max_context_length
    if len(prompt_ids) >= limit:
        raise OptionError(
            "prompt",
            f"has {len(prompt_ids)} tokens; the model's context is {limit} tokens, with room for at least one more",
        )
