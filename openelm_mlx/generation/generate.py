"""Generation on the engine: token streams (`generate_tokens`), text streams (`stream_generate`) and whole answers
for one prompt or a batch (`generate`). Every setting lives in one `GenerationConfig`.

Everything runs on `engine.Engine` except the two single-stream features mlx-lm's loops provide: speculative decoding
(a draft model) and a quantized KV cache (`kv_bits`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache

from ..errors import OptionError
from ..model.step import decoder_for
from .engine import Engine, Row, RowSampler
from .settings import (
    MAX_TOKENS,
    MIN_KV_SIZE,
    GenerationConfig,
    check_context,
    check_prompt_ids,
    context_room,
    kv_group_size_for,
    prefill_step,
    resolve_config,
)
from .tokenizer import Message, Tokenizer

Prompt = str | Sequence[Message] | Sequence[int]
MAX_BATCH = 32  # rows `generate` decodes at once for a list of prompts


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


def check_draft_model(model: nn.Module, draft_model: nn.Module) -> None:
    """A draft model must share the target's vocabulary, or every draft token would be rejected."""
    ours, theirs = model.config.vocab_size, draft_model.config.vocab_size
    if ours != theirs:
        raise OptionError("draft_model", f"has a vocabulary of {theirs} tokens, the model {ours}: they must match")


def _mlx_lm_steps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    draft_model: nn.Module | None,
    prompt_cache: list[Any] | None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """mlx-lm's single-stream loops, for speculative decoding and a quantized KV cache: (token, logprobs, drafted).
    They sample with the engine's row sampler (its own random key), so MLX's global random state is never used."""
    sampler = RowSampler(config)
    common: dict[str, Any] = dict(
        max_tokens=config.max_tokens,
        sampler=(lambda logprobs: mx.argmax(logprobs, axis=-1)) if sampler.greedy else sampler.sample,
        logits_processors=sampler.processors,
        prefill_step_size=prefill_step(),
    )
    if config.kv_bits is not None:
        group = kv_group_size_for(config, model.config.head_dim)
        common.update(kv_bits=config.kv_bits, kv_group_size=group, quantized_kv_start=0)
    prompt = mx.array(list(prompt_ids), dtype=mx.uint32)
    if draft_model is not None:
        check_draft_model(model, draft_model)
        cache = prompt_cache or make_prompt_cache(model, config.max_kv_size) + make_prompt_cache(
            draft_model, config.max_kv_size
        )
        steps = speculative_generate_step(
            prompt,
            decoder_for(model),
            decoder_for(draft_model),
            num_draft_tokens=config.num_draft_tokens,
            prompt_cache=cache,
            **common,
        )
        yield from ((int(t), lp, bool(d)) for t, lp, d in steps)
    else:
        cache = prompt_cache or make_prompt_cache(model, max_kv_size=config.max_kv_size)
        steps = generate_step(prompt, decoder_for(model), prompt_cache=cache, **common)
        yield from ((int(t), lp, False) for t, lp in steps)


def token_steps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    *,
    eos_ids: set[int],
    draft_model: nn.Module | None = None,
    prompt_cache: list[Any] | None = None,
    on_token: Callable[[int], bool] | None = None,
    logprobs: bool = True,
) -> Iterator[tuple[int, mx.array | None, bool]]:
    """Yield (token, logprobs, from_draft) until an id in `eos_ids` (not yielded), `max_tokens`, or `on_token`
    returning True (that token is yielded, then the stream ends). With `logprobs=False` the engine's steps yield None
    for them.

    `prompt_cache` holds the context before `prompt_ids` and is extended in place; it then holds every token fed: the
    prompt and all generated tokens but the last (and EOS is not fed).
    """
    check_prompt_ids(model, prompt_ids)
    if draft_model is not None or config.kv_bits is not None:
        for token, logprobs, drafted in _mlx_lm_steps(model, prompt_ids, config, draft_model, prompt_cache):
            if token in eos_ids:
                return
            stop = on_token is not None and on_token(token)
            yield token, logprobs, drafted
            if stop:
                return
        return
    engine = Engine(model, max_batch=1, max_kv_size=config.max_kv_size)
    stop = None if on_token is None else (lambda row, token: on_token(token))
    row = engine.add(Row(list(prompt_ids), config, frozenset(eos_ids), prompt_cache, logprobs=logprobs, on_token=stop))
    seen = 0
    try:
        while engine.busy:
            engine.step()
            if len(row.tokens) > seen:
                seen = len(row.tokens)
                yield row.tokens[-1], row.step_logprobs, False
    finally:
        if not row.done:  # closed early (Ctrl-C): what was fed goes back to the caller's cache
            engine.cancel(row)
            engine.step()
    if row.error is not None:
        raise row.error


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
        prompt_cache: a cache holding the context before `prompt_ids`, extended in place (see `token_steps`).
        eos_ids: ids that end generation (default: the model config's EOS).
    """
    config = resolve_config(config, settings)
    eos = set(eos_ids) if eos_ids is not None else {model.config.eos_token_id}
    for token, _, _ in token_steps(
        model, prompt_ids, config, eos_ids=eos, draft_model=draft_model, prompt_cache=prompt_cache, logprobs=False
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

    def finish(self, full: bool = False) -> tuple[str, str]:
        """(the text still held back, the finish reason: "stop_string", "length" or "eos"). `full`: generation ended
        because the model's context is full (also "length": the answer was cut off)."""
        if self.stopped:
            return "", "stop_string"
        tail = self.stops.feed(self.detok.finalize())
        tail += "" if self.stopped else self.stops.flush()
        cut = full or self.n >= self.max_tokens
        return tail, "stop_string" if self.stopped else "length" if cut else "eos"


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

    Raises:
        OptionError: the prompt does not fit the model's context (with room for one token), or a setting is bad.
    """
    config = resolve_config(config, settings)
    ids = encode_prompt(tokenizer, prompt, system, chat)
    if prompt_cache is None:
        check_context(model, ids)
    text, stats = TextStream(tokenizer, ids, config), _Stats(len(ids))
    room = context_room(model, prompt_cache, len(ids), config.max_kv_size)
    pieces: list[str] = []
    steps = token_steps(
        model,
        ids,
        config,
        eos_ids={tokenizer.eos_id},
        draft_model=draft_model,
        prompt_cache=prompt_cache,
        on_token=lambda token: pieces.append(text.add(token)) or text.stopped,
    )
    for token, logprobs, from_draft in steps:
        stats.count()
        piece = pieces.pop()
        if text.stopped:
            yield stats.step(piece, token, from_draft, logprobs=logprobs, finish_reason="stop_string")
            return
        yield stats.step(piece, token, from_draft, logprobs=logprobs)
    tail, reason = text.finish(full=room is not None and stats.n >= room)
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
    """The generated text for one prompt, or a list of texts for a list of prompts (decoded together on the engine,
    `MAX_BATCH` rows at a time, each answer equal to the prompt's own at temperature 0).

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
    max_batch: int = MAX_BATCH,
    finish_reasons: list[str] | None = None,
    **settings: Any,
) -> list[str]:
    """Answers to several prompts, decoded together on the engine (at most `max_batch` rows at once).

    Speculative decoding and a quantized KV cache are single-stream features and raise OptionError here.
    `finish_reasons`, when given, receives each answer's ("eos", "stop_string" or "length").
    """
    config = resolve_config(config, settings)
    if draft_model is not None:
        raise OptionError("draft_model", "is not supported for a batch of prompts")
    if config.kv_bits is not None:
        raise OptionError("kv_bits", "is not supported for a batch of prompts")
    if not prompts:
        raise OptionError("prompt", "the batch holds no prompts")
    ids = [encode_prompt(tokenizer, p, system, chat) for p in prompts]
    for row_ids in ids:
        check_context(model, row_ids)
    texts = [TextStream(tokenizer, row_ids, config) for row_ids in ids]
    pieces: list[list[str]] = [[] for _ in ids]

    def on_token(i: int) -> Callable[[Row, int], bool]:
        def add(row: Row, token: int) -> bool:
            pieces[i].append(texts[i].add(token))
            return texts[i].stopped

        return add

    engine = Engine(model, max_batch=max_batch, max_kv_size=config.max_kv_size)
    rows = engine.run([Row(r, config, frozenset({tokenizer.eos_id}), on_token=on_token(i)) for i, r in enumerate(ids)])
    for row in rows:
        if row.error is not None:
            raise row.error
    ends = [t.finish(full=row.finish_reason == "length") for t, row in zip(texts, rows)]
    if finish_reasons is not None:
        finish_reasons[:] = [reason for _, reason in ends]
    return ["".join(p) + tail for p, (tail, _) in zip(pieces, ends)]


__all__ = [
    "MAX_TOKENS",
    "MIN_KV_SIZE",
    "GenerationConfig",
    "GenerationStep",
    "TextStream",
    "encode_prompt",
    "generate",
    "generate_batch",
    "generate_tokens",
    "resolve_config",
    "stream_generate",
    "token_steps",
]
