"""The NumPy model beside transformers (torch eager, `use_cache=True`) on the same weights.

Both sides load one 124M-shaped random-weight folder and use the machine's 2 cores (torch through
`torch.set_num_threads(2)`, NumPy through OpenBLAS's own threads). Every measurement runs in its
own subprocess, one side at a time, so the two never compete for the cores and each process's
peak resident memory is its own. transformers is driven by a plain loop over its forward pass
with its KV cache (less overhead than `generate()`), inside `torch.inference_mode()`. Figures are
medians of REPEAT runs after one warm-up; the machine is shared, so they are noisy.

The physical limit of batch-1 decoding is reading every fp32 weight once per token: weight bytes
divided by the memory bandwidth of a large array copy (bytes read plus bytes written per second).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, random_124m, verdict
from tests.factory import GPT2_124M

THREADS = 2
REPEAT = 3
PROMPT = 32  # tokens in each decoding prompt
WORKLOADS = {  # name: (batch, prompt tokens, new tokens); new 0 = prefill to the last logits only,
    # ALL_LOGITS = the logits of every position (what scoring needs)
    "decode-b1": (1, PROMPT, 256),
    "prefill-1024": (1, 1024, 0),
    "prefill-1024-all": (1, 1024, -1),
    "decode-b8": (8, PROMPT, 64),
}
MIB = 2**20
ALL_LOGITS = -1


def main() -> None:
    """Measure every workload on both sides and print one table."""
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_124m(Path(tmp), tokenizer=False)
        results = {
            (side, name): _run_worker(side, name, folder)
            for name in WORKLOADS
            for side in ("transformers", "gpt2cli")
        }
    c = GPT2_124M
    weight_bytes = 4 * c.n_params
    per_token = weight_bytes - 4 * c.n_ctx * c.n_embd  # each step reads one wpe row, not all
    limit = bandwidth / per_token
    rows: list[list[object]] = []
    targets = {"decode-b1": 2.0, "prefill-1024": 1.0, "prefill-1024-all": 1.0, "decode-b8": 1.0}
    for name, (batch, _, _) in WORKLOADS.items():
        ref, ours = results["transformers", name], results["gpt2cli", name]
        ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
        label = f"{name} tokens/s" + (f" (x{batch} rows)" if batch > 1 else "")
        rows.append(
            [label, ref["tokens_per_s"], ours["tokens_per_s"], f"{ratio:.2f}x",
             f">= {targets[name]:g}x", verdict(ratio >= targets[name])]
        )  # fmt: skip
        if name == "decode-b1":
            share = ours["tokens_per_s"] / limit
            rows.append(
                ["  physical limit tokens/s", "", limit, f"{share:.0%} of it", ">= 80%",
                 verdict(share >= 0.8)]
            )  # fmt: skip
    for name, (batch, prompt, new) in WORKLOADS.items():
        kv = 2 * c.n_layer * batch * (prompt + max(new, 0)) * c.n_embd * 4
        logits = 4 * batch * prompt * c.n_vocab if new == ALL_LOGITS else 0
        budget = (weight_bytes + kv + logits) * 1.15
        ref, ours = results["transformers", name], results["gpt2cli", name]
        rows.append(
            [f"peak RSS MiB, {name}", ref["peak_rss"] / MIB, ours["peak_rss"] / MIB,
             f"budget {budget / MIB:.0f}", "weights+KV+15%", verdict(ours["peak_rss"] <= budget)]
        )  # fmt: skip
    print_table(
        f"model: gpt2cli (NumPy, {_blas()}) vs transformers (torch eager), "
        f"124M-shaped fp32, {THREADS} threads, median of {REPEAT}",
        ["workload", "transformers", "gpt2cli", "ratio", "target", ""],
        rows,
    )
    print(
        f"memory bandwidth (large array copy): {bandwidth / 1e9:.1f} GB/s; "
        f"fp32 weights read per token: {per_token / 1e6:.0f} MB; "
        f"BLAS env: {_blas_env() or 'none set'}"
    )


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes per second moved (read plus written) by copying a large float32 array, best of 5."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times[1:])


def _blas() -> str:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]  # type: ignore[func-returns-value]
    return f"{blas['name']} {blas['version']}"


def _blas_env() -> str:
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS")
    return " ".join(f"{n}={os.environ[n]}" for n in names if n in os.environ)


def _run_worker(side: str, workload: str, folder: Path) -> dict[str, float]:
    """Run one workload on one side in a fresh process; its last stdout line is the result."""
    cmd = [sys.executable, "-m", "bench.bench_model", side, workload, str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _worker(side: str, workload: str, folder: str) -> None:
    """Load the model, time the workload REPEAT times, print tokens/s and peak RSS as JSON."""
    batch, prompt, new = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, GPT2_124M.n_vocab, (batch, prompt))
    run = _ours(folder) if side == "gpt2cli" else _transformers(folder)
    rates = [run(prompts, new) for _ in range(REPEAT + 1)][1:]
    print(json.dumps({"tokens_per_s": statistics.median(rates), "peak_rss": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident bytes (VmHWM): unlike getrusage's ru_maxrss, it does not
    carry over the parent's peak from before the fork."""
    status = Path("/proc/self/status").read_text().splitlines()
    kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) * 1024


def _ours(folder: str) -> Callable[[np.ndarray, int], float]:
    from gpt2cli.model import GPT2

    model = GPT2.from_pretrained(folder)

    def run(prompts: np.ndarray, new: int) -> float:
        start = time.perf_counter()
        if new == ALL_LOGITS:
            model(prompts)
            return prompts.size / (time.perf_counter() - start)
        state, logits = model.prefill(list(prompts), prompts.shape[1] + new)
        if not new:
            return prompts.size / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new - 1):  # the first new token came from the prefill's logits
            logits = model.step(state, logits.argmax(axis=-1))
        return (new - 1) * len(prompts) / (time.perf_counter() - start)

    return run


def _transformers(folder: str) -> Callable[[np.ndarray, int], float]:
    import torch
    import transformers

    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()
    hf: Any = transformers.GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()

    @torch.inference_mode()
    def run(prompts: np.ndarray, new: int) -> float:
        start = time.perf_counter()
        if new == ALL_LOGITS:
            hf(torch.from_numpy(prompts), use_cache=False)
            return prompts.size / (time.perf_counter() - start)
        out = hf(torch.from_numpy(prompts), use_cache=True, logits_to_keep=1)
        if not new:
            return prompts.size / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new - 1):
            next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
            out = hf(next_ids, cache=out.past_key_values, use_cache=True)
        return (new - 1) * len(prompts) / (time.perf_counter() - start)

    return run


if __name__ == "__main__":
    _worker(*sys.argv[1:])
