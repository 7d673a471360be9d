"""`gpt2 serve` under load: one client against eight at once, on a 124M-shaped random model.

A real server process (`--max-batch 8`) on 127.0.0.1, clients on threads with httpx. Each client
streams 64 greedy tokens (`ignore_eos`, so every request is 64 tokens); aggregate tokens/s is all
clients' tokens over the wall time from the first request sent to the last token received, and
time to first token runs from sending a request to its first streamed token (prefill and HTTP
included). Continuous batching should make eight clients' aggregate at least twice one client's.
Then requests/s for short prompts (a few tokens in, 8 out), sent one after another by one client
and by eight clients at once. Medians over RUNS runs; the machine is shared, so figures are noisy.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import print_table, random_124m, verdict
from tests.serve_process import ServeProcess

CLIENTS = 8
NEW_TOKENS = 64
SHORT_REQUESTS = 8  # per measurement, shared among the clients (one each for eight)
SHORT_TOKENS = 8
RUNS = 3


def stream(url: str, i: int, new_tokens: int = NEW_TOKENS) -> tuple[float, float, int, float]:
    """One client's streamed request: (sent at, first token at, tokens received, done at)."""
    body = {
        "prompt": f"Client {i} asks about the history of the printing press, which",
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    sent, first, tokens = time.perf_counter(), 0.0, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                tokens += 1
                first = first or time.perf_counter()
    return sent, first, tokens, time.perf_counter()


def _load(url: str, clients: int) -> tuple[float, float]:
    """`clients` streams at once: (aggregate tokens/s, median time to first token in s)."""
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: stream(url, i), range(clients)))
    end = time.perf_counter()
    start = min(sent for sent, _, _, _ in results)
    assert all(tokens == NEW_TOKENS for _, _, tokens, _ in results)
    ttft = statistics.median(first - sent for sent, first, _, _ in results)
    return clients * NEW_TOKENS / (end - start), ttft


def _short(url: str, clients: int) -> float:
    """Requests/s for SHORT_REQUESTS short completions sent by `clients` clients at once."""
    body = {"prompt": "Hello there,", "max_tokens": SHORT_TOKENS, "temperature": 0}

    def client(n: int) -> None:
        with httpx.Client(timeout=600) as http:
            for _ in range(n):
                http.post(url + "/v1/completions", json=body).raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [SHORT_REQUESTS // clients] * clients))
    return SHORT_REQUESTS / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-serve-") as tmp:
        folder = random_124m(Path(tmp) / "gpt2-124M")
        with ServeProcess(folder, "--max-batch", str(CLIENTS)) as server:
            _load(server.url, 1)  # warm up: first allocations, page cache
            one = [_load(server.url, 1) for _ in range(RUNS)]
            many = [_load(server.url, CLIENTS) for _ in range(RUNS)]
            short_one = statistics.median(_short(server.url, 1) for _ in range(RUNS))
            short_many = statistics.median(_short(server.url, CLIENTS) for _ in range(RUNS))
    speed_one = statistics.median(s for s, _ in one)
    speed_many = statistics.median(s for s, _ in many)
    ttft_one = statistics.median(t for _, t in one)
    ttft_many = statistics.median(t for _, t in many)
    ratio = speed_many / speed_one
    print_table(
        f"serve: 124M-shaped random weights, --max-batch {CLIENTS}, greedy, {NEW_TOKENS} tokens "
        f"per request (median of {RUNS}, shared machine: noisy)",
        ["measure", "1 client", f"{CLIENTS} clients", "ratio", "target", "verdict"],
        [
            [
                "aggregate tokens/s",
                speed_one,
                speed_many,
                f"{ratio:.2f}x",
                ">= 2x",
                verdict(ratio >= 2),
            ],
            [
                "median time to first token, s",
                ttft_one,
                ttft_many,
                f"{ttft_many / ttft_one:.2f}x",
                "",
                "",
            ],
            [
                f"requests/s, short prompts, {SHORT_TOKENS} tokens out",
                short_one,
                short_many,
                f"{short_many / short_one:.2f}x",
                "",
                "",
            ],
        ],
    )


if __name__ == "__main__":
    main()
