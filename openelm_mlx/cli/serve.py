"""`serve`: the OpenAI-compatible HTTP server (options, model loading in the worker thread, the socket)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import OpenELMError, OptionError, check_range
from ..generate import MIN_KV_SIZE
from ._app import app, user_errors
from .generate import ModelOpt, TokenizerOpt, load_for_generation

DEMO_ID = "openelm-mlx-demo"


def _loader(model: str | None, tokenizer: str | None, draft_model: str | None, adapters: Any, adapter_path: str | None):
    """What the worker thread runs to load (model, tokenizer, draft): MLX state is created in that thread."""

    def load_all() -> tuple[Any, Any, Any]:
        from ..generate import check_draft_model
        from ..io import load

        m, tok = load_for_generation(model, tokenizer)
        if adapters is not None:
            adapters(m, adapter_path)
        draft = load(draft_model, tokenizer=tok.model_file)[0] if draft_model else None
        if draft is not None:
            check_draft_model(m, draft)
        return m, tok, draft

    return load_all


def _adapter_loader(adapter_path: str | None) -> Any:
    """`openelm_mlx.lora.load_adapters`, imported only when adapters are asked for."""
    if adapter_path is None:
        return None
    try:
        from ..lora import load_adapters
    except ImportError:
        raise OptionError("adapter_path", "LoRA adapters are not available in this build") from None
    return load_adapters


@app.command()
def serve(
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: Annotated[
        str | None, typer.Option(help="Smaller model with the same vocabulary for speculative decoding.")
    ] = None,
    adapter_path: Annotated[str | None, typer.Option(help="LoRA adapters to apply to the model.")] = None,
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
    with user_errors():
        check_range("port", port, 1, 65535, integer=True)
        check_range("max_tokens_limit", max_tokens_limit, 1, integer=True)
        check_range("max_kv_size", max_kv_size, MIN_KV_SIZE, integer=True)
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise OptionError("log_level", f"must be one of critical, error, warning, info, debug, got {log_level!r}")
        adapters = _adapter_loader(adapter_path)
        try:
            from ..server import Server, ServeSettings, Worker, bind, run
        except ImportError as e:
            raise OpenELMError(
                f"the server needs starlette and uvicorn: pip install 'openelm-mlx[serve]' ({e})"
            ) from None
        sock = bind(host, port)  # a taken port fails here, before the model loads
        worker = Worker(_loader(model, tokenizer, draft_model, adapters, adapter_path), max_kv_size=max_kv_size)
        try:
            worker.start()
        except BaseException:
            sock.close()
            raise
        settings = ServeSettings(
            model_id=model or DEMO_ID, api_key=api_key, max_tokens_limit=max_tokens_limit, max_kv_size=max_kv_size
        )
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"Serving {settings.model_id} at http://{shown}:{sock.getsockname()[1]}/v1", err=True)
        run(Server(worker, settings), sock, log_level)
