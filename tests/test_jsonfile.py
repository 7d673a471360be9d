"""gpt2cli.jsonfile: every way a JSON document or a file in its place can be hostile."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{", "doc is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
        (b"", "doc is not valid JSON: Expecting value at line 1 column 1"),
        (b'{"a": "\xff"}', "doc is not UTF-8 text (byte offset 7)"),
        ("[" * 100_000 + "]" * 100_000, "doc nests arrays or objects more than 64 levels deep"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "more than 64 levels deep"),
        ("[" * 65 + "]" * 65, "more than 64 levels deep"),  # within Python's limit, not ours
        ("1" * 5000, "doc holds an integer of more than 4300 digits"),
        ('{"shape": [' + "9" * 5000 + "]}", "doc holds an integer of more than 4300 digits"),
    ],
    ids=["syntax", "empty", "not-utf8", "deep-arrays", "deep-objects", "65-deep", "int", "int-in"],
)
def test_every_parser_failure_is_one_gpt2error_line(data: str | bytes, message: str) -> None:
    with pytest.raises(GPT2Error) as raised:
        jsonfile.parse(data, "doc")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_64_levels_and_a_4300_digit_integer_are_still_read() -> None:
    assert jsonfile.parse("[" * 64 + "]" * 64, "doc") == eval("[" * 64 + "]" * 64)
    assert jsonfile.parse("9" * 4300, "doc") == int("9" * 4300)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_parse_of_any_bytes_or_text_is_a_value_or_gpt2error(data: bytes | str) -> None:
    try:
        jsonfile.parse(data, "doc")
    except GPT2Error as e:
        assert "\n" not in str(e) and str(e).startswith("doc ")


@pytest.mark.parametrize(
    ("accessor", "value", "message"),
    [
        (jsonfile.mapping, [], "x must be a JSON object, not []"),
        (jsonfile.array, {}, "x must be a JSON array, not {}"),
        (jsonfile.string, ["F32"], "x must be a string, not ['F32']"),
        (jsonfile.integer, True, "x must be an integer >= 0, not True"),
        (jsonfile.integer, 1.0, "not 1.0"),
        (jsonfile.integer, -1, "not -1"),
        (jsonfile.integer, 2**63, ">= 0 that fits in 64 bits, not 9223372036854775808"),
        (jsonfile.integer, math.nan, "not nan"),
        (jsonfile.positive_number, math.nan, "x must be a positive finite number, not nan"),
        (jsonfile.positive_number, math.inf, "not inf"),
        (jsonfile.positive_number, 10**400, "not 1000000000000"),  # 1e400 as an int: no float
        (jsonfile.positive_number, 0, "not 0"),
        (jsonfile.positive_number, False, "not False"),
        (jsonfile.positive_number, "1e-5", "not '1e-5'"),
    ],
)
def test_accessors_refuse_the_wrong_type_naming_where(
    accessor: Callable[[object, str], object], value: object, message: str
) -> None:
    with pytest.raises(GPT2Error, match=r"^x must be") as raised:
        accessor(value, "x")
    assert message in str(raised.value)


def test_accessors_return_the_value_when_it_fits() -> None:
    assert jsonfile.integer(2**63 - 1, "x") == 2**63 - 1
    assert jsonfile.integer(1, "x", minimum=1) == 1
    assert jsonfile.positive_number(1, "x") == 1.0
    assert jsonfile.positive_number(1e-5, "x") == 1e-5
    assert jsonfile.field({"a": None}, "a", "x") is None
    with pytest.raises(GPT2Error, match=r"^x has no 'b'$"):
        jsonfile.field({"a": 1}, "b", "x")


def test_show_cuts_a_huge_value_to_one_short_line() -> None:
    shown = jsonfile.show("a\n" * 10_000)
    assert len(shown) == 60 and "\n" not in shown and shown.endswith("...")
    assert jsonfile.show([1, "b"]) == "[1, 'b']"


def within(seconds: float, call: Callable[[], object]) -> object:
    """The result of `call()`, or a test failure if it has not returned after `seconds`."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still blocked after {seconds} s"
    return result[0]


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except GPT2Error as e:
        return e


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _loop(path: Path) -> None:
    path.symlink_to(path.name)


def _dangling(path: Path) -> None:
    path.symlink_to("../blobs/gone")


# (what is at the path, how to make it, the message)
SPECIAL: list[tuple[str, Callable[[Path], None], str]] = [
    ("nothing", lambda p: None, "x.json: missing"),
    ("directory", Path.mkdir, "x.json: is a directory, not a file"),
    ("fifo", _fifo, "x.json: is a FIFO (named pipe), not a file"),
    ("symlink loop", _loop, "x.json: is a symlink loop, not a file"),
    ("dangling symlink", _dangling, "x.json: is a symlink to ../blobs/gone, which does not exist"),
]


@pytest.mark.parametrize(("make", "message"), [s[1:] for s in SPECIAL], ids=[s[0] for s in SPECIAL])
def test_what_is_there_instead_of_a_file_is_named_without_blocking(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "x.json"
    make(path)
    for read in (jsonfile.read, jsonfile.open_file, jsonfile.check_file):
        error = within(5, lambda read=read: read(path))
        assert isinstance(error, GPT2Error) and str(error).endswith(message), error


def test_missing_message_can_say_what_the_file_is_for(tmp_path: Path) -> None:
    with pytest.raises(GPT2Error, match=r"x.json: missing; needed for y$"):
        jsonfile.read(tmp_path / "x.json", missing="missing; needed for y")


def test_symlink_to_a_file_is_read_as_the_file(tmp_path: Path) -> None:
    """The hub cache stores every file as a symlink into ../../blobs."""
    (tmp_path / "blob").write_text('{"a": 1}')
    (tmp_path / "x.json").symlink_to("blob")
    assert jsonfile.read(tmp_path / "x.json") == {"a": 1}


def test_file_over_the_size_limit_is_refused_unparsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 10)
    (tmp_path / "x.json").write_text('{"a": "0123456789"}')
    with pytest.raises(GPT2Error, match=r"x.json: larger than .* MB, not a JSON file we read"):
        jsonfile.read(tmp_path / "x.json")


def test_nan_and_infinity_parse_but_no_accessor_takes_them() -> None:
    value = jsonfile.parse('{"eps": NaN, "n": Infinity, "big": 1e400}', "doc")
    for key in value:
        with pytest.raises(GPT2Error, match=f"^doc: {key} must be a positive finite number"):
            jsonfile.positive_number(value[key], f"doc: {key}")
        with pytest.raises(GPT2Error, match=f"^doc: {key} must be an integer"):
            jsonfile.integer(value[key], f"doc: {key}")
