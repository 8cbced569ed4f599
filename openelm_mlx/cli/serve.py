"""`serve`: the OpenAI-compatible HTTP server (options, model loading in the worker thread, the socket)."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from ..errors import OpenELMError, OptionError, check_range
from ..folders.io import parse_dtype
from ..generation.generate import MIN_KV_SIZE
from ._app import app, user_errors
from .generate import DtypeOpt, ModelOpt, TokenizerOpt, load_for_generation

DEMO_ID = "openelm-mlx-demo"


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
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    max_kv_size: Annotated[
        int | None, typer.Option(help=f"Rotating KV cache of this many tokens (>= {MIN_KV_SIZE}).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level (warning hides the access log).")] = "info",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Point any OpenAI client or chat front-end at http://HOST:PORT/v1. Ctrl-C (or SIGTERM) stops it.
    """
    with user_errors(tokenizer_option=True):
        check_range("port", port, 1, 65535, integer=True)
        check_range("max_tokens_limit", max_tokens_limit, 1, integer=True)
        check_range("max_kv_size", max_kv_size, MIN_KV_SIZE, integer=True)
        if dtype is not None:
            parse_dtype(dtype)
        if api_key is not None and not api_key.strip():
            raise OptionError("api_key", "must not be empty (no client could send it)")
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise OptionError("log_level", f"must be one of critical, error, warning, info, debug, got {log_level!r}")
        try:
            from ..serve.app import Server, bind, run
            from ..serve.requests import ServeSettings
            from ..serve.worker import Worker
        except ImportError as e:
            raise OpenELMError(
                f"the server needs starlette and uvicorn: pip install 'openelm-mlx[serve]' ({e})"
            ) from None
        sock = bind(host, port)  # a taken port fails here, before the model loads
        # The worker thread runs the loader: MLX state is made in the thread that uses it.
        loader = partial(load_for_generation, model, tokenizer, adapter_path, draft_model, dtype)
        worker = Worker(loader, max_kv_size=max_kv_size)
        try:
            worker.start()
        except BaseException:
            sock.close()
            raise
        settings = ServeSettings(model_id=model or DEMO_ID, api_key=api_key, max_tokens_limit=max_tokens_limit)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"Serving {settings.model_id} at http://{shown}:{sock.getsockname()[1]}/v1", err=True)
        run(Server(worker, settings), sock, log_level)
