"""Narrow weights (issue 22): float32, bfloat16 and int8 decoding beside transformers, on a busy
machine, at 774M, in a prefill, and what loading the compiled kernels adds to start-up.

Each measurement is a fresh process (`_worker`), loading the way `gpt2` does (a CpuSampler
from the start of the load, then `threads.fit_to_idle_cores`), so its peak resident memory is
its own; the conditions alternate, run after run. transformers runs bench_model's decode
workloads in its fork server, in the same run. Decoding continues a 32-token prompt greedily
(32 new tokens for one row, 8 each for eight); tokens/s leaves the prefill out. "busy" runs a
`while True: pass` process beside the worker (bench_load's); "quiet" is the same run's
decode-b1 figure, measured as found (the table's load average says how quiet). "large" is
gpt2-large's shape (774M) with random weights, written once. "prefill" is `gpt2 score`'s work,
every position's logits of 1,024 tokens. "start-up" is the whole process to the first token of
a 4-token prompt, the kernels loaded from numba's cache (the second run of a user's), against
float32. Medians of REPEAT runs in each process; the machine is shared, so figures are noisy.

Needs the `fast` extra (numba); without it the section says so and measures nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_load import _busy_process
from bench.bench_model import _ForkServer, _peak_rss
from bench.common import avx2_note, avx2_title, print_table, random_124m, verdict, worker_env
from gpt2cli.config import GPT2Config

REPEAT = 3
PROMPT = 32
WORKLOADS = {  # name: (batch, prompt tokens, new tokens, runs); new -1: every position's logits
    "decode-b1": (1, PROMPT, 32, REPEAT),
    "decode-b8": (8, PROMPT, 8, REPEAT),
    "prefill": (1, 1024, -1, REPEAT),
    "large-b1": (1, PROMPT, 8, 1),  # float32 reads 3.1 GB a token: about 0.3 s here
}
LARGE = GPT2Config(n_embd=1280, n_head=20, n_layer=36)  # gpt2-large, 774M
MIB = 2**20
TARGETS = {  # (what, dtype, workload): target
    "int8 decode-b1 vs our float32": 2.2,
    "bfloat16 decode-b1 vs our float32": 1.5,
    "float32 decode-b8 vs transformers": 2.5,
    "int8 decode-b8 vs transformers": 5.0,
    "busy share": 0.4,
    "large int8 vs float32": 2.5,
    "large int8 peak MiB": 1300,
    "start-up added s": 0.3,
}


def main() -> None:
    if importlib.util.find_spec("numba") is None:
        print("\n## quant: skipped, numba is not installed (pip install -e '.[fast]')")
        return
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-quant-") as tmp:
        folder = random_124m(Path(tmp) / "gpt2-124M", tokenizer=False)
        large = _write_large(Path(tmp) / "gpt2-large")
        # converted (and compiled) once, as on a user's first run
        for where, dtype in [
            (folder, "bfloat16"),
            (folder, "int8"),
            (large, "float32"),
            (large, "int8"),
        ]:
            _run(where, dtype, "decode-b1", warm_only=True)
        ours: dict[tuple[str, str], list[dict[str, Any]]] = {}
        ref = {}
        with _ForkServer(folder) as transformers_side:
            for name in ("decode-b1", "decode-b8"):
                ref[name] = transformers_side.run(name)["tokens_per_s"]
        plan = [
            (dtype, name, folder, False)
            for name in ("decode-b1", "decode-b8")
            for dtype in ("float32", "bfloat16", "int8")
        ]
        plan += [(d, "decode-b1", folder, True) for d in ("float32", "int8")]
        plan += [(d, "prefill", folder, False) for d in ("float32", "int8")]
        plan += [(d, "large-b1", large, False) for d in ("float32", "int8")]
        plan += [(d, "start-up", folder, False) for d in ("float32", "int8")]
        for dtype, name, where, busy in plan:
            with _busy_process(busy):
                ours.setdefault((dtype, name + " busy" * busy), []).append(_run(where, dtype, name))
    _report(ours, ref, load)


def _write_large(folder: Path) -> Path:
    """A gpt2-large-shaped random checkpoint (3.1 GB in float32), written once per run."""
    from tests.factory import write_random_gpt2

    return write_random_gpt2(folder, LARGE, seed=0, tokenizer=False)


def _run(folder: Path, dtype: str, workload: str, *, warm_only: bool = False) -> dict[str, Any]:
    """One workload in a fresh process; its last stdout line is the result."""
    if workload == "start-up":
        return _start_up(folder, dtype)
    cmd = [sys.executable, "-m", "bench.bench_quant", str(folder), dtype, workload]
    cmd += ["warm"] if warm_only else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=worker_env()).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _start_up(folder: Path, dtype: str) -> dict[str, Any]:
    """Seconds from starting a process to its first token (best of REPEAT: start-up is what the
    process does, not what the machine's other work does to it)."""
    code = (
        "from gpt2cli.model import GPT2; "
        f"m = GPT2.from_pretrained({str(folder)!r}, dtype={dtype!r}); "
        "s, l = m.prefill([[1, 2, 3, 4]], 8); m.step(s, l.argmax(-1))"
    )
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code], check=True, env=worker_env(), stdout=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - start)
    return {"seconds": min(times)}


def _worker(folder: str, dtype: str, workload: str, warm_only: bool) -> None:
    """Load as `gpt2` does, warm up, time the workload REPEAT times; print tok/s, peak RSS and
    the thread counts as JSON."""
    from gpt2cli import threads

    sampler = threads.CpuSampler()
    from gpt2cli.model import GPT2

    model = GPT2.from_pretrained(folder, dtype=dtype)
    fit = threads.fit_to_idle_cores(sampler)
    batch, prompt, new, runs = WORKLOADS[workload]
    prompts = np.random.default_rng(0).integers(0, model.config.n_vocab, (batch, prompt))

    def run(n_new: int) -> float:
        start = time.perf_counter()
        if n_new < 0:
            model(prompts)
            return prompts.size / (time.perf_counter() - start)
        state, logits = model.prefill(list(prompts), prompt + n_new)
        start = time.perf_counter()
        for _ in range(n_new - 1):
            logits = model.step(state, logits.argmax(axis=-1))
        return (n_new - 1) * batch / (time.perf_counter() - start)

    run(min(new, 4))  # pages the weights in
    rates = [] if warm_only else [run(new) for _ in range(runs)]
    print(
        json.dumps(
            {
                "tokens_per_s": statistics.median(rates) if rates else 0.0,
                "peak_rss": _peak_rss(),
                "blas_threads": None if fit is None else fit.threads,
                "kernel_threads": threads.kernel_threads(),
                "tile_rows": _tile_rows(),
            }
        )
    )


def _tile_rows() -> int | None:
    """The compiled kernels' rows a tile (gpt2cli.kernels.TILE_ROWS: 8 with AVX-512, else 4),
    or None when this run loaded no kernel."""
    kernels = sys.modules.get("gpt2cli.kernels")
    return None if kernels is None else int(kernels.TILE_ROWS)


def _report(
    ours: dict[tuple[str, str], list[dict[str, Any]]],
    ref: dict[str, float],
    load: tuple[float, ...],
) -> None:
    def rate(dtype: str, name: str) -> float:
        return float(statistics.median(r["tokens_per_s"] for r in ours[dtype, name]))

    def peak(dtype: str, name: str) -> float:
        return max(r["peak_rss"] for r in ours[dtype, name]) / MIB

    rows: list[list[object]] = []
    for name in ("decode-b1", "decode-b8"):
        for dtype in ("float32", "bfloat16", "int8"):
            ours_rate = rate(dtype, name)
            against = rate("float32", name)
            label = f"{name} {dtype} tok/s"
            target = TARGETS.get(f"{dtype} {name} vs transformers")
            mine = TARGETS.get(f"{dtype} {name} vs our float32")
            ratio, goal = ours_rate / ref[name], ""
            if target is not None:
                goal = f">= {target:g}x tf: {verdict(ratio >= target)}"
            if mine is not None:
                goal = f">= {mine:g}x fp32: {verdict(ours_rate / against >= mine)}"
            rows.append(
                [label, ref[name], ours_rate, f"{ratio:.2f}x", f"{ours_rate / against:.2f}x", goal]
            )
    for dtype in ("float32", "int8"):
        busy, quiet = rate(dtype, "decode-b1 busy"), rate(dtype, "decode-b1")
        threads = ours[dtype, "decode-b1 busy"][0]
        share = busy / quiet
        rows.append(
            [f"decode-b1 {dtype}, one core busy", "", busy, "",
             f"{share:.0%} of quiet", f">= 40%: {verdict(share >= TARGETS['busy share'])} "
             f"(BLAS {threads['blas_threads']}, kernels {threads['kernel_threads']} threads)"]
        )  # fmt: skip
    large = rate("int8", "large-b1") / rate("float32", "large-b1")
    rows.append(
        ["774M decode-b1 int8 tok/s", "", rate("int8", "large-b1"), "",
         f"{large:.2f}x fp32 ({rate('float32', 'large-b1'):.1f})",
         f">= 2.5x: {verdict(large >= TARGETS['large int8 vs float32'])}"]
    )  # fmt: skip
    rows.append(
        ["774M peak RSS MiB, int8 (fp32)", "", peak("int8", "large-b1"), "",
         f"({peak('float32', 'large-b1'):.0f})",
         f"<= 1300: {verdict(peak('int8', 'large-b1') <= TARGETS['large int8 peak MiB'])}"]
    )  # fmt: skip
    prefill = rate("int8", "prefill") / rate("float32", "prefill")
    rows.append(
        ["prefill 1,024, all logits, int8 tok/s", "", rate("int8", "prefill"), "",
         f"{prefill:.2f}x fp32", f">= 1x: {verdict(prefill >= 1)}"]
    )  # fmt: skip
    added = ours["int8", "start-up"][0]["seconds"] - ours["float32", "start-up"][0]["seconds"]
    rows.append(
        ["start-up to first token, int8 s", "", ours["int8", "start-up"][0]["seconds"], "",
         f"{added:+.2f} s vs fp32", f"<= +0.3 s: {verdict(added <= TARGETS['start-up added s'])}"]
    )  # fmt: skip
    print_table(
        "quant: float32 / bfloat16 / int8 weights (124M-shaped unless said), "
        f"median of {REPEAT}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start"
        f"{avx2_title()}",
        ["workload", "transformers", "gpt2cli", "vs tf", "vs ours / note", "target"],
        rows,
    )
    tiles = {str(r["tile_rows"]) for r in ours["int8", "decode-b8"]}
    print(avx2_note({"gpt2cli kernels' rows a tile": ", ".join(sorted(tiles))}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:] == ["warm"])
