"""The OpenAI-compatible HTTP server: the starlette app (/v1/models, /v1/chat/completions, /v1/completions,
/health), OpenAI-shaped answers and SSE, errors as OpenAI error bodies, and running it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import OpenELMError
from .requests import APIError, GenRequest, ServeSettings, parse_request
from .web import web_routes
from .worker import Done, Event, Failed, Job, Piece, ShuttingDown, TokenLogprob, Worker

log = logging.getLogger("openelm_mlx.serve.app")


def error_response(error: APIError) -> JSONResponse:
    """The OpenAI-style error body of a refused request."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(error.status)
    kind = kind or ("server_error" if error.status >= 500 else "invalid_request_error")
    # A message may quote request text; a lone surrogate there could not be encoded as UTF-8.
    message = error.message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"message": message, "type": kind, "param": error.param, "code": error.code}
    # After a 413 the rest of the body is still on the wire: close rather than parse it as a request.
    headers = {"Connection": "close"} if error.status == 413 else None
    return JSONResponse({"error": body}, status_code=error.status, headers=headers)


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(text: str, raw: bytes, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(raw)}  # OpenAI's bytes: a list of ints

    content = [{**one(e.token, e.raw, e.logprob), "top_logprobs": [one(*t) for t in e.top]} for e in entries]
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
            Route("/metrics", self._guard(self.metrics, auth=False)),
            Route("/v1/models", self._guard(self.models)),
            Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
        ]
        routes += web_routes() if settings.web else []  # the chat page at /
        handlers = {HTTPException: self._http_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)  # type: ignore[arg-type]

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}"
        return error_response(APIError(status, message))

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
                return error_response(e)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception:
                log.exception("error in %s", request.url.path)
                return error_response(APIError(500, "internal server error (see the server log)"))

        return endpoint

    def _check_key(self, request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")  # the scheme is case-insensitive
        expected = str(self.settings.api_key)  # checked only when a key is set
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_id, **self.worker.metrics()})

    async def metrics(self, request: Request) -> Response:
        """The active batch, the queue, tokens/s, and the limits a client may ask for (the chat page shows them)."""
        limits = {
            "max_tokens_limit": self.settings.max_tokens_limit,
            "context_length": self.worker.model.config.max_context_length,
        }
        return JSONResponse({"model": self.settings.model_id, **self.worker.metrics(), **limits})

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
        job.watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
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
            job.watcher.cancel()
        return JSONResponse(answer.whole(pieces, event))


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` as soon as its client disconnects (its body is read by now, so the next message is the
    disconnect): a write to a closed socket raises nothing, so the stream alone would never notice."""
    with contextlib.suppress(asyncio.CancelledError):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancelled.set()


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
        job.watcher.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a taken port fails at once (OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from None
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


__all__ = ["Server", "bind", "error_response", "read_json", "run"]
