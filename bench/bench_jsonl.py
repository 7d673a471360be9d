"""`gpt2 generate --jsonl`: batched rows against one row at a time, then the Ray engine.

24 prompts of 8-64 tokens, 16 new tokens each (greedy, <|endoftext|> ignored so every row does
the same work), on a 124M-shaped random-weight folder. The local engine runs in this process
with --batch-size 1 (one row at a time) and 8 (continuous batching), alternating in three rounds
of 8 rows (this machine's load changes by the minute); the driver's own work
(read, check and tokenize every row) is timed alone. Then the Ray engine, on the first 16 rows
(a batch for each of two actors): a local instance of this machine's CPUs (start-up, a job's
fixed cost with one row, rows/s of the 16), with one thread per actor and with one actor of all
threads, and a local cluster of two nodes of one CPU each (the weights then travel between two
object stores). Every output is checked to be the local engine's, byte for byte.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, random_124m, verdict

ROWS = 24
NEW_TOKENS = 16
PROMPT_TOKENS = (8, 64)
BATCH = 8
ROUNDS = 3  # the local engine's two ways alternate, a batch of rows each round
RAY_ROWS = 16  # Ray's jobs: two chunks of one batch, one for each of two actors


def main() -> None:
    """Run every engine on the same rows; print one table."""
    from gpt2cli import dataset
    from gpt2cli.model import GPT2
    from gpt2cli.params import GenerationParams

    with tempfile.TemporaryDirectory() as tmp:
        model = GPT2.from_pretrained(random_124m(Path(tmp)))
        content = _prompts(model)
        task = dataset.GenerateTask(
            GenerationParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
            batch_size=BATCH,
        )
        start = time.perf_counter()
        rows = dataset.read_rows("bench", content, task, model)
        driver_s = time.perf_counter() - start
        one_s, batched_s, output = _local(task, model, rows)
        expected = b"".join(output.splitlines(keepends=True)[:RAY_ROWS])  # a line a row
        ray_rows = _ray_single_node(task, model, rows[:RAY_ROWS], expected)
        cluster_rows = _ray_two_nodes(task, model, rows[:RAY_ROWS], expected)
    speedup = statistics.median(o / b for o, b in zip(one_s, batched_s, strict=True))
    table: list[list[object]] = [
        ["driver: read, check, tokenize", "", f"{ROWS / driver_s:,.0f}", "", ""],
        ["local, --batch-size 1 (one by one)", "", f"{ROWS / sum(one_s):.2f}", "", ""],
        [f"local, --batch-size {BATCH}", "", f"{ROWS / sum(batched_s):.2f}",
         f"{speedup:.2f}x one by one (>= 2x), median of {ROUNDS} rounds", verdict(speedup >= 2)],
        *ray_rows,
        *cluster_rows,
    ]  # fmt: skip
    print_table(
        f"generate --jsonl: {ROWS} prompts (Ray: the first {RAY_ROWS}) of "
        f"{PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens, "
        f"{NEW_TOKENS} new tokens each, greedy, 124M-shaped fp32, {os.cpu_count()} CPUs",
        ["engine", "fixed cost s", "rows/s", "note", ""],
        table,
    )


def _prompts(model: Any) -> str:
    """ROWS JSON lines, each a prompt of PROMPT_TOKENS tokens decoded from random ids."""
    import json

    rng = np.random.default_rng(1)
    lines = []
    for _ in range(ROWS):
        ids = rng.integers(0, 50000, int(rng.integers(*PROMPT_TOKENS, endpoint=True)))
        lines.append(json.dumps({"prompt": model.tokenizer.decode(ids.tolist())}))
    return "\n".join(lines) + "\n"


def _local(task: Any, model: Any, rows: Any) -> tuple[list[float], list[float], bytes]:
    """Seconds of each round one row at a time and batched, and the batched output: ROUNDS
    rounds of ROWS / ROUNDS rows, the two ways alternating which goes first, so that a change
    in the machine's load weighs on both alike."""
    from gpt2cli import dataset

    one_task = dataset.GenerateTask(task.defaults, batch_size=1)
    size = ROWS // ROUNDS
    one_s, batched_s, output = [], [], b""
    for r in range(ROUNDS):
        part = rows[r * size : (r + 1) * size]
        ways = [(one_task, one_s), (task, batched_s)]
        outputs = []
        for way, times in ways if r % 2 == 0 else ways[::-1]:
            seconds, out = _job(way, model, part, dataset.run_local)
            times.append(seconds)
            outputs.append(out)
        assert outputs[0] == outputs[1], "batch size 1 and 8 differ"
        output += outputs[0]
    return one_s, batched_s, output


def _job(task: Any, model: Any, rows: Any, engine: Callable[..., Any]) -> tuple[float, bytes]:
    """Seconds to run every row with `engine`, and the output."""
    from gpt2cli import dataset

    out = io.BytesIO()
    start = time.perf_counter()
    dataset.run(task, model, rows, dataset.OrderedWriter(out.write), engine=engine)
    return time.perf_counter() - start, out.getvalue()


def _ray_jobs(
    label: str, task: Any, model: Any, rows: Any, expected: bytes, threads: int
) -> list[object]:
    """One table row: a one-row job (the per-job fixed cost: actors, weights into the object
    store) then the whole job, on the Ray instance this process is connected to."""
    from gpt2cli import ray_engine

    engine = ray_engine.engine(threads=threads)
    fixed_s, _ = _job(task, model, rows[:1], engine)
    whole_s, out = _job(task, model, rows, engine)
    assert out == expected, f"{label}: the Ray engine's output differs from the local one"
    rate = len(rows) / whole_s
    return [label, f"{fixed_s:.1f}", f"{rate:.2f}", f"{whole_s:.1f} s for {len(rows)} rows", ""]


def _ray_single_node(task: Any, model: Any, rows: Any, expected: bytes) -> list[list[object]]:
    """The Ray engine on a local instance of this machine's CPUs."""
    import logging

    import ray

    cpus = os.cpu_count() or 1
    start = time.perf_counter()
    ray.init(
        num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
    )
    init_s = time.perf_counter() - start
    try:
        return [
            ["ray: start a local instance", f"{init_s:.1f}", "", "once per gpt2 run", ""],
            _ray_jobs(f"ray, 1 node, {cpus} actors x 1 thread", task, model, rows, expected, 1),
            _ray_jobs(f"ray, 1 node, 1 actor x {cpus} threads", task, model, rows, expected, cpus),
        ]
    finally:
        ray.shutdown()


def _ray_two_nodes(task: Any, model: Any, rows: Any, expected: bytes) -> list[list[object]]:
    """The Ray engine on a local cluster of two nodes of one CPU each."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes(timeout=120)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    init_s = time.perf_counter() - start
    try:
        return [
            ["ray: start a 2-node local cluster", f"{init_s:.1f}", "", "", ""],
            _ray_jobs("ray, 2 nodes x 1 actor x 1 thread", task, model, rows, expected, 1),
        ]
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
