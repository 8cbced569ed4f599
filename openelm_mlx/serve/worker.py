"""The server's generation worker: the one thread that owns MLX, runs queued Jobs a request at a time with a
prefix KV cache, and emits each answer as events (Piece, Done, Failed)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generation.generate import TextStream, token_steps
from .requests import GenRequest

FINISH = {"eos": "stop", "stop_string": "stop", "length": "length"}


@dataclass
class TokenLogprob:
    """A generated token's text, bytes and log-probability, and the likeliest alternatives as (text, bytes, logprob)."""

    token: str
    raw: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


@dataclass
class Piece:
    """Text decoded after one more generated token (possibly empty: held back for a stop string or UTF-8)."""

    text: str
    logprob: TokenLogprob | None = None


@dataclass
class Done:
    """The end of an answer: the remaining text and the counts for `usage`."""

    text: str
    finish_reason: str  # OpenAI's: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    error: BaseException


class ShuttingDown(Exception):
    """The server is stopping: running and queued requests end with this (503) instead of holding it up."""


Event = Piece | Done | Failed


@dataclass
class Job:
    """A request in the worker's queue; `emit` must be callable from the worker thread."""

    request: GenRequest
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


Loaded = tuple[Any, Any, Any]  # (model, tokenizer, draft model or None)


class Worker:
    """The one thread that loads the model and runs every generation, a queued request at a time.

    MLX is not safe for concurrent model calls, so concurrency is a queue. The KV cache of the last
    request is kept, and the next request reuses its longest common token prefix (a chat's history).
    """

    def __init__(self, loader: Callable[[], Loaded], max_kv_size: int | None = None):
        self.loader, self.max_kv_size = loader, max_kv_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "cached_tokens": 0}
        self.model: Any = None
        self.tokenizer: Any = None
        self.draft: Any = None
        self._cache: list[Any] | None = None
        self._cache_ids: list[int] = []
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._stopped = threading.Event()
        self.closing = threading.Event()
        # A daemon: a stuck generation can never keep the process alive after the server stops.
        self._thread = threading.Thread(target=self._main, name="openelm-generation", daemon=True)

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until the model is loaded (re-raising the loader's error)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        """Make the running and queued requests fail fast with ShuttingDown (safe in a signal handler)."""
        self.closing.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the current job (queued ones are dropped) and wait up to `timeout` s for it."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        self.jobs.put(None)
        if self._thread.is_alive():
            self._stopped.wait(timeout)

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            # Park rather than return: a thread that ran MLX and ends before the process does can make MLX's
            # thread-local teardown call std::terminate at exit (seen as "terminate called without an active
            # exception", exit code 134). A parked daemon thread is simply dropped when the process ends.
            self._stopped.set()
            threading.Event().wait()

    def _serve(self) -> None:
        try:
            self.model, self.tokenizer, self.draft = self.loader()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            if self.closing.is_set():
                job.emit(Failed(ShuttingDown("the server is shutting down")))
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
                self._cache = None  # its state is unknown now
                self.stats["failed"] += not isinstance(e, ShuttingDown)
                job.emit(Failed(e))

    def _prefix_cache(self, ids: Sequence[int]) -> tuple[list[Any], int]:
        """A cache holding the longest reusable prefix of `ids` (at least one token is left to feed)."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = self._cache
        if cache is None or not all(c.is_trimmable() for c in cache):
            cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
            if self.draft is not None:
                cache += make_prompt_cache(self.draft, max_kv_size=self.max_kv_size)
            self._cache, self._cache_ids = cache, []
        common = 0
        for a, b in zip(self._cache_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        for c in cache:
            if c.offset > common:
                c.trim(c.offset - common)
        self._cache_ids = self._cache_ids[:common]
        return cache, common

    def _remember(self, cache: list[Any], ids: list[int]) -> None:
        """Record which tokens the cache now holds: `ids` cut to what every layer has seen."""
        held = min(c.offset for c in cache)
        if held > len(ids) or not all(c.is_trimmable() for c in cache):
            self._cache = None  # rotated or inconsistent: start afresh next time
            return
        for c in cache:
            if c.offset > held:
                c.trim(c.offset - held)
        self._cache_ids = ids[:held]

    def _run(self, job: Job) -> None:
        request, tok = job.request, self.tokenizer
        ids, config = request.ids, request.config
        cache, cached = self._prefix_cache(ids)
        self._cache = None  # until _remember says what it holds
        text = TextStream(tok, ids, config)
        generated: list[int] = []
        steps = token_steps(
            self.model, ids[cached:], config, eos_ids={tok.eos_id}, draft_model=self.draft, prompt_cache=cache
        )
        try:
            for token, logprobs, _ in steps:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    return
                if self.closing.is_set():
                    raise ShuttingDown("the server is shutting down")
                generated.append(token)
                logprob = self._logprob(token, logprobs, request.top_logprobs) if request.logprobs else None
                job.emit(Piece(text.add(token), logprob))
                if text.stopped:
                    break
        finally:
            steps.close()
            self._cache = cache
            ended_on_eos = not text.stopped and len(generated) < config.max_tokens
            self._remember(cache, ids + generated + ([tok.eos_id] if ended_on_eos else []))
        tail, reason = text.finish()
        self.stats["served"] += 1
        self.stats["cached_tokens"] += cached
        job.emit(Done(tail, FINISH[reason], len(ids), len(generated), cached))

    def _logprob(self, token: int, logprobs: Any, top: int) -> TokenLogprob:
        import mlx.core as mx

        alternatives: list[tuple[str, bytes, float]] = []
        if top:
            best = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[best].tolist()
            pairs = sorted(zip(best.tolist(), values), key=lambda p: -p[1])
            alternatives = [(*self.tokenizer.token_text(t), v) for t, v in pairs]
        text, raw = self.tokenizer.token_text(token)
        return TokenLogprob(text, raw, float(logprobs[token].item()), alternatives)


__all__ = ["Done", "Event", "Failed", "Job", "Piece", "ShuttingDown", "TokenLogprob", "Worker"]
