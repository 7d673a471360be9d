"""`gpt2 decode`: exact bytes from ids in every input form, round trips with encode, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from click.testing import CliRunner, Result

from bench.bench_tokenizer import corpus_files
from gpt2cli.cli import cli
from gpt2cli.tokenizer import DATA_DIR

GPT2 = [sys.executable, "-m", "gpt2cli"]
TEXTS = [
    "Hello world",
    "trailing newlines\n\n",
    "crlf\r\nline\r\n",
    "  leading and trailing spaces  ",
    "naïve café 漢字 👩‍💻 e\u0301",
    "a<|endoftext|>b",
    "",
]


def decode(*args: str | Path, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["decode", *map(str, args)], input=input)


def assert_bad_input(result: Result, message: str) -> None:
    """Exit status 2, nothing on stdout, and `message` as the one line on stderr."""
    assert result.exit_code == 2, result.output
    assert result.stdout_bytes == b""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gpt2: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", TEXTS)
def test_ids_as_arguments_give_the_exact_bytes(tiktoken_gpt2: tiktoken.Encoding, text: str):
    ids = tiktoken_gpt2.encode(text, allowed_special="all")
    result = decode(*map(str, ids))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout_bytes == text.encode("utf-8")


def test_a_split_character_is_written_as_its_raw_bytes(tiktoken_gpt2: tiktoken.Encoding):
    ids = tiktoken_gpt2.encode_ordinary("🤗")
    assert len(ids) > 1
    result = decode(str(ids[0]))
    assert result.stdout_bytes == tiktoken_gpt2.decode_single_token_bytes(ids[0])


@pytest.mark.parametrize(
    "form",
    [
        lambda ids: " ".join(ids),
        lambda ids: ",".join(ids),
        lambda ids: "\n".join(ids) + "\n",
        lambda ids: " , ".join(ids) + ",\n",
        lambda ids: "\t".join(ids),
        lambda ids: json.dumps([int(i) for i in ids]),
        lambda ids: json.dumps([int(i) for i in ids], indent=2) + "\n",
    ],
    ids=["spaces", "commas", "lines", "mixed", "tabs", "json", "json-indented"],
)
def test_stdin_takes_whitespace_or_comma_separated_ids_or_a_json_array(
    tiktoken_gpt2: tiktoken.Encoding, form
):
    text = "Every form, one text.\n"
    ids = [str(i) for i in tiktoken_gpt2.encode_ordinary(text)]
    result = decode(input=form(ids))
    assert (result.exit_code, result.stdout_bytes) == (0, text.encode("utf-8"))


def test_comma_separated_arguments(tiktoken_gpt2: tiktoken.Encoding):
    ids = [str(i) for i in tiktoken_gpt2.encode_ordinary("Hello world, again")]
    result = decode(",".join(ids[:2]), *ids[2:])
    assert result.stdout_bytes == b"Hello world, again"


@pytest.mark.parametrize("empty", ["", "   \n", "[]", "[ ]\n"])
def test_no_ids_print_nothing(empty: str):
    result = decode(input=empty)
    assert (result.exit_code, result.stdout_bytes, result.stderr) == (0, b"", "")


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_encode_then_decode_reproduces_the_text(text: str, fmt: list[str]):
    encoded = CliRunner().invoke(cli, ["encode", *fmt], input=text.encode("utf-8"))
    assert decode(input=encoded.stdout).stdout_bytes == text.encode("utf-8")


def test_a_real_file_survives_a_pipe_byte_for_byte(tmp_path: Path):
    """`gpt2 encode < f | gpt2 decode` through real processes, on real text."""
    path = tmp_path / "f.txt"
    path.write_bytes("".join(t for _, t in corpus_files(200_000, seed=2)).encode("utf-8"))
    with path.open("rb") as f:
        encode = subprocess.Popen([*GPT2, "encode"], stdin=f, stdout=subprocess.PIPE)
        decoded = subprocess.run(
            [*GPT2, "decode"], stdin=encode.stdout, capture_output=True, timeout=120
        )
    assert encode.wait(timeout=120) == 0
    assert (decoded.returncode, decoded.stderr) == (0, b"")
    assert decoded.stdout == path.read_bytes()


def test_model_folder_tokenizer_is_used(tmp_path: Path, tiktoken_gpt2: tiktoken.Encoding):
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    swapped = vocab | {"Hello": vocab["Ġworld"], "Ġworld": vocab["Hello"]}
    (tmp_path / "vocab.json").write_text(json.dumps(swapped))
    shutil.copy(DATA_DIR / "merges.txt", tmp_path / "merges.txt")
    ids = tiktoken_gpt2.encode_ordinary("Hello world")
    assert decode("--model", tmp_path, *map(str, ids)).stdout_bytes == b" worldHello"


@pytest.mark.parametrize(
    ("args", "input", "message"),
    [
        (
            ["15496", "abc"],
            None,
            "'abc' at position 1 (counting from 0) is not an integer token id",
        ),
        ([], "1 2 3.5", "'3.5' at position 2 (counting from 0) is not an integer token id"),
        (["-1"], None, "-1 at position 0 (counting from 0) is not a token id: ids run from 0 to"),
        ([], "0,50257", "50257 at position 1 (counting from 0) is not a token id"),
        ([], "[1, -7]", "-7 at position 1 (counting from 0) is not a token id"),
        ([], '[1, "2"]', "'2' at position 1 (counting from 0) is not an integer token id"),
        ([], "[1, true]", "True at position 1 (counting from 0) is not an integer token id"),
        ([], "[[1]]", "[1] at position 0 (counting from 0) is not an integer token id"),
        ([], "[1, 2", "the JSON array of ids on stdin is not valid JSON: Expecting ',' delimiter"),
        ([], "[", "ids on stdin is not valid JSON: Expecting value at line 1 column 2"),
        ([], "[1] [2]", "the JSON array of ids on stdin is not valid JSON: Extra data"),
        (["[1,"], None, "the JSON array of ids on arguments is not valid JSON"),
        ([], "[1.5]", "1.5 at position 0 (counting from 0) is not an integer token id"),
        ([], "[1, NaN]", "nan at position 1 (counting from 0) is not an integer token id"),
        ([], "[Infinity]", "inf at position 0 (counting from 0) is not an integer token id"),
        ([], "[1e400]", "inf at position 0 (counting from 0) is not an integer token id"),
        (
            ["1", "1" * 19],
            None,
            "'1111111111111111111' at position 1 (counting from 0) is too large",
        ),
        (
            [],
            "[-1000000000000000000]",
            "-1000000000000000000 at position 0 (counting from 0) is too",
        ),
        ([], b"1 \xff 2", "ids on stdin is not valid UTF-8: byte 0xff at offset 2"),
    ],
)
def test_bad_ids_are_named_with_their_position(
    args: list[str], input: str | bytes | None, message: str
):
    assert_bad_input(decode(*args, input=input), message)


def test_missing_model_folder_is_one_line(tmp_path: Path):
    assert_bad_input(decode("-m", f"{tmp_path}/nope", "1"), f"{tmp_path}/nope: no such folder")


def test_broken_tokenizer_folder_is_named(tmp_path: Path):
    shutil.copy(DATA_DIR / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot a merge\n")
    assert_bad_input(
        decode("-m", tmp_path, "1"), f"{tmp_path / 'merges.txt'} line 2 is not a merge"
    )


# (what is hostile, the ids on stdin, the message)
HOSTILE_IDS = [
    ("nested 100k deep", "[" * 100_000 + "]" * 100_000, "nests arrays or objects more than 64"),
    ("5000-digit json", f"[{'7' * 5000}]", "holds an integer of more than 4300 digits"),
    (
        "4000-digit json",
        f"[{'7' * 4000}]",
        "7777... at position 0 (counting from 0) is too large for a token id",
    ),
    (
        "5000-digit text",
        "1 " + "7" * 5000,
        "7777... at position 1 (counting from 0) is too large for a token id",
    ),
    ("1.5", "[1.5]", "1.5 at position 0 (counting from 0) is not an integer token id"),
    ("NaN", "[NaN]", "nan at position 0 (counting from 0) is not an integer token id"),
    ("true", "[true]", "True at position 0 (counting from 0) is not an integer token id"),
    (
        "huge string",
        f'["{"x" * 100_000}"]',
        "xxxx... at position 0 (counting from 0) is not an integer token id",
    ),
]


@pytest.mark.parametrize(
    ("ids", "message"), [h[1:] for h in HOSTILE_IDS], ids=[h[0] for h in HOSTILE_IDS]
)
def test_hostile_ids_are_one_line_from_the_real_command(ids: str, message: str):
    result = subprocess.run(
        [*GPT2, "decode"], input=ids, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and len(result.stderr) < 200
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "vocab.json nests arrays or objects more than 64 levels"),
        ('{"a": ' + "7" * 5000 + "}", "vocab.json holds an integer of more than 4300 digits"),
        ('{"a": NaN}', "vocab.json must map its 1 tokens to the ids 0..0"),
        ('{"a": 0, "b": 1e400}', "vocab.json must map its 2 tokens to the ids 0..1"),
    ],
    ids=["deep", "5000-digit", "NaN", "1e400"],
)
def test_hostile_vocab_json_is_one_line_from_the_real_command(
    tmp_path: Path, vocab: str, message: str
):
    (tmp_path / "vocab.json").write_text(vocab)
    shutil.copy(DATA_DIR / "merges.txt", tmp_path / "merges.txt")
    result = subprocess.run(
        [*GPT2, "decode", "-m", str(tmp_path), "1"], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def test_leading_zeros_do_not_make_an_id_too_large_even_past_ints_digit_limit():
    zeros = "0" * 5000  # beyond int()'s 4,300-digit limit for a string
    result = decode(f"{zeros}17250", "00000000000000000000")  # "Hi", "!"
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Hi!"
