"""Files and JSON from outside: opened without hanging, parsed without surprises, typed on access.

Every JSON document gpt2cli reads (config.json, a safetensors header, a shard index, vocab.json,
`gpt2 decode`'s array of ids) goes through `parse`, which turns each way Python's parser can fail
(bad syntax, bad UTF-8, a number of thousands of digits, nesting that exhausts the recursion
limit) into one GPT2Error line naming the document. The accessors (`mapping`, `array`, `string`,
`integer`, `positive_number`) then check each value where it is used, so a wrong JSON type is a
GPT2Error naming the file and key, never a TypeError deep inside. `open_file` opens only regular
files (after following symlinks), and never waits on a FIFO.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from gpt2cli.errors import GPT2Error

MAX_DEPTH = 64  # arrays and objects nested deeper than this are refused; our files need 3
MAX_BYTES = 100 * 1024 * 1024  # larger JSON files are refused unread (GPT-2's vocab.json: 1 MB)
MAX_INT = 2**63 - 1  # the largest size or index numpy and the safetensors format can hold
_SHOWN = 60  # characters of a bad value quoted in a message
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX: opening a FIFO returns at once

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_file(path: Path, missing: str = "missing") -> None:
    """Raise a GPT2Error saying what `path` is unless it is a regular file or a symlink to one.

    `missing` is the message when nothing is there. Nothing is opened, so this never blocks.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:
        raise GPT2Error(f"{path}: {_unopenable(path, e, missing)}") from None
    _require_regular(path, mode)


def open_file(path: Path, missing: str = "missing") -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file (symlinks followed).

    A FIFO, device or directory is refused before it is opened; the kind is checked again on the
    opened descriptor (opened non-blocking), so a file swapped in between can neither hang the
    open nor slip through.
    """
    check_file(path, missing)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    except OSError as e:
        raise GPT2Error(f"{path}: {_unopenable(path, e, missing)}") from None
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise GPT2Error(f"{path}: is {kind}, not a file")


def _unopenable(path: Path, error: OSError | ValueError, missing: str) -> str:
    """Why `path` cannot be opened, in words: missing, a dangling symlink, a symlink loop, ..."""
    if isinstance(error, ValueError):  # a NUL byte in the path
        return "not a valid path"
    if isinstance(error, FileNotFoundError):
        try:
            return f"is a symlink to {os.readlink(path)}, which does not exist"
        except OSError:
            return missing
    if error.errno == errno.ELOOP:
        return "is a symlink loop, not a file"
    return f"cannot be opened ({error.strerror})"


def read(path: Path, missing: str = "missing") -> Any:
    """The JSON value in file `path`; any failure is a GPT2Error naming the file."""
    try:
        with open_file(path, missing) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise GPT2Error(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > MAX_BYTES:
        raise GPT2Error(f"{path}: larger than {MAX_BYTES // 2**20} MB, not a JSON file we read")
    return parse(data, str(path))


def parse(data: bytes | str, where: str) -> Any:
    """The JSON value in `data`, or one GPT2Error line saying why not; `where` names the document.

    NaN and Infinity, which Python's parser accepts, are left to the accessors to refuse.
    """
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text (byte offset {e.start})"
    except RecursionError:
        problem = f"nests arrays or objects more than {MAX_DEPTH} levels deep"
    except ValueError:  # Python's limit on the digits of an integer (4300 unless changed)
        problem = f"holds an integer of more than {sys.get_int_max_str_digits()} digits"
    else:
        if not _too_deep(value):
            return value
        problem = f"nests arrays or objects more than {MAX_DEPTH} levels deep"
    raise GPT2Error(f"{where} {problem}")


def _too_deep(value: Any) -> bool:
    """Whether `value` nests containers more than MAX_DEPTH levels deep (checked level by level,
    without recursion, so that a message can safely `repr` any part of it)."""
    level = [value] if isinstance(value, (list, dict)) else []
    for _ in range(MAX_DEPTH):
        if not level:
            return False
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, (list, dict))
        ]
    return bool(level)


def show(value: object) -> str:
    """`value` quoted for a one-line message: its repr, cut short (a hostile value can be huge)."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def field(obj: dict[str, Any], key: str, where: str) -> Any:
    """`obj[key]`, or a GPT2Error saying that `where` has no `key`."""
    if key not in obj:
        raise GPT2Error(f"{where} has no {key!r}")
    return obj[key]


def mapping(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a JSON object, else a GPT2Error naming `where`."""
    if not isinstance(value, dict):
        raise GPT2Error(f"{where} must be a JSON object, not {show(value)}")
    return value


def array(value: Any, where: str) -> list[Any]:
    """`value` if it is a JSON array, else a GPT2Error naming `where`."""
    if not isinstance(value, list):
        raise GPT2Error(f"{where} must be a JSON array, not {show(value)}")
    return value


def string(value: Any, where: str) -> str:
    """`value` if it is a JSON string, else a GPT2Error naming `where`."""
    if not isinstance(value, str):
        raise GPT2Error(f"{where} must be a string, not {show(value)}")
    return value


def integer(value: Any, where: str, *, minimum: int = 0) -> int:
    """`value` if it is an integer from `minimum` to MAX_INT (not a bool, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise GPT2Error(not_an_integer(where, value, minimum))
    return value


def not_an_integer(where: str, value: Any, low: int, high: int = MAX_INT) -> str:
    """The message for `value` that is not an integer from `low` to `high`, saying the limit as
    a user meets it: "n must be an integer from 1 to 8", "seed must be an integer >= 0", and
    for a number past what 64 bits hold, that it must fit in them (not 2**63 - 1 in digits)."""
    if high < MAX_INT:
        wanted = f"an integer from {low} to {high}"
    elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
        wanted = f"an integer >= {low} that fits in 64 bits"
    else:
        wanted = f"an integer >= {low}"
    return f"{where} must be {wanted}, not {show(value)}"


def positive_number(value: Any, where: str) -> float:
    """`value` as a float if it is a finite number above 0 (NaN, Infinity and 1e400 are not)."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (finite and 0 < value <= sys.float_info.max):
        raise GPT2Error(f"{where} must be a positive finite number, not {show(value)}")
    return float(value)
