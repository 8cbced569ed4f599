"""Request parsing for the OpenAI-compatible server: the served limits (ServeSettings), APIError, and turning a
chat or completion JSON body into a checked GenRequest (prompt ids and a GenerationConfig)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..generation.generate import GenerationConfig
from ..generation.template import ROLES as TEMPLATE_ROLES

log = logging.getLogger("openelm_mlx.serve.requests")

MAX_BODY_BYTES = 1 << 20
MAX_TOP_LOGPROBS = 20
# Request fields -> GenerationConfig fields (the rest of the names are shared).
CONFIG_FIELDS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed"}
CONFIG_FIELDS |= {"repetition_penalty": "repetition_penalty", "stop": "stop"}
ROLES = {**{role: role for role in TEMPLATE_ROLES}, "developer": "system"}  # OpenAI role -> template role


class APIError(Exception):
    """A request the server refuses: HTTP `status` and an OpenAI-style error naming `param` (and `code`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer enforces: the served model's id, the API key and the request limits."""

    model_id: str
    api_key: str | None = None
    max_tokens_limit: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES
    web: bool = True  # the chat page at /

    def default_max_tokens(self) -> int:
        return min(GenerationConfig.max_tokens, self.max_tokens_limit)


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
        return GenerationConfig(**values)
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
        # vLLM's and transformers' name: the last (assistant) message is continued rather than closed.
        go_on = bool(_typed(body, "continue_final_message", (bool,), "a boolean"))
        try:
            parsed = [_message(i, m) for i, m in enumerate(messages)]
            request.ids = tokenizer.apply_chat_template(parsed, continue_final_message=go_on)
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
    if len(request.ids) >= limit:  # the same rule as generate and chat: room for at least one generated token
        raise APIError(400, f"{prompt_field}: the prompt has {len(request.ids)} tokens; the model's context is {limit} "
                       "tokens, with room for at least one more", param=prompt_field,
                       code="context_length_exceeded")  # fmt: skip
    log.debug("%s request: %d prompt tokens, stream=%s, %s, %s", kind, len(request.ids), stream, config,
              _show_prompt(body))  # fmt: skip
    return request


def _show_prompt(body: dict[str, Any]) -> str:
    """The prompt of a request, cut short, for the debug log."""
    text = repr(body.get("messages", body.get("prompt")))
    return text if len(text) <= 2000 else text[:2000] + "..."


__all__ = ["APIError", "GenRequest", "ServeSettings", "parse_request"]
