"""OpenBLAS's thread count, read and set in the running process, and fitted to the cores other
processes leave idle.

OpenBLAS splits each product over all its threads, and a thread that finishes its share spins
until the others finish theirs. When another process keeps a core busy, one of the threads waits
for its turn on the CPU while the rest spin: on a 2-core machine with one busy core, batch-1
decoding ran 2-7 times slower on 2 threads than on 1 (bench/bench_load.py), while on the same
machine, quiet, 2 threads decoded 1.7 times faster than 1 (41 against 24 tok/s). So
`fit_to_idle_cores` picks, once the model is loaded, one thread for each core other processes
left idle while it loaded (`CpuSampler`), within a cgroup CPU quota, unless the user chose a
count (THREAD_VARIABLES). It decides once; a long-running process may call it again.

Linux only, for the OpenBLAS NumPy loaded (NumPy's wheels bring one): the library is found in
/proc/self/maps and its own `openblas_set_num_threads` called through ctypes. Elsewhere (macOS,
Windows, NumPy on MKL or Accelerate) nothing is read or changed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# how a user chooses the BLAS thread count (OpenBLAS reads the first three); any of them set,
# the count is theirs and is left alone
THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
# how a user chooses the thread count of every product, BLAS's and the compiled kernels'
# (gpt2cli.kernels); `apply_user_threads` (the CLI's --threads) sets the same
THREADS_VARIABLE = "GPT2CLI_THREADS"
# (get, set) function names: NumPy 2's wheels (scipy-openblas, 64-bit integers), then others
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)
# other processes using at least this share of a core count as keeping one core busy
BUSY_SHARE = 0.5
# the shortest interval a CpuSampler measures over: /proc/stat counts in ticks of 10 ms, so
# over 0.1 s on 2 cores a busy core is about 10 of 20 ticks
MIN_SAMPLE_S = 0.1


# the most threads a user may ask for: more than any machine's cores, far fewer than would
# overflow OpenBLAS's count or exhaust the process's threads
MAX_THREADS = 1024
# how often the kernels' thread count follows the machine's load (kernel_threads)
KERNEL_REFIT_S = 1.0
_chosen: int | None = None  # apply_user_threads' count: the user's, it wins
_fitted: int | None = None  # the kernels' count, from the cores others left idle lately
_kernel_sampler: tuple[float, CpuSampler] | None = None  # since when the load is measured


@dataclass(frozen=True)
class _Blas:
    get: Callable[[], int]
    set: Callable[[int], None]


@functools.cache
def _blas() -> _Blas | None:
    """The thread-count functions of the OpenBLAS loaded in this process, or None."""
    import ctypes

    import numpy  # noqa: F401  (loads NumPy's BLAS)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    rows = (line.split(maxsplit=5) for line in maps.splitlines())
    paths = {fields[5] for fields in rows if len(fields) == 6}  # address perms ... path
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:  # RTLD_NOLOAD: the library already loaded, never a second copy of it
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                return _Blas(get, set_)
    return None


def blas_threads() -> int | None:
    """How many threads OpenBLAS runs a product on, or None where it cannot be found."""
    blas = _blas()
    return None if blas is None else int(blas.get())


def set_blas_threads(n: int) -> bool:
    """Run OpenBLAS products on `n` threads (at least 1); False where OpenBLAS cannot be found.
    Call it while no product runs on another thread."""
    if n < 1:
        raise ValueError(f"BLAS needs at least one thread, got {n}")
    blas = _blas()
    if blas is None:
        return False
    _initial_threads()  # OpenBLAS's own count, remembered before the first change
    blas.set(n)
    return True


@functools.cache
def _initial_threads() -> int | None:
    return blas_threads()


def user_choice(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable through which the user chose the BLAS thread count, if they did
    (GPT2CLI_THREADS, or `apply_user_threads`, first)."""
    environ = os.environ if environ is None else environ
    if _chosen is not None or environ.get(THREADS_VARIABLE, "").strip():
        return THREADS_VARIABLE
    return next((v for v in THREAD_VARIABLES if environ.get(v, "").strip()), None)


def user_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """The count the user chose for every product: `apply_user_threads`' or GPT2CLI_THREADS'
    (a GPT2Error unless it is a whole number from 1 to MAX_THREADS); None if neither."""
    from gpt2cli.errors import GPT2Error

    if _chosen is not None:
        return _chosen
    text = (os.environ if environ is None else environ).get(THREADS_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdecimal() or not 1 <= int(text) <= MAX_THREADS:
        raise GPT2Error(
            f"{THREADS_VARIABLE}={text!r}: set it to a positive number of threads, at most "
            f"{MAX_THREADS}"
        )
    return int(text)


def apply_user_threads(n: int | None) -> None:
    """Run every product, BLAS's and the compiled kernels', on `n` threads from now on (the
    CLI's `--threads N`); None: GPT2CLI_THREADS' count if it is set, else leave the count to
    `fit_to_idle_cores`. Call it before the model runs, with no product running."""
    global _chosen
    from gpt2cli.errors import GPT2Error

    if n is not None and not 1 <= n <= MAX_THREADS:
        raise GPT2Error(
            f"--threads must be a positive number of threads, at most {MAX_THREADS}, got {n}"
        )
    count = n if n is not None else user_threads()
    if count is None:
        return
    _chosen = count
    set_blas_threads(count)


def kernel_threads() -> int:
    """The compiled kernels' thread count: the user's choice, else one for each core other
    processes left idle over the last KERNEL_REFIT_S or more (a CpuSampler, renewed then).

    Why it follows the load, where OpenBLAS's count is fitted once: a kernel waits for its
    slowest thread, and a thread that shares a core with another process waits for its turn at
    every one of a decode step's 49 products (measured beside a load of 10 on 2 cores: int8
    decoding at 1.1 tok/s on 2 threads, 17.8 on 1). numba's count is set per call and per
    thread, so changing it between products is safe, unlike OpenBLAS's."""
    global _fitted, _kernel_sampler
    user = user_threads()
    if user is not None:
        return user
    now = time.monotonic()
    if _kernel_sampler is None or now - _kernel_sampler[0] >= KERNEL_REFIT_S:
        if _kernel_sampler is not None:
            cores = usable_cores()
            _fitted = pick_threads(cores, cores, _kernel_sampler[1].busy_cores(), cpu_quota())
        _kernel_sampler = (now, CpuSampler())
    return _fitted or usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The cores' worth of CPU time a cgroup (v2) quota allows this process, rounded up; None
    without one. A container limited to 2 CPUs on a larger machine still sees all its cores."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, all) ticks so far, summed over the cores this process may run on (/proc/stat)."""
    try:
        cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in cores:
            # user nice system idle iowait irq softirq steal (guest time is within user)
            ticks = [int(t) for t in fields[1:9]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def _own_ticks() -> int | None:
    """The ticks of CPU time this process (all its threads) has used (/proc/self/stat)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _others_running() -> int | None:
    """Threads of other processes running or waiting for a core at this instant: /proc/loadavg's
    count of runnable threads, less this process's own (this one reading it, OpenBLAS's threads
    if they spin). None where that count is machine-wide but this process may use only some of
    the cores (a pinned process or container: the others may run elsewhere)."""
    if usable_cores() != os.cpu_count():
        return None
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for task in os.scandir("/proc/self/task"):
            with contextlib.suppress(OSError):
                stat = Path(task.path, "stat").read_text()
                own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(running - own, 0)


class CpuSampler:
    """How many cores other processes keep busy, measured from its creation to `busy_cores()`.

    Over MIN_SAMPLE_S or more: the busy ticks of the cores this process may run on, less its
    own, over the interval (/proc/stat). Over less (loading a cached model maps it in a few
    tens of milliseconds): the fewer of the other processes' threads found runnable at the two
    instants, start and end, so a core counts as busy when something kept it busy at both.
    Reading the counters takes tens of microseconds and waits for nothing: create one before a
    step that takes time (loading a model), ask it after."""

    def __init__(self) -> None:
        self._start = time.monotonic(), _cpu_ticks(), _own_ticks(), _others_running()

    def busy_cores(self) -> float | None:
        """Cores' worth of CPU time other processes used since the start, 0 to the number of
        usable cores; None where /proc cannot tell."""
        start, cpu0, own0, running0 = self._start
        end, cpu1, own1 = time.monotonic(), _cpu_ticks(), _own_ticks()
        cores = usable_cores()
        if end - start < MIN_SAMPLE_S or cpu0 is None or cpu1 is None:
            running1 = _others_running()
            if running0 is None or running1 is None:
                return None
            return float(min(running0, running1, cores))
        if own0 is None or own1 is None or cpu1[1] <= cpu0[1]:
            return None
        others = (cpu1[0] - cpu0[0]) - (own1 - own0)
        return min(max(others * cores / (cpu1[1] - cpu0[1]), 0.0), float(cores))


def pick_threads(default: int, cores: int, busy_cores: float | None, quota: int | None) -> int:
    """The thread count for OpenBLAS, whose own count is `default`, on `cores` cores of which
    other processes keep `busy_cores` busy (None: unknown) and under a CPU `quota` (None: none):
    one for each idle core, at least 1, at most the default and the quota."""
    limit = min(default, quota or default)
    if busy_cores is None:
        return limit
    return max(1, min(limit, cores - _busy(busy_cores)))


def _busy(busy_cores: float) -> int:
    """Cores' worth of CPU time as a count of busy cores (from BUSY_SHARE of one on)."""
    return math.floor(busy_cores + 1 - BUSY_SHARE)


@dataclass(frozen=True)
class Fit:
    """What `fit_to_idle_cores` found and did."""

    threads: int  # OpenBLAS's thread count now
    default: int  # OpenBLAS's own count (what it started with)
    cores: int  # the cores this process may run on
    busy_cores: float | None  # cores' worth of other processes' CPU time, None if not measured
    quota: int | None = None  # the cores' worth a cgroup CPU quota allows, if any
    user_variable: str | None = None  # the variable the user chose the count through, if any

    @property
    def changed(self) -> bool:
        """Whether the count differs from OpenBLAS's own (and the user did not choose it)."""
        return self.user_variable is None and self.threads != self.default

    def message(self) -> str:
        """One line saying why the count differs from OpenBLAS's own and how to choose it."""
        plural = "s" if self.threads > 1 else ""
        reasons = []
        if self.busy_cores is not None and _busy(self.busy_cores) > 0:
            busy = min(self.cores, _busy(self.busy_cores))
            reasons.append(f"{busy} of {self.cores} cores {'is' if busy == 1 else 'are'} busy")
        if self.quota is not None and self.quota < self.default:
            reasons.append(f"a CPU quota of {self.quota}")
        return (
            f"gpt2: {' and '.join(reasons) or 'busy cores'}: running BLAS on {self.threads} "
            f"thread{plural} (set OPENBLAS_NUM_THREADS to choose)"
        )


def fit_to_idle_cores(sampler: CpuSampler | None = None) -> Fit | None:
    """Run OpenBLAS on one thread for each core other processes left idle since `sampler`
    started (without one: at this instant), within a cgroup CPU quota, unless the user chose a
    count through one of THREAD_VARIABLES or GPT2CLI_THREADS. None where OpenBLAS cannot be
    found. The compiled kernels (`kernel_threads`) take the same count of idle cores.

    The count is decided from the cores' use until now. A long-running process may call it
    again with a new sampler to follow the machine's load, between products (OpenBLAS's count
    must not change while one runs on another thread)."""
    global _fitted
    current = blas_threads()
    default = _initial_threads()
    cores = usable_cores()
    busy = (sampler or CpuSampler()).busy_cores()
    quota = cpu_quota()
    _fitted = pick_threads(cores, cores, busy, quota)  # the kernels' count (kernel_threads)
    if current is None or default is None:
        return None
    user = user_choice()
    if user is not None:
        mine = user_threads()  # GPT2CLI_THREADS applies to BLAS too; OPENBLAS_NUM_THREADS is set
        if mine is not None and mine != current:
            set_blas_threads(mine)
        return Fit(mine or current, default, cores, None, None, user)
    chosen = pick_threads(default, cores, busy, quota)
    if chosen != current:
        set_blas_threads(chosen)
    return Fit(chosen, default, cores, busy, quota)
