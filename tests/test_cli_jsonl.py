"""`gpt2 generate --jsonl` and `gpt2 score --jsonl` through the real process: order, fields,
batch sizes, resuming a killed run, line-numbered errors, --skip-invalid and progress."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.compare import assert_same_output
from tests.factory import TINY, write_random_gpt2
from tests.terminal import run_on_terminal

GPT2 = [sys.executable, "-m", "gpt2cli"]


def gpt2(*args: object, input: bytes = b"") -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*GPT2, *map(str, args)], input=input, capture_output=True, timeout=180)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    """Greedy and seeded rows of mixed lengths and budgets, with fields to pass through."""
    rows = []
    for i in range(12):
        row: dict[str, object] = {"prompt": "Tell me" + " more" * (i % 5), "id": f"r{i}"}
        row["max_tokens"] = 2 + (i * 7) % 13
        if i % 2:
            row["temperature"] = 0
        if i == 5:
            row["seed"] = 123
        rows.append(row)
    path = tmp_path / "prompts.jsonl"
    path.write_text(jsonl(*rows))
    return path


def test_generate_rows_come_back_in_order_with_fields_and_per_row_options(
    tiny_model_dir: Path, prompts: Path
):
    result = gpt2("generate", "-m", tiny_model_dir, "--jsonl", prompts, "--seed", 4)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(12)]
    assert [len(line["ids"]) for line in lines] == [2 + (i * 7) % 13 for i in range(12)]
    fields = {"index", "id", "text", "ids", "prompt_ids", "finish_reason"}
    assert [set(line) for line in lines] == [fields] * 12  # no timings, logprobs or options


def test_batch_size_one_and_eight_write_the_same_bytes(tiny_model_dir: Path, prompts: Path):
    outputs = [
        gpt2("generate", "-m", tiny_model_dir, "--jsonl", prompts, "--seed", 9, "--batch-size", n)
        for n in (1, 8, 10**15)  # a batch larger than the rows is sized to them
    ]
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert outputs[0].stdout == outputs[1].stdout == outputs[2].stdout


def test_a_byte_order_mark_is_skipped_and_dash_o_dash_is_stdout(
    tiny_model_dir: Path, tmp_path: Path
):
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + jsonl({"prompt": "Hi"}, {"prompt": "there"}).encode())
    args = ("generate", "-m", tiny_model_dir, "--jsonl", rows, "--seed", 2, "-t", 3)
    plain = gpt2(*args)
    assert plain.returncode == 0, plain.stderr
    assert [json.loads(line)["index"] for line in plain.stdout.splitlines()] == [0, 1]
    assert gpt2(*args, "-o", "-").stdout == plain.stdout
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_a_row_is_what_generate_json_gives_with_its_derived_seed(tiny_model_dir: Path):
    rows = jsonl({"prompt": "One"}, {"prompt": "Two", "stop": "e"}, {"prompt": "Three"})
    result = gpt2(
        "generate", "-m", tiny_model_dir, "--jsonl", "-t", 9, "--seed", 2, input=rows.encode()
    )
    third = json.loads(result.stdout.splitlines()[2])
    seed = 2 * 2**64 + 2
    alone = gpt2("generate", "-m", tiny_model_dir, "-t", 9, "--seed", seed, "--json", "Three")
    expected = json.loads(alone.stdout)
    assert third["ids"] == expected["ids"] and third["text"] == expected["text"]


@pytest.mark.parametrize("command", ["generate", "score"])
def test_jsonl_reads_a_path_and_stdin_alike(tiny_model_dir: Path, tmp_path: Path, command: str):
    key = "prompt" if command == "generate" else "text"
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl(*[{key: f"Line number {i}", "k": i} for i in range(5)]))
    base = [command, "-m", tiny_model_dir, *(["--temperature", "0"] * (command == "generate"))]
    from_path = gpt2(*base, "--jsonl", source)
    assert from_path.returncode == 0, from_path.stderr
    assert len(from_path.stdout.splitlines()) == 5
    for how in (["--jsonl", "-"], ["--jsonl"]):
        from_stdin = gpt2(*base, *how, input=source.read_bytes()).stdout
        if command == "generate":  # no float in its lines: the same bytes
            assert from_stdin == from_path.stdout
        else:  # another process: floats within 1e-4
            assert_same_output(from_stdin, from_path.stdout)


def test_a_killed_run_resumes_without_losing_or_repeating_a_row(
    tiny_model_dir: Path, tmp_path: Path
):
    rows = [{"prompt": f"Row {i} of the file", "temperature": 0 if i % 2 else 1} for i in range(40)]
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl(*rows))
    args = [
        "generate",
        "-m",
        str(tiny_model_dir),
        "--jsonl",
        str(source),
        "-t",
        "40",
        "--seed",
        "5",
    ]
    expected = gpt2(*args).stdout
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([*GPT2, *args, "--batch-size", "1", "-o", str(out)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    written = out.read_text().count("\n")
    assert 3 <= written < len(rows)  # killed mid-file
    result = gpt2(*args, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert out.read_text() == expected  # every row once, in order
    again = gpt2(*args, "-o", out)  # complete: nothing more to run
    assert again.returncode == 0 and out.read_text() == expected


def test_a_score_run_resumes_after_a_torn_last_line(tiny_model_dir: Path, tmp_path: Path):
    source = tmp_path / "texts.jsonl"
    source.write_text(jsonl(*[{"text": "Some words " * (1 + i), "n": i} for i in range(9)]))
    args = ["score", "-m", str(tiny_model_dir), "--jsonl", str(source), "--batch-size", "3"]
    expected = gpt2(*args).stdout
    lines = expected.splitlines(keepends=True)
    assert len(lines) == 9
    out = tmp_path / "scores.jsonl"
    assert gpt2(*args, "-o", out).returncode == 0
    kept = "".join(lines[:3])
    out.write_text(kept + lines[3][:20])  # as a crash mid-write leaves it
    result = gpt2(*args, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text().startswith(kept)  # the lines before the torn one stay as they were
    assert_same_output(out.read_text(), expected)  # the rest from another run: floats within 1e-4


def test_an_output_file_whose_lines_are_not_the_inputs_results_is_refused_untouched(
    tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl({"prompt": "a"}, {"prompt": "b"}))
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "--jsonl", source, "-t", 2, "-o", out)
    assert gpt2(*args).returncode == 0
    out.write_text(  # its record is right, but its first line was edited since
        '{"index": 0, "text": "x", "ids": [1], "prompt_ids": [2], "finish_reason": "length"}\n'
    )
    before = out.read_bytes()
    result = gpt2(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "line 1 is not the result of input line 1" in result.stderr
    assert "add --overwrite to start it again" in result.stderr
    assert out.read_bytes() == before


def test_invalid_lines_are_named_first_ten_and_nothing_runs(tiny_model_dir: Path, tmp_path: Path):
    rows = [{"prompt": "ok"}] + [{"prompt": i} for i in range(11)] + [{"prompt": "fine"}]
    out = tmp_path / "out.jsonl"
    result = gpt2(
        "generate", "-m", tiny_model_dir, "--jsonl", "-o", out, input=jsonl(*rows).encode()
    )
    assert result.returncode == 2
    errors = result.stderr.splitlines()
    assert len(errors) == 11
    assert errors[0] == 'gpt2: error: stdin line 2 "prompt" must be a string, not 0'
    assert errors[9].startswith("gpt2: error: stdin line 11 ")
    assert "11 invalid line(s) of 13, the first 10 above; nothing was run" in errors[10]
    assert not out.exists() and result.stdout == ""


def test_skip_invalid_writes_an_error_object_in_place(tiny_model_dir: Path):
    rows = jsonl({"prompt": "ok"}, {"prompt": "x", "top_p": 2}) + "oops\n"
    result = gpt2(
        "generate", "-m", tiny_model_dir, "--jsonl", "--skip-invalid", "-t", 2, input=rows.encode()
    )
    assert result.returncode == 0, result.stderr
    first, second, third = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["index"] == 0 and len(first["ids"]) == 2
    assert second == {
        "index": 1,
        "error": "stdin line 2: top_p must be in (0, 1] (1 turns it off), got 2.0",
    }
    assert third["index"] == 2 and "not valid JSON" in third["error"]


@pytest.mark.parametrize("command", ["generate", "score"])
def test_a_line_that_is_not_utf8_is_named_or_skipped_like_any_invalid_line(
    tiny_model_dir: Path, tmp_path: Path, command: str
):
    key = "prompt" if command == "generate" else "text"
    lines = [json.dumps({key: f"Line number {i}", "k": i}).encode() for i in range(4)]
    lines[2] = b'{"%s": "caf\xe9 au lait", "k": 2}' % key.encode()  # Latin-1, not UTF-8
    offset = lines[2].index(b"\xe9")
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    base = [command, "-m", tiny_model_dir, *(["-t", 2, "--seed", 3] * (command == "generate"))]

    refused = gpt2(*base, "--jsonl", source)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"gpt2: error: {source} line 3 is not valid UTF-8: byte 0xe9 at offset {offset}",
        f"gpt2: error: {source}: 1 invalid line(s) of 4; nothing was run "
        "(--skip-invalid runs the others and writes an error object for these)",
    ]

    out = tmp_path / "out.jsonl"
    skipped = gpt2(*base, "--jsonl", "--skip-invalid", "-o", out, input=source.read_bytes())
    assert skipped.returncode == 0, skipped.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[2] == {
        "index": 2,
        "error": f"stdin line 3 is not valid UTF-8: byte 0xe9 at offset {offset}",
    }
    result = "ids" if command == "generate" else "n_tokens"
    assert [(x["index"], x["k"], bool(x[result])) for x in written[:2] + written[3:]] == [
        (0, 0, True),
        (1, 1, True),
        (3, 3, True),
    ]
    full = out.read_bytes()
    kept = b"".join(full.splitlines(keepends=True)[:2])
    out.write_bytes(kept)  # as if stopped before line 3
    resumed = gpt2(*base, "--jsonl", "--skip-invalid", "-o", out, input=source.read_bytes())
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes().startswith(kept)
    if command == "generate":  # no float in its lines: the same bytes
        assert out.read_bytes() == full
    else:  # the rows left ran in another batch: floats within 1e-4
        assert_same_output(out.read_bytes(), full)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b'{"text": "ok"}\n[1]\n', "stdin line 2 must be a JSON object"),
        (b'{"text": "ok"}\n{"txt": "x"}\n', "stdin line 2 has no 'text'"),
        (b'{"text": 5}\n', 'stdin line 1 "text" must be a string'),
        (b'{"text": "a", "x": NaN}\n', "line 1: holds NaN, Infinity or a lone"),
        (b'{"text": "ok"}\n{"text": ""}\n', "stdin line 2: nothing to score"),
        (b"[" * 100_000, "stdin line 1 nests arrays or objects"),
        (b'{"text": "a", "x": "\\ud800"}\n', "line 1: holds NaN, Infinity or a lone"),
    ],
)
def test_score_jsonl_names_each_bad_line_and_scores_nothing(
    tiny_model_dir: Path, stdin: bytes, message: str
):
    result = gpt2("score", "-m", tiny_model_dir, "--jsonl", input=stdin)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    problem, summary = result.stderr.splitlines()
    assert problem.startswith("gpt2: error: ") and message in problem
    assert "1 invalid line(s)" in summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--jsonl", "-", "Hello"], "--jsonl reads the prompts: give no PROMPT"),
        (["generate", "-o", "out.jsonl", "Hello"], "go with --jsonl"),
        (["score", "--batch-size", "2", "--text", "Hi"], "go with --jsonl"),
        (["generate", "--jsonl", "--ray-address", "x:1"], "go with --engine ray"),
        (["generate", "--logprobs", "Hi"], "--logprobs goes with --jsonl"),
        (["score", "--jsonl", "a.jsonl", "b.jsonl"], "--jsonl reads one file"),
        (["generate", "--jsonl", "-"], "stdin: no JSON lines"),
        (
            ["generate", "--jsonl", "-", "-n", "3", "--batch-size", "2"],
            "3 sequences (-n, --num-beams or --best-of) are more than",
        ),
    ],
)
def test_data_set_options_out_of_place_are_usage_errors(
    tiny_model_dir: Path, args: list[str], message: str
):
    result = gpt2(*args, "-m", tiny_model_dir, input=b"\n")
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_progress_on_a_terminal_counts_rows_and_tokens(tiny_model_dir: Path, prompts: Path):
    status, shown, piped = run_on_terminal(
        ["generate", "-m", str(tiny_model_dir), "--jsonl", str(prompts), "--batch-size", "1"],
        stream="stderr",
    )
    assert status == 0
    assert "rows/s" in shown and "tokens/s" in shown and "/12" in shown
    assert len(piped.splitlines()) == 12


AGAIN = "; write to another file, or add --overwrite to start it again\n"


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished -o file of each command, with its record, from `BASE[command]`."""
    folder = tmp_path_factory.mktemp("finished")
    source = folder / "in.jsonl"
    source.write_text(jsonl(*[{"prompt": f"Row {i}", "text": f"Row {i} text"} for i in range(4)]))
    outputs = {}
    for command, args in BASE.items():
        out = folder / f"{command}.jsonl"
        result = gpt2(command, "-m", tiny_model_dir, "--jsonl", source, *args, "-o", out)
        assert result.returncode == 0, result.stderr
        outputs[command] = out
    return outputs


BASE = {"generate": ["-t", "4", "--seed", "5"], "score": []}


@pytest.mark.parametrize(
    ("command", "changed", "words"),
    [
        ("generate", ["-t", "5"], "--max-tokens 4, not --max-tokens 5"),
        ("generate", ["--temperature", "0.5"], "--temperature 1, not --temperature 0.5"),
        ("generate", ["--top-k", "0"], "--top-k 5, not --top-k 0"),
        ("generate", ["--top-p", "0.9"], "--top-p 1, not --top-p 0.9"),
        ("generate", ["--seed", "6"], "--seed 5, not --seed 6"),
        ("generate", ["-n", "2"], "-n 1, not -n 2"),
        ("generate", ["--stop", "a b"], "no --stop, not --stop 'a b'"),
        ("generate", ["--ignore-eos"], "no --ignore-eos, not --ignore-eos"),
        ("generate", ["--truncate"], "no --truncate, not --truncate"),
        ("generate", ["--logprobs"], "no --logprobs, not --logprobs"),
        ("score", ["--stride", "3"], "no --stride, not --stride 3"),
        ("score", ["--no-bos"], "no --no-bos, not --no-bos"),
        ("score", ["--tokens"], "no --tokens, not --tokens"),
        ("score", ["--tokens", "--top", "2"], "--top 0 no --tokens, not --top 2 --tokens"),
    ],
)
def test_an_option_that_changes_results_is_refused_naming_both_values(
    tiny_model_dir: Path,
    finished: dict[str, Path],
    tmp_path: Path,
    command: str,
    changed: list[str],
    words: str,
):
    out, record = tmp_path / "out.jsonl", tmp_path / "out.jsonl.gpt2cli.json"
    out.write_bytes(finished[command].read_bytes())
    record.write_bytes(Path(f"{finished[command]}.gpt2cli.json").read_bytes())
    source = finished[command].parent / "in.jsonl"
    args = [command, "-m", tiny_model_dir, "--jsonl", source, *BASE[command], *changed]
    result = gpt2(*args, "-o", out)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"gpt2: error: {out} was made with {words}{AGAIN}"
    assert out.read_bytes() == finished[command].read_bytes()  # untouched, record and all
    assert record.read_bytes() == Path(f"{finished[command]}.gpt2cli.json").read_bytes()


def test_the_issue_case_a_finished_file_of_other_options_is_refused_not_passed_off(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "--jsonl", prompts, "-o", out)
    assert gpt2(*args, "-t", 12, "--seed", 5).returncode == 0
    result = gpt2(*args, "-t", 30, "--seed", 99)
    assert result.returncode == 2
    assert result.stderr == (
        f"gpt2: error: {out} was made with --max-tokens 12 --seed 5, not --max-tokens 30 "
        f"--seed 99{AGAIN}"
    )


def test_a_resume_may_change_only_what_does_not_change_results(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "--jsonl", prompts, "--seed", 3, "-o", out)
    assert gpt2(*args, "--batch-size", 5).returncode == 0
    full = out.read_bytes()
    out.write_bytes(b"".join(full.splitlines(keepends=True)[:4]))  # as if stopped at row 4
    resumed = gpt2(*args, "--batch-size", 1, "--skip-invalid")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == full


def test_overwrite_starts_the_file_again_with_its_new_record(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "--jsonl", prompts, "--seed", 3)
    assert gpt2(*args, "-t", 3, "-o", out).returncode == 0
    result = gpt2(*args, "-t", 4, "-o", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_text() == gpt2(*args, "-t", 4).stdout
    record = json.loads(Path(f"{out}.gpt2cli.json").read_text())
    assert record["command"] == "generate" and record["options"]["max_tokens"] == 4
    assert record["input"] == {
        "name": str(prompts),
        "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
    }
    assert record["model"]["name"] == str(tiny_model_dir) and len(record["model"]["sha256"]) == 64
    assert gpt2(*args, "-t", 4, "-o", out).returncode == 0  # the new record: continued


def test_a_changed_input_is_refused_but_the_same_bytes_on_stdin_are_not(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "-t", 3, "--seed", 3, "-o", out)
    assert gpt2(*args, "--jsonl", prompts).returncode == 0
    assert gpt2(*args, "--jsonl", "-", input=prompts.read_bytes()).returncode == 0
    old = hashlib.sha256(prompts.read_bytes()).hexdigest()[:12]
    with prompts.open("a") as f:
        f.write(jsonl({"prompt": "one more"}))
    new = hashlib.sha256(prompts.read_bytes()).hexdigest()[:12]
    result = gpt2(*args, "--jsonl", prompts)
    assert result.returncode == 2
    assert result.stderr == (
        f"gpt2: error: {out} was made from other contents of {prompts} (sha256 {old}, now "
        f"{new}){AGAIN}"
    )


def test_another_model_is_refused_but_a_copy_of_the_same_files_is_not(
    tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl({"text": "Some words"}, {"text": "More words here"}))
    out = tmp_path / "out.jsonl"
    assert gpt2("score", "-m", tiny_model_dir, "--jsonl", source, "-o", out).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert gpt2("score", "-m", copy, "--jsonl", source, "-o", out).returncode == 0
    other = write_random_gpt2(tmp_path / "other", TINY, seed=1)
    result = gpt2("score", "-m", other, "--jsonl", source, "-o", out)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"gpt2: error: {out} was made with -m {tiny_model_dir} (sha256 "
    )
    assert f", not -m {other} (sha256 " in result.stderr and result.stderr.endswith(AGAIN)


def test_a_file_without_a_record_is_refused_unless_overwritten(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path
):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny_model_dir, "--jsonl", prompts, "-t", 3, "--seed", 3)
    out.write_text(gpt2(*args).stdout)  # what `> out.jsonl` or an older gpt2cli left
    result = gpt2(*args, "-o", out)
    assert result.returncode == 2
    assert result.stderr == (
        f"gpt2: error: {out} has no record of what made it (out.jsonl.gpt2cli.json beside it: "
        f"an older gpt2cli or another program wrote it){AGAIN}"
    )
    assert gpt2(*args, "-o", out, "--overwrite").returncode == 0
    assert gpt2(*args, "-o", out).returncode == 0


def test_overwrite_needs_an_output_file(tiny_model_dir: Path):
    for args in (["--jsonl", "-"], ["--jsonl", "-", "-o", "-"]):
        result = gpt2("generate", "-m", tiny_model_dir, *args, "--overwrite", input=b"\n")
        assert result.returncode == 2
        assert result.stderr.endswith("gpt2: error: --overwrite goes with -o FILE\n")


def test_a_terminal_gets_a_summary_of_rows_written_skipped_and_invalid(
    tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl({"prompt": "a"}, {"prompt": 5}, {"prompt": "b"}, {"prompt": "c"}))
    out = tmp_path / "out.jsonl"
    args = ["generate", "-m", str(tiny_model_dir), "--jsonl", str(source), "--skip-invalid"]
    args += ["-t", "2", "-o", str(out)]
    status, shown, _ = run_on_terminal(args, stream="stderr")
    assert status == 0
    assert f"{out}: 3 rows written, 0 skipped (already there), 1 error (invalid line), in " in shown
    status, shown, _ = run_on_terminal(args, stream="stderr")
    assert f"{out}: 0 rows written, 4 skipped (already there), 0 errors (invalid lines)" in shown


def test_ctrl_c_on_a_terminal_says_how_many_rows_are_kept_and_how_to_continue(
    tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl(*[{"prompt": f"Row {i}"} for i in range(200)]))
    out = tmp_path / "out.jsonl"
    args = ["-m", str(tiny_model_dir), "--jsonl", str(source), "-t", "40", "--ignore-eos"]
    args += ["--batch-size", "1", "-o", str(out)]
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*GPT2, "generate", *args], stdout=subprocess.DEVNULL, stderr=follower
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        shown += _read_terminal(leader, 0.05)
    process.send_signal(signal.SIGINT)
    while chunk := _read_terminal(leader, 30):
        shown += chunk
    os.close(leader)
    assert process.wait(timeout=30) == 130
    kept = out.read_text().count("\n")
    assert 2 <= kept < 200
    assert (
        f"interrupted: {kept} of 200 rows kept in {out}; run the same command to continue"
        in shown.decode()
    )


def _read_terminal(leader: int, timeout: float) -> bytes:
    """What the terminal shows within `timeout` seconds; b"" once the program closed it."""
    ready, _, _ = select.select([leader], [], [], timeout)
    try:
        return os.read(leader, 65536) if ready else b""
    except OSError:  # EIO: the child closed the terminal
        return b""


def test_output_to_dev_stdout_is_a_stream_with_no_record_beside_it(
    tiny_model_dir: Path, tmp_path: Path
):
    """/dev/stdout leads to whatever stdout is (here a regular file): written to as `-` is, so
    no record lands in /dev, and a second run does not read one."""
    record = Path("/dev/stdout.gpt2cli.json")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(jsonl({"prompt": "a"}, {"prompt": "b"}))
    for _ in range(2):
        with open(tmp_path / "out.jsonl", "wb") as out:
            result = subprocess.run(
                [*GPT2, "generate", "-m", tiny_model_dir, "--jsonl", rows, "-o", "/dev/stdout",
                 "-t", "2", "--seed", "1"],
                stdout=out, stderr=subprocess.PIPE, timeout=180,
            )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert not record.exists()
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
