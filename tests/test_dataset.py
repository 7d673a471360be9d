"""gpt2cli.dataset: row checks, per-row options and seeds, batch-independent results, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from gpt2cli import dataset
from gpt2cli.dataset import GenerateTask, OrderedWriter, Row, ScoreTask
from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from tests.compare import assert_same_output


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


def test_rows_of_every_decoding_option_give_the_same_output_for_any_batch_size(model: GPT2):
    options: list[dict[str, object]] = [
        {"temperature": 0, "repetition_penalty": 1.4},
        {"presence_penalty": 1.0, "frequency_penalty": 0.5},
        {"temperature": 0, "no_repeat_ngram": 2, "logit_bias": {"11": 4, "13": -100}},
        {"ban": [" the", "ing"], "min_tokens": 6, "stop": "e"},
        {"min_p": 0.05, "typical_p": 0.8, "top_k": 0},
        {"num_beams": 3, "n": 2, "temperature": 0, "top_k": 0, "no_repeat_ngram": 2},
        {"best_of": 3, "n": 2},
        {"temperature": 0, "prompt_lookup": 3},
    ]
    content = jsonl(
        *[
            {"prompt": f"Row {i}: a b a b" + " c" * i, "max_tokens": 5 + i} | o
            for i, o in enumerate(options)
        ]
    )
    outputs = {
        size: run_all(GenerateTask(GenerationParams(seed=7), batch_size=size), model, content)
        for size in (3, 8)
    }
    assert_same_output(outputs[3], outputs[8])  # a beam's score is a float
    lines = [json.loads(line) for line in outputs[8].splitlines()]
    assert [len(line.get("samples", [line])) for line in lines] == [1, 1, 1, 1, 1, 2, 2, 1]
    assert "score" in lines[5]["samples"][0] and "score" not in lines[6]["samples"][0]


def test_a_row_sets_the_decoding_options_by_their_snake_case_names(model: GPT2):
    sampled = {
        "prompt": "x",
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "no_repeat_ngram": 2,
        "logit_bias": {"50256": -100, "11": 3},
        "ban": "Hello",
        "min_tokens": 2,
        "min_p": 0.1,
        "typical_p": 0.9,
        "best_of": 3,
        "prompt_lookup": 4,
    }
    searched = {
        "prompt": "y",
        "num_beams": 3,
        "n": 2,
        "length_penalty": 0.5,
        "early_stopping": "never",
    }
    rows = dataset.read_rows("input", jsonl(sampled, searched), GenerateTask(), model)
    first, second = (row.work.params for row in rows)
    assert first.logit_bias == ((11, 3.0), (50256, -100.0)) and first.ban == ("Hello",)
    assert (first.presence_penalty, first.frequency_penalty, first.min_p) == (0.5, -1.0, 0.1)
    assert (first.best_of, first.prompt_lookup, first.draws) == (3, 4, 3)
    assert (second.num_beams, second.n, second.early_stopping, second.draws) == (3, 2, "never", 3)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"logit_bias": [[5, 1]]}, '"logit_bias" must be an object {"id": bias}'),
        ({"logit_bias": {"5": True}}, "the logit bias of token 5 must be a number"),
        ({"logit_bias": {"99999": 1}}, "outside the vocabulary"),
        ({"early_stopping": 1}, '"early_stopping" must be true, false or "never"'),
        ({"ban": [""]}, "a banned text must not be empty"),
        ({"ban": 5}, '"ban" must be'),
        ({"min_p": "0.1"}, '"min_p" must be a number'),
        ({"num_beams": 9}, "runs 9 sequences (n, num_beams or best_of) but the batch holds 8"),
        ({"num_beams": 2, "top_p": 0.5}, "top_p is a sampling option"),
        ({"best_of": 1, "n": 2}, "best_of must be at least n (2)"),
    ],
)
def test_a_bad_decoding_field_is_an_invalid_row_naming_it(
    model: GPT2, fields: dict[str, object], says: str
):
    (row,) = dataset.read_rows("input", jsonl({"prompt": "x"} | fields), GenerateTask(), model)
    assert row.error is not None and says in row.error


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


def origin(
    model: GPT2, task: dataset.Task, content: bytes | str = b"", name: str = "in.jsonl"
) -> dataset.Origin:
    data = content.encode() if isinstance(content, str) else content
    return dataset.Origin.of(task, model, "tiny", None, name, data)


def test_the_output_may_not_be_the_input(model: GPT2, tmp_path: Path):
    source = tmp_path / "in.jsonl"
    source.write_text(jsonl({"prompt": "x"}))
    rows = dataset.read_rows(str(source), source.read_text(), GenerateTask(), model)
    made = origin(model, GenerateTask(), source.read_bytes())
    with pytest.raises(GPT2Error, match="is the input file"):
        dataset.open_output(source, str(source), rows, GenerateTask(), made, overwrite=True)
    assert source.read_text() == jsonl({"prompt": "x"})
    assert not dataset.record_path(source).exists()


def test_only_options_that_change_results_make_another_origin(model: GPT2):
    base = GenerationParams(max_tokens=12, seed=5)
    made = origin(model, GenerateTask(base, batch_size=8))
    assert made.mismatch(origin(model, GenerateTask(base, batch_size=1))) is None
    cases = [
        (
            replace(base, max_tokens=30, seed=99),
            False,
            "--max-tokens 12 --seed 5, not --max-tokens 30 --seed 99",
        ),
        (replace(base, seed=None), False, "--seed 5, not without --seed"),
        (replace(base, temperature=0.5), False, "--temperature 1, not --temperature 0.5"),
        (replace(base, stop=("a b", ".")), False, "no --stop, not --stop 'a b' --stop ."),
        (replace(base, n=2), False, "-n 1, not -n 2"),
        (replace(base, ignore_eos=True), False, "no --ignore-eos, not --ignore-eos"),
        (base, True, "no --logprobs, not --logprobs"),
        (
            replace(base, logit_bias=((5, -100.0), (7, 1.5))),
            False,
            "no --logit-bias, not --logit-bias 5=-100 --logit-bias 7=1.5",
        ),
        (
            replace(base, num_beams=2, early_stopping="never"),
            False,
            "--num-beams 1 --early-stopping false, not --num-beams 2 --early-stopping never",
        ),
        (replace(base, ban=("a b",)), False, "no --ban, not --ban 'a b'"),
    ]
    for params, logprobs, words in cases:
        assert made.mismatch(origin(model, GenerateTask(params, logprobs=logprobs))) == (
            f"with {words}"
        )
    scored = origin(model, ScoreTask(batch_size=8))
    assert scored.mismatch(origin(model, ScoreTask(batch_size=2))) is None
    assert scored.mismatch(origin(model, ScoreTask(bos=False, top=2, tokens=True))) == (
        "with no --no-bos --top 0 no --tokens, not --no-bos --top 2 --tokens"
    )
    assert scored.mismatch(made) == "by gpt2 score, not gpt2 generate"


def test_the_input_and_model_are_compared_by_content_not_by_name(
    model: GPT2, tiny_model_dir: Path, tmp_path: Path
):
    task = GenerateTask()
    made = origin(model, task, "rows\n")
    assert made.mismatch(origin(model, task, "rows\n", name="-")) is None  # stdin, same bytes
    was, now = (hashlib.sha256(text).hexdigest()[:12] for text in (b"rows\n", b"rows\nmore\n"))
    assert made.mismatch(origin(model, task, "rows\nmore\n")) == (
        f"from other contents of in.jsonl (sha256 {was}, now {now})"
    )
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert dataset.model_sha256(copy) == dataset.model_sha256(tiny_model_dir)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"layer_norm_epsilon": 1e-6}))
    other = replace(made, model_name=str(copy), model_sha256=dataset.model_sha256(copy))
    assert other.mismatch(made) == (
        f"with -m {copy} (sha256 {other.model_sha256[:12]}), "
        f"not -m tiny (sha256 {str(made.model_sha256)[:12]})"
    )


def test_a_hub_weights_file_is_known_by_its_blob_name_unread(tmp_path: Path):
    blob = "ab" * 32
    blobs = tmp_path / "models--someone--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / blob).write_bytes(b"not even safetensors")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blobs / blob)
    assert dataset._file_sha256(link) == blob
    (tmp_path / "plain").write_bytes(b"abc")
    assert dataset._file_sha256(tmp_path / "plain") == hashlib.sha256(b"abc").hexdigest()


def test_the_record_reads_back_and_an_option_it_lacks_is_its_default(model: GPT2, tmp_path: Path):
    made = origin(model, GenerateTask(GenerationParams(max_tokens=3)), "x")
    out = tmp_path / "out.jsonl"
    dataset.write_record(out, made)
    assert dataset.record_path(out).name == "out.jsonl.gpt2cli.json"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl.gpt2cli.json"]  # no partial left
    record = json.loads(dataset.record_path(out).read_text())
    assert dataset.Origin.from_json(record, "r") == made
    del record["options"]["echo_logprobs"]  # as a version before the option would write it
    assert dataset.Origin.from_json(record, "r").mismatch(made) is None
    record["options"]["max_tokens"] = 4
    assert dataset.Origin.from_json(record, "r").mismatch(made) == (
        "with --max-tokens 4, not --max-tokens 3"
    )
    for broken, problem in [
        ({**record, "format": 2}, "r is of format 2 (gpt2cli '0.1.0')"),
        ({**record, "input": {"name": "x"}}, "r has no 'sha256'"),
        ({**record, "command": 1}, "r: command must be a string, not 1"),
    ]:
        with pytest.raises(GPT2Error, match=re.escape(problem)):
            dataset.Origin.from_json(broken, "r")


def test_open_output_continues_only_the_same_origin_and_overwrite_starts_again(
    model: GPT2, tmp_path: Path
):
    task = GenerateTask(GenerationParams(max_tokens=2, temperature=0))
    content = jsonl(*[{"prompt": f"p {i}"} for i in range(3)])
    rows, full = written_rows(model, task, content)
    made = origin(model, task, content)
    out = tmp_path / "out.jsonl"
    opened = dataset.open_output(out, "in.jsonl", rows, task, made)
    with opened.file:
        opened.file.write(full[: full.index(b"\n") + 1])
    assert (opened.done, opened.resumable) == (0, True)
    assert dataset.Origin.from_json(json.loads(dataset.record_path(out).read_text()), "r") == made
    again = dataset.open_output(out, "in.jsonl", rows, task, made)
    again.file.close()
    assert again.done == 1
    other = origin(model, replace(task, defaults=replace(task.defaults, max_tokens=3)), content)
    with pytest.raises(GPT2Error, match=r"out\.jsonl was made with --max-tokens 2, not --max-to"):
        dataset.open_output(out, "in.jsonl", rows, task, other)
    assert out.read_bytes() == full[: full.index(b"\n") + 1]  # untouched
    fresh = dataset.open_output(out, "in.jsonl", rows, task, other, overwrite=True)
    fresh.file.close()
    assert fresh.done == 0 and out.read_bytes() == b""
    assert json.loads(dataset.record_path(out).read_text())["options"]["max_tokens"] == 3


def test_a_file_without_a_record_is_not_continued(model: GPT2, tmp_path: Path):
    task = GenerateTask(GenerationParams(max_tokens=2, temperature=0))
    rows, full = written_rows(model, task, jsonl({"prompt": "a"}, {"prompt": "b"}))
    out = tmp_path / "out.jsonl"
    out.write_bytes(full)  # as gpt2cli wrote it before records, or `> out.jsonl` did
    made = origin(model, task, "")
    with pytest.raises(GPT2Error, match=r"out\.jsonl has no record of what made it"):
        dataset.open_output(out, "in.jsonl", rows, task, made)
    dataset.record_path(out).write_text("{")
    with pytest.raises(GPT2Error, match=r"its record cannot be used: .* is not valid JSON"):
        dataset.open_output(out, "in.jsonl", rows, task, made)
    assert out.read_bytes() == full
    out.write_bytes(b"")  # empty: nothing to mix with, so it starts with a record
    dataset.open_output(out, "in.jsonl", rows, task, made).file.close()
    assert dataset.Origin.from_json(json.loads(dataset.record_path(out).read_text()), "r") == made


def test_a_device_gets_rows_but_no_record(model: GPT2, tmp_path: Path):
    task = GenerateTask()
    rows = dataset.read_rows("in", jsonl({"prompt": "a"}), task, model)
    opened = dataset.open_output(Path(os.devnull), "in", rows, task, origin(model, task))
    opened.file.close()
    assert (opened.done, opened.resumable) == (0, False)
    assert not dataset.record_path(Path(os.devnull)).exists()


def test_the_summary_counts_rows_written_skipped_and_invalid():
    rows = [Row(i, {}, work="x", error="bad" if i == 3 else None) for i in range(6)]
    assert dataset.summary(rows, 2, 6, 3.21, "out.jsonl") == (
        "out.jsonl: 3 rows written, 2 skipped (already there), 1 error (invalid line), in 3.2 s"
    )
    assert dataset.summary(rows, 6, 6, 125, "out.jsonl").endswith(
        ": 0 rows written, 6 skipped (already there), 0 errors (invalid lines), in 2 min 05 s"
    )
    assert dataset.interrupted(4, 6, "out.jsonl", resumable=True) == (
        "interrupted: 4 of 6 rows kept in out.jsonl; run the same command to continue"
    )
    assert dataset.interrupted(4, 6, "stdout", resumable=False) == (
        "interrupted: 4 of 6 rows written to stdout"
    )
