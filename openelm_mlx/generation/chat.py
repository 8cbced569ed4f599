"""A multi-turn chat session that keeps its KV cache between turns (history is never re-encoded)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from ..errors import OptionError
from .generate import GenerationConfig, GenerationStep, resolve_config, stream_generate
from .template import Message, render_continuation
from .tokenizer import Tokenizer


def chat_turn_ids(tokenizer: Tokenizer, messages: Sequence[Message], after_eos: bool) -> list[int]:
    """Ids that continue a cached conversation with `messages` and the generation prompt.

    The cached history ends right after an assistant answer; `after_eos` says whether that answer's
    EOS is already in the cache. The result equals the tail of the whole conversation's template.
    """
    ids = tokenizer.encode_chat_text(render_continuation(messages))
    return ids if after_eos else [tokenizer.eos_id, *ids]


class ChatSession:
    """Instruct-template chat over one growing prompt cache.

    Args:
        model, tokenizer: the model and its tokenizer.
        config: generation settings (`max_kv_size` makes a rotating cache for long chats); keyword
            `settings` override it.
        system: an optional system prompt for the conversation.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        config: GenerationConfig | None = None,
        system: str | None = None,
        **settings: Any,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.config = resolve_config(config, settings)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.cache = make_prompt_cache(self.model, max_kv_size=self.config.max_kv_size)
        self.history: list[int] = []  # every token of the conversation; the cache holds a prefix of them
        self.started = False
        self.after_eos = True

    def send(self, message: str) -> Iterator[GenerationStep]:
        """Stream the answer to `message`. Stopping early (Ctrl-C) keeps the cache consistent.

        Raises:
            OptionError: the conversation would pass the model's context (without a rotating `max_kv_size`).
        """
        user = [{"role": "user", "content": message}]
        if self.started:
            ids = chat_turn_ids(self.tokenizer, user, self.after_eos)
        else:
            prefix = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.tokenizer.apply_chat_template(prefix + user)
        held = self._held()
        limit = self.model.config.max_context_length
        if self.config.max_kv_size is None and len(self.history) + len(ids) >= limit:
            raise OptionError(
                "message",
                f"the conversation would reach {len(self.history) + len(ids)} tokens, past the model's context of "
                f"{limit}: /reset starts a new one (or set max_kv_size for a rolling window)",
            )
        feed = self.history[held:] + ids  # tokens not in the cache yet: the last answer's final one, then this turn
        self.started = True
        self.history += ids
        generated, reason = [], None
        try:
            for step in stream_generate(self.model, self.tokenizer, feed, config=self.config, prompt_cache=self.cache):
                if step.token >= 0:
                    generated.append(step.token)
                else:
                    reason = step.finish_reason
                yield step
        finally:
            self.history += generated
            self.after_eos = reason == "eos"
            if self.after_eos:
                self.history.append(self.tokenizer.eos_id)

    def _held(self) -> int:
        """How many tokens of the history the cache holds; layers an interrupted step left uneven are cut back."""
        held = min(c.offset for c in self.cache)
        for c in self.cache:
            extra = c.offset - held
            if extra > 0:
                if not c.is_trimmable():
                    self.cache = make_prompt_cache(self.model, max_kv_size=self.config.max_kv_size)
                    return 0
                c.trim(extra)
        return min(held, len(self.history))
