"""The OpenAI-compatible HTTP server: request parsing, the one generation worker thread that owns MLX (with a
prefix KV cache), and the starlette app (/v1/models, /v1/chat/completions, /v1/completions, /health) with SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import OpenELMError, OptionError
from .generate import GenerationConfig, TextStream, token_steps

log = logging.getLogger("openelm_mlx.server")

DEFAULT_MAX_TOKENS = 512
MAX_BODY_BYTES = 1 << 20
MAX_TOP_LOGPROBS = 20
# Request fields -> GenerationConfig fields (the rest of the names are shared).
CONFIG_FIELDS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed"}
CONFIG_FIELDS |= {"repetition_penalty": "repetition_penalty", "stop": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {"eos": "stop", "stop_string": "stop", "length": "length"}


class APIError(Exception):
    """A request the server refuses: HTTP `status` and an OpenAI-style error body naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(self.status)
        kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        # After a 413 the rest of the body is still on the wire: close rather than parse it as a request.
        headers = {"Connection": "close"} if self.status == 413 else None
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces: the served model's id, the API key and the request limits."""

    model_id: str
    api_key: str | None = None
    max_tokens_limit: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES
    max_kv_size: int | None = None

    def default_max_tokens(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.max_tokens_limit)


# ---------------------------------------------------------------- request parsing


@dataclass
class GenRequest:
    """One parsed generation request: prompt ids, settings, and how to answer."""

    kind: str  # "chat" or "completion"
    ids: list[int]
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def _show(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """`body[name]` (None when absent or null) if it has one of `kinds` (a bool is never a number)."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise APIError(400, f"{name}: must be {what}, got {_show(value)}", param=name)
    return value


def _refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    """Features this server does not have are refused by name rather than silently ignored."""
    n = _typed(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {n}", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise APIError(400, f"{name}: tool and function calling are not supported", param=name)
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "tool_choice: tool calling is not supported", param="tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(
            400, f"response_format: only {{'type': 'text'}} is supported, got {_show(fmt)}", "response_format"
        )
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias: is not supported", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _typed(body, name, (int, float), "a number")
        if value:
            raise APIError(400, f"{name}: is not supported (use repetition_penalty), got {value}", param=name)
    if kind == "completion":
        if body.get("echo"):
            raise APIError(400, "echo: is not supported", param="echo")
        if body.get("suffix"):
            raise APIError(400, "suffix: is not supported", param="suffix")
        best_of = _typed(body, "best_of", (int,), "an integer")
        if best_of is not None and best_of != 1:
            raise APIError(400, f"best_of: only 1 is supported, got {best_of}", param="best_of")


def _config(body: dict[str, Any], settings: ServeSettings) -> GenerationConfig:
    """GenerationConfig from the request; its own validation gives the 400 message, named by request field."""
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, token_field, (int,), "an integer")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"{token_field}: must be <= {settings.max_tokens_limit}, got {max_tokens}", token_field)
    values: dict[str, Any] = {"max_tokens": settings.default_max_tokens() if max_tokens is None else max_tokens}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        values[CONFIG_FIELDS[name]] = _typed(body, name, (int, float), "a number")
    values["top_k"] = _typed(body, "top_k", (int,), "an integer")
    values["seed"] = _typed(body, "seed", (int,), "an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, f"stop: must be a string or a list of strings, got {_show(stop)}", param="stop")
    values["stop"] = tuple(stop or ())
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return GenerationConfig(max_kv_size=settings.max_kv_size, **values)
    except OptionError as e:
        names = {v: k for k, v in CONFIG_FIELDS.items()} | {"max_tokens": token_field}
        name = names.get(e.option, e.option)
        raise APIError(400, f"{name}: {e.detail}", param=name) from None


def _message(i: int, message: Any) -> dict[str, str]:
    """One OpenAI chat message as a template message (text content parts are joined; others refused)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where}: must be an object, got {_show(message)}", param="messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(400, f"{where}.role: must be one of {sorted(ROLES)}, got {_show(role)}", param="messages")
    if message.get("tool_calls") or message.get("function_call"):
        raise APIError(400, f"{where}: tool calls are not supported", param="messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{where}.content: only text parts are supported, got {_show(part)}", "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content: must be a string, got {_show(content)}", param="messages")
    return {"role": ROLES[role], "content": content}


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise APIError(400, f"stream_options.include_usage: must be a boolean, got {_show(usage)}", "stream_options")
    return usage


def _completion_prompt(prompt: Any, tokenizer: Any, vocab_size: int) -> list[int]:
    """A completion prompt: a string or token ids (or a list holding exactly one of them)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab_size})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
    raise APIError(400, f"prompt: must be a string or a list of token ids, got {_show(prompt)}", param="prompt")


def parse_request(kind: str, body: Any, tokenizer: Any, model_config: Any, settings: ServeSettings) -> GenRequest:
    """Check a chat or completion request body and turn it into a GenRequest (APIError when refused)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = _typed(body, "model", (str,), "a string")
    if model is not None and model not in (settings.model_id, "default"):
        raise APIError(404, f"model: '{model}' is not served here (this server has '{settings.model_id}')", "model",
                       code="model_not_found")  # fmt: skip
    _refuse_unsupported(body, kind)
    config = _config(body, settings)
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    request = GenRequest(kind, [], config, stream, _stream_options(body, stream))
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, f"messages: must be a non-empty list, got {_show(messages)}", param="messages")
        try:
            request.ids = tokenizer.apply_chat_template([_message(i, m) for i, m in enumerate(messages)])
        except OptionError as e:
            raise APIError(400, f"messages: {e.detail}", param="messages") from None
        request.logprobs = bool(_typed(body, "logprobs", (bool,), "a boolean"))
        top = _typed(body, "top_logprobs", (int,), "an integer")
        if top is not None and not request.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        prompt_field = "messages"
    else:
        if "prompt" not in body:
            raise APIError(400, "prompt: is required", param="prompt")
        request.ids = _completion_prompt(body["prompt"], tokenizer, model_config.vocab_size)
        top = _typed(body, "logprobs", (int,), "an integer")
        request.logprobs = top is not None
        prompt_field = "prompt"
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        name = "top_logprobs" if kind == "chat" else "logprobs"
        raise APIError(400, f"{name}: must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param=name)
    request.top_logprobs = top or 0
    limit = model_config.max_context_length
    if len(request.ids) > limit:
        raise APIError(400, f"{prompt_field}: the prompt has {len(request.ids)} tokens, more than the model's "
                       f"context of {limit}", param=prompt_field, code="context_length_exceeded")  # fmt: skip
    return request


# ---------------------------------------------------------------- generation worker


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the likeliest alternatives, as (text, bytes, logprob)."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


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

        alternatives: list[tuple[str, list[int], float]] = []
        if top:
            best = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[best].tolist()
            pairs = sorted(zip(best.tolist(), values), key=lambda p: -p[1])
            alternatives = [(*self._token_text(t), v) for t, v in pairs]
        text, raw = self._token_text(token)
        return TokenLogprob(text, raw, float(logprobs[token].item()), alternatives)

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        """A token's own text and UTF-8 bytes (a byte-fallback piece is its one byte)."""
        sp = self.tokenizer.sp
        piece = sp.id_to_piece(token)
        if sp.is_byte(token):
            raw = bytes([int(piece[3:5], 16)])
            return raw.decode("utf-8", errors="backslashreplace"), list(raw)
        text = piece.replace("\u2581", " ")
        return text, list(text.encode())


# ---------------------------------------------------------------- HTTP layer


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(text: str, raw: list[int], lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": raw}

    content = [{**one(e.token, e.bytes, e.logprob), "top_logprobs": [one(*t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[TokenLogprob], offset: int, with_top: bool) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries] if with_top else None,
        "text_offset": offsets,
    }


def _usage(done: Done) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class _Answer:
    """Builds the OpenAI response objects (whole or chunked) of one request."""

    def __init__(self, request: GenRequest, model_id: str):
        self.request, self.model_id = request, model_id
        chat = request.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.text_offset = 0

    def _envelope(self, chunk: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.request.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.request.logprobs:
            return None
        if self.request.kind == "chat":
            return _chat_logprobs(entries)
        out = _completion_logprobs(entries, self.text_offset, self.request.top_logprobs > 0)
        self.text_offset += sum(len(e.token) for e in entries)
        return out

    def whole(self, pieces: list[Piece], done: Done) -> dict[str, Any]:
        text = "".join(p.text for p in pieces) + done.text
        logprobs = self._logprobs([p.logprob for p in pieces if p.logprob is not None])
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": done.finish_reason}
        if self.request.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._envelope(False, [choice]), "usage": _usage(done)}

    def chunk(self, text: str, entries: list[TokenLogprob], finish: str | None = None, role: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(entries), "finish_reason": finish}
        if self.request.kind == "chat":
            choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
        else:
            choice["text"] = text
        return _sse(self._envelope(True, [choice]))

    def usage_chunk(self, done: Done) -> str:
        return _sse({**self._envelope(True, []), "usage": _usage(done)})


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 past `limit` bytes (announced or streamed), 400 when not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body of {length} bytes is larger than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:100]}") from None


class Server:
    """The starlette app around a started Worker."""

    def __init__(self, worker: Worker, settings: ServeSettings):
        self.worker, self.settings = worker, settings
        routes = [
            Route("/health", self._guard(self.health, auth=False)),
            Route("/v1/models", self._guard(self.models)),
            Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)  # type: ignore[arg-type]

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}"
        return APIError(status, message).response()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(self.worker.stop, 2.0)

    def _guard(self, handler: Callable[[Request], Any], auth: bool = True) -> Callable[[Request], Any]:
        """The API key check, and any failure as an OpenAI-style error (a bug: 500, the server goes on)."""

        async def endpoint(request: Request) -> Response:
            try:
                if auth and self.settings.api_key is not None:
                    self._check_key(request)
                return await handler(request)
            except APIError as e:
                return e.response()
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception:
                log.exception("error in %s", request.url.path)
                return APIError(500, "internal server error (see the server log)").response()

        return endpoint

    def _check_key(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        stats = {**self.worker.stats, "queued": self.worker.jobs.qsize()}
        return JSONResponse({"status": "ok", "model": self.settings.model_id, **stats})

    async def models(self, request: Request) -> Response:
        model = {"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "openelm-mlx"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        body = await read_json(request, self.settings.max_body_bytes)
        w = self.worker
        # Tokenizing a 1 MB prompt takes a while: off the event loop.
        parsed = await run_in_threadpool(parse_request, kind, body, w.tokenizer, w.model.config, self.settings)
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(parsed, _emitter(asyncio.get_running_loop(), events))
        w.submit(job)
        answer = _Answer(parsed, self.settings.model_id)
        try:
            first = await _next(events, request, job)
        except BaseException:
            job.cancelled.set()
            raise
        if not parsed.stream:
            return await self._whole(first, events, request, job, answer)
        return StreamingResponse(
            _stream(first, events, job, answer), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _whole(self, event: Event, events: asyncio.Queue[Event], request: Request, job: Job, answer: _Answer):
        pieces: list[Piece] = []
        try:
            while isinstance(event, Piece):
                pieces.append(event)
                event = await _next(events, request, job)
        finally:
            job.cancelled.set()  # a no-op once done; stops the worker when we leave early
        return JSONResponse(answer.whole(pieces, event))


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A thread-safe `emit` for the worker: hands each event to the request's asyncio queue."""

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return emit


async def _next(events: asyncio.Queue[Event], request: Request, job: Job) -> Event:
    """The next event; a client that went away cancels its job (checked while waiting). Failed raises."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ClientDisconnect() from None
    if isinstance(event, Failed):
        if isinstance(event.error, ShuttingDown):
            raise APIError(503, str(event.error))
        if isinstance(event.error, OpenELMError):
            raise APIError(400, str(event.error))
        log.error("generation failed", exc_info=event.error)
        raise APIError(500, f"generation failed: {type(event.error).__name__}: {str(event.error)[:200]}")
    return event


async def _stream(first: Event, events: asyncio.Queue[Event], job: Job, answer: _Answer) -> AsyncIterator[str]:
    """SSE chunks until `data: [DONE]`; if the client goes away, the generator is closed and the job cancelled."""
    event = first
    try:
        if answer.request.kind == "chat":
            yield answer.chunk("", [], role=True)
        while isinstance(event, Piece):
            if event.text or event.logprob is not None:
                yield answer.chunk(event.text, [event.logprob] if event.logprob else [])
            event = await events.get()
        if isinstance(event, Failed):
            if not isinstance(event.error, ShuttingDown):
                log.error("generation failed mid-stream", exc_info=event.error)
            error = {"message": f"generation failed: {event.error}", "type": "server_error"}
            yield _sse({"error": error})
        else:
            yield answer.chunk(event.text, [], finish=event.finish_reason)
            if answer.request.include_usage:
                yield answer.usage_chunk(event)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a taken port fails at once (OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn that first tells the worker to end the running answers (else open streams hold up shutdown)."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.close()
        super().handle_exit(sig, frame)


def run(server: Server, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then stop the worker."""
    config = uvicorn.Config(server.app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on")
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler underneath makes a
    # clean shutdown exit 0 instead of dying by SIGTERM (or a KeyboardInterrupt traceback).
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        _Uvicorn(config, server.worker).run(sockets=[sock])
    finally:
        server.worker.stop(2.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = [
    "APIError",
    "GenRequest",
    "Job",
    "Server",
    "ServeSettings",
    "Worker",
    "bind",
    "parse_request",
    "read_json",
    "run",
]
