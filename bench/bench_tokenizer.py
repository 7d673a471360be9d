"""Tokenizer throughput: gpt2cli beside tiktoken and transformers' GPT2TokenizerFast.

All three encode the same 2 MB of text (Python's own sources and docs, and licence texts, found
on this machine) in one thread; each figure is the median of 3 runs (no warm-up: the median
leaves out a slow first run), and every output is checked to be tiktoken's. gpt2cli is shown
with a cold cache (a new cache each run: every distinct word is merged once) and a warm one.
Then: 1 MB words with no space (one pre-token each, which the merge loop once took hours over)
beside tiktoken, and a whole `gpt2 encode` of a 50 MB file: its time and peak memory.
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import string
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import print_table, verdict

if TYPE_CHECKING:
    import tiktoken

    from gpt2cli.tokenizer import Tokenizer

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
CORPUS_BYTES = 2_000_000
LONG_WORD = 1_000_000  # bytes
LONG_WORD_TARGET_S = 1.0
# 1 MB runs with no space, each a single pre-token
LONG_WORDS: dict[str, Callable[[random.Random], str]] = {
    "random letters": lambda rng: "".join(rng.choices(string.ascii_lowercase, k=LONG_WORD)),
    "one letter": lambda rng: "a" * LONG_WORD,
    "random digits": lambda rng: "".join(rng.choices(string.digits, k=LONG_WORD)),
    "repeated emoji": lambda rng: "🤗" * (LONG_WORD // 4),
    "random CJK": lambda rng: "".join(
        chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(LONG_WORD // 3)
    ),
}
BIG_FILE = 50_000_000  # bytes
BIG_FILE_TARGET_MB = 1000
# Runs a command with stdin from a file and stdout discarded; prints its exit status, wall time
# and peak resident memory (KiB). It runs in a fresh interpreter because a forked child's peak
# counts the memory of the process it was forked from (pytest's, the bench's) until it execs.
MEASURE_SCRIPT = """
import resource, subprocess, sys, time
with open(sys.argv[1], "rb") as stdin:
    start = time.perf_counter()
    status = subprocess.call(sys.argv[2:], stdin=stdin, stdout=subprocess.DEVNULL)
print(status, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


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

    text = "".join(t for _, t in corpus_files(CORPUS_BYTES))
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

    def cold() -> list[int]:
        ours._cache.clear()  # every distinct pre-token is merged again, as in a fresh process
        return ours.encode(text, allowed_special=False)

    runs: dict[str, Callable[[], list[int]]] = {
        "gpt2cli (cold cache)": cold,  # first: it leaves the cache warm for the next
        "gpt2cli (warm cache)": lambda: ours.encode(text, allowed_special=False),
        "tiktoken (1 thread)": lambda: reference.encode_ordinary(text),
        "transformers GPT2TokenizerFast": lambda: fast.encode(text),
    }
    speed, outputs = {}, {}
    for name, fn in runs.items():
        seconds, outputs[name] = median_and_output(fn)
        speed[name] = megabytes / seconds
    expected = outputs["tiktoken (1 thread)"]
    if any(out != expected for out in outputs.values()):
        raise SystemExit("the tokenizers disagree on the benchmark text")
    tiktoken_speed = speed["tiktoken (1 thread)"]
    fast_speed = speed["transformers GPT2TokenizerFast"]
    print_table(
        f"tokenizer: encode {megabytes:.1f} MB of text ({len(expected):,} tokens), median of 3",
        ["tokenizer", "MB/s", "x tiktoken", "x GPT2TokenizerFast"],
        [[name, s, s / tiktoken_speed, s / fast_speed] for name, s in speed.items()],
    )
    print("targets: gpt2cli >= 0.3x tiktoken and >= 1.5x GPT2TokenizerFast")
    long_words(ours, reference)
    big_file(text)


def long_words(ours: Tokenizer, reference: tiktoken.Encoding) -> None:
    """Seconds to encode each 1 MB word, cold (the word cache would remember the whole word)."""
    rows = []
    for kind, make in LONG_WORDS.items():
        word = make(random.Random(0))
        seconds, ids = median_and_output(functools.partial(encode_cold, ours, word))
        reference_s, expected = median_and_output(
            functools.partial(reference.encode_ordinary, word)
        )
        if ids != expected:
            raise SystemExit(f"gpt2cli and tiktoken disagree on the 1 MB word of {kind}")
        met = verdict(seconds < LONG_WORD_TARGET_S)
        rows.append([kind, seconds, reference_s, seconds / reference_s, met])
    print_table(
        "tokenizer: encode a 1 MB word with no space (one pre-token), median of 3",
        ["word", "gpt2cli s", "tiktoken s", "x tiktoken", f"< {LONG_WORD_TARGET_S:g} s"],
        rows,
    )


def encode_cold(ours: Tokenizer, word: str) -> list[int]:
    ours._cache.clear()
    return ours.encode(word)


def median_and_output(fn: Callable[[], list[int]], repeat: int = 3) -> tuple[float, list[int]]:
    """Median seconds of `repeat` runs of `fn` (no warm-up), and what the last one returned."""
    times, output = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        output = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def big_file(text: str) -> None:
    """`gpt2 encode < 50 MB file > /dev/null` as a whole process: wall time and peak memory."""
    data = text.encode("utf-8")
    data = (data * (BIG_FILE // len(data) + 1))[:BIG_FILE].decode("utf-8", "ignore").encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "big.txt")
        path.write_bytes(data)
        status, seconds, peak_mb = run_measured(
            [str(Path(sys.executable).parent / "gpt2"), "encode"], path
        )
    if status != 0:
        raise SystemExit(f"gpt2 encode of the {len(data) / 1e6:.0f} MB file failed")
    print_table(
        f"tokenizer: `gpt2 encode` of a {len(data) / 1e6:.0f} MB file ({len(text) / 1e6:.0f} MB of "
        "real text, repeated), a whole process",
        ["measure", "value", "target"],
        [
            ["wall time, s", seconds, ""],
            ["MB/s", len(data) / 1e6 / seconds, ""],
            [
                "peak memory, MiB",
                peak_mb,
                f"< {BIG_FILE_TARGET_MB}: {verdict(peak_mb < BIG_FILE_TARGET_MB)}",
            ],
        ],
    )


def run_measured(command: list[str], stdin: Path) -> tuple[int, float, float]:
    """Run `command` with stdin from a file, stdout discarded: exit status, wall seconds, and
    peak resident memory in MiB (Linux reports it in KiB)."""
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, str(stdin), *command],
        capture_output=True,
        text=True,
        check=True,
    )
    status, seconds, peak_kib = measured.stdout.split()
    return int(status), float(seconds), int(peak_kib) / 1024
