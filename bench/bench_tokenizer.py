"""Tokenizer throughput: gpt2cli beside tiktoken and transformers' GPT2TokenizerFast.

All three encode the same multi-megabyte text (Python's own sources and docs, and licence texts,
found on this machine) in one thread; each figure is the median of several runs. gpt2cli is shown
with a cold cache (a new cache each run: every distinct word is merged once) and a warm one.
"""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

from bench.common import median_seconds, print_table

TEXT_ROOTS = (
    Path(sysconfig.get_paths()["stdlib"]),
    Path("/usr/share/common-licenses"),
    Path("/usr/share/doc"),
)
TEXT_SUFFIXES = {".py", ".txt", ".rst", ".md", ""}
# as tiktoken_ext/openai_public.py spells it
TIKTOKEN_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def corpus_files(max_bytes: int, seed: int = 0) -> list[tuple[Path, str]]:
    """Real text files found on this machine, (path, text), in a shuffled but fixed order.

    Python sources and docs of the running interpreter, then licence texts and package docs when
    the machine has them; files that are not UTF-8 are skipped. Stops after `max_bytes`.
    """
    paths = sorted(
        p
        for root in TEXT_ROOTS
        if root.is_dir()
        for p in root.rglob("*")
        if p.suffix in TEXT_SUFFIXES and "site-packages" not in p.parts and p.is_file()
    )
    random.Random(seed).shuffle(paths)
    files, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append((path, text))
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return files


def main() -> None:
    """Print MB/s of each tokenizer on the same text, and gpt2cli's ratio to each reference."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # transformers' Rust tokenizer: one thread
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tiktoken
    from transformers import GPT2TokenizerFast

    from gpt2cli.tokenizer import DATA_DIR, Tokenizer

    text = "".join(t for _, t in corpus_files(4_000_000))
    megabytes = len(text.encode("utf-8")) / 1e6

    ours = Tokenizer.from_dir(DATA_DIR)
    reference = tiktoken.Encoding(
        name="gpt2",
        pat_str=TIKTOKEN_GPT2_PATTERN,
        mergeable_ranks={ours.token_bytes(i): i for i in range(ours.eot_token)},
        special_tokens={"<|endoftext|>": ours.eot_token},
    )
    # transformers 5 reads `vocab`/`merges`; `vocab_file=` is silently ignored there
    fast = GPT2TokenizerFast.from_pretrained(str(DATA_DIR))
    expected = reference.encode_ordinary(text)
    if ours.encode(text, allowed_special=False) != expected or fast.encode(text) != expected:
        raise SystemExit("the tokenizers disagree on the benchmark text")

    def cold() -> None:
        ours._cache.clear()  # every distinct pre-token is merged again, as in a fresh process
        ours.encode(text, allowed_special=False)

    runs = {
        "gpt2cli (cold cache)": cold,
        "gpt2cli (warm cache)": lambda: ours.encode(text, allowed_special=False),
        "tiktoken (1 thread)": lambda: reference.encode_ordinary(text),
        "transformers GPT2TokenizerFast": lambda: fast.encode(text),
    }
    speed = {name: megabytes / median_seconds(fn, repeat=3) for name, fn in runs.items()}
    tiktoken_speed = speed["tiktoken (1 thread)"]
    fast_speed = speed["transformers GPT2TokenizerFast"]
    print_table(
        f"tokenizer: encode {megabytes:.1f} MB of text ({len(expected):,} tokens), median of 3",
        ["tokenizer", "MB/s", "x tiktoken", "x GPT2TokenizerFast"],
        [[name, s, s / tiktoken_speed, s / fast_speed] for name, s in speed.items()],
    )
    print("targets: gpt2cli >= 0.3x tiktoken and >= 1.5x GPT2TokenizerFast")
