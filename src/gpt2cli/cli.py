"""The `gpt2` command: thin Click commands that parse options, call the library and print.

Heavy modules (numpy, rich, huggingface_hub) are imported inside the commands that use them, so
`gpt2 --help` and `gpt2 encode` start fast. Errors cross into the CLI at one boundary,
`_Gpt2Group.main`, which turns each into one line on stderr and an exit status.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from gpt2cli import __version__
from gpt2cli.errors import GPT2Error

EXIT_USAGE = 2  # bad input of any kind, as Click uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat big | head -1` reports for cat


class _Gpt2Group(click.Group):
    """A Click group whose failures are one line on stderr, never a traceback."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            click.echo(f"gpt2: error: {e.format_message()}", err=True)
            code = e.exit_code
        except GPT2Error as e:
            click.echo(f"gpt2: error: {e}", err=True)
            code = EXIT_USAGE
        except (click.Abort, KeyboardInterrupt):
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            code = EXIT_BROKEN_PIPE
        if not isinstance(code, int):
            code = 0
        if standalone_mode:
            sys.exit(code)
        return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def read_text(text: str | None, what: str = "input") -> str:
    """Return TEXT, or all of stdin when TEXT is absent or '-', decoded as strict UTF-8.

    stdin is read as bytes and kept exactly (a trailing newline is part of the text); a byte
    that is not UTF-8 is an error naming its offset.
    """
    if text is not None and text != "-":
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GPT2Error(
            f"{what} on stdin is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
        ) from None


@click.group(cls=_Gpt2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="gpt2")
def cli() -> None:
    """GPT-2 text generation in pure NumPy: tokenize, download models, generate text."""


def main() -> None:
    """Entry point of the `gpt2` console script and `python -m gpt2cli`."""
    cli.main(prog_name="gpt2")
