"""The OpenAI-compatible server, driven like a user would: a real `openelm-mlx serve` process on the demo model,
the official `openai` client, raw HTTP for what the client cannot send, and signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

import openelm_mlx.cli.serve  # noqa: F401  (registers the command until the lead imports it in cli/__init__)
from openelm_mlx.cli._app import app

KEY = "test-key"
LIMIT = 600
SERVE = "import openelm_mlx.cli.serve; from openelm_mlx.cli import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """A `serve` process on a free port with the demo model, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    proc, url = start_server("--api-key", KEY, "--max-tokens-limit", str(LIMIT))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def http(url: str, path: str, body: Any = None, key: str | None = KEY, method: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON) of one request; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="openelm-mlx-demo", messages=[{"role": "user", "content": text}], **{"max_tokens": 20, **kw}
    )


def health(url: str) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(url + "/health").read())


# ---------------------------------------------------------------- answers


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["openelm-mlx-demo"]
    assert health(url)["status"] == "ok"  # /health needs no key (for load balancers)


def test_chat_completion(client):
    r = chat(client, "Who are you?", max_tokens=12)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert chat(client, "Who are you?", max_completion_tokens=3).usage.completion_tokens == 3


def test_system_message_is_templated(client):
    plain = chat(client, "Hi", max_tokens=1).usage.prompt_tokens
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    with_system = client.chat.completions.create(model="default", messages=messages, max_tokens=1)
    assert with_system.usage.prompt_tokens > plain + 4


def test_chat_stream_equals_whole_answer(client, url):
    whole = chat(client, "Tell me of the king.", max_tokens=25)
    chunks = list(
        chat(client, "Tell me of the king.", max_tokens=25, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the raw stream is server-sent events ending with [DONE]
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_completion_streamed_and_not(client):
    whole = client.completions.create(model="openelm-mlx-demo", prompt="ROMEO:", max_tokens=20)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 20
    assert whole.choices[0].finish_reason == "length"
    stream = client.completions.create(model="openelm-mlx-demo", prompt="ROMEO:", max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    ids = client.completions.create(model="openelm-mlx-demo", prompt=[1, 1984], max_tokens=2)  # token ids
    assert ids.usage.prompt_tokens == 2
    full = client.completions.create(model="openelm-mlx-demo", prompt=[1] + [1984] * 508, max_tokens=100)
    assert (full.usage.completion_tokens, full.choices[0].finish_reason) == (3, "length")  # the context is full


def test_stop_string_ends_the_answer(client):
    full = client.completions.create(model="default", prompt="JULIET:", max_tokens=30).choices[0].text
    stop = full[10:13]
    cut = client.completions.create(model="default", prompt="JULIET:", max_tokens=30, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "Hello", max_tokens=30, stop=stop, stream=True)
    assert stop not in "".join(c.choices[0].delta.content or "" for c in streamed)


def test_seed_reproducibility(client):
    a, b, c = (chat(client, "Sing.", max_tokens=30, temperature=1.0, seed=s) for s in (7, 7, 8))
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content


def test_logprobs_in_openai_shape(client):
    r = chat(client, "Hello", max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:  # greedy: the chosen token is the likeliest
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
    text = "".join(e.token for e in content)
    assert text.lstrip() == r.choices[0].message.content.lstrip()
    c = client.completions.create(model="default", prompt="ROMEO:", max_tokens=4, logprobs=2).choices[0].logprobs
    assert len(c.tokens) == len(c.token_logprobs) == len(c.top_logprobs) == len(c.text_offset) == 4
    assert all(len(t) == 2 for t in c.top_logprobs)


def test_second_chat_turns_reuse_the_lru_prompt_cache(client, url):
    """Two conversations interleaved: each second turn reuses its own first turn from the LRU prompt cache."""
    firsts = [[{"role": "user", "content": "Who comes there?"}], [{"role": "user", "content": "Something else."}]]
    answers = [client.chat.completions.create(model="default", messages=m, max_tokens=15) for m in firsts]
    for first, answer in zip(firsts, answers):
        second = [*first, {"role": "assistant", "content": answer.choices[0].message.content}]
        second.append({"role": "user", "content": "Speak again."})
        warm = client.chat.completions.create(model="default", messages=second, max_tokens=15)
        assert warm.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    assert health(url)["prompt_cache_entries"] >= 2


# ---------------------------------------------------------------- refusals


def test_api_key_is_required(url):
    for key in (None, "wrong"):
        status, body = http(url, "/v1/models", key=key)
        assert status == 401 and "API key" in body["error"]["message"]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(bad, "Hi")
    for header, status in ((f"bearer {KEY}", 200), (f"Basic {KEY}", 401), (KEY, 401), (f"Bearer {KEY}x", 401)):
        req = urllib.request.Request(url + "/v1/models", headers={"Authorization": header})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == status, header


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages: must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"temperature": "hot"}, 400, "temperature: must be a number"),
    ("/v1/chat/completions", {"max_tokens": -5}, 400, "max_tokens: must be >= 1"),
    ("/v1/chat/completions", {"max_tokens": 2.5}, 400, "max_tokens: must be an integer"),
    ("/v1/chat/completions", {"max_tokens": LIMIT + 1}, 400, f"max_tokens: must be <= {LIMIT}"),
    ("/v1/chat/completions", {"top_p": 0}, 400, "top_p: must be > 0"),
    ("/v1/chat/completions", {"seed": -1}, 400, "seed: must be >= 0"),
    ("/v1/chat/completions", {"stop": 5}, 400, "stop: must be a string or a list of strings"),
    ("/v1/chat/completions", {"stream": "yes"}, 400, "stream: must be a boolean"),
    ("/v1/chat/completions", {"n": 2}, 400, "n: only n=1 is supported"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, 400, "tools: tool and function calling"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, 400, "response_format: only"),
    ("/v1/chat/completions", {"presence_penalty": 1}, 400, "presence_penalty: is not supported"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs: needs logprobs=true"),
    ("/v1/chat/completions", {"model": "gpt-4o"}, 404, "model: 'gpt-4o' is not served here"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ho " * 600}]}, 400, "the model's context is"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt: is required"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt: only one prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt: token ids must be in"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo: is not supported"),
    ("/v1/nowhere", {}, 404, "/v1/nowhere"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_request_is_refused_by_name(url, path, body, status, message):
    if isinstance(body, dict) and path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "Hi"}], **body}
    got, answer = http(url, path, body)
    assert got == status and message in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_get_on_a_post_endpoint_is_405(url):
    assert http(url, "/v1/chat/completions", method="GET")[0] == 405


def raw_post(url: str, head: bytes, chunks: list[bytes], whole: bool = True) -> bytes:
    """Send a hand-written request (the body may break off when the server answers early); return the reply
    (`whole`: until the server closes, else the first bytes, and hang up)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:
            pass
        reply = s.recv(65536)
        try:
            while whole and (more := s.recv(65536)):
                reply += more
        except ConnectionResetError:  # the server closed with our unread body still on the wire
            pass
        return reply


def test_oversized_body_is_413(url):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    announced = raw_post(url, f"{head}Content-Length: 2000000\r\n\r\n".encode(), [])
    assert announced.startswith(b"HTTP/1.1 413") and b"larger than the limit" in announced
    piece = b"x" * 65536
    chunked = raw_post(url, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), [b"10000\r\n" + piece + b"\r\n"] * 20)
    assert chunked.startswith(b"HTTP/1.1 413") and b"connection: close" in chunked.lower()
    assert health(url)["status"] == "ok"


# ---------------------------------------------------------------- concurrency, disconnects, failures


def test_concurrent_clients_each_get_their_own_answer(client):
    prompts = [f"{who}, what news?" for who in ("Romeo", "Juliet", "Hamlet", "Lear", "Puck", "Oberon")]
    prompts += [f"Tell me of {what}." for what in ("Rome", "kings", "the sea", "love", "war", "night")]
    alone = {p: chat(client, p, max_tokens=12).choices[0].message.content for p in prompts}

    def one_client(i: int) -> list[tuple[str, str]]:
        return [(p, chat(client, p, max_tokens=12).choices[0].message.content) for p in prompts[i::4]]

    with ThreadPoolExecutor(4) as pool:
        answers = [a for batch in pool.map(one_client, range(4)) for a in batch]
    assert len(answers) == len(prompts) and all(alone[p] == text for p, text in answers)


def test_disconnect_mid_stream_stops_generation(client, url):
    before = health(url)["cancelled"]
    body = json.dumps({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": LIMIT, "stream": True})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    assert raw_post(url, head.encode() + body.encode(), [], whole=False).startswith(b"HTTP/1.1 200")  # then hang up
    deadline = time.time() + 10
    while health(url)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert health(url)["cancelled"] == before + 1
    assert chat(client, "Still there?", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_row(url, stream):
    """Tokens keep flowing to a closed socket without an error: the server must notice the disconnect itself."""
    body = json.dumps({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": LIMIT, "stream": stream})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    host, port = url.removeprefix("http://").split(":")
    before = health(url)["cancelled"]
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.encode() + body.encode())
        deadline = time.time() + 10
        while health(url)["active"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert health(url)["active"] == 1
    deadline = time.time() + 10
    while health(url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(url)["active"] == 0
    assert health(url)["cancelled"] == before + 1  # stopped, not run to its end


class FlakyModel:
    """The demo model, failing on demand (a generation bug)."""

    def __init__(self, model: Any):
        self.model, self.fail = model, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise RuntimeError("injected failure")
        return self.model(*args, **kwargs)


def test_generation_error_is_a_500_and_the_server_goes_on():
    import uvicorn

    from openelm_mlx.demo import DEMO_DIR
    from openelm_mlx.folders.io import load
    from openelm_mlx.serve.app import Server, bind
    from openelm_mlx.serve.requests import ServeSettings
    from openelm_mlx.serve.worker import Worker

    flaky: list[FlakyModel] = []

    def loader() -> tuple[Any, Any, Any]:
        model, tok = load(DEMO_DIR)
        flaky.append(FlakyModel(model))
        return flaky[0], tok, None

    worker = Worker(loader)
    worker.start()
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(Server(worker, ServeSettings("m")).app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    try:
        while not server.started:
            time.sleep(0.02)
        flaky[0].fail = True
        status, answer = http(url, "/v1/chat/completions", body)
        assert status == 500 and "injected failure" in answer["error"]["message"]
        status, answer = http(url, "/v1/completions", {"prompt": "a", "stream": True})  # before the first event
        assert status == 500 and answer["error"]["type"] == "server_error"
    finally:
        flaky[0].fail = False
    try:
        status, answer = http(url, "/v1/chat/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        assert worker.stats["failed"] == 2
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------- the command


def test_sigterm_stops_the_server_cleanly_even_mid_stream():
    proc, url = start_server()
    assert http(url, "/v1/models", key=None)[0] == 200  # no --api-key: open
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stream = chat(client, "Go on.", max_tokens=4000, stream=True)
    next(iter(stream))  # an answer is under way
    tic = time.time()
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):  # it ends with an error event, not a hang
        list(stream)
    assert proc.wait(10) == 0 and time.time() - tic < 3.0  # not held up by the open stream


def test_a_lone_surrogate_in_model_gets_an_openai_error(url):
    status, body = http(url, "/v1/completions", b'{"model": "\\ud800", "prompt": "a"}')
    assert status == 404 and body["error"]["param"] == "model" and "not served here" in body["error"]["message"]


def test_sigterm_while_idle_stops_with_one_line_and_no_traceback():
    proc, url = start_server()
    assert http(url, "/v1/completions", {"prompt": "a", "max_tokens": 2}, key=None)[0] == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and err.rstrip().endswith("Stopped.")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port: must be >= 1"),
        (["--port", "70000"], "--port: must be <= 65535"),
        (["--max-tokens-limit", "0"], "--max-tokens-limit: must be >= 1"),
        (["--max-kv-size", "2"], "--max-kv-size: must be >= 8"),
    ],
)
def test_serve_options_are_checked(args, message):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 1 and message in result.output


def test_bad_adapter_path_fails_at_load_naming_it(tmp_path):
    missing = tmp_path / "missing"
    result = CliRunner().invoke(app, ["serve", "--port", str(free_port()), "--adapter-path", str(missing)])
    assert result.exit_code == 1 and f"{missing}: not an adapter folder" in result.output


def test_taken_port_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = CliRunner().invoke(app, ["serve", "--port", str(s.getsockname()[1])])
    assert result.exit_code == 1 and "address already in use" in result.output.lower()
