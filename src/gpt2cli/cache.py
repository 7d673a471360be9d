"""The user's cache of files gpt2cli derives from others, so later runs skip the work.

It lives in `$XDG_CACHE_HOME/gpt2cli` (`~/.cache/gpt2cli`) and holds the tokenizer's tables and
each model's transposed output head and c_proj weights. Every entry is named by a hash of what
it was derived from, written atomically, and checked when read: a stale, damaged or missing
entry is rebuilt, never used, and a cache that cannot be written (read-only, full, not a folder)
only costs speed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def folder() -> Path | None:
    """The cache folder, or None without a home (a relative path would land in the working
    directory)."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2cli")
    return path if path.is_absolute() else None


def open_entry(path: Path, max_size: int) -> BinaryIO | None:
    """An entry opened for reading, or None when it is missing, not a regular file or larger
    than `max_size` bytes. Opened without blocking: a FIFO would wait forever for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | _BINARY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size <= max_size:
            return os.fdopen(fd, "rb")
    except OSError:
        pass
    os.close(fd)
    return None


def store(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Write an entry atomically with `write` (a reader sees the old file or the whole new one);
    False when it could not be written. The partial file is always created anew (O_EXCL), never
    opened through something already there under its name."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        return False
    return True
