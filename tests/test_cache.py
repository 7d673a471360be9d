"""`gpt2cli.cache.store`: entries written whole under a name of their own, then renamed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpt2cli import cache


def test_an_entrys_bytes_reach_the_disk_before_its_name_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the rename must not leave a named entry whose blocks were never written
    (the right size, zeros inside): the partial file is synced whole, then renamed."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", Path(str(dst)).name))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    entry = tmp_path / "entry.bin"
    assert cache.store(entry, lambda f: f.write(b"x" * 10_000))
    assert events == [("fsync", 10_000), ("replace", "entry.bin")]
    assert entry.read_bytes() == b"x" * 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]  # no partial file left


def test_an_entry_that_cannot_be_written_leaves_nothing_behind(tmp_path: Path) -> None:
    def fail(f: object) -> None:
        raise OSError(28, "No space left on device")

    assert not cache.store(tmp_path / "entry.bin", fail)
    assert list(tmp_path.iterdir()) == []
