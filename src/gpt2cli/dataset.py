"""Data sets: JSON Lines of prompts or texts, checked first, run in batches, written in order.

`gpt2 generate --jsonl` and `gpt2 score --jsonl` read one JSON object per line. `read_rows` checks
every line before any model work (a line that is not UTF-8, a row that is not an object, lacks its
string field or has a bad option is an invalid `Row` carrying its error). A task (`GenerateTask`,
`ScoreTask`) turns valid rows into result lines: the same pure function on whatever engine runs it
(`run_local` here, `gpt2cli.ray_engine` on a Ray cluster), so the output does not depend on the
engine. `run` writes the results of the rows an output file does not hold yet (`resume` counts and
checks those it does) through an `OrderedWriter`: input order, one flushed line at a time, so a
crash loses only the rows in flight.

An output file never mixes runs: `open_output` keeps beside it a record (`Origin`, in
`record_path(out)`) of what made its rows, the task, the options that change results, the
model's files and the input's bytes, and continues the file only for the same ones.

Generate's output lines hold its `--json` fields without `timings`, and without `logprobs` unless
asked for, so its files from any batch size or engine compare byte for byte. Floats (scores,
logprobs) are sums whose last digits depend on the batch's shape and BLAS's threads: across
engines, batch sizes and resumes they agree within 1e-4, and every other field is identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar, NamedTuple, Protocol

from gpt2cli import __version__, jsonfile
from gpt2cli.errors import GPT2Error, WriteError
from gpt2cli.inputs import decode_utf8, printable
from gpt2cli.params import GenerationParams, ParamError, logit_bias

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

    command: ClassVar[str]  # the `gpt2` command that runs it: "generate" or "score"
    key: ClassVar[str]  # the input field holding the work: "prompt" or "text"
    options: ClassVar[tuple[str, ...]]  # the input fields that are options, not passed through
    results: ClassVar[tuple[str, ...]]  # the output fields a result sets (over passed-through ones)

    @property
    def batch_size(self) -> int:
        """Rows per batch; an engine that splits the rows splits them in whole batches."""
        ...

    def settings(self) -> dict[str, Any]:
        """The options that change results, by name (as `Origin` records them); not those that
        only change how the rows run, such as the batch size."""
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
GENERATE_FIELDS = (
    *("max_tokens", "temperature", "top_k", "top_p", "seed", "n", "stop", "repetition_penalty"),
    *("presence_penalty", "frequency_penalty", "no_repeat_ngram", "logit_bias", "ban"),
    *("min_tokens", "min_p", "typical_p", "num_beams", "length_penalty", "early_stopping"),
    *("best_of", "prompt_lookup"),
)
GENERATE_FLAGS = ("ignore_eos", "truncate")
_NUMBERS: tuple[str, ...] = ("temperature", "top_p", "repetition_penalty", "presence_penalty")
_NUMBERS += ("frequency_penalty", "min_p", "typical_p", "length_penalty")


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
    command: ClassVar[str] = "generate"
    key: ClassVar[str] = "prompt"
    options: ClassVar[tuple[str, ...]] = (*GENERATE_FIELDS, *GENERATE_FLAGS)
    results: ClassVar[tuple[str, ...]] = (
        "text", "ids", "prompt_ids", "finish_reason", "logprobs", "score", "samples",
    )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """Every row's default options (all of `GenerationParams`) and `logprobs`."""
        return {**asdict(self.defaults), "logprobs": self.logprobs}

    def parse(self, row: dict[str, Any], index: int, where: str, model: GPT2) -> Prompt:
        """The row's prompt ids and options, checked as the scheduler will run them."""
        from gpt2cli.scheduler import prepare

        prompt = _text(jsonfile.field(row, "prompt", where), f'{where} "prompt"')
        params = _row_params(self.defaults, row, where)
        own = params.seed if "seed" in row else None
        params = replace(params, seed=row_seed(own, self.defaults.seed, index))
        if params.draws > self.batch_size:
            raise GPT2Error(
                f"{where} runs {params.draws} sequences (n, num_beams or best_of) but the batch "
                f"holds {self.batch_size} rows (--batch-size): a row's sequences run in one batch"
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
        size = min(self.batch_size, sum(row.work.params.draws for row in rows))
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
        `--json` fields (no timings; a beam search's `score`), or `prompt_ids` and a list
        `samples` when n > 1."""
        kept = ["text", "ids", "prompt_ids", "finish_reason"] + (["logprobs"] * self.logprobs)
        kept += ["score"] * (state.params.num_beams > 1)
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
    command: ClassVar[str] = "score"
    key: ClassVar[str] = "text"
    options: ClassVar[tuple[str, ...]] = ()
    results: ClassVar[tuple[str, ...]] = (  # TextScore.totals()' keys, and --tokens' list
        *("n_tokens", "n_bytes", "n_words", "nll", "mean_nll", "nll_stderr", "perplexity"),
        *("bits_per_byte", "byte_perplexity", "word_perplexity", "tokens"),
    )

    def settings(self) -> dict[str, Any]:
        """The windows' stride, the <|endoftext|> before each text, and what is listed."""
        return {"stride": self.stride, "bos": self.bos, "top": self.top, "tokens": self.tokens}

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
        if name in _NUMBERS:
            changes[name] = _number(value, at)
        elif name in ("stop", "ban"):
            texts = [value] if isinstance(value, str) else jsonfile.array(value, at)
            changes[name] = tuple(_text(s, at) for s in texts)
        elif name == "logit_bias":
            if not isinstance(value, dict):
                raise GPT2Error(
                    f'{at} must be an object {{"id": bias}}, not {jsonfile.show(value)}'
                )
            changes[name] = value.items()  # to pairs below, with the others' checks
        elif name == "early_stopping":
            if not (isinstance(value, bool) or value == "never"):
                raise GPT2Error(f'{at} must be true, false or "never", not {jsonfile.show(value)}')
            changes[name] = value
        elif name in GENERATE_FLAGS:
            if not isinstance(value, bool):
                raise GPT2Error(f"{at} must be true or false, not {jsonfile.show(value)}")
            changes[name] = value
        else:
            changes[name] = jsonfile.integer(value, at)
    try:
        if "logit_bias" in changes:
            changes["logit_bias"] = logit_bias(changes["logit_bias"])
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


_ANOTHER = "it holds other results; write to another file, or add --overwrite to start it again"


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


class Output(NamedTuple):
    """An output file opened to append results (unbuffered), how many rows it already holds the
    results of, and whether it is a regular file, kept with its record so that a stopped run can
    continue (a device or pipe is only written to)."""

    file: Any
    done: int
    resumable: bool


def open_output(
    path: Path,
    input_name: str,
    rows: Sequence[Row],
    task: Task,
    origin: Origin,
    *,
    overwrite: bool = False,
) -> Output:
    """`path` opened to append the results of `rows`, which `origin` describes.

    A regular file that holds anything is continued only when its record says that the same
    origin made it (`check_origin`) and its lines are results of these rows, in order (`resume`);
    with `overwrite` it is emptied instead. A file that starts anew (missing, empty, emptied or
    holding only a torn line) gets `origin` as its record, written before any row. Refused when
    it is the input file itself; opening never waits for a pipe's reader.
    """
    if input_name != "-":
        with contextlib.suppress(OSError):
            if os.path.samefile(path, input_name):
                raise GPT2Error(f"{path} is the input file; write the results to another file")
    # /dev/stdout, /dev/fd/N, /proc/self/fd/N: a stream under a file's name, even when it leads
    # to a regular file (stdout redirected); written to as `-` is, never resumed or recorded
    stream = Path(os.path.abspath(path)).parts[1:2] in (("dev",), ("proc",))
    try:
        is_dir, is_file = path.is_dir(), path.is_file() and not stream
        filled = is_file and path.stat().st_size > 0
    except OSError as e:  # a name too long to look up
        raise GPT2Error(f"{path}: cannot write it ({e.strerror})") from None
    if is_dir:
        raise GPT2Error(f"{path}: is a directory, not a file")
    done = 0
    if filled and not overwrite:
        check_origin(path, origin)
        done = resume(path, rows, task)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK, 0o666)
        os.set_blocking(fd, True)
        regular = stat.S_ISREG(os.fstat(fd).st_mode) and not stream
    except OSError as e:
        raise GPT2Error(f"{path}: cannot write it ({e.strerror})") from None
    try:
        if regular and overwrite:  # the rows go first: a new record never describes old rows
            try:
                os.ftruncate(fd, 0)
            except OSError as e:
                raise GPT2Error(f"{path}: cannot empty it ({e.strerror})") from None
        if regular and done == 0:
            write_record(path, origin)
    except BaseException:
        os.close(fd)
        raise
    return Output(open(fd, "ab", buffering=0), done, regular)


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a pipe nobody reads fails instead of waiting


RECORD_SUFFIX = ".gpt2cli.json"  # the record of out.jsonl is out.jsonl.gpt2cli.json
RECORD_FORMAT = 1  # change it when the record's fields change meaning
MODEL_DEFAULTS = {"dtype": "float32"}  # what a record without these options (older) ran with
_START_AGAIN = "write to another file, or add --overwrite to start it again"


def record_path(out: Path) -> Path:
    """Where the record of what made output file `out` is kept: beside it, named after it, in
    sight of `ls` and `rm out.jsonl*` (a header line in `out` would break the JSON Lines it
    holds for every other reader)."""
    return out.with_name(out.name + RECORD_SUFFIX)


@dataclass(frozen=True)
class Origin:
    """What makes an output file's rows, as its record keeps it (JSON, in `record_path(out)`):

        {"format": 1, "gpt2cli": "0.1.0", "command": "generate",
         "options": {"max_tokens": 12, "temperature": 1.0, ..., "logprobs": false,
                     "dtype": "float32"},
         "model": {"name": "gpt2", "revision": null, "sha256": "..."},
         "input": {"name": "prompts.jsonl", "sha256": "..."}}

    `options` are the task's `settings()` and the model's `dtype`, the ones that change results
    (not the batch size, the engine or its threads: their rows are the same). Two origins are
    the same when their command, options and both hashes are: the names are only for messages
    (`-m gpt2` and `-m 124M` are the same files; a renamed input holds the same bytes), and
    `gpt2cli` says which version wrote the record. An option a record lacks (one added since)
    counts as its default (MODEL_DEFAULTS for the model's).
    """

    command: str
    options: dict[str, Any]
    model_name: str
    revision: str | None
    model_sha256: str | None
    input_name: str
    input_sha256: str

    @classmethod
    def of(
        cls,
        task: Task,
        model: GPT2,
        model_name: str,
        revision: str | None,
        input_name: str,
        content: bytes,
    ) -> Origin:
        """The origin of `task`'s results on `model` (as `-m model_name --revision revision`
        named it) from input `input_name`, whose bytes are `content`."""
        return cls(
            task.command,
            _as_json(task.settings() | {"dtype": model.dtype}),
            model_name,
            revision,
            model_sha256(model.folder),
            "stdin" if input_name == "-" else input_name,
            hashlib.sha256(content).hexdigest(),
        )

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        return {
            "format": RECORD_FORMAT,
            "gpt2cli": __version__,
            "command": self.command,
            "options": self.options,
            "model": {
                "name": self.model_name,
                "revision": self.revision,
                "sha256": self.model_sha256,
            },
            "input": {"name": self.input_name, "sha256": self.input_sha256},
        }

    @classmethod
    def from_json(cls, value: Any, where: str) -> Origin:
        """The origin a record's JSON holds, or a GPT2Error naming what is wrong with it."""
        record = jsonfile.mapping(value, where)
        version = jsonfile.field(record, "format", where)
        if version != RECORD_FORMAT:
            writer = jsonfile.show(record.get("gpt2cli"))
            raise GPT2Error(f"{where} is of format {jsonfile.show(version)} (gpt2cli {writer})")
        model = jsonfile.mapping(jsonfile.field(record, "model", where), f"{where}: model")
        given = jsonfile.mapping(jsonfile.field(record, "input", where), f"{where}: input")

        def text(obj: dict[str, Any], key: str, *, optional: bool = False) -> Any:
            value = jsonfile.field(obj, key, where)
            return (
                value if optional and value is None else jsonfile.string(value, f"{where}: {key}")
            )

        return cls(
            text(record, "command"),
            jsonfile.mapping(jsonfile.field(record, "options", where), f"{where}: options"),
            text(model, "name"),
            text(model, "revision", optional=True),
            text(model, "sha256", optional=True),
            text(given, "name"),
            text(given, "sha256"),
        )

    def mismatch(self, now: Origin) -> str | None:
        """How the run that made an output file (this origin) differs from the one `now`, as
        words that follow "OUT was made ", or None when it does not."""
        if self.command != now.command:
            return f"by gpt2 {self.command}, not gpt2 {now.command}"
        clauses = []
        if self.input_sha256 != now.input_sha256:
            names = (self.input_name, now.input_name)
            hashes = (self.input_sha256, now.input_sha256)
            clauses.append(_other("from", "contents", names, hashes))
        if self.model_sha256 != now.model_sha256:
            names = (self._model, now._model)
            hashes = (self.model_sha256 or "", now.model_sha256 or "")
            clauses.append(_other("with", "files", names, hashes))
        was, wanted = _changed_options(self.options, now.options, self.command)
        if was:
            clauses.append(f"with {was}, not {wanted}")
        return ", and ".join(clauses) or None

    @property
    def _model(self) -> str:
        return f"-m {self.model_name}" + (f" --revision {self.revision}" if self.revision else "")


def _as_json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), to compare with a record."""
    return json.loads(json.dumps(value))


def _other(by: str, what: str, names: tuple[str, str], hashes: tuple[str, str]) -> str:
    """'from old (sha256 ...), not new (sha256 ...)', or when both have one name, 'from other
    contents of name (sha256 ..., now ...)'."""
    (old, new), (was, now) = names, (h[:12] for h in hashes)
    if old == new:
        return f"{by} other {what} of {old} (sha256 {was}, now {now})"
    return f"{by} {old} (sha256 {was}), not {new} (sha256 {now})"


def _changed_options(was: dict[str, Any], now: dict[str, Any], command: str) -> tuple[str, str]:
    """The options that differ, as command-line words: as they were, and as they are now."""
    tasks: dict[str, type[GenerateTask] | type[ScoreTask]] = {
        "generate": GenerateTask,
        "score": ScoreTask,
    }
    defaults = _as_json(tasks[command]().settings()) if command in tasks else {}
    defaults |= MODEL_DEFAULTS
    old, new = [], []
    for name in dict.fromkeys([*now, *was]):
        before, after = was.get(name, defaults.get(name)), now.get(name, defaults.get(name))
        if before != after:
            old.append(_option(name, before, "no"))
            new.append(_option(name, after, "without"))
    return " ".join(old), " ".join(new)


_FLAGS = {"n": "-n"}  # options whose flag is not --name-with-dashes


def _option(name: str, value: Any, absent: str) -> str:
    """An option's value as the command line gives it: `--max-tokens 12`, `--ignore-eos`,
    `--stop a --stop b`; or, when it is off or not given, `no --seed` (`absent` is the word)."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    if name == "bos":  # on unless --no-bos
        flag, value = "--no-bos", value is False
    if name == "early_stopping":  # a choice of true, false and never
        value = str(value).lower()
    if name == "logit_bias":  # [[id, bias], ...] as ID=BIAS
        value = [f"{id}={_word(bias)}" for id, bias in value]
    if value is None or value is False or value == []:
        return f"{absent} {flag}"
    if value is True:
        return flag
    return " ".join(f"{flag} {_word(v)}" for v in (value if isinstance(value, list) else [value]))


def _word(value: Any) -> str:
    """A value as typed on a command line: 1 for 1.0, a string quoted for the shell."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return shlex.quote(value) if isinstance(value, str) else str(value)


def check_origin(out: Path, origin: Origin) -> None:
    """Refuse (a GPT2Error naming what differs) to continue output file `out` unless its record
    says that `origin` made it. A file without a record (written by an older gpt2cli, or by
    another program) is refused too: what made its rows is not known, and taking it would
    continue a file of other options without a word."""
    record = record_path(out)
    if not os.path.lexists(record):
        raise GPT2Error(
            f"{out} has no record of what made it ({record.name} beside it: an older gpt2cli "
            f"or another program wrote it); {_START_AGAIN}"
        )
    try:
        made = Origin.from_json(jsonfile.read(record), str(record))
    except GPT2Error as e:
        raise GPT2Error(f"{out}: its record cannot be used: {e}; {_START_AGAIN}") from None
    problem = made.mismatch(origin)
    if problem:
        raise GPT2Error(f"{out} was made {problem}; {_START_AGAIN}")


def write_record(out: Path, origin: Origin) -> None:
    """Write `origin` as the record of output file `out`, atomically (a reader sees the old
    record or the whole new one), or a GPT2Error naming it."""
    record = record_path(out)
    partial = record.with_name(f".{record.name}.{os.getpid()}.partial")
    data = json.dumps(origin.to_json(), indent=2) + "\n"  # ASCII: any name, even undecodable
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as f:
            f.write(data.encode())
        os.replace(partial, record)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise GPT2Error(f"{record}: cannot write it ({e.strerror})") from None


def model_sha256(folder: Path | None) -> str | None:
    """A SHA-256 of the model files that decide results, `config.json`, the weights and the
    tokenizer's files, each by its name and own SHA-256 (None for a model not loaded from a
    folder). A weights file in the Hugging Face cache is a link to a blob named by its SHA-256,
    which is taken as it is; any other file is hashed once (about 1 s per GB) and remembered."""
    if folder is None:
        return None
    from gpt2cli.tokenizer import HF_FILES, OPENAI_FILES
    from gpt2cli.weights import weight_files

    named = [folder / n for n in ("config.json", *HF_FILES, *OPENAI_FILES)]
    digest = hashlib.sha256()
    for path in sorted({*(p for p in named if p.is_file()), *weight_files(folder)}):
        digest.update(f"{path.name} {_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """A file's sha256, through the user cache's index (`gpt2cli.cache.Index`): a hub blob's is
    its name, a local file is hashed once and remembered while it is unchanged."""
    from gpt2cli import cache

    where = cache.folder()
    index = cache.Index.read(where) if where is not None else None
    try:
        if index is None:
            return cache.Index(path.parent).sha256(path)  # nothing remembered: hashed here
        digest = index.sha256(path)
        index.save()
        return digest
    except OSError as e:
        raise GPT2Error(f"{path}: cannot read it ({e.strerror or e})") from None


def summary(rows: Sequence[Row], start: int, end: int, seconds: float, where: str) -> str:
    """A finished run in one line: what it wrote to `where` (`rows[start:end]`, the results and
    apart from them the error objects of invalid rows), the rows skipped (already there), and
    the time."""
    errors = sum(row.error is not None for row in rows[start:end])
    lines = "(invalid line)" if errors == 1 else "(invalid lines)"
    return (
        f"{where}: {_count(end - start - errors, 'row')} written, {start} skipped (already "
        f"there), {_count(errors, 'error')} {lines}, in {_duration(seconds)}"
    )


def interrupted(kept: int, total: int, where: str, *, resumable: bool) -> str:
    """A stopped run in one line: how many of the `total` rows `where` holds, and how to go on."""
    if resumable:
        return (
            f"interrupted: {kept} of {total} rows kept in {where}; run the same command to continue"
        )
    return f"interrupted: {kept} of {total} rows written to {where}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    """1.2 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes} min {int(seconds) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
