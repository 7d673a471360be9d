"""Start-up: whole `gpt2` commands that do little work, timed from launch to exit.

`gpt2 encode` builds the tokenizer's tables from vocab.json + merges.txt on its first run and
loads them from ~/.cache/gpt2cli afterwards, so it is timed both ways (each cold run gets an
empty cache folder). Beside them: the interpreter alone, and the same one-line encode as a
script with tiktoken, whose `Encoding` is built from the same vocab.json (its own ranks file is
not reachable offline). Medians over RUNS runs after one warm-up.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_tokenizer import TIKTOKEN_GPT2_PATTERN
from bench.common import print_table, verdict

RUNS = 5
TARGET_S = 0.3
GPT2 = str(Path(sys.executable).parent / "gpt2")

TIKTOKEN_SCRIPT = f"""
import json, sys, tiktoken
from gpt2cli.tokenizer import BYTE_CHARS, DATA_DIR
to_byte = {{c: b for b, c in enumerate(BYTE_CHARS)}}
vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
eot = vocab.pop("<|endoftext|>")
ranks = {{bytes(to_byte[c] for c in token): i for token, i in vocab.items()}}
enc = tiktoken.Encoding(
    name="gpt2", pat_str={TIKTOKEN_GPT2_PATTERN!r}, mergeable_ranks=ranks,
    special_tokens={{"<|endoftext|>": eot}},
)
print(*enc.encode_ordinary(sys.argv[1]))
"""


def main() -> None:
    """Print the median wall time of each command and whether gpt2's meet the target."""
    with tempfile.TemporaryDirectory() as tmp:

        def cached(run: int) -> dict[str, str]:  # one tables cache, filled by the warm-up
            return {**os.environ, "XDG_CACHE_HOME": str(Path(tmp, "cache"))}

        def empty(run: int) -> dict[str, str]:  # a new, empty tables cache every run
            return {**os.environ, "XDG_CACHE_HOME": str(Path(tmp, f"cache{run}"))}

        commands = {
            "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
            "gpt2 --help": [GPT2, "--help"],
            "gpt2 encode 'Hello world', tables cached": [GPT2, "encode", "Hello world"],
            "gpt2 encode 'Hello world', first run": [GPT2, "encode", "Hello world"],
            "gpt2 decode 15496 995, tables cached": [GPT2, "decode", "15496", "995"],
            "tiktoken script, same encode": [sys.executable, "-c", TIKTOKEN_SCRIPT, "Hello world"],
        }
        rows = []
        for name, cmd in commands.items():
            seconds = _median_run(cmd, empty if "first run" in name else cached)
            rows.append([name, seconds, verdict(seconds < TARGET_S) if cmd[0] == GPT2 else ""])
    print_table(
        f"start-up: whole processes, median of {RUNS} (shared machine: noisy)",
        ["command", "seconds", f"< {TARGET_S} s"],
        rows,
    )


def _median_run(cmd: list[str], env: Callable[[int], dict[str, str]]) -> float:
    """Median wall time of running `cmd` RUNS times (after a warm-up) with env(run)."""
    times = []
    for run in range(RUNS + 1):
        start = time.perf_counter()
        subprocess.run(cmd, env=env(run), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
