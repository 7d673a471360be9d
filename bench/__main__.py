"""Run the benchmark sections: `python -m bench [section ...]` (all of them by default)."""

from __future__ import annotations

import importlib
import sys

SECTIONS = ["startup", "tokenizer", "weights", "model", "generate", "score", "jsonl"]


def main(argv: list[str]) -> None:
    chosen = argv or SECTIONS
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    for name in chosen:
        importlib.import_module(f"bench.bench_{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
