"""`gpt2 encode`: tiktoken's ids in every format, exact stdin, pipes, terminals, bad input."""

from __future__ import annotations

import codecs
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from click.testing import CliRunner, Result

from bench.bench_tokenizer import corpus_files, run_measured
from gpt2cli.cli import cli
from gpt2cli.inputs import STDIN_CHUNK
from gpt2cli.tokenizer import DATA_DIR
from tests.factory import TINY, write_random_gpt2
from tests.hub_server import FakeHub, Repo

GPT2 = [sys.executable, "-m", "gpt2cli"]
TEXT = "Hello world! It's 2024: naïve café, 漢字, 👩‍💻 <|endoftext|> done.\n\n"


@pytest.fixture(scope="module")
def big_text() -> bytes:
    """Real text whose ids are far more than a pipe holds (64 KiB)."""
    return "".join(t for _, t in corpus_files(300_000)).encode("utf-8")


def encode(*args: str | Path, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["encode", *map(str, args)], input=input)


def assert_bad_input(result: Result, message: str) -> None:
    """Exit status 2, nothing on stdout, and `message` as the one line on stderr."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("gpt2: error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def unescape(piece: str) -> bytes:
    """The bytes a `--tokens` piece stands for (its escapes are Python's \\\\, \\n, \\t, \\xNN)."""
    return codecs.escape_decode(piece.encode("utf-8"))[0]  # type: ignore[attr-defined,no-any-return]


def test_ids_of_the_argument_are_space_separated_with_one_newline(
    tiktoken_gpt2: tiktoken.Encoding,
):
    result = encode(TEXT)
    expected = tiktoken_gpt2.encode(TEXT, allowed_special="all")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == " ".join(map(str, expected)) + "\n"


def test_stdin_is_read_exactly_with_its_trailing_newlines(tiktoken_gpt2: tiktoken.Encoding):
    text = "line one\r\nline two \n\n"
    for args in [(), ("-",)]:
        result = encode(*args, input=text.encode("utf-8"))
        assert result.exit_code == 0
        assert result.stdout.split() == [str(i) for i in tiktoken_gpt2.encode_ordinary(text)]


def test_json_prints_an_array(tiktoken_gpt2: tiktoken.Encoding):
    result = encode("--json", TEXT)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == tiktoken_gpt2.encode(TEXT, allowed_special="all")


def test_count_prints_the_number_of_tokens(tiktoken_gpt2: tiktoken.Encoding):
    result = encode("--count", TEXT)
    expected = len(tiktoken_gpt2.encode(TEXT, allowed_special="all"))
    assert (result.exit_code, result.stdout) == (0, f"{expected}\n")


def test_no_special_encodes_endoftext_as_text(tiktoken_gpt2: tiktoken.Encoding):
    default, plain = encode("--json", TEXT), encode("--json", "--no-special", TEXT)
    assert tiktoken_gpt2.eot_token in json.loads(default.stdout)
    assert json.loads(plain.stdout) == tiktoken_gpt2.encode_ordinary(TEXT)


def test_tokens_lists_each_id_and_its_piece_which_spell_the_text(
    tiktoken_gpt2: tiktoken.Encoding,
):
    text = "tab\there\\x41 and a backslash \\ 🤗\r\n"
    result = encode("--tokens", text)
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert all(len(row) == 2 for row in rows)  # the tab in the text is escaped
    assert [int(i) for i, _ in rows] == tiktoken_gpt2.encode_ordinary(text)
    assert b"".join(unescape(piece) for _, piece in rows) == text.encode("utf-8")
    assert [unescape(piece) for _, piece in rows] == [
        tiktoken_gpt2.decode_single_token_bytes(int(i)) for i, _ in rows
    ]


def test_tokens_on_a_terminal_colours_the_pieces_alternately(tiktoken_gpt2: tiktoken.Encoding):
    """Under a pseudo-terminal the pieces are inline, neighbours in two different colours."""
    text = "Hello world, again"
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm-256color"}
    process = subprocess.run(
        [*GPT2, "encode", "--tokens", text],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
    )
    os.close(follower)
    output = os.read(leader, 65536).decode("utf-8")
    os.close(leader)
    assert (process.returncode, process.stderr) == (0, b"")
    styled = re.findall(r"\x1b\[([0-9;]+)m([^\x1b]+)", output.rstrip("\r\n"))
    pieces = [tiktoken_gpt2.decode([i]) for i in tiktoken_gpt2.encode_ordinary(text)]
    assert [piece for _, piece in styled] == pieces
    styles = [style for style, _ in styled]
    assert len(set(styles[0::2])) == len(set(styles[1::2])) == 1
    assert styles[0] != styles[1]


def test_empty_text_prints_an_empty_line():
    for args, input in [(("",), None), ((), b"")]:
        result = encode(*args, input=input)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "\n", "")
    assert encode("--json", "").stdout == "[]\n"
    assert encode("--count", "").stdout == "0\n"


def tokenizer_folder(folder: Path, vocab: str | None = None) -> Path:
    folder.mkdir()
    shutil.copy(DATA_DIR / "merges.txt", folder / "merges.txt")
    if vocab is None:
        shutil.copy(DATA_DIR / "vocab.json", folder / "vocab.json")
    else:
        (folder / "vocab.json").write_text(vocab)
    return folder


def test_model_folder_with_tokenizer_files_is_used(
    tmp_path: Path, tiktoken_gpt2: tiktoken.Encoding
):
    # A vocabulary whose ids are shifted would show whether the folder's files were read
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    swapped = vocab | {"Hello": vocab["Ġworld"], "Ġworld": vocab["Hello"]}
    folder = tokenizer_folder(tmp_path / "model", json.dumps(swapped))
    result = encode("--model", folder, "Hello world")
    assert result.exit_code == 0
    assert result.stdout.split() == [str(i) for i in tiktoken_gpt2.encode("Hello world")[::-1]]


def test_hub_model_tokenizer_is_used_without_fetching_weights(
    fake_hub: FakeHub, tmp_path: Path, tiktoken_gpt2: tiktoken.Encoding
):
    """`--model owner/name` goes through the hub (a local fake), uses that repo's tokenizer
    files and downloads no weights: encode and decode never need them."""
    folder = write_random_gpt2(tmp_path / "model", TINY, tokenizer=False)
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    swapped = vocab | {"Hello": vocab["Ġworld"], "Ġworld": vocab["Hello"]}
    (folder / "vocab.json").write_text(json.dumps(swapped))
    shutil.copy(DATA_DIR / "merges.txt", folder / "merges.txt")
    fake_hub.add("someone/swapped", Repo.from_folder(folder))
    process = subprocess.run(
        [*GPT2, "encode", "-m", "someone/swapped", "Hello world"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (process.returncode, process.stderr) == (0, "")
    assert process.stdout.split() == [str(i) for i in tiktoken_gpt2.encode("Hello world")[::-1]]
    assert fake_hub.downloads("vocab.json") and fake_hub.downloads("merges.txt")
    assert not fake_hub.downloads("model.safetensors")


def test_model_folder_without_tokenizer_files_uses_gpt2s(
    tmp_path: Path, tiktoken_gpt2: tiktoken.Encoding
):
    (tmp_path / "config.json").write_text("{}")
    result = encode("-m", tmp_path, "weights only")
    assert result.stdout.split() == [str(i) for i in tiktoken_gpt2.encode("weights only")]


def test_broken_tokenizer_folder_is_named(tmp_path: Path):
    folder = tokenizer_folder(tmp_path / "model", vocab="{broken")
    assert_bad_input(encode("-m", folder, "x"), f"{folder / 'vocab.json'} is not valid JSON")


def test_missing_model_folder_is_one_line(tmp_path: Path):
    assert_bad_input(encode("--model", f"{tmp_path}/nope", "x"), f"{tmp_path}/nope: no such folder")


def test_non_utf8_stdin_names_the_byte_and_offset_after_the_ids_before_it(
    tiktoken_gpt2: tiktoken.Encoding,
):
    before = " ".join(map(str, tiktoken_gpt2.encode("ok ")))
    for data, byte in ((b"ok \xe9t\xc3\xa9", "0xe9"), (b"ok \xf0\x9f", "0xf0")):  # 2nd: cut short
        result = encode(input=data)
        assert result.exit_code == 2
        assert result.stdout == before  # and no newline: the output did not end well
        assert result.stderr == (
            f"gpt2: error: text on stdin is not valid UTF-8: byte {byte} at offset 3\n"
        )


def test_stdin_of_several_chunks_gives_tiktokens_ids_in_every_format(
    tiktoken_gpt2: tiktoken.Encoding, big_text: bytes
):
    """Chunk ends that fall inside a character and inside <|endoftext|> change nothing."""
    head = b"ab " * (STDIN_CHUNK // 3) + b"x" * (STDIN_CHUNK % 3 - 1)  # 1 byte short of a chunk
    middle = (b"cd, " * STDIN_CHUNK)[: STDIN_CHUNK - 6]
    data = head + "🤗".encode() + middle + b"<|endoftext|>" + big_text
    assert data[STDIN_CHUNK - 1 : STDIN_CHUNK + 3] == "🤗".encode()
    assert data[2 * STDIN_CHUNK - 3 : 2 * STDIN_CHUNK + 10] == b"<|endoftext|>"
    text = data.decode("utf-8")
    expected = tiktoken_gpt2.encode(text, allowed_special="all")
    assert encode(input=data).stdout == " ".join(map(str, expected)) + "\n"
    assert json.loads(encode("--json", input=data).stdout) == expected
    assert encode("--count", input=data).stdout == f"{len(expected)}\n"
    rows = [line.split("\t") for line in encode("--tokens", input=data).stdout.splitlines()]
    assert [int(i) for i, _ in rows] == expected
    plain = encode("--no-special", input=data).stdout.split()
    assert plain == [str(i) for i in tiktoken_gpt2.encode_ordinary(text)]


def test_a_bad_byte_after_the_first_chunk_stops_after_the_ids_before_it(
    tiktoken_gpt2: tiktoken.Encoding,
):
    good = b"Hello world, " * (STDIN_CHUNK // 10)
    result = encode(input=good + b"\xff and more")
    assert result.exit_code == 2
    assert result.stderr == (
        f"gpt2: error: text on stdin is not valid UTF-8: byte 0xff at offset {len(good)}\n"
    )
    expected = [str(i) for i in tiktoken_gpt2.encode_ordinary(good.decode())]
    assert result.stdout.split() == expected  # every id of the text before the bad byte
    assert json.loads(encode("--json", input=good + b"\xff").stdout + "]") == list(
        map(int, expected)
    )


def test_ids_come_out_while_stdin_is_still_open(tiktoken_gpt2: tiktoken.Encoding):
    """`producer | gpt2 encode`: ids of what has arrived are printed before the input ends."""
    text = "Hello world " * 1000  # its ids fit in a pipe's buffer, so nothing blocks
    process = subprocess.Popen(
        [*GPT2, "encode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin and process.stdout and process.stderr
    process.stdin.write(text.encode())
    process.stdin.flush()
    readable, _, _ = select.select([process.stdout], [], [], 60)
    assert readable, "no ids within 60 s while stdin stayed open"
    first = os.read(process.stdout.fileno(), 65536)
    assert first.startswith(b"15496 995 ")
    process.stdin.write(b"the end")
    process.stdin.close()
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 0
    assert (first + rest).split() == [
        str(i).encode() for i in tiktoken_gpt2.encode_ordinary(text + "the end")
    ]


def test_memory_stays_flat_however_large_stdin_is(tmp_path: Path, big_text: bytes):
    """Encoded chunk by chunk, 12 MB take little more memory than 1 MB (58 and 79 MiB when
    measured; encoding all of stdin at once took 265 MiB)."""
    peak_mib = {}
    for size in (1_000_000, 12_000_000):
        path = tmp_path / f"{size}.txt"
        data = big_text * (size // len(big_text) + 1)
        path.write_bytes(data[: data.rindex(b"\n", 0, size)])  # whole lines: whole characters
        status, _, peak_mib[size] = run_measured([*GPT2, "encode", "--count"], path)
        assert status == 0
    assert peak_mib[12_000_000] < peak_mib[1_000_000] + 60, peak_mib


def test_non_utf8_argument_names_the_byte_and_offset():
    process = subprocess.run([*GPT2, "encode", b"caf\xe9"], capture_output=True, timeout=60)
    assert process.returncode == 2
    assert process.stdout == b""
    assert process.stderr == (
        b"gpt2: error: text in the argument is not valid UTF-8: byte 0xe9 at offset 3\n"
    )


def test_output_formats_are_exclusive():
    assert_bad_input(encode("--json", "--count", "x"), "choose one of --json, --count and --tokens")


@pytest.mark.parametrize("args", [[], ["--tokens"]])
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_reader_closing_the_pipe_early_is_quiet(
    args: list[str], unbuffered: str, big_text: bytes, tmp_path: Path
):
    """`gpt2 encode < big | head -c 100`: no traceback, whether or not Python buffers stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    (tmp_path / "big.txt").write_bytes(big_text)
    with (tmp_path / "big.txt").open("rb") as stdin:  # a file: ids come out while it is read
        process = subprocess.Popen(
            [*GPT2, "encode", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    assert process.stdout and process.stderr
    assert len(process.stdout.read(100)) == 100
    process.stdout.close()  # the reader goes away with most of the output unread
    # 141 (128 + SIGPIPE) once a write fails; 0 when the reader left during the last write, which
    # the kernel then ends short instead of failing (unbuffered stdout does not retry the rest)
    assert process.wait(timeout=120) in (0, 141)
    assert process.stderr.read() == b""


def test_start_up_does_not_import_numpy_or_rich():
    """`gpt2 encode` loads only what it uses, which is what keeps it starting fast."""
    code = (
        "import sys; from gpt2cli.cli import main; sys.argv = ['gpt2', 'encode', 'hi']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({'numpy', 'rich', 'huggingface_hub'} & set(sys.modules)))"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert process.stdout.splitlines()[-1] == "[]", process.stderr
