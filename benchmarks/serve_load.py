"""The HTTP server under load: requests/s and time to first token for 1, 4 and 8 concurrent streaming clients,
and the prefix cache's time-to-first-token gain on a second chat turn.

    python benchmarks/serve_load.py [MODEL] [--requests-per-client 4] [--max-tokens 32]
"""

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

TOPICS = ["Rome", "the king", "the sea", "love", "war", "the night", "a ghost", "the crown", "a storm", "the moon"]


def start(model: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from openelm_mlx.cli import main, serve; main()", "serve", "--port", str(port)]
    cmd += ["--log-level", "warning", *(["--model", model] if model else [])]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.1)
    proc.kill()
    sys.exit("the server did not start in 60 s")


def ask(client: OpenAI, messages: list[dict], max_tokens: int) -> tuple[float, int]:
    """Stream one chat answer: (seconds to the first content, completion tokens)."""
    tic, first, used = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - tic
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - tic), used


def load_level(client: OpenAI, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    def one(i: int) -> list[tuple[float, int]]:
        return [
            ask(client, [{"role": "user", "content": f"Tell me of {TOPICS[(i + j) % len(TOPICS)]}."}], max_tokens)
            for j in range(per_client)
        ]

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(one, range(clients)) for r in batch]
    wall = time.perf_counter() - tic
    ttfts = sorted(t for t, _ in results)
    return {
        "requests": len(results),
        "req_s": len(results) / wall,
        "tok_s": sum(n for _, n in results) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


def prefix_gain(client: OpenAI, rounds: int = 5) -> tuple[float, float, int]:
    """Median TTFT of a second chat turn with the first turn cached (warm) vs evicted (cold), and its prompt size."""
    warm, cold, size = [], [], 0
    for r in range(rounds):
        history = [{"role": "user", "content": f"Tell me a long tale of {TOPICS[r]}, with every king in it."}]
        answer = client.chat.completions.create(model="default", messages=history, max_tokens=300, temperature=0)
        history += [{"role": "assistant", "content": answer.choices[0].message.content}]
        history += [{"role": "user", "content": "And then?"}]
        size = answer.usage.total_tokens
        warm.append(ask(client, history, 1)[0])  # the cache holds turn one: only the new turn is fed
        ask(client, [{"role": "user", "content": "Something else."}], 1)  # evict it
        cold.append(ask(client, history, 1)[0])
    return statistics.median(warm), statistics.median(cold), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None, help="model folder or repo (default: the bundled demo)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    proc, url = start(args.model)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        ask(client, [{"role": "user", "content": "Hi"}], 4)  # warm up
        print(f"model {args.model or 'bundled demo'}, streamed chat, {args.max_tokens} tokens per answer, temp 0")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9}")
        for clients in (1, 4, 8):
            r = load_level(client, clients, args.requests_per_client, args.max_tokens)
            print(
                f"{clients:>7} {r['requests']:>8} {r['req_s']:>7.1f} {r['tok_s']:>7.0f} "
                f"{1000 * r['ttft_p50']:>7.0f}ms {1000 * r['ttft_p90']:>7.0f}ms"
            )
        warm, cold, size = prefix_gain(client)
        print(
            f"second chat turn (~{size} tokens of history): TTFT {1000 * warm:.1f} ms with the prefix cache, "
            f"{1000 * cold:.1f} ms without ({cold / warm:.1f}x)"
        )
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
