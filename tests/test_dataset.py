"""gpt2cli.dataset: row checks, per-row options and seeds, batch-independent results, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gpt2cli import dataset
from gpt2cli.dataset import GenerateTask, OrderedWriter, Row, ScoreTask
from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def mixed_prompts(count: int = 14) -> str:
    """Greedy and seeded rows of mixed prompt lengths and budgets."""
    rows: list[dict[str, object]] = []
    for i in range(count):
        row: dict[str, object] = {"prompt": f"Row {i}:" + " and so on" * (i % 5), "id": i}
        row["max_tokens"] = 3 + (i * 5) % 11
        if i % 3 == 0:
            row["temperature"] = 0
        rows.append(row)
    return jsonl(*rows)


def run_all(task: dataset.Task, model: GPT2, content: str) -> bytes:
    rows = dataset.read_rows("input", content, task, model)
    out = io.BytesIO()
    dataset.run(task, model, rows, OrderedWriter(out.write))
    return out.getvalue()


def test_invalid_lines_carry_their_line_number_and_reason(model: GPT2):
    content = "\n".join(
        [
            json.dumps({"prompt": "fine"}),
            "not json",
            "[1, 2]",
            json.dumps({"text": "no prompt"}),
            "",  # blank: skipped, not a row
            json.dumps({"prompt": "x", "temperature": -1}),
            json.dumps({"prompt": "x", "top_k": 1.5}),
            json.dumps({"prompt": "x", "stop": ["ok", ""]}),
            json.dumps({"prompt": "x", "n": 9}),
            json.dumps({"prompt": "x", "seed": 2**64}),
            json.dumps({"prompt": "x", "ignore_eos": "yes"}),
            json.dumps({"prompt": "\ud800"}),
            json.dumps({"prompt": "x", "note": float("nan")}),
            json.dumps({"prompt": "word " * 200}),  # over the tiny model's 128-token context
            json.dumps({"prompt": "x", "temperature": 10**400}),
        ]
    )
    rows = dataset.read_rows("in.jsonl", content, GenerateTask(batch_size=8), model)
    assert [r.index for r in rows] == [0, 1, 2, 3, *range(5, 15)]
    assert rows[0].error is None
    errors = [r.error or "" for r in rows[1:]]
    assert all(
        e.startswith(f"in.jsonl line {r.index + 1}") for e, r in zip(errors, rows[1:], strict=True)
    )
    for error, words in zip(
        errors,
        [
            "not valid JSON",
            "must be a JSON object",
            "has no 'prompt'",
            "temperature must be",
            "must be an integer",
            "must not be empty",
            "batch holds 8 rows",
            "must be an integer",
            "true or false",
            "lone surrogate",
            "NaN",
            "context is 128 tokens",
            "is too large",
        ],
        strict=True,
    ):
        assert words in error


def test_a_line_that_is_not_utf8_is_an_invalid_row_and_the_others_are_read(model: GPT2):
    bad = b'{"prompt": "caf\xe9"}'  # Latin-1, as a legacy editor writes it
    cut = b'{"prompt": "x", "note": "\xe2\x82"}'  # a character cut short by the line's end
    content = b"\n".join(
        [
            b"\xef\xbb\xbf" + jsonl({"prompt": "first"}).strip().encode(),  # byte order mark
            bad,
            b"",
            jsonl({"prompt": "caf\u00e9 \u20ac"}).strip().encode(),
            cut,
            b"\xff" * 100_000,  # a long line that is nothing but bad bytes
            jsonl({"prompt": "last"}).encode(),
        ]
    )
    rows = dataset.read_rows("in.jsonl", content, GenerateTask(), model)
    assert [r.index for r in rows] == [0, 1, 3, 4, 5, 6]
    assert [r.error for r in rows] == [
        None,
        "in.jsonl line 2 is not valid UTF-8: byte 0xe9 at offset 15",
        None,
        "in.jsonl line 5 is not valid UTF-8: byte 0xe2 at offset 25",
        "in.jsonl line 6 is not valid UTF-8: byte 0xff at offset 0",
        None,
    ]
    valid = [r for r in rows if r.error is None]
    text = content.replace(bad, b"").replace(cut, b"").replace(b"\xff", b"").decode()
    assert [(r.index, r.work) for r in valid] == [
        (r.index, r.work) for r in dataset.read_rows("in.jsonl", text, GenerateTask(), model)
    ]  # the bytes of the valid lines read as their text does, byte order mark skipped alike
    with pytest.raises(dataset.InvalidRows) as refused:
        dataset.check_rows(rows, "in.jsonl", skip_invalid=False)
    assert refused.value.problems == [rows[1].error, rows[3].error, rows[4].error]
    assert "3 invalid line(s) of 6;" in str(refused.value)


def test_an_error_object_is_utf8_when_the_file_name_is_not(model: GPT2):
    name = b"in\xff.jsonl".decode("utf-8", "surrogateescape")  # as Python keeps such a name
    [row] = dataset.read_rows(name, jsonl({"prompt": 1}), GenerateTask(), model)
    error = json.loads(dataset.error_line(row).encode("utf-8"))["error"]
    assert error == 'in\\xff.jsonl line 1 "prompt" must be a string, not 1'


def test_check_rows_names_the_first_ten_and_refuses_unless_skipping(model: GPT2):
    content = jsonl(*[{"prompt": 1}] * 12, {"prompt": "ok"})
    rows = dataset.read_rows("-", content, GenerateTask(), model)
    with pytest.raises(dataset.InvalidRows) as refused:
        dataset.check_rows(rows, "-", skip_invalid=False)
    assert len(refused.value.problems) == 10
    assert refused.value.problems[0].startswith("stdin line 1 ")
    assert "12 invalid line(s) of 13, the first 10 above; nothing was run" in str(refused.value)
    dataset.check_rows(rows, "-", skip_invalid=True)


def test_skipped_rows_become_error_lines_in_place(model: GPT2):
    out = run_all(GenerateTask(GenerationParams(max_tokens=2)), model, jsonl({"prompt": "a"}, 7))
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first["index"] == 0 and len(first["ids"]) == 2
    assert second == {"index": 1, "error": "input line 2 must be a JSON object, not 7"}


def test_row_fields_override_defaults_and_options_are_not_passed_through(model: GPT2):
    task = GenerateTask(GenerationParams(max_tokens=5, temperature=0.0, stop=("zzz",)))
    content = jsonl({"prompt": "Hi", "max_tokens": 2, "stop": "q", "index": 99, "tag": [1]})
    [row] = dataset.read_rows("x", content, task, model)
    assert row.work.params == GenerationParams(max_tokens=2, temperature=0.0, stop=("q",))
    assert row.fields == {"tag": [1]}  # options and our own `index` are not passed through
    [line] = [json.loads(x) for x in run_all(task, model, content).splitlines()]
    assert list(line) == ["index", "tag", "text", "ids", "prompt_ids", "finish_reason"]
    assert line["index"] == 0 and len(line["ids"]) == 2


def test_a_row_without_a_seed_is_seeded_from_the_command_line_seed_and_its_index(model: GPT2):
    assert dataset.row_seed(5, 3, 7) == 5
    assert dataset.row_seed(None, 3, 7) == 3 * 2**64 + 7
    assert dataset.row_seed(None, None, 7) is None
    task = GenerateTask(GenerationParams(max_tokens=6, seed=3))
    lines = run_all(task, model, jsonl({"prompt": "a"}, {"prompt": "Once upon"})).splitlines()
    alone = Generation(
        model,
        model.tokenizer.encode("Once upon"),
        GenerationParams(max_tokens=6, seed=3 * 2**64 + 1),
    )
    list(alone)
    assert json.loads(lines[1])["ids"] == alone.samples[0].ids


def test_generate_output_is_the_same_bytes_for_any_batch_size(model: GPT2):
    content = mixed_prompts()
    outputs = {
        size: run_all(GenerateTask(GenerationParams(seed=11), batch_size=size), model, content)
        for size in (1, 3, 8)
    }
    assert outputs[1] == outputs[3] == outputs[8]
    lines = [json.loads(line) for line in outputs[8].splitlines()]
    assert [line["index"] for line in lines] == list(range(14))
    assert [len(line["ids"]) for line in lines] == [3 + (i * 5) % 11 for i in range(14)]


def test_a_row_with_several_samples_lists_them_after_its_prompt_ids(model: GPT2):
    task = GenerateTask(GenerationParams(max_tokens=4, seed=1), batch_size=3)
    content = jsonl({"prompt": "a", "n": 3}, {"prompt": "b"}, {"prompt": "c", "n": 2})
    first, second, third = [json.loads(x) for x in run_all(task, model, content).splitlines()]
    assert list(first) == ["index", "prompt_ids", "samples"]
    assert [list(s) for s in first["samples"]] == [["text", "ids", "finish_reason"]] * 3
    assert "samples" not in second and len(third["samples"]) == 2


def test_logprobs_are_added_on_request(model: GPT2):
    task = GenerateTask(GenerationParams(max_tokens=3), logprobs=True)
    [line] = [json.loads(x) for x in run_all(task, model, jsonl({"prompt": "a"})).splitlines()]
    assert len(line["logprobs"]) == 3 and all(lp <= 0 for lp in line["logprobs"])


def test_score_rows_are_grouped_in_input_order_and_keep_their_fields(model: GPT2):
    content = jsonl(*[{"text": "word " * (1 + i % 4), "k": i} for i in range(7)])
    lines = [json.loads(x) for x in run_all(ScoreTask(batch_size=3), model, content).splitlines()]
    assert [(x["index"], x["k"]) for x in lines] == [(i, i) for i in range(7)]
    assert [x["n_bytes"] for x in lines] == [5 * (1 + i % 4) for i in range(7)]
    assert run_all(ScoreTask(batch_size=3), model, content) == run_all(
        ScoreTask(batch_size=3), model, content
    )


def test_ordered_writer_holds_a_result_until_those_before_it_are_written():
    out = io.BytesIO()
    writer = OrderedWriter(out.write, start=2)
    writer.put(3, "three\n")
    assert out.getvalue() == b""
    writer.put(2, "two\n")
    writer.put(4, "four\n")
    assert out.getvalue() == b"two\nthree\nfour\n" and writer.next == 5


def written_rows(model: GPT2, task: dataset.Task, content: bytes | str) -> tuple[list[Row], bytes]:
    rows = dataset.read_rows("in", content, task, model)
    out = io.BytesIO()
    dataset.run(task, model, rows, OrderedWriter(out.write))
    return rows, out.getvalue()


def test_resume_counts_written_rows_and_cuts_a_torn_last_line(model: GPT2, tmp_path: Path):
    task = GenerateTask(GenerationParams(max_tokens=3, temperature=0), batch_size=2)
    rows, full = written_rows(model, task, jsonl(*[{"prompt": f"p {i}"} for i in range(5)]))
    lines = full.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:2]) + lines[2][:9])
    assert dataset.resume(out, rows, task) == 2
    assert out.read_bytes() == b"".join(lines[:2])  # the torn line is gone
    out.write_bytes(full)
    assert dataset.resume(out, rows, task) == 5
    assert dataset.resume(tmp_path / "missing.jsonl", rows, task) == 0


def test_resume_compares_passed_fields_but_not_those_a_result_replaces(model: GPT2, tmp_path: Path):
    task = GenerateTask(GenerationParams(max_tokens=2, temperature=0))
    content = jsonl({"prompt": "a", "text": "mine", "id": 1}, {"prompt": "b", "id": 2})
    rows, full = written_rows(model, task, content)
    assert json.loads(full.splitlines()[0])["text"] != "mine"  # the result's text won
    out = tmp_path / "out.jsonl"
    out.write_bytes(full)
    assert dataset.resume(out, rows, task) == 2
    other = dataset.read_rows("in", content.replace('"id": 2', '"id": 3'), task, model)
    with pytest.raises(GPT2Error, match="its 'id' is not the row's"):
        dataset.resume(out, other, task)


def test_resume_takes_a_line_that_is_not_utf8_as_any_invalid_row(model: GPT2, tmp_path: Path):
    task = GenerateTask(GenerationParams(max_tokens=2, temperature=0))
    content = b'{"prompt": "a"}\n{"prompt": "\xff"}\n{"prompt": "b"}\n'
    rows, full = written_rows(model, task, content)
    lines = full.splitlines(keepends=True)
    assert json.loads(lines[1]) == {
        "index": 1,
        "error": "in line 2 is not valid UTF-8: byte 0xff at offset 12",
    }
    out = tmp_path / "out.jsonl"
    for kept in (1, 2, 3):
        out.write_bytes(b"".join(lines[:kept]) + b'{"ind')
        assert dataset.resume(out, rows, task) == kept
    fixed = dataset.read_rows("in", content.replace(b"\xff", b"c"), task, model)
    with pytest.raises(GPT2Error, match="one is an error, the other not"):
        dataset.resume(out, fixed, task)  # the line was mended since: its error is not its result


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (jsonl(*[{"prompt": f"other {i}"} for i in range(5)]), "prompt_ids are not the tokens"),
        ("\n" + jsonl(*[{"prompt": f"p {i}"} for i in range(5)]), "index differs"),
        (jsonl(*[{"prompt": f"p {i}"} for i in range(2)]), "more lines than the input has rows"),
    ],
)
def test_resume_refuses_another_inputs_results(
    model: GPT2, tmp_path: Path, content: str, problem: str
):
    task = GenerateTask(GenerationParams(max_tokens=2, temperature=0))
    _, full = written_rows(model, task, jsonl(*[{"prompt": f"p {i}"} for i in range(5)]))
    out = tmp_path / "out.jsonl"
    out.write_bytes(full)
    rows = dataset.read_rows("in", content, task, model)
    with pytest.raises(GPT2Error, match=problem):
        dataset.resume(out, rows, task)
    assert out.read_bytes() == full  # left as it was


def test_resume_of_scores_compares_the_texts_sizes_and_fields(model: GPT2, tmp_path: Path):
    task = ScoreTask()
    rows, full = written_rows(model, task, jsonl({"text": "abc", "k": 1}, {"text": "de f"}))
    out = tmp_path / "scores.jsonl"
    out.write_bytes(full)
    assert dataset.resume(out, rows, task) == 2
    for other in (jsonl({"text": "abcd", "k": 1}), jsonl({"text": "abc", "k": 2})):
        with pytest.raises(GPT2Error, match="is not the result of input line 1"):
            dataset.resume(out, dataset.read_rows("in", other, task, model), task)


def test_the_output_may_not_be_the_input(model: GPT2, tmp_path: Path):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl({"prompt": "x"}))
    rows = dataset.read_rows(str(source), source.read_text(), GenerateTask(), model)
    with pytest.raises(GPT2Error, match="is the input file"):
        dataset.open_output(source, str(source), rows, GenerateTask())
    assert source.read_text() == jsonl({"prompt": "x"})
