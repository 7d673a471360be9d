"""The user's cache of files gpt2cli derives from others, so later runs skip the work.

It lives in `$XDG_CACHE_HOME/gpt2cli` (`~/.cache/gpt2cli`) and holds the tokenizer's tables and
each model's weight layout: its output head and c_proj weights transposed, or with the `fast`
extra every weight matrix in panels (`weights.transposed_layout`). Every entry is named by a
hash of the content it was derived from (so the same weights in two folders share one entry),
written atomically, and checked when read: a stale, damaged or missing entry is rebuilt, never
used, and a cache that cannot be written (read-only, full, not a folder) only costs speed.
`Index` (`index.json`) remembers each weight file's hash, so it is computed once, and the
folders each entry came from, for `gpt2 cache` (`gpt2cli.cachelist`) to show.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
INDEX = "index.json"
INDEX_FORMAT = 1  # change it when the index's fields change
_MAX_INDEX = 16 << 20  # bytes: an index of a few hundred folders takes tens of kB
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """Write an entry atomically with `write` (a reader sees the old file or the whole new one,
    also after a crash: its bytes reach the disk before its name does); False when it could not
    be written. The partial file is always created anew (O_EXCL), never opened through something
    already there under its name."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        return False
    return True


class Index:
    """`index.json` in the cache: each weight file's sha256, and where each entry came from.

    A file's hash is kept with the file's identity (resolved path, size, modification and change
    times, inode, device) and used while that identity is unchanged, so a file is hashed once
    (about 0.5 s per 500 MB), not on every load; rewriting, copying or moving it gives it a new
    identity, hence a new hash. A hub cache file is never hashed: its blob is named by its sha256.
    The index is read on every load (tens of microseconds) and written, atomically, only when it
    learned something, merged with what other processes wrote meanwhile (of two writing at the
    very same moment one wins, which costs the other's hashing again later). It is as untrusted
    as any entry: whatever is malformed in it is ignored.
    """

    def __init__(self, folder: Path, data: Any = None) -> None:
        self.folder = folder
        data = data if isinstance(data, dict) and data.get("format") == INDEX_FORMAT else {}
        files, sources = data.get("files"), data.get("sources")
        self._files: dict[str, Any] = files if isinstance(files, dict) else {}
        self._sources: dict[str, Any] = sources if isinstance(sources, dict) else {}
        self._changed = False

    @classmethod
    def read(cls, folder: Path) -> Index:
        """The index of the cache `folder`; an empty one when it is missing or malformed."""
        f = open_entry(folder / INDEX, _MAX_INDEX)
        if f is None:
            return cls(folder)
        try:
            with f:
                return cls(folder, jsonfile.parse(f.read(_MAX_INDEX), INDEX))
        except (OSError, GPT2Error):
            return cls(folder)

    def sha256(self, path: Path) -> str:
        """The sha256 of the file's content, as hex; OSError when it cannot be read."""
        real = path.resolve()
        if is_hub_blob(real):
            return real.name
        f = open_entry(real, 1 << 62)
        if f is None:
            raise FileNotFoundError(f"{real}: not a readable regular file")
        with f:
            identity = _identity(os.fstat(f.fileno()))
            known = self._files.get(str(real))
            if isinstance(known, dict) and known.get("identity") == identity:
                digest = known.get("sha256")
                if isinstance(digest, str) and _SHA256.fullmatch(digest):
                    return digest
            digest = _sha256(f)
        self._files[str(real)] = {"identity": identity, "sha256": digest}
        self._changed = True
        return digest

    def sources(self, entry: str) -> list[str]:
        """The folders the entry named `entry` was derived from, as they were recorded."""
        recorded = self._sources.get(entry)
        if not isinstance(recorded, list):
            return []
        return [s for s in recorded if isinstance(s, str)]

    def derived(self, entry: str, source: Path) -> None:
        """Record that the entry named `entry` was derived from (or used for) folder `source`."""
        name = str(source.absolute())
        recorded = self.sources(entry)
        if name not in recorded:
            self._sources[entry] = [*recorded, name]
            self._changed = True

    def save(self) -> bool:
        """Write the index if it learned something, leaving out what no longer exists: files
        whose identity changed, entries gone from the cache, folders gone. False when it could
        not be written."""
        if not self._changed:
            return True
        on_disk = Index.read(self.folder)  # what other processes added since this one read it
        self._files = {**on_disk._files, **self._files}
        self._sources = {
            entry: list(dict.fromkeys([*on_disk.sources(entry), *self.sources(entry)]))
            for entry in {**on_disk._sources, **self._sources}
        }
        files = {}
        for name, known in self._files.items():
            with contextlib.suppress(OSError, ValueError):
                if isinstance(known, dict) and known.get("identity") == _identity(os.stat(name)):
                    files[name] = known
        sources = {}
        for entry in self._sources:
            kept = [s for s in self.sources(entry) if os.path.isdir(s)]
            if kept and "/" not in entry and (self.folder / entry).is_file():
                sources[entry] = kept
        data = {"format": INDEX_FORMAT, "files": files, "sources": sources}
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        self._changed = not store(self.folder / INDEX, lambda f: f.write(text))
        return not self._changed


def is_hub_blob(path: Path) -> bool:
    """Whether resolved `path` is a weights (LFS) blob of the Hugging Face cache, whose name is
    the sha256 of its content (`models--owner--name/blobs/<sha256>`)."""
    return (
        path.parent.name == "blobs"
        and path.parent.parent.name.startswith("models--")
        and _SHA256.fullmatch(path.name) is not None
    )


def _sha256(f: BinaryIO) -> str:
    """The sha256 of what is left to read in `f`, as hex (hashlib.file_digest, on Python 3.10)."""
    digest = hashlib.sha256()
    chunk = memoryview(bytearray(1 << 20))
    while n := f.readinto(chunk):  # type: ignore[attr-defined]
        digest.update(chunk[:n])
    return digest.hexdigest()


def _identity(info: os.stat_result) -> list[int]:
    """What changes when a file is rewritten, replaced or copied: size, times, inode, device."""
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
