"""`gpt2 generate` end to end against the same generation with transformers, as whole processes.

Both sides start a fresh Python process on a 124M-shaped random-weight folder (with the real
vocabulary) and continue the same prompt greedily for 64 tokens, printing each token as soon as
it exists. Time to first token is measured from launching the process to the first byte on its
stdout, so it includes start-up, imports and loading the weights; tokens/s is the other 63
tokens over the time from the first byte to the end of the output. Medians over RUNS runs, after
one warm-up run of one token (it warms the page cache); the machine is shared, so the figures
are noisy. With `python -m bench generate --avx2` both sides run as on an AVX2-only CPU
(bench.common.avx2_env).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    avx2,
    avx2_note,
    avx2_title,
    print_table,
    random_124m,
    verdict,
    worker_env,
)

NEW_TOKENS = 64
RUNS = 3
TTFT_TARGET = 2.0  # times faster than transformers to the first token
SPEED_TARGET = 2.4  # tokens/s after the first, times transformers'
PROMPT = "The history of the printing press begins in"

# The transformers side: load, then generate with a streamer that writes each new token's text
# to stdout (unbuffered) the moment generate() produces it.
TRANSFORMERS_SCRIPT = """
import sys
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel
from transformers.generation.streamers import BaseStreamer

folder, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = GPT2LMHeadModel.from_pretrained(folder).eval()


class Print(BaseStreamer):
    def __init__(self):
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() hands the streamer the prompt first
            self.prompt_seen = True
            return
        sys.stdout.buffer.write(tokenizer.decode(value.reshape(-1)).encode())
        sys.stdout.buffer.flush()

    def end(self):
        pass


ids = torch.tensor([tokenizer.encode(prompt)])
with torch.no_grad():
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tokenizer.eos_token_id,
        streamer=Print(),
    )
"""


def first_byte_and_total(cmd: list[str]) -> tuple[float, float]:
    """Seconds from launch to the first stdout byte, and to the end of the output."""
    start = time.perf_counter()
    env = worker_env()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)
    first_at = time.perf_counter()
    rest = proc.stdout.read()
    end = time.perf_counter()
    if proc.wait() != 0 or not first:
        raise RuntimeError(f"{cmd[:4]} failed with status {proc.returncode}")
    del rest
    return first_at - start, end - start


def measure(cmd: list[str]) -> tuple[float, float]:
    """Median time to first token, and median tokens/s after it, over RUNS runs of `cmd` +
    [str(NEW_TOKENS)], after one run of `cmd` + ["1"] that warms the page cache."""
    first_byte_and_total([*cmd, "1"])
    runs = [first_byte_and_total([*cmd, str(NEW_TOKENS)]) for _ in range(RUNS)]
    ttft = statistics.median(first for first, _ in runs)
    speed = statistics.median((NEW_TOKENS - 1) / (total - first) for first, total in runs)
    return ttft, speed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-generate-") as tmp:
        folder = random_124m(Path(tmp) / "gpt2-124M")
        ours = measure(
            [
                sys.executable,
                "-m",
                "gpt2cli",
                "generate",
                "-m",
                str(folder),
                "--temperature",
                "0",
                "--ignore-eos",
                PROMPT,
                "--max-tokens",
            ]
        )
        reference = measure([sys.executable, "-c", TRANSFORMERS_SCRIPT, str(folder), PROMPT])
    ttft, speed = reference[0] / ours[0], ours[1] / reference[1]
    print_table(
        f"generate: whole process, 124M-shaped random weights, greedy, {NEW_TOKENS} new tokens "
        f"(median of {RUNS}, shared machine: noisy){avx2_title()}",
        ["measure", "transformers", "gpt2cli", "ratio", "target", ""],
        [
            [
                "time to first token, s (start-up + load + prefill)",
                reference[0],
                ours[0],
                f"{ttft:.2f}x faster",
                f">= {TTFT_TARGET:g}x faster",
                verdict(ttft >= TTFT_TARGET),
            ],
            [
                f"`gpt2 generate` tokens/s after the first ({NEW_TOKENS - 1} tokens)",
                reference[1],
                ours[1],
                f"{speed:.2f}x",
                f">= {SPEED_TARGET:g}x",
                verdict(speed >= SPEED_TARGET),
            ],
        ],
    )
    if avx2():
        print(avx2_note({}))


if __name__ == "__main__":
    main()
