"""Timing and table helpers shared by the benchmark sections."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeat` runs after `warmup` unrecorded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_124m(folder: Path, *, tokenizer: bool = True) -> Path:
    """Write a 124M-shaped random checkpoint into `folder` and load it once, so what gpt2cli
    derives from it on a first load (the transposed output head in the user's cache) is there,
    as on every later run of a user's; the timed runs measure that steady state."""
    from gpt2cli.model import GPT2
    from tests.factory import GPT2_124M, write_random_gpt2

    write_random_gpt2(folder, GPT2_124M, seed=0, tokenizer=tokenizer)
    GPT2.from_pretrained(folder)
    return folder


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table, columns right-aligned after the first."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for n, row in enumerate(cells):
        rest = zip(row[1:], widths[1:], strict=True)
        line = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        print("  ".join(line))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def verdict(ok: bool) -> str:
    """How a table says whether a target was met."""
    return "met" if ok else "NOT met"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
