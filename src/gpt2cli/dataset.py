"""Data sets: JSON Lines of prompts or texts, checked first, run in batches, written in order.

`gpt2 generate --jsonl` and `gpt2 score --jsonl` read one JSON object per line. `read_rows` checks
every line before any model work (a line that is not UTF-8, a row that is not an object, lacks its
string field or has a bad option is an invalid `Row` carrying its error). A task (`GenerateTask`,
`ScoreTask`) turns valid rows into result lines: the same pure function on whatever engine runs it
(`run_local` here, `gpt2cli.ray_engine` on a Ray cluster), so the output does not depend on the
engine. `run` writes the results of the rows an output file does not hold yet (`resume` counts and
checks those it does) through an `OrderedWriter`: input order, one flushed line at a time, so a
crash loses only the rows in flight.

Generate's output lines hold its `--json` fields without `timings`, and without `logprobs` unless
asked for, so its files from any batch size or engine compare byte for byte. Floats (scores,
logprobs) are sums whose last digits depend on the batch's shape and BLAS's threads: across
engines, batch sizes and resumes they agree within 1e-4, and every other field is identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar, NamedTuple, Protocol

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error, WriteError
from gpt2cli.inputs import decode_utf8, printable
from gpt2cli.params import GenerationParams, ParamError

if TYPE_CHECKING:
    from gpt2cli.model import GPT2
    from gpt2cli.scheduler import Request, RequestState

SHOWN_ERRORS = 10  # invalid lines named before a run is refused
SEED_STRIDE = 2**64  # a row without a seed, under --seed S, uses seed S * SEED_STRIDE + index


class InvalidRows(GPT2Error):
    """Some input lines are invalid and --skip-invalid was not given; nothing was run.

    `problems` holds one message per invalid line, the first SHOWN_ERRORS of them.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class Row:
    """One non-blank input line: its 0-based line number, the fields passed through to its
    result, and what a task runs (a `Prompt`, or a text to score), or why it is invalid."""

    index: int
    fields: dict[str, Any]
    work: Any = None
    error: str | None = None


class Result(NamedTuple):
    """One row's result: its position in the rows given to the task, the output line, and the
    tokens it took (generated or scored), for the progress display."""

    position: int
    line: str
    tokens: int


class Task(Protocol):
    """What a data-set job does with each row; picklable, so that Ray actors run it too."""

    key: ClassVar[str]  # the input field holding the work: "prompt" or "text"
    options: ClassVar[tuple[str, ...]]  # the input fields that are options, not passed through
    results: ClassVar[tuple[str, ...]]  # the output fields a result sets (over passed-through ones)

    @property
    def batch_size(self) -> int:
        """Rows per batch; an engine that splits the rows splits them in whole batches."""
        ...

    def parse(self, row: dict[str, Any], index: int, where: str, model: GPT2) -> Any:
        """The work of a valid row (its other fields pass through), or a GPT2Error."""
        ...

    def run(self, model: GPT2, rows: Sequence[Row]) -> Iterator[Result]:
        """The results of valid rows, in any order (`Result.position` says whose)."""
        ...

    def mismatch(self, row: Row, written: dict[str, Any]) -> str | None:
        """Why `written` (a line of an earlier run's output) is not `row`'s result, or None."""
        ...


# the generation options a row may set (as `gpt2 generate`'s options, -n as "n"), then its flags
GENERATE_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "n", "stop")
GENERATE_FLAGS = ("ignore_eos", "truncate")


@dataclass(frozen=True)
class Prompt:
    """A valid generate row's work: its prompt's ids and its options, seed already derived."""

    prompt_ids: list[int]
    params: GenerationParams

    def request(self) -> Request:
        """The scheduler request for this prompt."""
        from gpt2cli.scheduler import Request

        return Request(self.prompt_ids, self.params)


def row_seed(row: int | None, command_line: int | None, index: int) -> int | None:
    """The seed of the row on input line `index` (from 0): its own `seed` field if it has one,
    else `command_line * 2**64 + index` when --seed was given (a distinct stream per row and per
    --seed, which `gpt2 generate --seed` reproduces), else None (fresh randomness)."""
    if row is not None:
        return row
    return None if command_line is None else command_line * SEED_STRIDE + index


@dataclass(frozen=True)
class GenerateTask:
    """`gpt2 generate --jsonl`: each row's prompt continued, `batch_size` rows decoding at once
    (continuous batching: a finished row's place goes to the next one at once)."""

    defaults: GenerationParams = field(default_factory=GenerationParams)
    batch_size: int = 8
    logprobs: bool = False
    key: ClassVar[str] = "prompt"
    options: ClassVar[tuple[str, ...]] = (*GENERATE_FIELDS, *GENERATE_FLAGS)
    results: ClassVar[tuple[str, ...]] = (
        "text", "ids", "prompt_ids", "finish_reason", "logprobs", "samples",
    )  # fmt: skip

    def parse(self, row: dict[str, Any], index: int, where: str, model: GPT2) -> Prompt:
        """The row's prompt ids and options, checked as the scheduler will run them."""
        from gpt2cli.scheduler import prepare

        prompt = _text(jsonfile.field(row, "prompt", where), f'{where} "prompt"')
        params = _row_params(self.defaults, row, where)
        own = params.seed if "seed" in row else None
        params = replace(params, seed=row_seed(own, self.defaults.seed, index))
        if params.n > self.batch_size:
            raise GPT2Error(
                f'{where} "n" is {params.n} but the batch holds {self.batch_size} rows '
                "(--batch-size): a row's samples run in one batch"
            )
        work = Prompt(model.tokenizer.encode(prompt), params)
        try:
            prepare(model, work.request())  # the scheduler's own checks (length, ids)
        except GPT2Error as e:
            raise GPT2Error(f"{where}: {e}") from None
        return work

    def run(self, model: GPT2, rows: Sequence[Row]) -> Iterator[Result]:
        """Decode the rows `batch_size` at a time, admitting the next as soon as one finishes."""
        from gpt2cli.scheduler import FailedEvent, Scheduler, TokenEvent

        if not rows:
            return
        # no more rows than the rows' samples could fill: a huge --batch-size costs nothing
        size = min(self.batch_size, sum(row.work.params.n for row in rows))
        scheduler = Scheduler(model, max_batch=size)
        left = {scheduler.submit(row.work.request()): (p, row) for p, row in enumerate(rows)}
        for event in scheduler.run():
            if isinstance(event, FailedEvent):
                raise event.error
            if isinstance(event, TokenEvent) and event.state.finished and event.state in left:
                position, row = left.pop(event.state)  # at its last sample's last token
                tokens = sum(len(s.ids) for s in event.state.samples)
                yield Result(position, self.line(row, event.state), tokens)

    def line(self, row: Row, state: RequestState) -> str:
        """The output line of a finished row: index, passed-through fields, then the sample's
        `--json` fields (no timings), or `prompt_ids` and a list `samples` when n > 1."""
        kept = ["text", "ids", "prompt_ids", "finish_reason"] + (["logprobs"] * self.logprobs)
        samples = [{k: s.to_json()[k] for k in kept} for s in state.samples]
        result = samples[0]
        if len(samples) > 1:
            kept.remove("prompt_ids")
            result = {
                "prompt_ids": state.prompt_ids,
                "samples": [{k: sample[k] for k in kept} for sample in samples],
            }
        return _json_line({"index": row.index} | row.fields | result)

    def mismatch(self, row: Row, written: dict[str, Any]) -> str | None:
        """Compared: the passed-through fields and the prompt's ids (all of them, or their end
        when the prompt was truncated)."""
        ids = written.get("prompt_ids")
        if not (isinstance(ids, list) and ids and row.work.prompt_ids[-len(ids) :] == ids):
            return "its prompt_ids are not the tokens of the row's prompt"
        return _fields_mismatch(row, written, self.results)


@dataclass(frozen=True)
class ScoreTask:
    """`gpt2 score --jsonl`: each row's text scored, `batch_size` rows per padded batch (rows
    grouped in input order, so every engine runs the same batches)."""

    batch_size: int = 8
    stride: int | None = None
    bos: bool = True
    top: int = 0
    tokens: bool = False
    key: ClassVar[str] = "text"
    options: ClassVar[tuple[str, ...]] = ()
    results: ClassVar[tuple[str, ...]] = (  # TextScore.totals()' keys, and --tokens' list
        *("n_tokens", "n_bytes", "n_words", "nll", "mean_nll", "nll_stderr", "perplexity"),
        *("bits_per_byte", "byte_perplexity", "word_perplexity", "tokens"),
    )

    def parse(self, row: dict[str, Any], index: int, where: str, model: GPT2) -> str:
        """The row's text, checked to have something to score."""
        from gpt2cli.score import scoring_ids

        text = _text(jsonfile.field(row, "text", where), f'{where} "text"')
        scoring_ids(model, text, bos=self.bos, name=where)
        return text

    def run(self, model: GPT2, rows: Sequence[Row]) -> Iterator[Result]:
        """Score the rows `batch_size` at a time, in order."""
        from gpt2cli.score import score_json, score_texts

        for start in range(0, len(rows), self.batch_size):
            group = rows[start : start + self.batch_size]
            scores = score_texts(
                model, [r.work for r in group], stride=self.stride, bos=self.bos, top=self.top
            )
            for position, (row, s) in enumerate(zip(group, scores, strict=True), start):
                first = {"index": row.index} | row.fields
                line = score_json(s, model.tokenizer, tokens=self.tokens, first=first)
                yield Result(position, line, s.n_tokens)

    def mismatch(self, row: Row, written: dict[str, Any]) -> str | None:
        """Compared: the passed-through fields and the text's bytes and words (counted as
        `TextScore.n_words` counts them)."""
        text = row.work
        if [written.get("n_bytes"), written.get("n_words")] != [
            len(text.encode("utf-8")),
            len(re.split(r"\s+", text)),
        ]:
            return "its n_bytes or n_words differ from the row's text"
        return _fields_mismatch(row, written, self.results)


def _text(value: Any, where: str) -> str:
    """A JSON string that UTF-8 can carry (no lone surrogate such as "\\ud800")."""
    text = jsonfile.string(value, where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GPT2Error(f"{where} holds a lone surrogate (\\udXXX), which is not text") from None
    return text


def _row_params(defaults: GenerationParams, row: dict[str, Any], where: str) -> GenerationParams:
    """`defaults` with the options the row sets: their JSON types checked here, their values by
    `GenerationParams` (a GPT2Error names the field)."""
    changes: dict[str, Any] = {}
    for name in (*GENERATE_FIELDS, *GENERATE_FLAGS):
        if name not in row:
            continue
        value, at = row[name], f'{where} "{name}"'
        if name in ("temperature", "top_p"):
            changes[name] = _number(value, at)
        elif name == "stop":
            stops = [value] if isinstance(value, str) else jsonfile.array(value, at)
            changes[name] = tuple(_text(s, at) for s in stops)
        elif name in GENERATE_FLAGS:
            if not isinstance(value, bool):
                raise GPT2Error(f"{at} must be true or false, not {jsonfile.show(value)}")
            changes[name] = value
        else:
            changes[name] = jsonfile.integer(value, at)
    try:
        return replace(defaults, **changes)
    except ParamError as e:
        raise GPT2Error(f"{where}: {e}") from None


def _number(value: Any, where: str) -> float:
    """A JSON number (not a bool) as a float; its range is the option's to check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GPT2Error(f"{where} must be a number, not {jsonfile.show(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise GPT2Error(f"{where} is too large, {jsonfile.show(value)}") from None


def _fields_mismatch(row: Row, written: dict[str, Any], results: Sequence[str]) -> str | None:
    """Why the passed-through fields of `written` are not the row's, or None (a field named like
    a result field is the result's, so it is not compared)."""
    for key, value in row.fields.items():
        if key not in results and (key not in written or written[key] != value):
            return f"its {key!r} is not the row's"
    return None


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"


def error_line(row: Row) -> str:
    """The output line of an invalid row under --skip-invalid: its index and error."""
    return _json_line({"index": row.index, "error": row.error})


def read_rows(name: str, content: bytes | str, task: Task, model: GPT2) -> list[Row]:
    """Every non-blank line of a JSON Lines input, checked by `task` (blank lines are skipped;
    `Row.index` is the line's number from 0). Invalid lines are rows with an error.

    `content` is the input as read (each line decoded as strict UTF-8 on its own, so a byte that
    is not UTF-8 makes only its line invalid) or as text.
    """
    where = "stdin" if name == "-" else printable(name)  # in error objects, which are UTF-8
    rows = []
    for index, line in enumerate(_lines(content)):
        line_name = f"{where} line {index + 1}"
        try:
            text = decode_utf8(line, line_name) if isinstance(line, bytes) else line
            if text.strip():
                rows.append(_row(text, index, line_name, task, model))
        except GPT2Error as e:
            rows.append(Row(index, {}, error=str(e)))
    if not rows:
        raise GPT2Error(f"{where}: no JSON lines")
    return rows


def _lines(content: bytes | str) -> Iterator[bytes | str]:
    """The lines of `content` (as `split("\\n")` gives them), after a UTF-8 byte order mark at
    its start (as some editors write)."""
    if isinstance(content, bytes):
        return _split(content, b"\n", b"\xef\xbb\xbf")
    return _split(content, "\n", "\ufeff")


def _split(content: AnyStr, newline: AnyStr, mark: AnyStr) -> Iterator[AnyStr]:
    """`content`'s lines one at a time (no list of them all: a huge input is not held twice)."""
    start = len(mark) if content.startswith(mark) else 0
    while (end := content.find(newline, start)) >= 0:
        yield content[start:end]
        start = end + 1
    yield content[start:]


def _row(line: str, index: int, where: str, task: Task, model: GPT2) -> Row:
    """The row of non-blank line `line`, or a GPT2Error saying why it is invalid."""
    obj = jsonfile.mapping(jsonfile.parse(line, where), where)
    dropped = (task.key, "index", *task.options)
    fields = {k: v for k, v in obj.items() if k not in dropped}
    _check_json(fields, where)
    return Row(index, fields, task.parse(obj, index, where, model))


def _check_json(fields: dict[str, Any], where: str) -> None:
    """Fields that JSON output can carry (no NaN or Infinity, no lone surrogate)."""
    try:
        json.dumps(fields, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError:  # UnicodeEncodeError included
        raise GPT2Error(
            f"{where}: holds NaN, Infinity or a lone surrogate (\\udXXX), which JSON output "
            "cannot carry"
        ) from None


def check_rows(rows: Sequence[Row], name: str, *, skip_invalid: bool) -> None:
    """Refuse the run (InvalidRows naming the first SHOWN_ERRORS lines) if any row is invalid,
    unless `skip_invalid`."""
    bad = [row.error for row in rows if row.error is not None]
    if bad and not skip_invalid:
        where = "stdin" if name == "-" else name
        shown = "" if len(bad) <= SHOWN_ERRORS else f", the first {SHOWN_ERRORS} above"
        raise InvalidRows(
            f"{where}: {len(bad)} invalid line(s) of {len(rows)}{shown}; nothing was run "
            "(--skip-invalid runs the others and writes an error object for these)",
            [e for e in bad[:SHOWN_ERRORS] if e],
        )


def resume(path: Path, rows: Sequence[Row], task: Task) -> int:
    """How many rows the output file `path` already holds the results of (0 if it is missing or
    empty), after checking that they are results of these rows, in order.

    A last line without its newline (a crash while writing it) is cut off, to be written again.
    A file that holds anything else (another input's results, other text) is a GPT2Error: it is
    left as it is.
    """
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below; r+ to cut a torn last line
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise GPT2Error(f"{path}: cannot open it ({e.strerror})") from None
    with f:
        done, good = 0, 0  # good: bytes of complete lines
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # torn: the run writing it was killed
            where = f"{path} line {number}"
            if done >= len(rows):
                raise GPT2Error(f"{path} holds more lines than the input has rows: " + _ANOTHER)
            written = jsonfile.parse(raw, where)
            problem = _written_mismatch(rows[done], written, task)
            if problem:
                raise GPT2Error(
                    f"{where} is not the result of input line {rows[done].index + 1} "
                    f"({problem}): " + _ANOTHER
                )
            done, good = done + 1, good + len(raw)
        f.truncate(good)
    return done


_ANOTHER = "it holds other results; write to another file, or remove it to start again"


def _written_mismatch(row: Row, written: Any, task: Task) -> str | None:
    if not isinstance(written, dict) or written.get("index") != row.index:
        return "its index differs"
    if (row.error is None) == ("error" in written):
        return "one is an error, the other not"
    return None if row.error is not None else task.mismatch(row, written)


class OrderedWriter:
    """Writes result lines in input order, each as soon as those before it are written.

    `put(position, line)` takes results in any order; lines wait only for an earlier one still
    running. `write` gets each line's bytes once and must write them all (and flush).
    """

    def __init__(self, write: Callable[[bytes], None], start: int = 0) -> None:
        self._write = write
        self.next = start  # position of the next line to write
        self._held: dict[int, str] = {}

    def put(self, position: int, line: str) -> None:
        """Take the result at `position`; write it and any held ones that follow it."""
        self._held[position] = line
        while self.next in self._held:
            self._write(self._held.pop(self.next).encode("utf-8"))
            self.next += 1


def file_writer(f: Any, path: Path) -> Callable[[bytes], None]:
    """A write function for OrderedWriter that writes to unbuffered binary file `f`, all of it,
    at once (the OS has it when it returns); failures name `path`."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[f.write(view) :]
        except OSError as e:
            raise WriteError(f"{path}: cannot write it ({e.strerror})") from None

    return write


Runner = Callable[[Task, "GPT2", Sequence[Row]], Iterator[Result]]


def run_local(task: Task, model: GPT2, rows: Sequence[Row]) -> Iterator[Result]:
    """The local engine: the task's own batches, in this process."""
    return task.run(model, rows)


def run(
    task: Task,
    model: GPT2,
    rows: Sequence[Row],
    writer: OrderedWriter,
    *,
    engine: Runner = run_local,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the rows from `writer.next` on with `engine`, writing every result in input order:
    an invalid row's error line at once, the others as they finish. `progress(rows, tokens)`,
    if given, is called with each row written or finished."""
    pending = range(writer.next, len(rows))
    work = [p for p in pending if rows[p].error is None]
    for position in pending:
        if rows[position].error is not None:
            writer.put(position, error_line(rows[position]))
    for result in engine(task, model, [rows[p] for p in work]):
        writer.put(work[result.position], result.line)
        if progress is not None:
            progress(1, result.tokens)


@contextlib.contextmanager
def row_progress(total: int, done: int, what: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(rows, tokens)` callback that, when stderr is a terminal, draws rows done of
    `total` (counting `done` already there), rows/s, tokens/s and the time left."""
    from gpt2cli.output import progress_bar

    rates = "rows, {task.fields[rows_s]:.2f} rows/s, {task.fields[tokens_s]:,.0f} tokens/s"
    start, counts = time.perf_counter(), [0, 0]
    with progress_bar(what, rates) as bar:
        if bar is None:
            yield lambda rows, tokens: None
            return
        task = bar.add_task(what, total=total, completed=done, rows_s=0.0, tokens_s=0.0)

        def update(rows: int, tokens: int) -> None:
            counts[0] += rows
            counts[1] += tokens
            elapsed = max(time.perf_counter() - start, 1e-9)
            rows_s, tokens_s = counts[0] / elapsed, counts[1] / elapsed
            bar.update(task, advance=rows, rows_s=rows_s, tokens_s=tokens_s)

        yield update


def open_output(path: Path, input_name: str, rows: Sequence[Row], task: Task) -> tuple[Any, int]:
    """`path` opened to append results (unbuffered), and how many rows it already holds the
    results of (see `resume`; only a regular file is resumed, a device or pipe is written to).
    Refused when it is the input file itself; opening never waits for a pipe's reader."""
    if input_name != "-":
        with contextlib.suppress(OSError):
            if os.path.samefile(path, input_name):
                raise GPT2Error(f"{path} is the input file; write the results to another file")
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as e:  # a name too long to look up
        raise GPT2Error(f"{path}: cannot write it ({e.strerror})") from None
    if is_dir:
        raise GPT2Error(f"{path}: is a directory, not a file")
    done = resume(path, rows, task) if is_file else 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK, 0o666)
        os.set_blocking(fd, True)
    except OSError as e:
        raise GPT2Error(f"{path}: cannot write it ({e.strerror})") from None
    return open(fd, "ab", buffering=0), done


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a pipe nobody reads fails instead of waiting
