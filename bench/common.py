"""Timing and table helpers shared by the benchmark sections."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Set by `python -m bench` to a folder of the run's own: the random checkpoint is written there
# once and hard-linked into each section's folder (writing one takes about 8 s).
RUN_FOLDER: Path | None = None
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeat` runs after `warmup` unrecorded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_124m(folder: Path, *, tokenizer: bool = True) -> Path:
    """Put a 124M-shaped random checkpoint (seed 0) in `folder` and load it once, so what gpt2cli
    derives from it on a first load (the transposed layout in the user's cache) is there, as on
    every later run of a user's; the timed runs measure that steady state.

    Within one `python -m bench` run the checkpoint is written once, in RUN_FOLDER, and its
    files are hard-linked into `folder` (copied if they cannot be), so every section measures
    the same bytes without paying for writing them again."""
    from gpt2cli.model import GPT2
    from tests.factory import GPT2_124M, write_random_gpt2

    if RUN_FOLDER is None:
        write_random_gpt2(folder, GPT2_124M, seed=0, tokenizer=tokenizer)
    else:
        shared = RUN_FOLDER / "random-124M"
        if not (shared / "model.safetensors").exists():
            write_random_gpt2(shared, GPT2_124M, seed=0, tokenizer=True)
        folder.mkdir(parents=True, exist_ok=True)
        for source in shared.iterdir():
            if tokenizer or source.name not in TOKENIZER_FILES:
                try:
                    os.link(source, folder / source.name)
                except OSError:
                    shutil.copy(source, folder / source.name)
    GPT2.from_pretrained(folder)
    return folder


# An AVX2-only CPU emulated on an AVX-512 one (`python -m bench --avx2` sets BENCH_AVX2=1), in
# every worker process of the model, generate and quant sections, both sides: OpenBLAS takes its
# Haswell kernels, torch's ATen its AVX2 ones (and MKL and oneDNN, under torch, AVX2 at most),
# numba compiles gpt2cli's kernels for a Haswell's features (no AVX-512; its cache keeps them
# apart from the host's), and NumPy leaves out every AVX-512 dispatch target of its build. NumPy
# 2.4 names those X86_V4, AVX512_ICL and AVX512_SPR (older NumPy: AVX512F, AVX512_SKX, ...); a
# name that is not one of the build's targets, such as AVX512F on 2.4, is ignored with a
# warning, so they are read from the build rather than listed here.
AVX2_VARIABLE = "BENCH_AVX2"
# LLVM's features of a Haswell (AVX2 and FMA), for numba; "-avx512f" turns off every AVX-512 one
HASWELL_FEATURES = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,"
    "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f"
)


def avx2() -> bool:
    """Whether this run emulates an AVX2-only CPU in the model and generate workers."""
    return os.environ.get(AVX2_VARIABLE, "") not in ("", "0")


def avx2_env() -> dict[str, str]:
    """The variables that make a fresh process use AVX2 kernels at most."""
    from numpy._core import _multiarray_umath

    targets = _multiarray_umath.__cpu_dispatch__
    return {
        "OPENBLAS_CORETYPE": "Haswell",
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": HASWELL_FEATURES,
        "NPY_DISABLE_CPU_FEATURES": " ".join(t for t in targets if _avx512(t)),
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }


def worker_env() -> dict[str, str]:
    """The environment of a worker process: this one's, plus avx2_env() when avx2()."""
    return dict(os.environ) | (avx2_env() if avx2() else {})


def avx2_title() -> str:
    """What a table's title adds when the run emulates an AVX2-only CPU."""
    return ", AVX2-only CPU emulated (--avx2)" if avx2() else ""


def avx2_note(simd: dict[str, str]) -> str:
    """A line under a table: the emulation's variables, if any, and the kernels a worker
    reported using (simd_report), if given."""
    parts = []
    if avx2():
        settings = " ".join(f"{k}={v!r}" for k, v in avx2_env().items())
        parts.append(f"--avx2: every worker ran with {settings}")
    if simd:
        parts.append("workers' kernels: " + "; ".join(f"{k}: {v}" for k, v in simd.items()))
    return "\n".join(parts)


def _avx512(target: str) -> bool:
    return target.startswith("AVX512") or target == "X86_V4"


def simd_report() -> dict[str, str]:
    """The vector kernels this process's libraries use: NumPy's AVX-512 dispatch targets in
    effect, OpenBLAS's core type, and torch's CPU capability if torch is imported."""
    import sys

    from numpy._core import _multiarray_umath

    features = _multiarray_umath.__cpu_features__
    on = [t for t in _multiarray_umath.__cpu_dispatch__ if _avx512(t) and features.get(t)]
    report = {"NumPy AVX-512 targets": " ".join(on) or "none"}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # not a dependency of ours: scikit-learn brings it with the test extra
        report["OpenBLAS core"] = "unknown (no threadpoolctl)"
    else:
        cores = {
            str(i.get("architecture")) for i in threadpool_info() if i["internal_api"] == "openblas"
        }
        report["OpenBLAS core"] = " ".join(sorted(cores))
    if "torch" in sys.modules:
        report["torch CPU capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return report


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table, columns right-aligned after the first."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for n, row in enumerate(cells):
        rest = zip(row[1:], widths[1:], strict=True)
        line = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        print("  ".join(line))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def verdict(ok: bool) -> str:
    """How a table says whether a target was met."""
    return "met" if ok else "NOT met"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
