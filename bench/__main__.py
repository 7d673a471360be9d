"""Run the benchmark sections: `python -m bench [section ...]` (all of them by default)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile

SECTIONS = ["startup", "tokenizer", "weights", "model", "generate", "score", "jsonl", "serve"]


def main(argv: list[str]) -> None:
    chosen = argv or SECTIONS
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    # the files gpt2cli caches for the bench's random models (154 MB per 124M head) go to a
    # folder of the run's own, inherited by every process it starts, not to the user's cache
    with tempfile.TemporaryDirectory(prefix="gpt2cli-bench-cache-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        for name in chosen:
            importlib.import_module(f"bench.bench_{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
