"""Running `gpt2` with one output stream on a pseudo-terminal, as in a user's shell."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from typing import Literal


def run_on_terminal(
    args: list[str],
    *,
    stream: Literal["stdout", "stderr"] = "stdout",
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run `python -m gpt2cli ARGS` with `stream` on a 100-column pseudo-terminal and the other
    stream on a pipe; return (exit status, what the terminal showed, what the pipe got)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    other = "stderr" if stream == "stdout" else "stdout"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", *args],
        env=env,
        **{stream: follower, other: subprocess.PIPE},  # type: ignore[arg-type]
    )
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    piped = getattr(process, other).read()
    return process.wait(timeout=60), shown.decode(errors="replace"), piped.decode()
