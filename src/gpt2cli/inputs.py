"""How commands read their input: stdin (whole or in chunks), arguments and files,
always as strict UTF-8 (JSON Lines as bytes, which `gpt2cli.dataset` decodes line by line), and
token ids for `gpt2 decode`. Every failure is a GPT2Error naming where the input came from and,
for a byte that is not UTF-8, its offset."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error


def stdin_binary() -> Any:
    """The binary stdin, or a GPT2Error when the shell closed it (`<&-`: `sys.stdin` is None)."""
    if sys.stdin is None:
        raise GPT2Error("stdin is closed; pass the input as an argument or redirect a file into it")
    return sys.stdin.buffer


def read_text(text: str | None, what: str = "input") -> str:
    """Return TEXT, or all of stdin when TEXT is absent or '-', decoded as strict UTF-8.

    stdin is read as bytes and kept exactly (a trailing newline is part of the text); a byte
    that is not UTF-8, on stdin or in the argument (which Python decodes with surrogateescape),
    is an error naming its offset.
    """
    if text is not None and text != "-":
        return argument_text(text, what)
    return decode_utf8(stdin_binary().read(), f"{what} on stdin")


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
    """stdin as strict UTF-8 text, chunk by chunk as it is read (a character split between two
    reads is carried over); a byte that is not UTF-8 is an error naming its offset in stdin,
    raised once the text before it has been yielded."""
    stdin = stdin_binary()
    carry, offset = b"", 0  # offset: bytes of stdin before `carry`
    while True:
        block = stdin.read1(STDIN_CHUNK)
        data = carry + block
        try:
            chunk, carry = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if not (block and e.reason == "unexpected end of data"):
                if e.start:
                    yield data[: e.start].decode("utf-8")
                raise utf8_error(f"{what} on stdin", data, e, offset) from None
            chunk, carry = data[: e.start].decode("utf-8"), data[e.start :]
        if not block:
            return
        offset += len(data) - len(carry)
        yield chunk


def read_file(name: str) -> str:
    """The text of file `name` (stdin for `-`), strict UTF-8; errors name the file."""
    if name == "-":
        return read_text(None, "input")
    return decode_utf8(read_bytes(name), name)


def read_bytes(name: str) -> bytes:
    """The bytes of file `name` (stdin for `-`), undecoded, for a reader that decodes them in
    parts (JSON Lines, line by line); errors name the file.

    Opened without blocking, so a named pipe with no writer reads as empty instead of hanging;
    a pipe that has one (`<(command)`) is read to its end.
    """
    if name == "-":
        data: bytes = stdin_binary().read()
        return data
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            os.set_blocking(fd, True)
            return f.read()
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
