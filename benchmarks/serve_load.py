"""Servers under load, side by side in one run: our `serve` (continuous batching), mlx-lm's `mlx_lm.server` (its
default batching) and, optionally, an older checkout of ours (e.g. the serial server before the engine), on the same
model. 1, 4, 8 and 16 concurrent streaming clients on 127.0.0.1 send completions with 64-token answers at temperature
0; each level is bounded in requests and time. With --rounds N the servers are measured in turn N times and each level
keeps its best round (this machine's speed drifts between runs). Prints requests/s, generated tokens/s and time to
first token p50/p90, and merges the rows into benchmarks/results.json. The servers run one at a time, never together.

    python benchmarks/serve_load.py [--model DIR | --arch OpenELM-270M] [--clients 1,4,8,16]
        [--requests-per-client 2] [--max-tokens 64] [--baseline OLD_CHECKOUT] [--rounds 1]
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# isort: off
import openelm_mlx  # noqa: F401  (first: loads the fast BLAS before mlx.core)

# isort: on
from openelm_mlx.bench import blas
from openelm_mlx.bench import speed as bench

RESULTS = Path(__file__).resolve().parent / "results.json"
TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/llama-tokenizer/tokenizer.model"
TOPICS = ["Rome", "the king", "the sea", "love", "war", "the night", "a ghost", "the crown", "a storm", "the moon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server did not start: {' '.join(cmd)}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not start in 120 s")


def servers(model: str, baseline: str | None, max_batch: int) -> dict[str, list[str]]:
    """Command lines (with {port}) of each server to measure."""
    ours = [sys.executable, "-m", "openelm_mlx", "serve", "--model", model, "--log-level", "warning"]
    out = {
        "ours": [*ours, "--max-batch", str(max_batch), "--port", "{port}"],
        "mlx_lm": [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--port", "{port}"],
    }
    if baseline:
        boot = f"import sys; sys.path.insert(0, {baseline!r}); from openelm_mlx.cli import main; main()"
        out["baseline"] = [sys.executable, "-c", boot, *ours[3:], "--port", "{port}"]
    return out


def ask(url: str, prompt: str, max_tokens: int, model: str) -> tuple[float, int]:
    """Stream one completion: (seconds to the first text, generated tokens).

    The clients share the machine's cores with the server, so they parse little: events are split from the raw
    stream, and only those before the first text and the one carrying `usage` are decoded as JSON (a client parsing
    every chunk took a quarter of a core at 1,300 tokens/s, slowing the faster server most)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    address = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    tic, first, pieces, used, rest = time.perf_counter(), None, 0, None, b""
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sys.exit(f"{url}: HTTP {response.status}: {response.read()[:200]!r}")
        while data := response.read1(1 << 16):
            *events, rest = (rest + data).split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                pieces += 1
                if first is None or b'"usage"' in event:
                    chunk = json.loads(event[6:])
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
                    choices = chunk.get("choices") or []
                    if first is None and choices and choices[0].get("text"):
                        first = time.perf_counter() - tic
    finally:
        conn.close()
    return (first if first is not None else time.perf_counter() - tic), used if used is not None else pieces


def load_level(url: str, model: str, clients: int, per_client: int, max_tokens: int, limit: float) -> dict[str, float]:
    deadline = time.perf_counter() + limit

    def one(i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(per_client):
            if time.perf_counter() > deadline:
                break
            out.append(ask(url, f"Tell me of {TOPICS[(i + j) % len(TOPICS)]}.", max_tokens, model))
        return out

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(one, range(clients)) for r in batch]
    wall = time.perf_counter() - tic
    ttfts = sorted(t for t, _ in results)
    return {
        "requests": len(results),
        "req_s": len(results) / wall,
        "tok_s": sum(n for _, n in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


def random_folder(arch: str, work: Path) -> str:
    from openelm_mlx.folders.io import save
    from openelm_mlx.generation.tokenizer import Tokenizer
    from openelm_mlx.model.config import OpenELMConfig

    if not TOKENIZER.is_file():
        sys.exit(f"--arch needs the LLaMA tokenizer at {TOKENIZER}")
    model = bench.random_model(OpenELMConfig.from_preset(arch), "float32")
    return str(save(model, work / arch, tokenizer=Tokenizer(TOKENIZER)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo)")
    parser.add_argument(
        "--arch", default=None, help="a random float32 model of this preset instead (e.g. OpenELM-270M)"
    )
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per level, at most")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--baseline", default=None, help="an older checkout of this repo to measure too")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure the servers in turn this many times; keep each level's best"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        from openelm_mlx.demo import DEMO_DIR

        model = random_folder(args.arch, Path(tmp)) if args.arch else args.model or str(DEMO_DIR)
        name = args.arch or ("demo" if model == str(DEMO_DIR) else Path(model).name)
        table: dict[str, dict[int, dict[str, float]]] = {}
        for _ in range(args.rounds):  # the servers in turn, each round; each level keeps its best round
            for server, cmd in servers(model, args.baseline, args.max_batch).items():
                port = free_port()
                proc = start([c.replace("{port}", str(port)) for c in cmd], port, "/v1/models")
                url = f"http://127.0.0.1:{port}"
                try:
                    ask(url, "Hi", 4, model)  # warm up
                    budget = (args.requests_per_client, args.max_tokens, args.time_limit)
                    for c in levels:
                        level = load_level(url, model, c, *budget)
                        best = table.setdefault(server, {}).get(c)
                        if best is None or level["req_s"] > best["req_s"]:
                            table[server][c] = level
                finally:
                    proc.terminate()
                    proc.wait(30)
    print(
        f"model {name}, streamed completions, {args.max_tokens} tokens per answer, temp 0, BLAS {blas.STATE.describe()}"
    )
    print(f"{'server':>9} {'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9}")
    for server, rows in table.items():
        for c, r in rows.items():
            print(f"{server:>9} {c:>7} {r['requests']:>8} {r['req_s']:>7.2f} {r['tok_s']:>7.0f} "
                  f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p90_ms']:>7.0f}ms")  # fmt: skip
    ratios = {}
    for c in levels:
        ours = table["ours"][c]
        ratios[c] = {"req_s_vs_mlx_lm": ours["req_s"] / table["mlx_lm"][c]["req_s"]}
        if "baseline" in table:
            ratios[c]["req_s_vs_baseline"] = ours["req_s"] / table["baseline"][c]["req_s"]
        ratios[c]["ttft_p50_vs_solo"] = ours["ttft_p50_ms"] / table["ours"][levels[0]]["ttft_p50_ms"]
        print(f"{c} clients: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[c].items()))
    row = {"max_tokens": args.max_tokens, "rounds": args.rounds, "servers": table, "ratios": ratios}
    bench.record(RESULTS, f"serve load {name} max_batch={args.max_batch}/blas={blas.STATE.source}", row)


if __name__ == "__main__":
    main()
