"""Every command's output and input streams under hostile conditions, through the real process:
a full disk, a closed stdout or stdin, and a reader that goes away (exit 141, like `cat`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GPT2 = [sys.executable, "-m", "gpt2cli"]


def commands(model: Path) -> list[list[str]]:
    """One invocation of each command that prints something, each reading no stdin."""
    return [
        ["--help"],
        ["encode", "Hello world"],
        ["encode", "--json", "Hello world"],
        ["encode", "--count", "Hello world"],
        ["encode", "--tokens", "Hello world"],
        ["decode", "15496", "995"],
        ["generate", "-m", str(model), "--seed", "0", "-t", "5", "Hello"],
        ["generate", "-m", str(model), "--seed", "0", "-t", "5", "--json", "Hello"],
        ["download", str(model)],
    ]


def run(args: list[str], **streams: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*GPT2, *args],
        capture_output="stdout" not in streams,
        timeout=60,
        **streams,  # type: ignore[call-overload]
    )


def assert_one_error_line(stderr: bytes, *fragments: str) -> None:
    text = stderr.decode()
    assert text.startswith("gpt2: error: "), text
    assert text.count("\n") == 1 and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize("index", range(9))
def test_a_full_disk_is_one_error_line_and_a_failure_status(tiny_model_dir: Path, index: int):
    args = commands(tiny_model_dir)[index]
    with open("/dev/full", "wb") as full:
        result = subprocess.run([*GPT2, *args], stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 1  # the system failed, not the input (which is 2)
    assert_one_error_line(result.stderr, "No space left on device")


@pytest.mark.parametrize("index", range(9))
def test_a_closed_stdout_is_one_error_line_not_silently_lost_output(
    tiny_model_dir: Path, index: int
):
    args = commands(tiny_model_dir)[index]
    result = subprocess.run(
        [*GPT2, *args],
        stderr=subprocess.PIPE,
        timeout=60,
        pass_fds=(),
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "stdout is closed")


@pytest.mark.parametrize("command", ["generate", "score"])
def test_a_closed_stdout_does_not_stop_a_data_set_run_that_writes_to_a_file(
    tiny_model_dir: Path, tmp_path: Path, command: str
):
    rows = tmp_path / "rows.jsonl"
    key = "prompt" if command == "generate" else "text"
    rows.write_text(f'{{"{key}": "Hello there"}}\n{{"{key}": "and more"}}\n')
    out = tmp_path / "out.jsonl"
    args = [command, "-m", str(tiny_model_dir), "--jsonl", str(rows), "-o", str(out)]
    result = subprocess.run(
        [*GPT2, *args], stderr=subprocess.PIPE, timeout=60, preexec_fn=lambda: os.close(1)
    )
    assert result.returncode == 0, result.stderr
    assert [line.startswith('{"index": ') for line in out.read_text().splitlines()] == [True] * 2


@pytest.mark.parametrize("args", [["encode"], ["decode"], ["generate", "-m", "MODEL"]])
def test_a_closed_stdin_is_one_error_line(tiny_model_dir: Path, args: list[str]):
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    result = subprocess.run(
        [*GPT2, *args], capture_output=True, timeout=60, preexec_fn=lambda: os.close(0)
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "stdin is closed")


@pytest.mark.parametrize(
    "args",
    [["encode"], ["encode", "--tokens"], ["encode", "--json"], ["decode"]],
)
def test_a_reader_that_stops_early_ends_the_command_quietly_with_141(
    tmp_path: Path, args: list[str]
):
    """`gpt2 ... < big | head -c 10`: the rest of a large output has nowhere to go. stdin is a
    file, as in the shell: encode prints while it reads, so a test writing all of a pipe first
    and reading after would deadlock, as it would with `cat`."""
    data = b"Hello world " * 200_000 if args[0] == "encode" else b"15496 995 " * 200_000
    (tmp_path / "input").write_bytes(data)
    with open(tmp_path / "input", "rb") as stdin:
        process = subprocess.Popen(
            [*GPT2, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout is not None and process.stderr is not None
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()
        assert process.wait(timeout=60) == 141
        assert process.stderr.read() == b""


@pytest.mark.parametrize("index", range(1, 9))
def test_a_closed_stderr_does_not_stop_the_command(tiny_model_dir: Path, index: int):
    """`2>&-`: errors would have nowhere to go, but a command that works still works."""
    args = commands(tiny_model_dir)[index]
    result = subprocess.run(
        [*GPT2, *args], stdout=subprocess.PIPE, timeout=60, preexec_fn=lambda: os.close(2)
    )
    assert result.returncode == 0
    assert result.stdout.strip()


@pytest.mark.parametrize("columns", ["0", "-3", "abc"])
def test_a_nonsense_terminal_width_still_shows_the_output(tiny_model_dir: Path, columns: str):
    from tests.terminal import run_on_terminal

    env = os.environ | {"COLUMNS": columns}
    status, shown, _ = run_on_terminal(["encode", "--tokens", "Hello world"], env=env)
    assert status == 0 and "Hello" in shown and "world" in shown


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_like_ctrl_c_keeping_the_output(
    tmp_path: Path, signum: int, status: int
):
    """The text generated so far stays printed, the status is 128 + the signal, stderr is
    empty (when piped) and there is no traceback."""
    from gpt2cli.config import GPT2Config
    from tests.factory import write_random_gpt2

    folder = write_random_gpt2(
        tmp_path / "slow", GPT2Config(n_ctx=1024, n_embd=256, n_head=4, n_layer=4)
    )
    process = subprocess.Popen(
        [*GPT2, "generate", "-m", str(folder), "-t", "1000", "--ignore-eos", "Hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    printed = os.read(process.stdout.fileno(), 4096)  # generation is under way
    process.send_signal(signum)
    printed += process.stdout.read()
    assert process.wait(timeout=60) == status
    assert process.stderr.read() == b""
    assert printed
