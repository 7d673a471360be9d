"""How commands read their input: stdin (whole or in chunks), arguments and files,
always as strict UTF-8 (JSON Lines as bytes, which `gpt2cli.dataset` decodes line by line), and
token ids for `gpt2 decode`. Every failure is a GPT2Error naming where the input came from and,
for a byte that is not UTF-8, its offset."""

from __future__ import annotations

import codecs
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error

T = TypeVar("T")


def stdin_binary() -> Any:
    """The binary stdin, or a GPT2Error when the shell closed it (`<&-`: `sys.stdin` is None)."""
    if sys.stdin is None:
        raise GPT2Error("stdin is closed; pass the input as an argument or redirect a file into it")
    return sys.stdin.buffer


MAX_TEXT_BYTES = 64 << 20  # a text read whole: a prompt, a file to score, ids to decode
MAX_FILE_BYTES = 1 << 30  # a JSON Lines file, read whole and decoded line by line


def read_text(text: str | None, what: str = "input") -> str:
    """Return TEXT, or all of stdin when TEXT is absent or '-', decoded as strict UTF-8.

    stdin is read as bytes and kept exactly (a trailing newline is part of the text); a byte
    that is not UTF-8, on stdin or in the argument (which Python decodes with surrogateescape),
    is an error naming its offset, found as soon as it is read.
    """
    if text is not None and text != "-":
        return argument_text(text, what)
    return _read_utf8(stdin_binary(), f"{what} on stdin")


def _read_utf8(f: Any, what: str) -> str:
    """All of binary stream `f` as strict UTF-8, decoded as it is read: a byte that is not
    UTF-8 stops the reading at once (`/dev/urandom` fails at its first bytes), and so does
    more than MAX_TEXT_BYTES (`yes |` or `/dev/zero` would fill the memory)."""
    return "".join(_utf8_chunks(f, what, MAX_TEXT_BYTES))


def _utf8_chunks(f: Any, what: str, limit: int | None = None) -> Iterator[str]:
    """Binary stream `f` as strict UTF-8 text, chunk by chunk as it is read (a character split
    between two reads waits for its end). A byte that is not UTF-8 is an error naming `what`
    and its offset in the stream, raised once the text before it has been yielded; so is more
    than `limit` bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0  # bytes read before this chunk
    while True:
        chunk = f.read1(STDIN_CHUNK)
        pending = len(decoder.getstate()[0])  # bytes of a character begun in earlier chunks
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:  # e.object: the pending bytes, then this chunk
            if e.start:
                yield e.object[: e.start].decode("utf-8")
            raise utf8_error(what, e.object, e, size - pending) from None
        if text:
            yield text
        if not chunk:
            return
        size += len(chunk)
        if limit is not None:
            _check_size(size, limit, what)


def _read_all(f: Any, what: str) -> bytes:
    """All of binary stream `f`, at most MAX_FILE_BYTES."""
    parts, size = [], 0
    while chunk := f.read1(STDIN_CHUNK):
        size += len(chunk)
        _check_size(size, MAX_FILE_BYTES, what)
        parts.append(chunk)
    return b"".join(parts)


def _check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise GPT2Error(
            f"{what} goes on past {limit >> 20} MiB, more than gpt2 reads at once; give it in parts"
        )


def argument_text(value: str, what: str) -> str:
    """A command-line argument as text; a byte in it that is not UTF-8 (which Python keeps as a
    lone surrogate) is a GPT2Error naming `what` and the offset."""
    return decode_utf8(value.encode("utf-8", "surrogateescape"), f"{what} in the argument")


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as strict UTF-8, or a GPT2Error naming `what` and the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(what, data, e) from None


def utf8_error(what: str, data: bytes, error: UnicodeDecodeError, offset: int = 0) -> GPT2Error:
    """The error for a byte of `data` that is not UTF-8; `offset` is where `data` starts."""
    return GPT2Error(
        f"{what} is not valid UTF-8: byte 0x{data[error.start]:02x} at offset "
        f"{offset + error.start}"
    )


STDIN_CHUNK = 1 << 20  # bytes of stdin read and encoded at a time


def stdin_chunks(what: str) -> Iterator[str]:
    """stdin as strict UTF-8 text, chunk by chunk as it is read, of any length; a byte that is
    not UTF-8 is an error naming its offset in stdin, raised once the text before it has been
    yielded (`_utf8_chunks`)."""
    return _utf8_chunks(stdin_binary(), f"{what} on stdin")


def read_file(name: str) -> str:
    """The text of file `name` (stdin for `-`), strict UTF-8, at most MAX_TEXT_BYTES; errors
    name the file."""
    if name == "-":
        return read_text(None, "input")
    return _read_named(name, _read_utf8)


def read_bytes(name: str) -> bytes:
    """The bytes of file `name` (stdin for `-`), at most MAX_FILE_BYTES, undecoded, for a reader
    that decodes them in parts (JSON Lines, line by line); errors name the file."""
    if name == "-":
        return _read_all(stdin_binary(), "stdin")
    return _read_named(name, _read_all)


def _read_named(name: str, read: Callable[[Any, str], T]) -> T:
    """`read(file, name)` on file `name`, opened without blocking, so a named pipe with no
    writer reads as empty instead of hanging; a pipe that has one (`<(command)`) is read to its
    end. A failure to open or read it names the file."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            os.set_blocking(fd, True)
            data = read(f, name)
            if not data and stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise GPT2Error(
                    f"{name}: a named pipe with nothing writing to it; start its writer first"
                )
            return data
    except OSError as e:
        raise GPT2Error(f"{name}: cannot read it ({e.strerror})") from None


def parse_ids(source: str, where: str) -> list[int]:
    """Token ids from whitespace- or comma-separated integers, or from one JSON array.

    A number of more than 18 digits (no vocabulary is that large) is refused unconverted.
    """
    items: list[object]
    text_form = not source.lstrip().startswith("[")  # valid JSON that starts with `[` is an array
    if text_form:
        items = [s for s in re.split(r"[\s,]+", source) if s]
    else:
        where = f"the JSON array of ids on {where}"
        items = jsonfile.array(jsonfile.parse(source, where), where)
    ids: list[int] = []
    for position, item in enumerate(items):
        at = f"at position {position} (counting from 0)"
        digits = (
            re.fullmatch(r"(-?)0*([0-9]+)", item) if text_form and isinstance(item, str) else None
        )
        if (digits and len(digits[2]) > 18) or (type(item) is int and abs(item) >= 10**18):
            raise GPT2Error(f"{jsonfile.show(item)} {at} is too large for a token id")
        if digits:  # leading zeros dropped first: they are no size, yet count against int()'s limit
            item = int(digits[1] + digits[2])
        if type(item) is not int:
            raise GPT2Error(f"{jsonfile.show(item)} {at} is not an integer token id")
        ids.append(item)
    return ids


def printable(text: str) -> str:
    """`text` as valid Unicode: a file name's non-UTF-8 bytes (which Python keeps as lone
    surrogates) as \\xNN, any other lone surrogate as \\uNNNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
