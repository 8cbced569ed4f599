"""Generation: tokenizer-free token streams on mlx-lm's KV caches and samplers, text streaming on top.

`generate_tokens` works on ids and any model with the `model(tokens, cache) -> logits` contract;
`stream_generate` / `generate` add the tokenizer, the Instruct template and stop strings.
"""

from __future__ import annotations

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

from .tokenizer import EOS_TEXT, Message, Tokenizer, render_chat

Prompt = str | Sequence[Message] | Sequence[int]
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
PREFILL_STEP = 512


@dataclass
class GenerationStep:
    """One streamed piece of text with per-step statistics."""

    text: str
    token: int
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "eos", "stop_string", "length", or None while running


def make_sampling(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
) -> tuple[Sampler, list[LogitsProcessor]]:
    """mlx-lm's sampler and logits processors for these settings (temp 0: greedy)."""
    sampler = make_sampler(temp=temp, top_p=top_p if 0 < top_p < 1 else 0.0, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return sampler, processors


def _token_steps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_tokens: int,
    sampler: Sampler,
    processors: list[LogitsProcessor],
    eos_ids: set[int],
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    prompt_cache: list[Any] | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> Iterator[tuple[int, bool]]:
    """Yield (token, from_draft) until EOS (not yielded) or `max_tokens`."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if kv_bits is not None and max_kv_size is not None:
        raise ValueError("--kv-bits and --max-kv-size cannot be combined (a rotating cache cannot be quantized)")
    head_dim = getattr(getattr(model, "config", None), "head_dim", kv_group_size)
    if kv_bits is not None and head_dim % kv_group_size:
        raise ValueError(f"--kv-group-size {kv_group_size} must divide the model's head_dim {head_dim}")
    prompt = mx.array(list(prompt_ids), dtype=mx.uint32)
    quant = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=0)
    if draft_model is not None:
        if prompt_cache is None:
            prompt_cache = make_prompt_cache(model) + make_prompt_cache(draft_model)
        steps = speculative_generate_step(
            prompt,
            model,
            draft_model,
            num_draft_tokens=num_draft_tokens,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=prompt_cache,
            prefill_step_size=PREFILL_STEP,
            **quant,
        )
        items = ((int(t), bool(d)) for t, _, d in steps)
    else:
        if prompt_cache is None:
            prompt_cache = make_prompt_cache(model, max_kv_size=max_kv_size)
        steps = generate_step(
            prompt,
            model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=prompt_cache,
            prefill_step_size=PREFILL_STEP,
            **quant,
        )
        items = ((int(t), False) for t, _ in steps)
    for token, from_draft in items:
        if token in eos_ids:
            return
        yield token, from_draft


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prompt_cache: list[Any] | None = None,
    eos_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield generated token ids (EOS ends the stream and is not yielded). Tokenizer-free.

    Args:
        model: any model with `model(tokens, cache) -> logits` and a `layers` list.
        prompt_ids: the prompt, BOS included if wanted.
        temp/top_p/top_k/min_p: sampling (temp 0 is greedy); repetition_penalty: e.g. 1.2.
        seed: seeds MLX's random state first, so the same seed gives the same sample.
        draft_model: a smaller model with the same vocabulary for speculative decoding.
        max_kv_size: a rotating KV cache of this many tokens; kv_bits: a quantized KV cache
            (kv_group_size must divide the head dim).
        prompt_cache: a cache to reuse and extend (e.g. across chat turns).
        eos_ids: ids that end generation (default: the model config's EOS).
    """
    if seed is not None:
        mx.random.seed(seed)
    sampler, processors = make_sampling(temp, top_p, top_k, min_p, repetition_penalty, repetition_context_size)
    eos = set(eos_ids) if eos_ids is not None else {model.config.eos_token_id}
    for token, _ in _token_steps(
        model,
        prompt_ids,
        max_tokens,
        sampler,
        processors,
        eos,
        draft_model,
        num_draft_tokens,
        prompt_cache,
        max_kv_size,
        kv_bits,
        kv_group_size,
    ):
        yield token


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt, system: str | None = None, chat: bool | None = None
) -> list[int]:
    """Token ids for a string (the Instruct template when `chat`, default: the tokenizer's), a message
    list (always templated), or ids (as given)."""
    if isinstance(prompt, str):
        use_chat = tokenizer.chat_template if chat is None else chat
        if not use_chat:
            return tokenizer.encode(prompt)
        prompt = [{"role": "user", "content": prompt}]
    elif prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    messages = list(prompt)  # type: ignore[arg-type]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages)


def chat_turn_ids(tokenizer: Tokenizer, messages: Sequence[Message], after_eos: bool) -> list[int]:
    """Ids that continue a cached conversation with `messages` and the generation prompt.

    The cached history ends right after an assistant answer; `after_eos` says whether that answer's
    EOS is already in the cache. The result equals the tail of the whole conversation's template.
    """
    text = "\n" + render_chat(messages, add_generation_prompt=True)
    ids = [] if after_eos else [tokenizer.eos_id]
    for i, chunk in enumerate(text.split(EOS_TEXT)):
        if i:
            ids.append(tokenizer.eos_id)
        if chunk:
            ids.extend(tokenizer.sp.encode(chunk))
    return ids


class _StopStrings:
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


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    system: str | None = None,
    chat: bool | None = None,
    stop: Sequence[str] = (),
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prompt_cache: list[Any] | None = None,
) -> Iterator[GenerationStep]:
    """Yield text pieces as they are generated (never broken UTF-8), with statistics.

    `prompt` is a string, a chat message list, or token ids. Strings use the Instruct template when
    `chat` (default: when the tokenizer has one). Generation ends at EOS, a `stop` string (not
    included), or `max_tokens`.
    """
    ids = encode_prompt(tokenizer, prompt, system, chat)
    limit = getattr(model.config, "max_context_length", None)
    if limit and len(ids) > limit:
        warnings.warn(
            f"the prompt has {len(ids)} tokens, more than the model's max_context_length {limit}: "
            "RoPE works past it, but quality is not promised",
            stacklevel=2,
        )
    if seed is not None:
        mx.random.seed(seed)
    sampler, processors = make_sampling(temp, top_p, top_k, min_p, repetition_penalty)
    detok = tokenizer.detokenizer(strip_leading_space=_starts_fresh(tokenizer, ids))
    stops = _StopStrings(stop)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, n, last = 0.0, 0, None
    steps = _token_steps(
        model,
        ids,
        max_tokens,
        sampler,
        processors,
        {tokenizer.eos_id},
        draft_model,
        num_draft_tokens,
        prompt_cache,
        max_kv_size,
        kv_bits,
        kv_group_size,
    )
    for token, from_draft in steps:
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        n += 1
        text = stops.feed(detok.add_token(token))
        last = GenerationStep(
            text,
            token,
            from_draft,
            len(ids),
            prompt_tps,
            n,
            n / (time.perf_counter() - tic),
            mx.get_peak_memory() / 1e9,
        )
        if stops.stopped:
            last.finish_reason = "stop_string"
            yield last
            return
        yield last
    tail = stops.feed(detok.finalize()) + ("" if stops.stopped else stops.flush())
    reason = "stop_string" if stops.stopped else "length" if n >= max_tokens else "eos"
    yield GenerationStep(
        tail,
        -1,
        False,
        len(ids),
        prompt_tps,
        n,
        n / max(time.perf_counter() - tic, 1e-9) if n else 0.0,
        mx.get_peak_memory() / 1e9,
        reason,
    )


def _starts_fresh(tokenizer: Tokenizer, ids: Sequence[int]) -> bool:
    """Drop SentencePiece's leading space when the answer starts a line (chat) or the prompt is only BOS."""
    if len(ids) <= 1:
        return True
    return tokenizer.decode(list(ids[-3:])).endswith(("\n", " "))


def generate(
    model: nn.Module, tokenizer: Tokenizer, prompt: Prompt | Sequence[Prompt], max_tokens: int = 256, **kwargs: Any
) -> str | list[str]:
    """The generated text for one prompt, or a list of texts for a list of prompts (run as one batch)."""
    if (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(isinstance(p, (str, list, tuple)) for p in prompt)
        and not all(isinstance(p, dict) for p in prompt)
    ):
        return generate_batch(model, tokenizer, list(prompt), max_tokens, **kwargs)
    return "".join(step.text for step in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


def generate_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    *,
    system: str | None = None,
    chat: bool | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """Generate for several prompts in one batch (left padding; masks and positions per row)."""
    ids = [encode_prompt(tokenizer, p, system, chat) for p in prompts]
    if seed is not None:
        mx.random.seed(seed)
    sampler, _ = make_sampling(temp, top_p, top_k, min_p)
    outputs = batch_token_ids(model, ids, max_tokens, sampler, tokenizer.eos_id)
    return [_decode_answer(tokenizer, p, out) for p, out in zip(ids, outputs)]


def _decode_answer(tokenizer: Tokenizer, prompt_ids: Sequence[int], out: Sequence[int]) -> str:
    detok = tokenizer.detokenizer(strip_leading_space=_starts_fresh(tokenizer, prompt_ids))
    return "".join(detok.add_token(t) for t in out) + detok.finalize()


def batch_token_ids(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, sampler: Sampler, eos_id: int
) -> list[list[int]]:
    """Generated ids per prompt (EOS excluded), decoding all rows together."""
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    tokens = mx.array([[0] * pad + list(p) for p, pad in zip(prompts, padding)], dtype=mx.uint32)
    cache = [BatchKVCache(padding) for _ in model.layers]
    for start in range(0, longest - 1, PREFILL_STEP):  # chunked prefill, all but the last column
        model(tokens[:, start : min(start + PREFILL_STEP, longest - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(tokens[:, -1:], cache=cache)[:, -1, :]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_tokens):
        y = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        for i, t in enumerate(y.tolist()):
            if not done[i]:
                done[i] = t == eos_id
                if not done[i]:
                    outputs[i].append(t)
        if all(done):
            break
        logits = model(y[:, None], cache=cache)[:, -1, :]
    return outputs
