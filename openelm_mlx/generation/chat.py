"""A multi-turn chat session that keeps its KV cache between turns (history is never re-encoded)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

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
        self.tokens = 0  # tokens in the cache
        self.started = False
        self.after_eos = True

    def send(self, message: str) -> Iterator[GenerationStep]:
        """Stream the answer to `message`. Stopping early (Ctrl-C) keeps the cache consistent."""
        user = [{"role": "user", "content": message}]
        if self.started:
            ids = chat_turn_ids(self.tokenizer, user, self.after_eos)
        else:
            prefix = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.tokenizer.apply_chat_template(prefix + user)
        self.started = True
        start, generated, ended_on_eos = self.tokens + len(ids), 0, False
        try:
            for step in stream_generate(self.model, self.tokenizer, ids, config=self.config, prompt_cache=self.cache):
                if step.token >= 0:
                    generated += 1
                else:
                    ended_on_eos = step.finish_reason == "eos"
                yield step
        finally:
            # Every yielded token has been fed to the cache (and EOS too, when it ended the answer);
            # an interrupted step may have fed some layers one more token: cut them back.
            self.tokens = start + generated + (1 if ended_on_eos else 0)
            self.after_eos = ended_on_eos
            self._trim_to(self.tokens)

    def _trim_to(self, n: int) -> None:
        for c in self.cache:
            extra = c.offset - n
            if extra > 0:
                if not c.is_trimmable():
                    self.reset()
                    return
                c.trim(extra)
