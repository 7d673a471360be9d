"""Scoring beside the Hugging Face perplexity recipe run with transformers, on the same weights.

A 1,536-token text scored in windows of 1,024 starting every 512 tokens (two windows: the
first scores 1,023 tokens, the second the last 512): gpt2cli's `score.token_logprobs` against the
"Perplexity of fixed-length models" loop (labels masked before `trg_len`, torch with 2 threads),
each in its own process so that its peak resident memory is its own; tokens/s is the median of
REPEAT runs after the model is loaded and a short warm-up. Then JSON Lines: 9 documents of
about 100 tokens scored as padded batches (`score_texts`, what `gpt2 score --jsonl` does)
against scoring them one call at a time in the same process (the two ways alternate, REPEAT
runs each; docs/s are medians), and against one `gpt2 score --text` process per document (a
shell loop, PROCESSES documents).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_model import THREADS, _peak_rss
from bench.common import print_table, random_124m, verdict
from tests.factory import GPT2_124M

TOKENS = 1_536  # two windows; the stride's second window is the one that masks labels
STRIDE = 512
WARM_UP_TOKENS = 256
DOCUMENTS = 9  # the issue names 256; 9 (of ~104 ids: one padded batch of 1,024) keep it short
DOCUMENT_TOKENS = 100
REPEAT = 3  # runs of each measurement a ratio is taken of: 9 documents take about 2 s
PROCESSES = 4  # documents scored by a `gpt2 score` process each, for the last row
MIB = 2**20


def main() -> None:
    """Run both workloads and print one table."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_124m(Path(tmp))
        ref = _run_worker("transformers", folder)
        ours = _run_worker("gpt2cli", folder)
        docs = _run_worker("jsonl", folder)
    weights = 4 * GPT2_124M.n_params
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
    batched = docs["batched"] / docs["one_by_one"]
    rows: list[list[object]] = [
        [f"score {TOKENS:,} tokens, stride {STRIDE}: tokens/s", ref["tokens_per_s"],
         ours["tokens_per_s"], f"{ratio:.2f}x", ">= 1.5x", verdict(ratio >= 1.5)],
        ["  total NLL (nats)", ref["nll"], ours["nll"],
         f"rel diff {abs(ours['nll'] - ref['nll']) / ref['nll']:.1e}", "<= 1e-5",
         verdict(abs(ours["nll"] - ref["nll"]) <= 1e-5 * ref["nll"])],
        ["  peak RSS MiB", ref["peak_rss"] / MIB, ours["peak_rss"] / MIB,
         f"weights {weights / MIB:.0f}", "<= weights+300, < transformers",
         verdict(ours["peak_rss"] <= weights + 300 * MIB and ours["peak_rss"] < ref["peak_rss"])],
        [f"--jsonl {DOCUMENTS} docs of ~{DOCUMENT_TOKENS} tokens: docs/s", "",
         docs["batched"], f"{batched:.2f}x one by one ({docs['one_by_one']:.1f} docs/s)",
         ">= 2x", verdict(batched >= 2)],
        ["  vs one `gpt2 score --text` process a doc", "", docs["processes"],
         f"{docs['batched'] / docs['processes']:.1f}x", "", ""],
    ]  # fmt: skip
    print_table(
        f"score: gpt2cli vs the Hugging Face recipe on transformers, 124M-shaped fp32, "
        f"{THREADS} threads, median of {REPEAT}",
        ["workload", "transformers", "gpt2cli", "ratio", "target", ""],
        rows,
    )


def _run_worker(side: str, folder: Path) -> dict[str, float]:
    """Run one side in a fresh process; its last stdout line is the result."""
    cmd = [sys.executable, "-m", "bench.bench_score", side, str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _worker(side: str, folder: str) -> None:
    ids = np.random.default_rng(0).integers(0, GPT2_124M.n_vocab, TOKENS)
    if side == "jsonl":
        result = _documents(folder)
    else:
        run = _transformers_recipe(folder) if side == "transformers" else _ours(folder)
        run(ids[:WARM_UP_TOKENS])
        rates, nll = [], 0.0
        for _ in range(REPEAT):
            start = time.perf_counter()
            nll, n_tokens = run(ids)
            rates.append(n_tokens / (time.perf_counter() - start))
        result = {"tokens_per_s": statistics.median(rates), "nll": nll}
    print(json.dumps(result | {"peak_rss": _peak_rss()}))


def _ours(folder: str) -> Callable[[np.ndarray], tuple[float, int]]:
    from gpt2cli.model import GPT2
    from gpt2cli.score import token_logprobs

    model = GPT2.from_pretrained(folder)

    def run(ids: np.ndarray) -> tuple[float, int]:
        logprobs = token_logprobs(model, ids, stride=STRIDE, bos=False)
        return -float(logprobs.sum(dtype=np.float64)), len(logprobs)

    return run


def _transformers_recipe(folder: str) -> Callable[[np.ndarray], tuple[float, int]]:
    """Load the model with transformers; return the recipe run on it."""
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()
    hf: Any = transformers.GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()

    def run(ids: np.ndarray) -> tuple[float, int]:
        return _recipe(hf, torch.from_numpy(ids)[None])

    return run


def _recipe(hf: Any, encodings: Any) -> tuple[float, int]:
    """The page's loop, counting the labels the loss really averages (see tests/test_score.py):
    total NLL and the number of tokens scored."""
    import torch

    length = encodings.shape[1]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, length, STRIDE):
        end = min(begin + GPT2_124M.n_ctx, length)
        trg_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = hf(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end = end
        if end == length:
            break
    return nll_sum, n_tokens


def _documents(folder: str) -> dict[str, float]:
    """Documents per second, batched (score_texts) and one score_text call at a time."""
    from gpt2cli.model import GPT2
    from gpt2cli.score import score_text, score_texts

    model = GPT2.from_pretrained(folder)
    rng = np.random.default_rng(1)
    texts = [
        model.tokenizer.decode(rng.integers(0, 50000, DOCUMENT_TOKENS).tolist())
        for _ in range(DOCUMENTS)
    ]

    def batched() -> float:
        start = time.perf_counter()
        score_texts(model, texts)
        return DOCUMENTS / (time.perf_counter() - start)

    def one_by_one() -> float:
        start = time.perf_counter()
        for text in texts:
            score_text(model, text)
        return DOCUMENTS / (time.perf_counter() - start)

    def processes(count: int = PROCESSES) -> float:
        start = time.perf_counter()
        for text in texts[:count]:
            cmd = [sys.executable, "-m", "gpt2cli", "score", "-m", folder, "--json", "--text", text]
            subprocess.run(cmd, check=True, capture_output=True)
        return count / (time.perf_counter() - start)

    score_texts(model, texts[:4])  # warm-up: the tokenizer, the weights' pages, BLAS's buffers
    ways = {"batched": batched, "one_by_one": one_by_one}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(REPEAT):  # alternating, so that a change in the machine's load hits both
        for name in ways if r % 2 == 0 else reversed(ways):
            rates[name].append(ways[name]())
    result = {name: statistics.median(values) for name, values in rates.items()}
    return result | {"processes": processes()}


if __name__ == "__main__":
    _worker(*sys.argv[1:])
