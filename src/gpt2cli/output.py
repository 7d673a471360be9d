"""How commands write their output: stdout that fails loudly, and `generate`'s sample printer.

Every byte a command prints goes through `write_stdout`, which writes all of it or raises: a short
write (the reader went away while we wrote) becomes the BrokenPipeError of the next attempt, so
`gpt2 encode big | head -1` ends with status 141 like `cat`, and a full disk or a closed stdout
is an OSError the CLI's boundary turns into one line. rich is imported only on a terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from gpt2cli.errors import WriteError
from gpt2cli.inputs import printable

if TYPE_CHECKING:
    from gpt2cli.generate import Generation
    from gpt2cli.score import TextScore
    from gpt2cli.tokenizer import Tokenizer


def write_stdout(data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to stdout and flush it, all of it or an error.

    A reader that went away is a BrokenPipeError (the CLI exits quietly with 141); any other
    failure, such as a full disk or a closed stdout, is a GPT2Error naming it.
    """
    if isinstance(data, str):  # a lone surrogate cannot be UTF-8: shown, never a traceback
        data = data.encode("utf-8", "backslashreplace")
    view = memoryview(data)
    try:
        sys.stdout.flush()  # anything printed through the text layer goes first
        out = sys.stdout.buffer
        while view:
            written = out.write(view)  # a short count when a pipe breaks: try the rest again
            if not written:
                raise OSError("stdout accepted no bytes")
            view = view[written:]
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write the output: {e.strerror or e}") from None


def settle_stdout() -> OSError | None:
    """Flush stdout before exiting; on failure, point it at /dev/null (so the interpreter's own
    final flush cannot print a traceback) and return the error."""
    if sys.stdout is None:
        return None
    try:
        sys.stdout.flush()
        return None
    except OSError as e:
        silence_stdout()
        return e


def silence_stdout() -> None:
    """Point stdout at /dev/null, dropping what is buffered, so nothing more is written to it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    finally:
        os.close(devnull)


class SamplePrinter:
    """Prints a batch's samples in order, the first unfinished one live, for `gpt2 generate`.

    On a terminal: rich, the prompt dimmed, a rule between samples, a summary on stderr. Piped:
    the continuation only, samples separated by a `---` line. JSON: one line per sample.
    """

    SEPARATOR = "\n---\n"

    def __init__(self, generation: Generation, prompt: str, *, as_json: bool, live: bool) -> None:
        self.samples = generation.samples
        self.prompt = prompt
        self.as_json = as_json
        self.live = live and not as_json
        self.head = 0  # the sample being printed; those before it are done
        self.shown = 0  # characters of the head's text already printed
        self.console: Any = None if as_json else terminal_console()
        self._begin_sample()

    def update(self, sample: int) -> None:
        """Print what became printable after a token of `sample` was generated."""
        if sample == self.head and self.live:
            self._show_text()
        while self.head < len(self.samples) and self.samples[self.head].finish_reason:
            self._end_sample()
            self.head += 1
            if self.head < len(self.samples):
                self._begin_sample()

    def flush_partial(self) -> None:
        """After Ctrl-C: print what every unfinished sample generated so far (not in JSON)."""
        if self.as_json:
            return
        for row in range(self.head, len(self.samples)):
            if row > self.head:
                self.head, self.shown = row, 0
                self._begin_sample()
            self._show_text()
            self._write("\n" if self.console else "")

    def summary(self) -> None:
        """On a terminal: tokens, tokens/s and time to first token, on stderr."""
        if self.console is None:
            return
        from rich.console import Console

        tokens = sum(len(c.ids) for c in self.samples)
        timings = [c.timings for c in self.samples]
        decode_s = max(t.decode_s for t in timings)
        speed = sum(t.decoded for t in timings) / decode_s if decode_s else 0.0
        Console(stderr=True, color_system=self.console.color_system).print(
            f"{tokens} tokens, {speed:.1f} tokens/s, first token after "
            f"{timings[0].prefill_s:.2f} s (model loaded in {timings[0].load_s:.2f} s)",
            style="dim",
            highlight=False,
        )

    def _begin_sample(self) -> None:
        if self.console is None:
            self._write(self.SEPARATOR if self.head and not self.as_json else "")
            return
        if len(self.samples) > 1:
            self.console.rule(f"sample {self.head + 1} of {len(self.samples)}", style="dim")
        self.console.out(terminal_text(self.prompt), end="", style="dim")

    def _end_sample(self) -> None:
        if self.as_json:
            import json

            self._write(json.dumps(self.samples[self.head].to_json(), ensure_ascii=False))
            self._write("\n")
            return
        self._show_text()
        self._write("\n" if self.console else "")
        self.shown = 0

    def _show_text(self) -> None:
        text = self.samples[self.head].text
        self._write(text[self.shown :])
        self.shown = len(text)

    def _write(self, text: str) -> None:
        if not text:
            return
        if self.console is not None:
            self.console.out(terminal_text(text), end="")
        else:
            write_stdout(text)


# How a token's piece is shown in a row: C0 controls escaped, so one token is one line and its
# bytes are visible (a backslash is doubled first, so the pieces read in order spell the text
# unambiguously); bytes of a split UTF-8 character show as \xNN.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape_piece(raw: bytes) -> str:
    """A token's bytes as one printable, unambiguous line (what `gpt2 encode --tokens` shows)."""
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace").translate(_ESCAPES)


# Unicode's bidirectional overrides and isolates reorder what follows them on screen (a file
# named `x\u202eexe.txt` shows as `xtxt.exe`): shown as \uNNNN wherever text reaches a terminal
_BIDI = {c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
# in a line that must stay one line (a message, a file name) also C1 controls, invisible
# formatting (zero-width characters, marks, BOM) and Unicode's own line and paragraph breaks
_LINE_ESCAPES = (
    _ESCAPES
    | {c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}
    | _BIDI
    | {
        c: f"\\u{c:04x}"
        for c in [0x061C, *range(0x200B, 0x2010), 0x2028, 0x2029, *range(0x2060, 0x2065), 0xFEFF]
    }
)


def escape_controls(text: str) -> str:
    """`text` with control and invisible characters (newlines, escapes, bidi overrides) shown
    as \\n, \\x1b, \\u202e..., so it stays one inert line, and a byte of a file name that is
    not UTF-8 as \\xNN."""
    return printable(text).translate(_LINE_ESCAPES)


# Text for a terminal keeps its line breaks and tabs; every other control character, C1's
# included (\x9b starts an escape sequence too), is shown as \xNN so that text from a file, a
# prompt or the model cannot drive the terminal (move the cursor, set the title, ...), and so
# are bidi overrides (zero-width joiners stay: emoji sequences are made of them).
_TERMINAL_ESCAPES = {
    c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"
} | _BIDI


def terminal_text(text: str) -> str:
    """`text` to show on a terminal: its line breaks and tabs kept, other controls escaped."""
    return printable(text).translate(_TERMINAL_ESCAPES)


def terminal_console(*, stderr: bool = False) -> Any:
    """A rich Console for a terminal (None when that stream is not one), honouring NO_COLOR."""
    stream = sys.stderr if stderr else sys.stdout
    if stream is None or not stream.isatty():
        return None
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    return Console(stderr=stderr, color_system=None if no_color else "auto", highlight=False)


# GLTR's four colours: the actual token among the model's top 10, top 100, top 1,000, or beyond
GLTR_BUCKETS = ((10, "black on #adff80"), (100, "black on #ffea80"), (1000, "black on #ff9280"))
GLTR_BEYOND = "black on #e5b0ff"


def print_score_summary(rows: Sequence[tuple[str, TextScore]], total: TextScore | None) -> None:
    """One line per input: source, tokens, perplexity, bits per byte.

    On a terminal an aligned table with a total row (when `total` is given); piped, a
    tab-separated header and rows, with no total, for `sort -t$'\\t' -k3 -g`.
    """
    console = terminal_console()
    if console is None:
        lines = ["source\ttokens\tperplexity\tbits_per_byte"] + [
            f"{_cell(source)}\t{s.n_tokens}\t{s.perplexity:.6g}\t{s.bits_per_byte:.6g}"
            for source, s in rows
        ]
        write_stdout("\n".join(lines) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in [
        ("source", "left"),
        ("tokens", "right"),
        ("perplexity", "right"),
        ("bits/byte", "right"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for source, s in [*rows, *([("total", total)] if total is not None else [])]:
        cell = Text(escape_controls(source))  # as it is: a Text is never read as markup
        table.add_row(cell, f"{s.n_tokens:,}", f"{s.perplexity:.4g}", f"{s.bits_per_byte:.4f}")
    console.print(table)


def print_token_rows(tokenizer: Tokenizer, rows: Sequence[tuple[str, TextScore]], top: int) -> None:
    """`--tokens` piped: a header, then one tab-separated row per scored token: id, piece,
    logprob, rank and, with --top, each alternative's id, piece and logprob; a first column
    `source` when there are several inputs."""
    several = len(rows) > 1
    header = ["id", "piece", "logprob", "rank"]
    header += [f"top{k}_{f}" for k in range(1, top + 1) for f in ("id", "piece", "logprob")]
    lines = ["\t".join((["source"] if several else []) + header)]
    for source, s in rows:
        lead = f"{_cell(source)}\t" if several else ""
        for i, token in enumerate(s.ids.tolist()):
            cells = [
                str(token),
                escape_piece(tokenizer.token_bytes(token)),
                f"{s.logprobs[i]:.6f}",
                str(s.ranks[i]),
            ]
            for alt, logprob in zip(s.top_ids[i].tolist(), s.top_logprobs[i], strict=True):
                cells += [str(alt), escape_piece(tokenizer.token_bytes(alt)), f"{logprob:.6f}"]
            lines.append(lead + "\t".join(cells))
        write_stdout("\n".join(lines) + "\n")
        lines = []


def gltr_style(rank: int) -> str:
    """The GLTR colour of a token the model ranked `rank` (1 = its top choice)."""
    return next((style for limit, style in GLTR_BUCKETS if rank <= limit), GLTR_BEYOND)


def print_gltr(tokenizer: Tokenizer, source: str, ids: Sequence[int], s: TextScore) -> None:
    """`--tokens` on a terminal: the text itself, each token coloured by the rank the model gave
    it (GLTR's top 10 / 100 / 1,000 / beyond), after a legend line; unscored tokens plain."""
    import codecs

    from rich.text import Text

    console = terminal_console()
    legend = Text(f"{escape_controls(source)}: ", style="bold")
    for limit, style in GLTR_BUCKETS:
        legend.append(f" top {limit:,} ", style=style).append(" ")
    legend.append(" beyond ", style=GLTR_BEYOND)
    console.print(legend)
    ranks = dict(zip(s.positions.tolist(), s.ranks.tolist(), strict=True))
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = Text()
    for position, token in enumerate(ids):
        piece = utf8.decode(tokenizer.token_bytes(token), final=position == len(ids) - 1)
        rank = ranks.get(position)
        text.append(terminal_text(piece), style="" if rank is None else gltr_style(rank))
    console.print(text, soft_wrap=True)
    console.print(
        f"{s.n_tokens:,} tokens, perplexity {s.perplexity:.4g}, "
        f"{s.bits_per_byte:.4f} bits per byte",
        style="dim",
    )


def _cell(text: str) -> str:
    """A file name as one TSV cell: control characters (tabs, newlines) escaped."""
    return escape_controls(text)


PROGRESS_MIN_TOKENS = 4096  # smaller inputs are scored before a bar would be worth drawing


@contextlib.contextmanager
def progress_bar(what: str, rates: str) -> Iterator[Any]:
    """A transient rich Progress on stderr (None when stderr is not a terminal) with the columns
    `what`, a bar, done/total, `rates` (a format string over its task's fields) and time left."""
    console = terminal_console(stderr=True)
    if console is None:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(rates),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        yield bar


@contextlib.contextmanager
def token_progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback that draws a rich progress bar on stderr (tokens done
    of total, tokens/s, time left) when stderr is a terminal and the total is large enough."""
    start = time.perf_counter()
    with progress_bar(what, "tokens, {task.fields[rate]:,.0f} tokens/s") as bar:
        if bar is None:
            yield lambda done, total: None
            return
        task = bar.add_task(what, total=None, visible=False, rate=0.0)

        def update(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            shown = total >= PROGRESS_MIN_TOKENS
            bar.update(task, completed=done, total=total, visible=shown, rate=rate)

        yield update


def write_ids(batches: Iterable[list[int]], *, as_json: bool) -> None:
    """Write the ids as they come, then a newline: `15496 995`, or `[15496, 995]` as JSON."""
    separator = ", " if as_json else " "
    write_stdout("[" if as_json else "")
    for n, ids in enumerate(batches):
        write_stdout((separator if n else "") + separator.join(map(str, ids)))
    write_stdout("]\n" if as_json else "\n")


_TOKEN_STYLES = ("black on #a8d8ea", "black on #f9d27a")  # alternate, so token edges show


def show_tokens(tokenizer: Tokenizer, batches: Iterable[list[int]]) -> None:
    """`gpt2 encode --tokens`: each token as `id<TAB>piece` (see `escape_piece`), or, on a
    terminal, the pieces inline in alternating colours."""
    console = terminal_console()
    shown = 0  # tokens so far, which sets the next one's colour
    for ids in batches:
        raw = [tokenizer.token_bytes(i) for i in ids]
        pieces = [escape_piece(b) for b in raw]
        if console is None:
            write_stdout("".join(f"{i}\t{piece}\n" for i, piece in zip(ids, pieces, strict=True)))
            continue
        from rich.text import Text

        line = Text()
        for n, (b, piece) in enumerate(zip(raw, pieces, strict=True), start=shown):
            line.append(piece, style=_TOKEN_STYLES[n % 2])
            if b.endswith(b"\n"):  # the escape shows the newline; the line break keeps the layout
                line.append("\n")
        console.print(line, soft_wrap=True, end="")
        shown += len(ids)
    if console is not None:
        console.print()
