"""`gpt2 serve` as a real subprocess on 127.0.0.1, for the tests and the benchmark.

It listens on a free port (`--port 0`); its URL is read from the one line it prints on stdout,
its stderr is kept line by line, and it is stopped with a signal, with timeouts on every wait.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 120.0  # seconds to load the model and print the URL (a shared, busy machine)
STOP_TIMEOUT = 30.0


def serve_env(cache: Path) -> dict[str, str]:
    """The environment for a server: its caches under `cache`, no hub, no network."""
    return os.environ | {
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "HF_HOME": str(cache / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }


class ServeProcess:
    """A running `gpt2 serve -m MODEL --port 0 ARGS...`: `url`, `line` (what it printed),
    `stderr` (lines so far); a context manager that stops it."""

    def __init__(self, model: Path | str, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "gpt2cli", "serve", "-m", str(model)]
        command += ["--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            self.line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            raise RuntimeError(f"gpt2 serve printed no URL in {START_TIMEOUT} s") from None
        found = re.search(r"http://\S+", self.line)
        if found is None:
            self.proc.wait(STOP_TIMEOUT)
            raise RuntimeError(f"gpt2 serve failed: {self.line!r} {''.join(self.stderr)}")
        self.url = found.group()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` (if it still runs) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            raise

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
