"""`serve`: the OpenAI-compatible HTTP server (options, model loading in the worker thread, the socket)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import mlx.core as mx
import typer

from ..errors import OpenELMError, OptionError, check_range
from ..folders.io import parse_dtype
from ..generation.generate import MIN_KV_SIZE
from ..serve.requests import ServeSettings
from ..serve.worker import EngineSettings
from ._app import app, user_errors
from .generate import DtypeOpt, ModelOpt, TokenizerOpt, load_for_generation

DEMO_ID = "openelm-mlx-demo"


def check_api_key(key: str | None) -> None:
    """A key a client can send in an HTTP header: visible ASCII, no spaces (RFC 6750's token characters and more)."""
    if key is None:
        return
    if not key.strip():
        raise OptionError("api_key", "must not be empty (no client could send it)")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise OptionError("api_key", "must be visible ASCII without spaces (no client could send it in a header)")


def check_prompt_cache(config: Any, model: Any, engine: EngineSettings) -> None:
    """The prompt cache must hold at least one prompt of the model's full context (else it would keep nothing)."""
    if not engine.prompt_cache_size:
        return
    dtype = model.transformer.token_embeddings.weight.dtype if hasattr(model, "transformer") else None
    size = dtype.size if dtype is not None and dtype in (mx.float32, mx.float16, mx.bfloat16) else 4
    one = sum(2 * n * config.head_dim * config.max_context_length * size for n in config.num_kv_heads)
    if engine.prompt_cache_bytes < one:
        raise OptionError(
            "prompt_cache_bytes",
            f"{engine.prompt_cache_bytes} is smaller than one full-context prompt's KV cache ({one} bytes); "
            "raise it, or turn the cache off with --prompt-cache-size 0",
        )


@app.command()
def serve(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: Annotated[
        str | None, typer.Option(help="Smaller model with the same vocabulary for speculative decoding.")
    ] = None,
    adapter_path: Annotated[str | None, typer.Option(help="LoRA adapters to apply to the model.")] = None,
    dtype: DtypeOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes the server to the network).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on every /v1 request.")
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = (
        ServeSettings.max_tokens_limit
    ),
    max_kv_size: Annotated[
        int | None, typer.Option(help=f"Rotating KV cache of this many tokens per request (>= {MIN_KV_SIZE}).")
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="Most requests decoding at once (continuous batching); more wait in a queue.")
    ] = EngineSettings.max_batch,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(help="Prompt tokens per prefill step between decode steps (default: 256 on CPU, 512 on GPU)."),
    ] = None,
    prompt_cache_size: Annotated[
        int,
        typer.Option(help="Conversations kept in the LRU prompt cache; a request reuses the longest cached prefix."),
    ] = EngineSettings.prompt_cache_size,
    prompt_cache_bytes: Annotated[
        int, typer.Option(help="Most bytes the prompt cache holds (at least one full-context prompt's KV cache).")
    ] = EngineSettings.prompt_cache_bytes,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning hides the access log).")] = "info",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Point any OpenAI client or chat front-end at http://HOST:PORT/v1. Ctrl-C (or SIGTERM) stops it.
    """
    with user_errors(tokenizer_option=True):
        check_range("port", port, 1, 65535, integer=True)
        check_range("max_tokens_limit", max_tokens_limit, 1, integer=True)
        check_range("max_kv_size", max_kv_size, MIN_KV_SIZE, integer=True)
        check_range("max_batch", max_batch, 1, 1024, integer=True)
        check_range("prefill_chunk", prefill_chunk, 1, integer=True)
        check_range("prompt_cache_size", prompt_cache_size, 0, integer=True)
        check_range("prompt_cache_bytes", prompt_cache_bytes, 1, integer=True)
        if dtype is not None:
            parse_dtype(dtype)
        check_api_key(api_key)
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise OptionError("log_level", f"must be one of critical, error, warning, info, debug, got {log_level!r}")
        try:
            from ..serve.app import Server, bind, run
            from ..serve.worker import Worker
        except ImportError as e:
            raise OpenELMError(
                f"the server needs starlette and uvicorn: pip install 'openelm-mlx[serve]' ({e})"
            ) from None
        sock = bind(host, port)  # a taken port fails here, before the model loads
        # The worker thread runs the loader: MLX state is made in the thread that uses it.
        loader = partial(load_for_generation, model, tokenizer, adapter_path, draft_model, dtype)
        engine = EngineSettings(max_batch, prefill_chunk, max_kv_size, prompt_cache_size, prompt_cache_bytes)
        worker = Worker(loader, engine)
        try:
            worker.start()
            check_prompt_cache(worker.model.config, worker.model, engine)
        except BaseException:
            sock.close()
            raise
        settings = ServeSettings(model_id=model or DEMO_ID, api_key=api_key, max_tokens_limit=max_tokens_limit)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"Serving {settings.model_id} at http://{shown}:{sock.getsockname()[1]}/v1", err=True)
        run(Server(worker, settings), sock, log_level)
        typer.echo("Stopped.", err=True)
