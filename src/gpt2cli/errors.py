"""The exception types that cross from the library into the CLI."""

from __future__ import annotations

import os
import signal

# the signals that stop a command or a server cleanly: Ctrl-C, `kill`, a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class GPT2Error(Exception):
    """A failure caused by input the user can fix.

    The message is one line that names what is wrong (a file, a tensor, an id and its position)
    and, where there is one, the next step. The CLI prints it and exits with status 2.
    """


class CorruptWeightsError(GPT2Error):
    """A weight file whose bytes are not a whole safetensors file: truncated or damaged.

    `path` is that file. Fetching it again may fix it; only the code that fetched it knows how,
    so the message gives no such advice.
    """

    def __init__(self, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = path


class WriteError(GPT2Error):
    """Output that could not be written once its destination was open: a full disk, an I/O
    error. The system failed, not the input, so the CLI exits with status 1."""


def missing_extra(extra: str, needed_by: str) -> GPT2Error:
    """The error for a feature whose optional extra is not installed, naming the command that
    installs it here: into this Python, from this source tree when gpt2cli runs from a clone
    (where `pip install 'gpt2cli[...]'` finds no such package), else from the package index."""
    import shlex
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # src/gpt2cli/errors.py -> the clone, if any
    if (root / "pyproject.toml").is_file() and Path(__file__).resolve().parent.parent.name == "src":
        target = f"-e {shlex.quote(f'{root}[{extra}]')}"
    else:
        target = shlex.quote(f"gpt2cli[{extra}]")
    return GPT2Error(
        f"{needed_by} needs the {extra} extra: "
        f"{shlex.quote(sys.executable)} -m pip install {target}"
    )
