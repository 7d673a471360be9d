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
