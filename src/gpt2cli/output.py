"""How commands write their output: stdout that fails loudly, and `generate`'s sample printer.

Every byte a command prints goes through `write_stdout`, which writes all of it or raises: a short
write (the reader went away while we wrote) becomes the BrokenPipeError of the next attempt, so
`gpt2 encode big | head -1` ends with status 141 like `cat`, and a full disk or a closed stdout
is an OSError the CLI's boundary turns into one line. rich is imported only on a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from gpt2cli.errors import GPT2Error

if TYPE_CHECKING:
    from gpt2cli.generate import Generation


def write_stdout(data: str | bytes) -> None:
    """Write `data` (str as UTF-8) to stdout and flush it, all of it or an error.

    A reader that went away is a BrokenPipeError (the CLI exits quietly with 141); any other
    failure, such as a full disk or a closed stdout, is a GPT2Error naming it.
    """
    view = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
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
        raise GPT2Error(f"cannot write the output: {e.strerror or e}") from None


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
        self.completions = generation.completions
        self.prompt = prompt
        self.as_json = as_json
        self.live = live and not as_json
        self.head = 0  # the sample being printed; those before it are done
        self.shown = 0  # characters of the head's text already printed
        self.console: Any = None
        if sys.stdout.isatty() and not as_json:
            from rich.console import Console

            no_color = bool(os.environ.get("NO_COLOR"))
            self.console = Console(color_system=None if no_color else "auto", highlight=False)
        self._begin_sample()

    def update(self, sample: int) -> None:
        """Print what became printable after a token of `sample` was generated."""
        if sample == self.head and self.live:
            self._show_text()
        while self.head < len(self.completions) and self.completions[self.head].finish_reason:
            self._end_sample()
            self.head += 1
            if self.head < len(self.completions):
                self._begin_sample()

    def flush_partial(self) -> None:
        """After Ctrl-C: print what every unfinished sample generated so far (not in JSON)."""
        if self.as_json:
            return
        for row in range(self.head, len(self.completions)):
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

        tokens = sum(len(c.ids) for c in self.completions)
        timings = [c.timings for c in self.completions]
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
        if len(self.completions) > 1:
            self.console.rule(f"sample {self.head + 1} of {len(self.completions)}", style="dim")
        self.console.out(self.prompt, end="", style="dim")

    def _end_sample(self) -> None:
        if self.as_json:
            import json

            self._write(json.dumps(self.completions[self.head].to_json(), ensure_ascii=False))
            self._write("\n")
            return
        self._show_text()
        self._write("\n" if self.console else "")
        self.shown = 0

    def _show_text(self) -> None:
        text = self.completions[self.head].text
        self._write(text[self.shown :])
        self.shown = len(text)

    def _write(self, text: str) -> None:
        if not text:
            return
        if self.console is not None:
            self.console.out(text, end="")
        else:
            write_stdout(text)
