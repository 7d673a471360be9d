"""gpt2cli.threads: OpenBLAS's thread count read and set in this process, the idle-core estimate,
the policy, and what `gpt2` says about it (one dim line on a terminal, nothing when piped, nothing
when the user chose a count). No timing here: the speeds are bench/bench_load.py's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpt2cli import threads
from tests.terminal import run_on_terminal

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
# this process may run on every core (so /proc/loadavg's machine-wide count applies)
ALL_CORES = bool(CORES) and len(CORES) == os.cpu_count() and Path("/proc/loadavg").exists()
linux_openblas = pytest.mark.skipif(
    threads.blas_threads() is None, reason="no OpenBLAS found in this process (not Linux?)"
)


@pytest.fixture
def restore_threads() -> Iterator[int]:
    """This process's BLAS thread count, put back after the test."""
    before = threads.blas_threads()
    assert before is not None
    yield before
    threads.set_blas_threads(before)


@linux_openblas
def test_set_and_get_round_trip_on_numpys_openblas(restore_threads: int):
    assert restore_threads >= 1
    assert threads.set_blas_threads(1) is True
    assert threads.blas_threads() == 1
    assert threads.set_blas_threads(restore_threads) is True
    assert threads.blas_threads() == restore_threads


def test_a_count_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one thread"):
        threads.set_blas_threads(0)


def test_usable_cores_is_the_affinity():
    assert threads.usable_cores() == len(CORES) >= 1


def test_a_cgroup_cpu_quota_in_cores_rounded_up(tmp_path: Path):
    cpu_max = tmp_path / "cpu.max"
    assert threads.cpu_quota(cpu_max) is None  # no such file
    for text, cores in [("max 100000", None), ("50000 100000", 1), ("250000 100000", 3)]:
        cpu_max.write_text(text + "\n")
        assert threads.cpu_quota(cpu_max) == cores
    cpu_max.write_text("garbage\n")
    assert threads.cpu_quota(cpu_max) is None


def test_the_user_chooses_through_any_of_the_blas_variables():
    assert threads.user_choice({}) is None
    assert threads.user_choice({"OPENBLAS_NUM_THREADS": " "}) is None  # set but empty: unset
    for name in threads.THREAD_VARIABLES:
        assert threads.user_choice({name: "2", "PATH": "/bin"}) == name


@pytest.mark.parametrize(
    ("default", "cores", "busy", "quota", "expected"),
    [
        (2, 2, None, None, 2),  # not measured: OpenBLAS's own count
        (2, 2, 0.0, None, 2),
        (2, 2, 0.4, None, 2),  # less than half a core: not a busy core
        (2, 2, 0.6, None, 1),
        (2, 2, 1.0, None, 1),
        (2, 2, 2.0, None, 1),  # never below 1
        (8, 8, 1.0, None, 7),
        (8, 8, 2.7, None, 5),
        (4, 8, 1.0, None, 4),  # never above the default
        (1, 2, 0.0, None, 1),
        (16, 16, None, 2, 2),  # a container's quota, measured or not
        (16, 16, 0.0, 2, 2),
        (16, 16, 15.0, 2, 1),
    ],
)
def test_one_thread_for_each_idle_core(
    default: int, cores: int, busy: float | None, quota: int | None, expected: int
):
    assert threads.pick_threads(default, cores, busy, quota) == expected


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)


def test_over_a_long_load_others_ticks_count(monkeypatch: pytest.MonkeyPatch, two_cores: None):
    """Over 200 ticks of 2 cores, 150 busy of which this process used 50: one other core."""
    ticks, own = iter([(1000, 5000), (1150, 5200)]), iter([300, 350])
    monkeypatch.setattr(threads, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(threads, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(threads, "_others_running", lambda: 0)  # not used for a long interval
    sampler = threads.CpuSampler()
    sampler._start = (sampler._start[0] - threads.MIN_SAMPLE_S, *sampler._start[1:])
    assert sampler.busy_cores() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("start", "end", "busy"), [(0, 0, 0.0), (1, 0, 0.0), (0, 1, 0.0), (3, 1, 1.0), (5, 4, 2.0)]
)
def test_over_a_short_load_a_core_is_busy_if_busy_at_both_ends(
    monkeypatch: pytest.MonkeyPatch, two_cores: None, start: int, end: int, busy: float
):
    running = iter([start, end])
    monkeypatch.setattr(threads, "_others_running", lambda: next(running))
    assert threads.CpuSampler().busy_cores() == busy


def test_unknown_where_proc_cannot_tell(monkeypatch: pytest.MonkeyPatch):
    for name in ("_cpu_ticks", "_own_ticks", "_others_running"):
        monkeypatch.setattr(threads, name, lambda: None)
    assert threads.CpuSampler().busy_cores() is None


@pytest.mark.skipif(not ALL_CORES, reason="Linux, on all the machine's cores")
@pytest.mark.parametrize("wait", [0.0, threads.MIN_SAMPLE_S + 0.05])
def test_the_estimate_on_this_machine_is_sane_and_sees_a_busy_process(wait: float):
    sampler = threads.CpuSampler()
    time.sleep(wait)
    busy = sampler.busy_cores()
    assert busy is not None and 0.0 <= busy <= len(CORES)
    with _busy_loops(1):
        sampler = threads.CpuSampler()
        time.sleep(wait)
        busy = sampler.busy_cores()
    # a process that never sleeps keeps a core busy, whatever else runs (no timing involved)
    assert busy is not None and 0.5 <= busy <= len(CORES)


@linux_openblas
def test_fitting_sets_the_count_and_says_why(restore_threads: int, monkeypatch: pytest.MonkeyPatch):
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "_initial_threads", lambda: 2)
    fit = threads.fit_to_idle_cores(_Sampler(1.0))  # type: ignore[arg-type]
    assert fit == threads.Fit(threads=1, default=2, cores=2, busy_cores=1.0)
    assert threads.blas_threads() == 1 and fit.changed
    assert fit.message() == (
        "gpt2: 1 of 2 cores is busy: running BLAS on 1 thread (set OPENBLAS_NUM_THREADS to choose)"
    )
    fit = threads.fit_to_idle_cores(_Sampler(0.1))  # called again: the machine got quiet
    assert fit is not None and fit.threads == 2 and not fit.changed
    assert threads.blas_threads() == 2


@linux_openblas
def test_the_users_variable_wins(restore_threads: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    fit = threads.fit_to_idle_cores(_Sampler(2.0))  # type: ignore[arg-type]
    assert fit is not None and fit.user_variable == "OMP_NUM_THREADS" and not fit.changed
    assert fit.threads == restore_threads == threads.blas_threads()


def test_the_message_says_why():
    fit = threads.Fit(threads=1, default=2, cores=2, busy_cores=1.8)
    assert fit.message().startswith("gpt2: 2 of 2 cores are busy: running BLAS on 1 thread ")
    fit = threads.Fit(threads=6, default=8, cores=8, busy_cores=2.2)
    assert fit.message().startswith("gpt2: 2 of 8 cores are busy: running BLAS on 6 threads ")
    fit = threads.Fit(threads=2, default=16, cores=16, busy_cores=0.0, quota=2)
    assert fit.message().startswith("gpt2: a CPU quota of 2: running BLAS on 2 threads ")


# `gpt2 generate` itself, with all the cores but one kept busy: 1 thread (on 2 to 4 cores)


@pytest.fixture
def all_cores_but_one_busy() -> Iterator[None]:
    if not ALL_CORES or not 2 <= len(CORES) <= 4 or threads.blas_threads() is None:
        pytest.skip("needs Linux and OpenBLAS, on all of a machine's 2 to 4 cores")
    with _busy_loops(len(CORES) - 1):
        yield


def _generate(folder: Path, *, terminal: bool, **env: str) -> tuple[int, str, str]:
    """`gpt2 generate`, stderr on a terminal or a pipe: (status, stderr, stdout)."""
    environ = {k: v for k, v in os.environ.items() if k not in threads.THREAD_VARIABLES}
    environ |= {"NO_COLOR": "1"} | env
    args = ["generate", "-m", str(folder), "-t", "2", "--seed", "1", "Hello"]
    if terminal:
        return run_on_terminal(args, stream="stderr", env=environ)
    done = subprocess.run(
        [sys.executable, "-m", "gpt2cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    return done.returncode, done.stderr, done.stdout


def test_busy_cores_are_said_once_on_a_terminal(all_cores_but_one_busy: None, tiny_model_dir):
    status, shown, stdout = _generate(tiny_model_dir, terminal=True)
    assert status == 0
    assert shown.count("running BLAS on 1 thread (set OPENBLAS_NUM_THREADS to choose)") == 1
    assert "BLAS" not in stdout


def test_nothing_is_said_when_piped(all_cores_but_one_busy: None, tiny_model_dir: Path):
    status, stderr, stdout = _generate(tiny_model_dir, terminal=False)
    assert status == 0
    assert "BLAS" not in stderr + stdout


def test_nothing_is_said_when_the_user_chose(all_cores_but_one_busy: None, tiny_model_dir: Path):
    status, shown, _ = _generate(tiny_model_dir, terminal=True, OPENBLAS_NUM_THREADS="2")
    assert status == 0 and "BLAS" not in shown


class _Sampler:
    """A CpuSampler that reports a given number of busy cores."""

    def __init__(self, busy: float) -> None:
        self.busy = busy

    def busy_cores(self) -> float:
        return self.busy


@contextmanager
def _busy_loops(n: int) -> Iterator[None]:
    """`n` processes that never sleep, each spinning before this yields (it says so on its
    stdout once its loop is about to start: a loaded machine can take seconds to start one)."""
    spin = "import sys\nsys.stdout.write('.')\nsys.stdout.flush()\nwhile True: pass"
    procs = [
        subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.read(1) == b"."
        time.sleep(0.05)  # past its first instructions: spinning
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
