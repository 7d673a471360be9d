"""Run the benchmark sections: `python -m bench [--avx2] [section ...]` (all of them by default).

`--avx2` (or BENCH_AVX2=1 in the environment) runs the worker processes of the model, generate
and quant sections, both sides, as on an AVX2-only CPU (see bench.common.avx2_env); the other
sections are measured as usual.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import common

SECTIONS = [
    "startup",
    "tokenizer",
    "weights",
    "model",
    "generate",
    "decoding",
    "load",
    "quant",
    "score",
    "jsonl",
    "serve",
    "ray_serve",
]
AVX2_SECTIONS = ("model", "generate", "quant")


def main(argv: list[str]) -> None:
    if "--avx2" in argv:
        os.environ[common.AVX2_VARIABLE] = "1"
        argv = [a for a in argv if a != "--avx2"]
    chosen = argv or SECTIONS
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {SECTIONS}; option: --avx2")
    if common.avx2() and not set(chosen) & set(AVX2_SECTIONS):
        sys.exit(f"--avx2 (BENCH_AVX2) applies to the {', '.join(AVX2_SECTIONS)} sections only")
    # the files gpt2cli caches for the bench's random models (its transposed layout of each
    # checkpoint), and that checkpoint itself, written once and shared by the sections, go to a
    # folder of the run's own, inherited by every process it starts, not to the user's cache
    with tempfile.TemporaryDirectory(prefix="gpt2cli-bench-cache-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        common.RUN_FOLDER = Path(cache)
        start = time.perf_counter()
        for name in chosen:
            section_start = time.perf_counter()
            importlib.import_module(f"bench.bench_{name}").main()
            print(f"({name}: {time.perf_counter() - section_start:.0f} s)", flush=True)
        # the project's rule: `make bench` takes a few minutes at most (about 5 on a quiet machine)
        print(f"\nbench: {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
