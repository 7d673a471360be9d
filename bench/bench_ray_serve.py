"""`gpt2 serve --engine ray` under load, beside the local server: no targets, figures only.

Each server is a real process on 127.0.0.1 over a 124M-shaped random model; the Ray ones start
their own local Ray instance (1 CPU and 1 BLAS thread per replica). Sixteen clients each stream
NEW_TOKENS greedy tokens (`ignore_eos`); aggregate tokens/s is all their tokens over the wall
time from the first request sent to the last token received, time to first token runs from
sending to the first streamed token. Then one client alone, on the local server and on Ray with
one replica: the difference in its time to first token and tokens/s is what Ray's routing costs
(the ingress, the handle, the replica's stream back). On a machine of 2 shared cores, two
replicas compete with the ingress and each other: the figures show overheads, not scaling.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.bench_serve import stream  # the same streamed request
from bench.common import print_table, random_124m
from tests.serve_process import ServeProcess

CLIENTS = 16
NEW_TOKENS = 32
SOLO_RUNS = 3


def _load(url: str, clients: int) -> tuple[float, float, float]:
    """`clients` streams at once: (aggregate tokens/s, TTFT p50, TTFT p99) in s."""
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: stream(url, i, NEW_TOKENS), range(clients)))
    start = min(r[0] for r in results)
    end = max(r[3] for r in results)
    assert all(r[2] == NEW_TOKENS for r in results)
    ttfts = sorted(r[1] - r[0] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return clients * NEW_TOKENS / (end - start), statistics.median(ttfts), p99


def _solo(url: str) -> tuple[float, float]:
    """One client alone, median of SOLO_RUNS: (tokens/s, time to first token)."""
    runs = [_load(url, 1) for _ in range(SOLO_RUNS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-ray-serve-") as tmp:
        folder = random_124m(Path(tmp) / "gpt2-124M")
        with ServeProcess(folder, "-q") as local:
            _load(local.url, 1)  # warm up
            local_solo = _solo(local.url)
            local_many = _load(local.url, CLIENTS)
        figures = {}
        for replicas in (1, 2):
            started = time.perf_counter()
            args = ["-q", "--engine", "ray", "--replicas", str(replicas)]
            with ServeProcess(folder, *args) as server:
                ready = time.perf_counter() - started
                _load(server.url, 1)  # warm up
                solo = _solo(server.url) if replicas == 1 else None
                figures[replicas] = (_load(server.url, CLIENTS), solo, ready)
    rows.append(["local server", *local_many, "", ""])
    for replicas, (many, _, ready) in figures.items():
        rows.append([f"ray, {replicas} replica(s)", *many, f"{ready:.1f}", ""])
    print_table(
        f"ray-serve: {CLIENTS} clients, {NEW_TOKENS} greedy tokens each, 124M-shaped random "
        "weights (one run, shared machine: noisy)",
        ["server", "aggregate tokens/s", "TTFT p50, s", "TTFT p99, s", "ready in, s", ""],
        rows,
    )
    solo = figures[1][1]
    assert solo is not None
    print_table(
        f"ray-serve: one client, the cost of Ray's routing (median of {SOLO_RUNS})",
        ["measure", "local", "ray, 1 replica", "ray - local"],
        [
            ["tokens/s", local_solo[0], solo[0], solo[0] - local_solo[0]],
            ["time to first token, s", local_solo[1], solo[1], solo[1] - local_solo[1]],
            [
                "per token, ms",
                1000 / local_solo[0],
                1000 / solo[0],
                1000 / solo[0] - 1000 / local_solo[0],
            ],
        ],
    )


if __name__ == "__main__":
    main()
