"""Generation: tokenizer-free token streams on mlx-lm's KV caches and samplers, text streaming on top.

Every setting lives in one `GenerationConfig`. `generate_tokens` works on ids and any model with the
`model(tokens, cache) -> logits` contract; `stream_generate` / `generate` add the tokenizer, the
Instruct template and stop strings.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..errors import OptionError, check_range, settings_field
from ..model.step import decoder_for
from .tokenizer import Message, Tokenizer

Prompt = str | Sequence[Message] | Sequence[int]
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
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
        seed: seeds MLX's random state first, so the same seed gives the same sample.
        stop: strings that end generation (not included in the text).
        max_kv_size: a rotating KV cache of this many tokens (None: unbounded).
        kv_bits / kv_group_size: a quantized KV cache (group size default: the largest of 64, 32
            that divides the model's head_dim).
        num_draft_tokens: tokens a draft model proposes per step (speculative decoding).
    """

    max_tokens: int = settings_field(256, "Most tokens to generate.")
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


@dataclass
class GenerationStep:
    """One streamed piece of text with per-step statistics (`token` is -1 on the final, closing step)."""

    text: str
    token: int
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "eos", "stop_string", "length", or None while running
    logprobs: mx.array | None = None  # log-probabilities over the vocabulary for `token`'s step


def make_sampling(config: GenerationConfig) -> tuple[Sampler, list[LogitsProcessor]]:
    """mlx-lm's sampler and logits processors for these settings (temp 0: greedy)."""
    top_p = config.top_p if config.top_p < 1 else 0.0
    sampler = make_sampler(temp=config.temp, top_p=top_p, min_p=config.min_p, top_k=config.top_k)
    processors = make_logits_processors(
        repetition_penalty=config.repetition_penalty, repetition_context_size=config.repetition_context_size
    )
    return sampler, processors


def check_draft_model(model: nn.Module, draft_model: nn.Module) -> None:
    """A draft model must share the target's vocabulary, or every draft token would be rejected."""
    ours, theirs = model.config.vocab_size, draft_model.config.vocab_size
    if ours != theirs:
        raise OptionError("draft_model", f"has a vocabulary of {theirs} tokens, the model {ours}: they must match")


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


def token_steps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    *,
    eos_ids: set[int],
    draft_model: nn.Module | None = None,
    prompt_cache: list[Any] | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs, from_draft) until an id in `eos_ids` (not yielded) or `max_tokens`."""
    check_prompt_ids(model, prompt_ids)
    if config.seed is not None:
        mx.random.seed(config.seed)
    sampler, processors = make_sampling(config)
    prompt = mx.array(list(prompt_ids), dtype=mx.uint32)
    common: dict[str, Any] = dict(
        max_tokens=config.max_tokens, sampler=sampler, logits_processors=processors, prefill_step_size=prefill_step()
    )
    if config.kv_bits is not None:
        common.update(
            kv_bits=config.kv_bits,
            kv_group_size=kv_group_size_for(config, model.config.head_dim),
            quantized_kv_start=0,
        )
    if draft_model is not None:
        check_draft_model(model, draft_model)
        cache = prompt_cache or make_prompt_cache(model) + make_prompt_cache(draft_model)
        steps = speculative_generate_step(
            prompt,
            decoder_for(model),
            decoder_for(draft_model),
            num_draft_tokens=config.num_draft_tokens,
            prompt_cache=cache,
            **common,
        )
        items = ((int(t), lp, bool(d)) for t, lp, d in steps)
    else:
        cache = prompt_cache or make_prompt_cache(model, max_kv_size=config.max_kv_size)
        items = (
            (int(t), lp, False) for t, lp in generate_step(prompt, decoder_for(model), prompt_cache=cache, **common)
        )
    for token, logprobs, from_draft in items:
        if token in eos_ids:
            return
        yield token, logprobs, from_draft


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    config: GenerationConfig | None = None,
    draft_model: nn.Module | None = None,
    prompt_cache: list[Any] | None = None,
    eos_ids: Sequence[int] | None = None,
    **settings: Any,
) -> Iterator[int]:
    """Yield generated token ids (EOS ends the stream and is not yielded). Tokenizer-free.

    Args:
        model: any model with `model(tokens, cache) -> logits`, a `layers` list and a `config`.
        prompt_ids: the prompt, BOS included if wanted.
        config: the settings; keyword `settings` (e.g. `max_tokens=20, temp=0.8`) override it.
        draft_model: a smaller model with the same vocabulary for speculative decoding.
        prompt_cache: a cache to reuse and extend (e.g. across chat turns).
        eos_ids: ids that end generation (default: the model config's EOS).
    """
    config = resolve_config(config, settings)
    eos = set(eos_ids) if eos_ids is not None else {model.config.eos_token_id}
    for token, _, _ in token_steps(
        model, prompt_ids, config, eos_ids=eos, draft_model=draft_model, prompt_cache=prompt_cache
    ):
        yield token


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt, system: str | None = None, chat: bool | None = None
) -> list[int]:
    """Token ids for a string (the Instruct template when `chat`, default: the tokenizer's), a message
    list (always templated), or ids (as given). A `system` prompt needs the template.

    Raises:
        OptionError: `system` given for a prompt that is not rendered with the chat template.
    """
    if not isinstance(prompt, str) and not prompt:
        raise OptionError("prompt", "is empty (no text, messages or token ids)")
    if isinstance(prompt, str):
        use_chat = tokenizer.chat_template if chat is None else chat
        if not use_chat:
            if system is not None:
                raise OptionError("system", "needs the chat template (this prompt is plain text: enable chat)")
            return tokenizer.encode(prompt)
        prompt = [{"role": "user", "content": prompt}]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if system is not None:
            raise OptionError("system", "cannot be added to a prompt given as token ids")
        return list(prompt)  # type: ignore[arg-type]
    messages = list(prompt)  # type: ignore[arg-type]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages)


class StopStrings:
    """Holds back text that could still become a stop string; cuts at the first one found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """The text of a token stream: UTF-8-safe pieces, stop strings held back and cut, and the finish reason."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], config: GenerationConfig):
        self.detok = tokenizer.detokenizer(strip_leading_space=starts_fresh(tokenizer, prompt_ids))
        self.stops, self.max_tokens, self.n = StopStrings(config.stop), config.max_tokens, 0

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token: int) -> str:
        """The text that `token` completes (held back while it could still start a stop string)."""
        self.n += 1
        return self.stops.feed(self.detok.add_token(token))

    def finish(self) -> tuple[str, str]:
        """(the text still held back, the finish reason: "stop_string", "length" or "eos")."""
        if self.stopped:
            return "", "stop_string"
        tail = self.stops.feed(self.detok.finalize())
        tail += "" if self.stopped else self.stops.flush()
        return tail, "stop_string" if self.stopped else "length" if self.n >= self.max_tokens else "eos"


class _Stats:
    """Prompt and generation throughput: the clock restarts when the first token arrives."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.prompt_tps, self.n = prompt_tokens, 0.0, 0
        mx.reset_peak_memory()
        self.tic = time.perf_counter()

    def count(self) -> None:
        if self.n == 0:
            self.prompt_tps = self.prompt_tokens / max(time.perf_counter() - self.tic, 1e-9)
            self.tic = time.perf_counter()
        self.n += 1

    def step(self, text: str, token: int = -1, from_draft: bool = False, **extra: Any) -> GenerationStep:
        tps = self.n / max(time.perf_counter() - self.tic, 1e-9) if self.n else 0.0
        peak = mx.get_peak_memory() / 1e9
        return GenerationStep(text, token, from_draft, self.prompt_tokens, self.prompt_tps, self.n, tps, peak, **extra)


def _warn_if_too_long(model: nn.Module, ids: Sequence[int]) -> None:
    limit = model.config.max_context_length
    if len(ids) > limit:
        warnings.warn(
            f"the prompt has {len(ids)} tokens, more than the model's max_context_length {limit}: "
            "RoPE works past it, but quality is not promised",
            stacklevel=3,
        )


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    config: GenerationConfig | None = None,
    system: str | None = None,
    chat: bool | None = None,
    draft_model: nn.Module | None = None,
    prompt_cache: list[Any] | None = None,
    **settings: Any,
) -> Iterator[GenerationStep]:
    """Yield text pieces as they are generated (never broken UTF-8), with statistics.

    `prompt` is a string, a chat message list, or token ids. Strings use the Instruct template when
    `chat` (default: when the tokenizer has one). Generation ends at EOS, a stop string (not
    included), or `max_tokens`; the last step has `token == -1` and the `finish_reason`.
    """
    config = resolve_config(config, settings)
    ids = encode_prompt(tokenizer, prompt, system, chat)
    _warn_if_too_long(model, ids)
    text, stats = TextStream(tokenizer, ids, config), _Stats(len(ids))
    steps = token_steps(
        model, ids, config, eos_ids={tokenizer.eos_id}, draft_model=draft_model, prompt_cache=prompt_cache
    )
    for token, logprobs, from_draft in steps:
        stats.count()
        piece = text.add(token)
        if text.stopped:
            yield stats.step(piece, token, from_draft, logprobs=logprobs, finish_reason="stop_string")
            return
        yield stats.step(piece, token, from_draft, logprobs=logprobs)
    tail, reason = text.finish()
    yield stats.step(tail, finish_reason=reason)


def starts_fresh(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """Drop SentencePiece's leading space when the answer starts a line (chat) or the prompt is only BOS."""
    if len(ids) <= 1:
        return True
    return tokenizer.decode(list(ids[-3:])).endswith(("\n", " "))


def _is_prompt_list(prompt: Any) -> bool:
    """A list of prompts (strings, message lists or id lists), as opposed to one message list or id list."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(p, (str, list, tuple)) for p in prompt)


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt | Sequence[Prompt],
    *,
    config: GenerationConfig | None = None,
    **kwargs: Any,
) -> str | list[str]:
    """The generated text for one prompt, or a list of texts for a list of prompts (run as one batch).

    Keyword arguments are `stream_generate`'s (`system`, `chat`, `draft_model`, ...) and the settings
    of `GenerationConfig` (`max_tokens`, `temp`, `stop`, ...).
    """
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise OptionError("prompt", "is empty")
    if _is_prompt_list(prompt):
        return generate_batch(model, tokenizer, list(prompt), config=config, **kwargs)
    return "".join(step.text for step in stream_generate(model, tokenizer, prompt, config=config, **kwargs))


def generate_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    *,
    config: GenerationConfig | None = None,
    system: str | None = None,
    chat: bool | None = None,
    draft_model: nn.Module | None = None,
    **settings: Any,
) -> list[str]:
    """Generate for several prompts in one batch (left padding; masks and positions per row).

    Takes the same settings as single prompts; a quantized or rotating KV cache and speculative
    decoding are single-prompt features and raise OptionError here.
    """
    config = resolve_config(config, settings)
    if draft_model is not None:
        raise OptionError("draft_model", "is not supported for a batch of prompts")
    for name in ("max_kv_size", "kv_bits"):
        if getattr(config, name) is not None:
            raise OptionError(name, "is not supported for a batch of prompts")
    if not prompts:
        raise OptionError("prompt", "the batch holds no prompts")
    ids = [encode_prompt(tokenizer, p, system, chat) for p in prompts]
    for row in ids:
        check_prompt_ids(model, row)
        _warn_if_too_long(model, row)
    if config.seed is not None:
        mx.random.seed(config.seed)
    sampler, processors = make_sampling(config)
    texts = [TextStream(tokenizer, row, config) for row in ids]
    pieces: list[list[str]] = [[] for _ in ids]

    def stopped(i: int, token: int) -> bool:  # decode one row's token as it arrives; True at a stop string
        pieces[i].append(texts[i].add(token))
        return texts[i].stopped

    batch_token_ids(model, ids, config.max_tokens, sampler, tokenizer.eos_id, processors, stopped)
    return ["".join(p) + t.finish()[0] for p, t in zip(pieces, texts)]


def batch_token_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    sampler: Sampler,
    eos_id: int,
    processors: Sequence[LogitsProcessor] = (),
    stop: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Generated ids per prompt (EOS excluded), decoding all rows together.

    `processors` (e.g. a repetition penalty) see each row's own prompt and output; `stop(row, token)`
    may end a row early (its token is kept).
    """
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    tokens = mx.array([[0] * pad + list(p) for p, pad in zip(prompts, padding)], dtype=mx.uint32)
    cache = [BatchKVCache(padding) for _ in model.layers]
    chunk = prefill_step()
    for start in range(0, longest - 1, chunk):  # chunked prefill, all but the last column
        model(tokens[:, start : min(start + chunk, longest - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(tokens[:, -1:], cache=cache)[:, -1, :]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_tokens):
        if processors:  # as in mlx-lm's generate_step: on the raw logits, each row with its own history
            rows = []
            for i in range(len(prompts)):
                row, history = logits[i : i + 1], mx.array(list(prompts[i]) + outputs[i], dtype=mx.uint32)
                for proc in processors:
                    row = proc(history, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        y = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        for i, t in enumerate(y.tolist()):
            if done[i]:
                continue
            done[i] = t == eos_id
            if not done[i]:
                outputs[i].append(t)
                done[i] = stop is not None and stop(i, t)
        if all(done):
            break
        logits = model(y[:, None], cache=cache)[:, -1, :]
    return outputs
