"""A multi-turn chat session that keeps its KV cache between turns (history is never re-encoded)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .generate import GenerationStep, chat_turn_ids, stream_generate
from .tokenizer import Tokenizer


class ChatSession:
    """Instruct-template chat over one growing prompt cache.

    Args:
        model, tokenizer: the model and its tokenizer.
        system: an optional system prompt for the conversation.
        max_kv_size: a rotating cache of this many tokens (long chats).
        **sampling: passed to `stream_generate` (temp, top_p, repetition_penalty, max_tokens, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        system: str | None = None,
        max_kv_size: int | None = None,
        **sampling: Any,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_kv_size = max_kv_size
        self.sampling = sampling
        self.reset()

    def reset(self) -> None:
        """Forget the conversation."""
        self.cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
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
            for step in stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache, **self.sampling):
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
