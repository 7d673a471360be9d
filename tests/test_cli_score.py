"""`gpt2 score` through the real process: output formats, JSON Lines, terminals and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpt2cli.model import GPT2
from gpt2cli.score import score_text, score_texts
from tests.factory import TINY, write_random_gpt2
from tests.terminal import run_on_terminal

GPT2_CMD = [sys.executable, "-m", "gpt2cli", "score"]


def score(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*GPT2_CMD, *map(str, args)], input=input, capture_output=True, timeout=120
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture
def texts(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog.\n")
    b.write_text("Naïve café — 日本語 🤖\n" * 3)
    return [a, b]


def test_piped_default_is_a_tsv_header_and_a_row_per_input(
    tiny_model_dir: Path, model: GPT2, texts: list[Path]
):
    result = score("-m", tiny_model_dir, *texts)
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert header == ["source", "tokens", "perplexity", "bits_per_byte"]
    assert [r[0] for r in rows] == [str(t) for t in texts]  # no total row when piped
    for row, path in zip(rows, texts, strict=True):
        expected = score_text(model, path.read_text())
        assert int(row[1]) == expected.n_tokens
        assert float(row[2]) == pytest.approx(expected.perplexity, rel=1e-5)
        assert float(row[3]) == pytest.approx(expected.bits_per_byte, rel=1e-5)


def test_json_has_every_field_and_the_source(tiny_model_dir: Path, texts: list[Path]):
    result = score("-m", tiny_model_dir, "--json", texts[1], "-", input=b"from stdin")
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert [first["source"], second["source"]] == [str(texts[1]), "-"]
    assert set(first) == {
        "source", "n_tokens", "n_bytes", "n_words", "nll", "mean_nll", "nll_stderr",
        "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity",
    }  # fmt: skip
    assert first["n_bytes"] == len(texts[1].read_bytes())
    assert first["perplexity"] == pytest.approx(math.exp(first["nll"] / first["n_tokens"]))


def test_text_option_and_tokens_in_json(tiny_model_dir: Path, model: GPT2):
    result = score("-m", tiny_model_dir, "--json", "--tokens", "--top", "2", "--text", "Hi there")
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["source"] == "<text>"
    expected = score_text(model, "Hi there", top=2)
    assert [t["id"] for t in line["tokens"]] == expected.ids.tolist()
    assert [t["text"] for t in line["tokens"]] == ["Hi", " there"]
    assert [t["rank"] for t in line["tokens"]] == expected.ranks.tolist()
    assert [len(t["top"]) for t in line["tokens"]] == [2, 2]
    assert set(line["tokens"][0]["top"][0]) == {"id", "text", "logprob"}


def test_text_dash_is_the_text_itself_not_stdin(tiny_model_dir: Path):
    result = score("-m", tiny_model_dir, "--json", "--text", "-", input=b"from stdin")
    assert json.loads(result.stdout)["n_bytes"] == 1


def test_a_named_pipe_without_a_writer_is_named_as_such_instead_of_hanging(
    tiny_model_dir: Path, tmp_path: Path
):
    os.mkfifo(tmp_path / "fifo")
    for args in ([tmp_path / "fifo"], ["--jsonl", tmp_path / "fifo"]):
        result = score("-m", tiny_model_dir, *args)
        assert result.returncode == 2, result.stderr
        assert "fifo: a named pipe with nothing writing to it; start its writer first" in (
            result.stderr
        )


def test_a_file_name_with_a_newline_or_bad_byte_stays_one_line(tiny_model_dir: Path):
    result = score("-m", tiny_model_dir, "no\nsuch\x1b[31m")
    assert result.stderr == (
        "gpt2: error: no\\nsuch\\x1b[31m: cannot read it (No such file or directory)\n"
    )
    odd = os.fsdecode(b"bad\xffname.txt")
    Path(odd).write_text("Hello there")
    try:
        result = score("-m", tiny_model_dir, "--json", odd)
        assert json.loads(result.stdout)["source"] == "bad\\xffname.txt"
    finally:
        Path(odd).unlink()


def test_piped_tokens_are_rows_escaped_like_encode_tokens(tiny_model_dir: Path, model: GPT2):
    text = "Tab\there\nand 🤖"
    result = score("-m", tiny_model_dir, "--tokens", "--top", "1", input=text.encode())
    header, *rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert header == ["id", "piece", "logprob", "rank", "top1_id", "top1_piece", "top1_logprob"]
    encoded = subprocess.run(
        [sys.executable, "-m", "gpt2cli", "encode", "--tokens"],
        input=text.encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert [r[:2] for r in rows] == [line.split("\t") for line in encoded.splitlines()]
    expected = score_text(model, text)
    assert [int(r[3]) for r in rows] == expected.ranks.tolist()
    np.testing.assert_allclose([float(r[2]) for r in rows], expected.logprobs, atol=1e-5)


def test_jsonl_rows_come_back_in_order_with_their_fields(tiny_model_dir: Path, model: GPT2):
    lines = [
        {"text": "First document.", "id": "a", "meta": {"x": [1, 2]}},
        {"text": "Second, a little longer, document text.", "id": "b"},
        {"text": "Third.", "id": "c"},
    ]
    data = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2])
    result = score("-m", tiny_model_dir, "--jsonl", input=data.encode())
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 3]  # the blank line 2 is skipped
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["meta"] == {"x": [1, 2]} and "text" not in rows[0]
    alone = [score_text(model, line["text"]) for line in lines]
    for row, expected in zip(rows, alone, strict=True):
        assert row["n_tokens"] == expected.n_tokens
        assert row["nll"] == pytest.approx(expected.nll, abs=1e-3)


def test_a_batch_of_jsonl_rows_scores_as_each_row_alone(model: GPT2):
    texts = [f"Document number {i} says {'more ' * i}things." for i in range(12)]
    batched = score_texts(model, texts)
    for text, result in zip(texts, batched, strict=True):
        alone = score_text(model, text)
        np.testing.assert_array_equal(result.ids, alone.ids)
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-4)


def test_on_a_terminal_a_table_with_a_total(tiny_model_dir: Path, texts: list[Path]):
    status, shown, _ = run_on_terminal(["score", "-m", str(tiny_model_dir), *map(str, texts)])
    assert status == 0
    assert "perplexity" in shown and "bits/byte" in shown and "total" in shown
    assert texts[1].name in shown


def test_on_a_terminal_file_names_are_shown_escaped_and_never_as_markup(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    names = ["e\x1b[31mred", "[bold]loud", "two\nlines", "see\u202etxt.exe"]
    for name in names:
        (tmp_path / name).write_text("Some text to score.")
    monkeypatch.chdir(tmp_path)  # short names: the table does not fold them
    status, shown, _ = run_on_terminal(
        ["score", "-m", str(tiny_model_dir), *names], env=os.environ | {"NO_COLOR": "1"}
    )
    assert status == 0
    assert "\x1b[31m" not in shown and "e\\x1b[31mred" in shown
    assert "[bold]loud" in shown
    assert "two\\nlines" in shown
    assert "see\\u202etxt.exe" in shown and "\u202e" not in shown  # no bidi reordering


def test_a_model_with_a_context_of_one_token_cannot_score_and_says_so(tmp_path: Path):
    folder = write_random_gpt2(tmp_path / "ctx1", replace(TINY, n_ctx=1), tokenizer=False)
    result = score("-m", folder, "--text", "Hello world")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "gpt2: error: the model's context is 1 token: no token can be scored, since a window of "
        "one token gives it no context\n"
    )


def test_on_a_terminal_tokens_are_the_text_in_gltr_colours(tiny_model_dir: Path):
    status, shown, _ = run_on_terminal(
        ["score", "-m", str(tiny_model_dir), "--tokens", "--text", "Hello world, again"]
    )
    assert status == 0
    assert "top 10" in shown and "top 1,000" in shown and "beyond" in shown
    assert "\x1b[" in shown  # coloured
    plain = shown.replace("\r", "")
    assert "Hello" in plain and "again" in plain and "bits per byte" in plain


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["missing.txt"], None, "missing.txt: cannot read it (No such file or directory)"),
        (["."], None, ".: cannot read it (Is a directory)"),
        ([], b"ok \xff\xfe", "not valid UTF-8: byte 0xff at offset 3"),
        ([], b"", "stdin: nothing to score: the text is empty"),
        (["--no-bos", "--text", "Hi"], None, "one token has no context"),
        (["--stride", "0", "--text", "Hi"], None, "Invalid value for '--stride'"),
        (["--stride", "129", "--text", "Hi"], None, "--stride must be between 1 and the context"),
        (["--top", "3", "--text", "Hi"], None, "--top goes with --tokens"),
        (["-", "-"], b"", "stdin (-) can be read only once"),
        (["--text", "Hi", "file.txt"], None, "--text goes alone"),
        (["/dev/urandom"], None, "/dev/urandom is not valid UTF-8"),  # at once, not at OOM
        (["/dev/zero"], None, "/dev/zero goes on past 64 MiB, more than gpt2 reads at once"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_is_scored(
    tiny_model_dir: Path, args: list[str], stdin: bytes | None, message: str
):
    result = score("-m", tiny_model_dir, *args, input=stdin if stdin is not None else b"")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_progress_bar_on_a_terminal_for_a_long_input(tiny_model_dir: Path, tmp_path: Path):
    long = tmp_path / "long.txt"
    long.write_text("Some words that repeat, and then some more of them. " * 500)  # ~6,000 tokens
    status, shown, piped = run_on_terminal(
        ["score", "-m", str(tiny_model_dir), str(long)], stream="stderr"
    )
    assert status == 0
    assert "scoring" in shown and "tokens/s" in shown
    assert piped.startswith("source\ttokens\t")


def test_no_progress_bar_for_a_short_input(tiny_model_dir: Path):
    status, shown, _ = run_on_terminal(
        ["score", "-m", str(tiny_model_dir), "--text", "short"], stream="stderr"
    )
    assert status == 0 and "tokens/s" not in shown


def test_html_onto_its_own_input_is_refused_and_the_input_kept(
    tiny_model_dir: Path, tmp_path: Path
):
    text = tmp_path / "text.txt"
    text.write_text("Some words to score.")
    link = tmp_path / "link.html"
    link.symlink_to(text)
    for out in (text, link):
        result = score("-m", tiny_model_dir, text, "--html", out)
        assert result.returncode == 2 and result.stdout == ""
        assert (
            result.stderr
            == f"gpt2: error: {out} is the input file; write the view to another file\n"
        )
    assert text.read_text() == "Some words to score."


def test_html_onto_a_full_disk_is_a_system_failure_exit_1(tiny_model_dir: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text("Some words to score.")
    result = score("-m", tiny_model_dir, text, "--html", "/dev/full")
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert result.stderr.count("\n") == 1


def test_html_into_a_missing_folder_is_the_users_error_exit_2(tiny_model_dir: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text("Some words to score.")
    result = score("-m", tiny_model_dir, text, "--html", tmp_path / "nope" / "view.html")
    assert result.returncode == 2 and "No such file or directory" in result.stderr
    assert result.stderr.count("\n") == 1
