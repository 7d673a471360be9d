"""The NumPy model beside transformers (torch eager, `use_cache=True`) on the same weights.

Both sides load one 124M-shaped random-weight folder and use the machine's 2 cores (torch through
`torch.set_num_threads(2)`, NumPy through OpenBLAS's own threads). Every measurement runs in its
own process, one side at a time (the two alternate, workload by workload), so the two never
compete for the cores and each process's peak resident memory is its own. gpt2cli's processes
are fresh interpreters, as a user's would be. transformers' are forked, one a workload, from a
process that has imported torch and transformers (4-5 s each time otherwise) and waits for the
next workload on its stdin; their peaks thus leave out the library pages only the import read,
about 80 MiB less than a fresh interpreter's. transformers is driven by a plain loop over its
forward pass with its KV cache (less overhead than `generate()`), inside
`torch.inference_mode()`. Decoding continues a 32-token prompt (64 new tokens for one row, 16
each for eight; tokens/s leaves the prefill out); prefill runs a 1,024-token prompt. Figures are
medians of REPEAT runs after a short warm-up (8 new tokens, or a 128-token prompt: it pages the
weights in and starts the threads); the machine is shared, so they are noisy. With
`python -m bench model --avx2` every worker, both sides, runs as on an AVX2-only CPU
(bench.common.avx2_env), and the table says so.

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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    avx2_note,
    avx2_title,
    print_table,
    random_124m,
    simd_report,
    verdict,
    worker_env,
)
from tests.factory import GPT2_124M

THREADS = 2
REPEAT = 3
PROMPT = 32  # tokens in each decoding prompt
WORKLOADS = {  # name: (batch, prompt tokens, new tokens); new 0 = prefill to the last logits only,
    # ALL_LOGITS = the logits of every position (what scoring needs)
    "decode-b1": (1, PROMPT, 64),
    "prefill-1024": (1, 1024, 0),
    "prefill-1024-all": (1, 1024, -1),
    "decode-b8": (8, PROMPT, 16),
}
MIB = 2**20
ALL_LOGITS = -1
WARM_UP_NEW, WARM_UP_PROMPT = 8, 128  # the warm-up run's new tokens, or prompt for a prefill
TARGETS = {"decode-b1": 2.4, "prefill-1024": 1.5, "prefill-1024-all": 1.2, "decode-b8": 2.5}
LIMIT_SHARE = 0.9  # decode-b1's target share of the physical limit


def main() -> None:
    """Measure every workload on both sides and print one table."""
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_124m(Path(tmp), tokenizer=False)
        results = {}
        with _ForkServer(folder) as transformers_side:
            for name in WORKLOADS:
                results["transformers", name] = transformers_side.run(name)
                results["gpt2cli", name] = _run_worker(name, folder)
    c = GPT2_124M
    weight_bytes = 4 * c.n_params
    per_token = weight_bytes - 4 * c.n_ctx * c.n_embd  # each step reads one wpe row, not all
    limit = bandwidth / per_token
    rows: list[list[object]] = []
    for name, (batch, _, _) in WORKLOADS.items():
        ref, ours = results["transformers", name], results["gpt2cli", name]
        ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
        label = f"{name} tokens/s" + (f" (x{batch} rows)" if batch > 1 else "")
        rows.append(
            [label, ref["tokens_per_s"], ours["tokens_per_s"], f"{ratio:.2f}x",
             f">= {TARGETS[name]:g}x", verdict(ratio >= TARGETS[name])]
        )  # fmt: skip
        if name == "decode-b1":
            share = ours["tokens_per_s"] / limit
            rows.append(
                ["  physical limit tokens/s", "", limit, f"{share:.0%} of it",
                 f">= {LIMIT_SHARE:.0%}", verdict(share >= LIMIT_SHARE)]
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
        f"124M-shaped fp32, {THREADS} threads, median of {REPEAT}{avx2_title()}",
        ["workload", "transformers", "gpt2cli", "ratio", "target", ""],
        rows,
    )
    print(
        f"memory bandwidth (large array copy): {bandwidth / 1e9:.1f} GB/s; "
        f"fp32 weights read per token: {per_token / 1e6:.0f} MB; "
        f"BLAS env: {_blas_env() or 'none set'}"
    )
    torch_simd = results["transformers", "decode-b1"]["simd"]["torch CPU capability"]
    print(avx2_note(results["gpt2cli", "decode-b1"]["simd"] | {"torch CPU capability": torch_simd}))


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


def _run_worker(workload: str, folder: Path) -> dict[str, Any]:
    """Run one workload of gpt2cli's in a fresh process; its last stdout line is the result."""
    cmd = [sys.executable, "-m", "bench.bench_model", "gpt2cli", str(folder), workload]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env()).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


class _ForkServer:
    """A process that imports torch and transformers once, then, for each workload name written
    to its stdin, forks a child that runs it (`_worker`) and prints its result line."""

    def __init__(self, folder: Path) -> None:
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 (its stderr; closed on exit)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_model", "transformers", str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            env=worker_env(),
        )

    def run(self, workload: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            self.errors.seek(0)
            stderr = self.errors.read().decode(errors="replace")
            raise RuntimeError(f"transformers {workload} failed: {line!r}\n{stderr}")
        result: dict[str, Any] = json.loads(line)
        return result

    def __enter__(self) -> _ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.errors.close()


def _fork_server(folder: str) -> None:
    """The transformers side's process: import once, then a forked child per workload read from
    stdin; a child's result line, or a line that is not JSON if it failed, goes to stdout."""
    import torch  # noqa: F401
    from transformers import GPT2LMHeadModel  # noqa: F401  (the model's code is imported lazily)

    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker("transformers", line.strip(), folder)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status:
            print(f"failed with wait status {status}", flush=True)


def _worker(side: str, workload: str, folder: str) -> None:
    """Load the model, warm up, time the workload REPEAT times; print tokens/s, peak RSS and
    the kernels in use as JSON."""
    batch, prompt, new = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, GPT2_124M.n_vocab, (batch, prompt))
    run = _ours(folder) if side == "gpt2cli" else _transformers(folder)
    if new > 0:
        run(prompts, WARM_UP_NEW)
    else:
        run(prompts[:, :WARM_UP_PROMPT], new)
    rates = [run(prompts, new) for _ in range(REPEAT)]
    result = {"tokens_per_s": statistics.median(rates), "peak_rss": _peak_rss()}
    print(json.dumps(result | {"simd": simd_report()}))


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
    if sys.argv[1] == "transformers":
        _fork_server(sys.argv[2])
    else:
        _worker(sys.argv[1], sys.argv[3], sys.argv[2])
