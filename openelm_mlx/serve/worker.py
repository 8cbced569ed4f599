"""The server's generation worker: the one thread that owns MLX. It feeds queued Jobs into the generation engine, which
decodes them together (continuous batching, an LRU prompt cache), and emits each answer as events (Piece, Done,
Failed)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..generation.engine import Engine, Row
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
    watcher: Any = None  # the HTTP side's task that cancels the job when its client goes away


@dataclass(frozen=True)
class EngineSettings:
    """How the worker batches: rows decoding at once, prompt tokens per prefill chunk (None: the backend's default),
    a rotating KV window, and the LRU prompt cache (entries and bytes; 0 entries: off)."""

    max_batch: int = 8
    prefill_chunk: int | None = None
    max_kv_size: int | None = None
    prompt_cache_size: int = 10
    prompt_cache_bytes: int = 2 << 30


Loaded = tuple[Any, Any, Any]  # (model, tokenizer, draft model or None)


@dataclass(eq=False)
class _Running:
    """A job in the engine: its row, its text stream and the text its last token completed."""

    job: Job
    row: Row
    text: TextStream
    piece: str = ""
    sent: int = 0


class Worker:
    """The one thread that loads the model and runs every generation on the engine.

    MLX is not safe for concurrent model calls, so requests reach this thread through a queue, and the engine decodes
    them together. With a draft model (speculative decoding, a single-stream feature) requests run one at a time.
    """

    def __init__(self, loader: Callable[[], Loaded], settings: EngineSettings | None = None):
        self.loader, self.settings = loader, settings or EngineSettings()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "cached_tokens": 0}
        self.model: Any = None
        self.tokenizer: Any = None
        self.draft: Any = None
        self.engine: Engine | None = None
        self._running: list[_Running] = []
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
        """Cancel the queued jobs, end the running ones, and wait up to `timeout` s for the thread."""
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

    def metrics(self) -> dict[str, Any]:
        """The batch, the queue and the throughput, for /metrics and /health."""
        s = self.engine.stats if self.engine is not None else None
        cache = self.engine.prompt_cache if self.engine is not None else None
        return {
            **self.stats,
            "active": s.active if s else 0,
            "prefilling": s.prefilling if s else 0,
            "queued": self.jobs.qsize() + (s.queued if s else 0),
            "tokens_per_second": round(s.tokens_per_second(), 2) if s else 0.0,
            "generated_tokens": s.generated_tokens if s else 0,
            "max_batch": self.settings.max_batch,
            "prompt_cache_entries": len(cache) if cache is not None else 0,
            "prompt_cache_bytes": cache.nbytes if cache is not None else 0,
        }

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
            s = self.settings
            self.engine = Engine(
                self.model,
                max_batch=s.max_batch,
                prefill_chunk=s.prefill_chunk,
                max_kv_size=s.max_kv_size,
                prompt_cache_size=0 if self.draft is not None else s.prompt_cache_size,
                prompt_cache_bytes=s.prompt_cache_bytes,
            )
        except BaseException as e:  # noqa: BLE001 - handed to start(), which re-raises it
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while self._take_jobs():
            if self.draft is not None:
                continue
            self._step()

    def _take_jobs(self) -> bool:
        """Move queued jobs into the engine (waiting for one when idle); False once stop() was called."""
        idle = not self._running and not self.engine.busy
        while True:
            try:
                job = self.jobs.get(block=idle)
            except queue.Empty:
                return True
            if job is None:
                return False
            idle = False
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
            elif self.closing.is_set():
                job.emit(Failed(ShuttingDown("the server is shutting down")))
            elif self.draft is not None:
                self._run_speculative(job)
            else:
                self._add(job)

    def _add(self, job: Job) -> None:
        request = job.request
        running = _Running(job, None, TextStream(self.tokenizer, request.ids, request.config))  # type: ignore[arg-type]

        def on_token(row: Row, token: int) -> bool:
            running.piece = running.text.add(token)
            return running.text.stopped

        eos = frozenset({self.tokenizer.eos_id})
        try:
            running.row = self.engine.add(Row(request.ids, request.config, eos, logprobs=request.logprobs,
                                              on_token=on_token))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - refused by the engine (a setting it cannot honour)
            job.emit(Failed(e))
            return
        self._running.append(running)

    def _step(self) -> None:
        """One engine step, then each job's new piece and, for those that ended, its end."""
        for r in self._running:
            if self.closing.is_set() and not r.row.done:
                r.row.error = ShuttingDown("the server is shutting down")
                self.engine.cancel(r.row)
            elif r.job.cancelled.is_set():
                self.engine.cancel(r.row)
        self.engine.step()
        still = []
        for r in self._running:
            row = r.row
            if len(row.tokens) > r.sent and row.finish_reason not in ("cancelled", "error"):
                r.sent = len(row.tokens)
                logprob = self._logprob(row, r.job.request.top_logprobs) if row.logprobs else None
                r.job.emit(Piece(r.piece, logprob))
            if row.done:
                self._finish(r)
            else:
                still.append(r)
        self._running = still

    def _finish(self, r: _Running) -> None:
        row, request = r.row, r.job.request
        if row.finish_reason == "cancelled":
            if isinstance(row.error, ShuttingDown):
                r.job.emit(Failed(row.error))
            else:
                self.stats["cancelled"] += 1
            return
        if row.finish_reason == "error":
            self.stats["failed"] += 1
            r.job.emit(Failed(row.error))
            return
        tail, reason = r.text.finish(full=row.finish_reason == "length")
        self.stats["served"] += 1
        self.stats["cached_tokens"] += row.cached_tokens
        r.job.emit(Done(tail, FINISH[reason], len(request.ids), len(row.tokens), row.cached_tokens))

    def _logprob(self, row: Row, top: int) -> TokenLogprob:
        import mlx.core as mx

        token, logprobs = row.tokens[-1], row.step_logprobs
        alternatives: list[tuple[str, bytes, float]] = []
        if top:
            best = mx.argpartition(-logprobs, kth=top - 1)[:top]
            pairs = sorted(zip(best.tolist(), logprobs[best].tolist()), key=lambda p: -p[1])
            alternatives = [(*self.tokenizer.token_text(t), v) for t, v in pairs]
        text, raw = self.tokenizer.token_text(token)
        return TokenLogprob(text, raw, float(logprobs[token].item()), alternatives)

    def _run_speculative(self, job: Job) -> None:
        """A request with the draft model, alone (speculative decoding is a single-stream feature)."""
        request, tok = job.request, self.tokenizer
        text = TextStream(tok, request.ids, request.config)
        n = 0
        try:
            steps = token_steps(self.model, request.ids, request.config, eos_ids={tok.eos_id}, draft_model=self.draft)
            for token, _, _ in steps:
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    return
                if self.closing.is_set():
                    raise ShuttingDown("the server is shutting down")
                n += 1
                job.emit(Piece(text.add(token)))
                if text.stopped:
                    break
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
            self.stats["failed"] += not isinstance(e, ShuttingDown)
            job.emit(Failed(e))
            return
        tail, reason = text.finish()
        self.stats["served"] += 1
        job.emit(Done(tail, FINISH[reason], len(request.ids), n, 0))


__all__ = ["Done", "EngineSettings", "Event", "Failed", "Job", "Piece", "ShuttingDown", "TokenLogprob", "Worker"]
