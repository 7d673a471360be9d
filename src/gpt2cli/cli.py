"""The `gpt2` command: thin Click commands that parse options, call the library and print.

Heavy modules (numpy, rich, huggingface_hub) are imported inside the commands that use them, so
`gpt2 --help` and `gpt2 encode` start fast. Errors cross into the CLI at one boundary,
`_Gpt2Group.main`, which turns each into one line on stderr and an exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gpt2cli import __version__
from gpt2cli.errors import STOP_SIGNALS, GPT2Error, WriteError
from gpt2cli.inputs import (
    argument_text,
    parse_ids,
    printable,
    read_bytes,
    read_file,
    read_text,
    stdin_chunks,
)
from gpt2cli.output import (
    SamplePrinter,
    escape_controls,
    settle_stdout,
    show_tokens,
    silence_stdout,
    write_ids,
    write_stdout,
)

if TYPE_CHECKING:
    from gpt2cli.dataset import Runner, Task
    from gpt2cli.model import GPT2
    from gpt2cli.params import GenerationParams
    from gpt2cli.tokenizer import Tokenizer

EXIT_FAILURE = 1  # the system failed us: out of memory, an I/O error
EXIT_USAGE = 2  # bad input of any kind, as Click uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat big | head -1` reports for cat
# signals that stop a command the way Ctrl-C does: output so far flushed, exit 128 + signal


class Stopped(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP), raised where the program is, like Ctrl-C."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


class _StoppedRun(Exception):
    """A Stopped command, carried past Click's own Ctrl-C handling (which prints a newline)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_stop_signal(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _stdout_for_output_file(args: list[str]) -> None:
    """With stdout closed, a command that writes its results to `-o FILE` still runs (stdout
    then goes to /dev/null); any other is refused, since every command prints."""
    files = [b for a, b in zip(args, [*args[1:], ""], strict=True) if a in ("-o", "--output")]
    files += [a.removeprefix("--output=") for a in args if a.startswith("--output=")]
    files += [a[2:] for a in args if a.startswith("-o") and a != "-o"]
    if not any(f and f != "-" for f in files):
        raise GPT2Error("stdout is closed (>&-): nowhere to write the output")
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


class _Gpt2Group(click.Group):
    """A Click group whose failures are one line on stderr, never a traceback."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, standalone_mode: bool = True, **extra: Any
    ) -> Any:
        if sys.stderr is None:  # `2>&-`: errors have nowhere to go, but the command still runs
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        for stream in (sys.stdout, sys.stderr):  # a terminal that is not UTF-8 (LANG=C, ascii):
            if isinstance(stream, io.TextIOWrapper):  # what it cannot show is written \xe9
                stream.reconfigure(errors="backslashreplace")
        try:
            if sys.stdout is None:  # `>&-`: refuse before doing any work, unless -o FILE
                _stdout_for_output_file(sys.argv[1:] if args is None else list(args))
            code = super().main(args, standalone_mode=False, **extra)
            if settle_stdout() is not None:  # a buffered write that failed only now
                raise WriteError("cannot write the output to stdout")
        except click.exceptions.NoArgsIsHelpError as e:  # bare `gpt2`: the help, as it is
            with contextlib.suppress(OSError, ValueError):
                click.echo(e.format_message(), err=True)
            code = e.exit_code
        except click.ClickException as e:
            code = _report(e.format_message(), e.exit_code)
        except WriteError as e:
            code = _report(str(e), EXIT_FAILURE)
        except GPT2Error as e:
            code = _report(str(e), EXIT_USAGE)
        except _StoppedRun as e:
            code = 128 + e.signum
            if sys.stderr.isatty():  # end the line the terminal's ^C echo left open
                _report("", code, prefix="")
        except (click.Abort, KeyboardInterrupt):
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            code = EXIT_BROKEN_PIPE
        except MemoryError:
            code = _report("out of memory; try a smaller input or fewer samples", EXIT_FAILURE)
        except OSError as e:  # reading a file or stdin failed under us (EIO, ENOSPC on a cache...)
            where = f"{e.filename}: " if e.filename else ""
            code = _report(f"{where}{e.strerror or e}", EXIT_FAILURE)
        settle_stdout()
        if not isinstance(code, int):
            code = 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a reader closing stdout early ends it quietly with status 141.

        This has to happen here: Click's own `main` turns a BrokenPipeError into exit status 1.
        """
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            silence_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except KeyboardInterrupt as e:
            raise _StoppedRun(getattr(e, "signum", signal.SIGINT)) from None


def _report(message: str, code: int, prefix: str = "gpt2: error: ") -> int:
    """Print one error line on stderr (if stderr is still there) and return the exit status.

    Control characters (a newline or escape sequence in a file name) are escaped, so the line
    stays one line and cannot drive the terminal.
    """
    with contextlib.suppress(OSError, ValueError):
        click.echo(f"{prefix}{escape_controls(message)}", err=True)
    return code


DTYPES = ("float32", "bfloat16", "int8")  # gpt2cli.quant.DTYPES, without importing NumPy for --help


def _model_options(command: Any) -> Any:
    """`-m/--model`, `--revision`, `--dtype` and `--threads`, for the commands that run a model."""
    command = click.option(
        "--threads",
        type=click.IntRange(min=1),
        envvar="GPT2CLI_THREADS",
        show_envvar=True,
        help="Threads for the model's products [default: one per core other processes leave idle].",
    )(command)
    command = click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default="float32",
        show_default=True,
        help="The weights' type: float32 (exact), bfloat16 or int8 (half, or about a quarter, "
        "of the bytes read per token: faster, at a small KL divergence from float32, which "
        "`gpt2 score --kl-divergence` measures; they need gpt2cli[fast]).",
    )(command)
    command = click.option("--revision", help="Branch, tag or commit of a hub model.")(command)
    return click.option(
        "-m",
        "--model",
        "model_name",
        default="gpt2",
        show_default=True,
        help="A model name (gpt2, gpt2-medium, 355M, ...), a hub repo id owner/name, or a folder.",
    )(command)


def _load_model(
    name: str, revision: str | None, dtype: str = "float32", n_threads: int | None = None
) -> GPT2:
    """The model `-m/--model` names, found or downloaded (a progress bar on a terminal), its
    weights in `dtype` (int8 and bfloat16's kernels checked first: no download without them),
    its products on `n_threads` threads (--threads, GPT2CLI_THREADS) or else one for each core
    other processes left idle meanwhile, unless the user chose through OPENBLAS_NUM_THREADS and
    the like (gpt2cli.threads; a dim line on a terminal says when that differs from OpenBLAS's
    own)."""
    from gpt2cli import threads

    sampler = threads.CpuSampler()
    from gpt2cli import hub, quant
    from gpt2cli.model import GPT2
    from gpt2cli.output import terminal_console

    threads.apply_user_threads(n_threads)
    if dtype != "float32":
        quant.load_kernels(dtype)
    folder = hub.resolve(name, revision, progress=sys.stderr.isatty())
    model = GPT2.from_pretrained(folder, dtype=dtype)
    fit = threads.fit_to_idle_cores(sampler)
    console = terminal_console(stderr=True) if fit is not None and fit.changed else None
    if fit is not None and console is not None:
        console.print(fit.message(), style="dim")
    return model


def _dataset_options(what: str) -> Callable[[Any], Any]:
    """`--jsonl` and the options of a data-set run, for `generate` and `score`."""
    options = [
        click.option(
            "--jsonl",
            metavar="FILE|-",
            is_flag=False,
            flag_value="-",
            help=f"Read JSON Lines, one {what} per line (stdin for - or no FILE), and write one "
            "result object per line in input order, with `index` (the 0-based line) and the "
            "other fields passed through.",
        ),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            help="With --jsonl: write to FILE (- for stdout), line by line; if it holds results "
            "of an earlier run, continue after them, but only for the same input, model and "
            "options that change results (recorded in FILE.gpt2cli.json).",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="With -o FILE: start FILE again, discarding the results it holds.",
        ),
        click.option(
            "--skip-invalid",
            is_flag=True,
            help='With --jsonl: write {"index": i, "error": ...} for invalid lines and run the '
            "rest (otherwise the first 10 are named and nothing runs).",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="With --jsonl: rows run together as one batch [default: 8].",
        ),
        click.option(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="With --jsonl: run here, or on Ray (the cluster at RAY_ADDRESS or "
            "--ray-address, else a local one); needs gpt2cli[ray].",
        ),
        click.option("--ray-address", metavar="ADDRESS", help="With --engine ray: the cluster."),
        click.option(
            "--threads-per-actor",
            type=click.IntRange(min=1),
            help="With --engine ray: BLAS threads (and CPUs) per actor; a node runs its "
            "CPUs // this many actors [default: 1].",
        ),
    ]

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@dataclasses.dataclass(frozen=True)
class _DatasetOptions:
    """The options `_dataset_options` adds, as Click passes them."""

    jsonl: str | None
    output: Path | None
    overwrite: bool
    skip_invalid: bool
    batch_size: int | None
    engine: str
    ray_address: str | None
    threads_per_actor: int | None

    def checked_engine(self) -> Runner:
        """The engine asked for (the ray extra checked before any work), or a usage error for
        options that go with another."""
        from gpt2cli import dataset

        given = [self.output, self.overwrite, self.skip_invalid, self.batch_size]
        if self.jsonl is None and any([*given, self.engine != "local"]):
            raise click.UsageError(
                "-o/--output, --overwrite, --skip-invalid, --batch-size and --engine go with "
                "--jsonl"
            )
        if self.overwrite and str(self.output or "-") == "-":
            raise click.UsageError("--overwrite goes with -o FILE")
        if self.engine == "local":
            if self.ray_address or self.threads_per_actor:
                raise click.UsageError("--ray-address and --threads-per-actor go with --engine ray")
            return dataset.run_local
        from gpt2cli import ray_engine

        return ray_engine.engine(self.ray_address, self.threads_per_actor or 1)

    def run(
        self,
        task: Task,
        model: GPT2,
        engine: Runner,
        source: str,
        what: str,
        *,
        model_name: str,
        revision: str | None,
    ) -> None:
        """Run a data-set job: every row checked, then those -o lacks run and written in order
        (to stdout without -o; -o continued only for what made it, see `dataset.open_output`),
        progress on a terminal, and there a summary at the end or a note on how to continue."""
        import time

        from gpt2cli import dataset

        start = time.perf_counter()
        content = read_bytes(source)
        rows = dataset.read_rows(source, content, task, model)
        try:
            dataset.check_rows(rows, source, skip_invalid=self.skip_invalid)
        except dataset.InvalidRows as e:
            for problem in e.problems:
                _report(problem, EXIT_USAGE)
            raise
        output = dataset.Output(None, 0, resumable=False)
        write: Callable[[bytes], None] = write_stdout
        where = "stdout"
        if self.output is not None and str(self.output) != "-":  # -o -: stdout, as no -o
            origin = dataset.Origin.of(task, model, model_name, revision, source, content)
            output = dataset.open_output(
                self.output, source, rows, task, origin, overwrite=self.overwrite
            )
            write, where = dataset.file_writer(output.file, self.output), str(self.output)

        def write_whole(data: bytes) -> None:  # a stop signal never tears a line
            with _ctrl_c_deferred():
                write(data)

        writer = dataset.OrderedWriter(write_whole, output.done)
        terminal = sys.stderr.isatty()
        try:
            with (
                contextlib.closing(output.file) if output.file else contextlib.nullcontext(),
                dataset.row_progress(len(rows), output.done, what) as progress,
            ):
                dataset.run(task, model, rows, writer, engine=engine, progress=progress)
        except KeyboardInterrupt:
            if terminal:  # after the progress bar is gone
                kept = dataset.interrupted(
                    writer.next, len(rows), where, resumable=output.resumable
                )
                _report(kept, 0, prefix="")
            raise
        if terminal:
            elapsed = time.perf_counter() - start
            _report(dataset.summary(rows, output.done, writer.next, elapsed, where), 0, prefix="")


# the decoding options `_decoding_options` adds: GenerationParams' keyword-only fields, named
# as the command line names them
_DECODING = (
    *("repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram"),
    *("logit_bias", "ban", "min_tokens", "min_p", "typical_p", "num_beams", "length_penalty"),
    *("early_stopping", "best_of", "prompt_lookup", "draft_tokens"),
)
_SAMPLING = ("temperature", "top_k", "top_p", "seed")  # what a beam search does not use


def _decoding_options(command: Any) -> Any:
    """The options that shape the next-token scores, search beams or draft tokens (what each
    does: `gpt2cli.params.GenerationParams`)."""
    float_options = {
        "--repetition-penalty": (
            1.0,
            "Divide a seen token's positive logit by F (multiply a "
            "negative one), as transformers; 1 is off.",
        ),
        "--presence-penalty": (
            0.0,
            "Subtract F from the logit of every token generated so far (OpenAI; -2 to 2).",
        ),
        "--frequency-penalty": (
            0.0,
            "Subtract F times the number of times a token was generated (OpenAI; -2 to 2).",
        ),
        "--min-p": (
            0.0,
            "Sample only tokens at least F times as likely as the likeliest; 0 is off.",
        ),
        "--typical-p": (
            1.0,
            "Sample only the most typical tokens whose mass reaches F "
            "(locally typical sampling); 1 is off.",
        ),
        "--length-penalty": (
            1.0,
            "With --num-beams: a finished beam's score is its logprob "
            "over length**F (> 0 favours longer ones).",
        ),
    }
    int_options = {
        "--no-repeat-ngram": (
            0,
            "Never repeat an n-gram of this size (prompt included); 0 is off.",
        ),
        "--min-tokens": (
            0,
            "Neither <|endoftext|> nor a --stop string ends a sample before this many new tokens.",
        ),
        "--num-beams": (
            1,
            "Beam search with this many beams (deterministic; -n of them are "
            "printed, best first); 1 samples.",
        ),
        "--best-of": (
            None,
            "Draw this many samples and print the -n with the highest mean logprob.",
        ),
        "--prompt-lookup": (
            0,
            "Draft up to K tokens by matching the text's last words earlier in it, verified in "
            "one pass (faster on repetitive text; greedy output is the same, sampled output as "
            "likely); 0 is off.",
        ),
        "--draft-tokens": (5, "With --draft-model: tokens drafted per step."),
    }
    options = [
        *(
            click.option(flag, type=float, default=default, show_default=True, help=help)
            for flag, (default, help) in float_options.items()
        ),
        *(
            click.option(
                flag, type=int, default=default, show_default=default is not None, help=help
            )
            for flag, (default, help) in int_options.items()
        ),
        click.option(
            "--logit-bias",
            metavar="ID=BIAS",
            multiple=True,
            help="Add BIAS (-100 to 100) to token ID's logit; -100 bans it. Repeatable.",
        ),
        click.option(
            "--ban",
            metavar="TEXT",
            multiple=True,
            help="Never generate TEXT's tokens in a row (encoded as given). Repeatable.",
        ),
        click.option(
            "--early-stopping",
            type=click.Choice(["true", "false", "never"]),
            default="false",
            show_default=True,
            help="With --num-beams W: stop once W beams have finished (true), when no running "
            "beam can beat them at its length (false), or at any length (never).",
        ),
        click.option(
            "--draft-model",
            metavar="NAME",
            help="Speculative decoding: a smaller GPT-2 of the same vocabulary drafts tokens that "
            "the model verifies (faster when they agree; greedy output is the same, sampled "
            "output as likely).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=_Gpt2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="gpt2")
def cli() -> None:
    """GPT-2 in pure NumPy: tokenize, download models, generate and score text."""


@cli.command(short_help="Continue a prompt, streaming the text.")
@click.argument("prompt", required=False)
@_model_options
@click.option(
    "-t",
    "--max-tokens",
    type=int,
    default=40,
    show_default=True,
    help="New tokens per sample (fewer when the context fills up).",
)
@click.option(
    "--temperature",
    type=float,
    default=1.0,
    show_default=True,
    help="Divides the logits; 0 is greedy (always the most likely token).",
)
@click.option(
    "--top-k",
    type=int,
    default=5,
    show_default=True,
    help="Sample only among the k most likely tokens; 0 turns it off.",
)
@click.option(
    "--top-p",
    type=float,
    default=1.0,
    show_default=True,
    help="Sample only among the most likely tokens whose probabilities reach p; 1 is off.",
)
@click.option("--seed", type=int, help="Random seed: the same seed gives the same text.")
@click.option(
    "-n",
    "--num-samples",
    type=int,
    default=1,
    show_default=True,
    help="Samples to generate, as one batch.",
)
@click.option(
    "--stop", multiple=True, help="End a sample at this text, which is not printed. Repeatable."
)
@click.option("--ignore-eos", is_flag=True, help="Keep generating past <|endoftext|>.")
@click.option(
    "--truncate",
    is_flag=True,
    help="Keep only the prompt's last tokens when it leaves no room for --max-tokens in the "
    "context (otherwise a prompt that fills the context is an error).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per sample per line: text, ids, prompt_ids, finish_reason, "
    "logprobs, timings.",
)
@click.option("--no-stream", is_flag=True, help="Print each sample only once it is complete.")
@_decoding_options
@_dataset_options("prompt")
@click.option(
    "--logprobs",
    is_flag=True,
    help="With --jsonl: add each sample's logprobs (left out by default: their last digits "
    "depend on the batch, and the rest of the output does not).",
)
def generate(
    prompt: str | None,
    model_name: str,
    revision: str | None,
    dtype: str,
    threads: int | None,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    num_samples: int,
    stop: tuple[str, ...],
    ignore_eos: bool,
    truncate: bool,
    as_json: bool,
    no_stream: bool,
    logprobs: bool,
    draft_model: str | None,
    **options: Any,
) -> None:
    """Continue PROMPT (or stdin, when absent or '-') with GPT-2, printing tokens as they come.

    Defaults: 40 new tokens, top-k 5 sampling at temperature 1. An empty prompt starts from
    <|endoftext|>. On a terminal the prompt is shown dimmed and a summary goes to stderr; when
    stdout is not a terminal it gets the generated text only. Several samples (-n) are printed
    in order, the first one streaming; piped, they are separated by a line holding `---`.

    With --jsonl, each line is {"prompt": ...} and may set max_tokens, temperature, top_k,
    top_p, seed, n, stop, ignore_eos or truncate for itself. Its result has the --json fields
    except timings (and logprobs: see --logprobs); with n > 1, prompt_ids and a list `samples`.
    A row without a seed, under --seed S, is seeded S * 2**64 + index: the same text on any
    batch size or engine, and the same as `gpt2 generate --seed <that> --json`.
    """
    import time

    from gpt2cli.generate import Generation

    stop = tuple(argument_text(s, "--stop") for s in stop)
    params = _generation_params(
        (max_tokens, temperature, top_k, top_p, seed, num_samples, stop, ignore_eos, truncate),
        {name: options.pop(name) for name in _DECODING},
    )
    dataset_options = _DatasetOptions(**options)
    engine = dataset_options.checked_engine()
    if dataset_options.jsonl is not None:
        from gpt2cli.dataset import GenerateTask

        if prompt is not None:
            raise click.UsageError("--jsonl reads the prompts: give no PROMPT")
        if draft_model is not None:
            raise click.UsageError("--draft-model goes with one prompt, not with --jsonl")
        batch_size = dataset_options.batch_size or 8
        if params.draws > batch_size:  # every row without its own "n" would be refused
            raise click.UsageError(
                f"{params.draws} sequences (-n, --num-beams or --best-of) are more than "
                f"--batch-size {batch_size}: a row's sequences decode in one batch, so give "
                f"--batch-size {params.draws} or more"
            )
        task = GenerateTask(params, batch_size, logprobs)
        model = _load_model(model_name, revision, dtype, threads)
        source = dataset_options.jsonl
        dataset_options.run(
            task, model, engine, source, "generating", model_name=model_name, revision=revision
        )
        return
    if logprobs:
        raise click.UsageError("--logprobs goes with --jsonl (--json always has them)")
    text = read_text(prompt, "prompt")
    start = time.perf_counter()
    model = _load_model(model_name, revision, dtype, threads)
    draft = None if draft_model is None else _load_model(draft_model, None, dtype, threads)
    generation = Generation(
        model,
        model.tokenizer.encode(text),
        params,
        load_s=time.perf_counter() - start,
        draft=draft,
    )
    printer = SamplePrinter(generation, text, as_json=as_json, live=not no_stream)
    try:
        for token in generation:
            with _ctrl_c_deferred():
                printer.update(token.sample)
    except KeyboardInterrupt:
        generation.flush()
        printer.flush_partial()
        raise
    printer.summary()


def _generation_params(values: tuple[Any, ...], decoding: dict[str, Any]) -> GenerationParams:
    """`gpt2 generate`'s options as one checked `GenerationParams`; a bad value is a usage
    error naming its option."""
    from gpt2cli.params import GenerationParams, ParamError, logit_bias

    ctx = click.get_current_context()
    try:
        if ctx.params.get("draft_model") is None and _given(ctx, "draft_tokens"):
            raise ParamError("draft_tokens", "--draft-tokens goes with --draft-model")
        if decoding["num_beams"] > 1 and ctx.params.get("draft_model") is not None:
            raise ParamError("num_beams", "a beam search does not use a draft model")
        if decoding["num_beams"] > 1:
            given = [n for n in _SAMPLING if _given(ctx, n)]
            if given:
                raise ParamError(
                    given[0],
                    f"{given[0]} does not go with num_beams > 1: beam search is deterministic",
                )
        pairs = [_bias_pair(item) for item in decoding["logit_bias"]]
        decoding |= {
            "logit_bias": logit_bias(pairs),
            "ban": tuple(argument_text(t, "--ban") for t in decoding["ban"]),
            "early_stopping": {"true": True, "false": False}.get(
                decoding["early_stopping"], "never"
            ),
        }
        return GenerationParams(*values, **decoding)
    except ParamError as e:
        name = {"n": "num_samples"}.get(e.param, e.param)
        option = next((p for p in ctx.command.params if p.name == name), None)
        raise click.BadParameter(str(e), ctx=ctx, param=option) from None


def _given(ctx: click.Context, name: str) -> bool:
    """The user gave option `name` (on the command line or in its environment variable)."""
    return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def _bias_pair(item: str) -> tuple[str, float]:
    """One --logit-bias ID=BIAS as (ID, BIAS); ID is checked by `params.logit_bias`."""
    from gpt2cli.params import ParamError

    key, _, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise ParamError("logit_bias", f"expected ID=BIAS, got {item!r}") from None


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold stop signals (Ctrl-C, SIGTERM, SIGHUP) until the block ends, so text is never both
    printed and still counted unprinted (which would print it twice after the interruption)."""
    ours = [s for s in STOP_SIGNALS if signal.getsignal(s) is _on_stop_signal]  # others: left alone
    caught: list[int] = []
    for signum in ours:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum in ours:
            signal.signal(signum, _on_stop_signal)
    if caught:
        raise Stopped(caught[0])


@cli.command(short_help="Fetch a model into the hub cache.")
@click.argument("model", required=False)
@click.option("--revision", help="Branch, tag or commit of a hub model.")
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar, and no retry messages from the hub."
)
def download(model: str | None, revision: str | None, quiet: bool) -> None:
    """Download MODEL into the Hugging Face cache and print its local folder.

    MODEL is a name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or 124M, 355M, ...),
    a hub repo id owner/name, or a local folder (checked, not copied). Only the config,
    safetensors weights and tokenizer files are fetched; a model already in the cache is not
    fetched again, except its files that no longer match the hub's checksum. A progress bar goes
    to stderr when it is a terminal. A download stops after GPT2CLI_DOWNLOAD_TIMEOUT seconds
    (default 3600; 0: no limit), and the next run resumes it. Without MODEL, list the known
    models and where each is cached.
    """
    from gpt2cli import hub, weights

    if model is None:
        if revision is not None:
            raise click.UsageError("--revision needs a MODEL")
        rows = [
            (
                m.name,
                m.alias or "",
                f"{m.config.n_params / 1e6:.0f}M",
                _size(4 * m.config.n_params),
                m.repo_id,
                str(folder) if folder else "not cached",
            )
            for m, folder in hub.known_models()
        ]
        header = ("NAME", "ALIAS", "PARAMS", "FLOAT32", "HUB REPO", "CACHED")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            click.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        return
    progress = sys.stderr.isatty() and not quiet
    folder = hub.resolve(model, revision, progress=progress, refetch_damaged=True)
    weights.load(folder)  # complete and well-formed, or a clear error now rather than later
    click.echo(str(folder))


def _size(n_bytes: float) -> str:
    """Bytes as a short human size: 498 MB, 1.4 GB."""
    gb = n_bytes / 1e9
    return f"{gb:.1f} GB" if gb >= 1 else f"{n_bytes / 1e6:.0f} MB"


def _tokenizer(model: str | None) -> Tokenizer:
    """The tokenizer of `--model` (a hub name or a local folder), or GPT-2's built-in one."""
    from gpt2cli.tokenizer import load_tokenizer

    if model is None:
        return load_tokenizer(None)
    from gpt2cli.hub import resolve

    return load_tokenizer(resolve(model, tokenizer_only=True))


_MODEL_OPTION = click.option(
    "-m",
    "--model",
    metavar="NAME",
    help="Use this model's tokenizer: a model folder, or a hub name such as gpt2 or owner/name "
    "[default: GPT-2's vocabulary, built in].",
)


@cli.command(short_help="Print the token ids of a text.")
@click.argument("text", required=False)
@_MODEL_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the ids as a JSON array.")
@click.option("--count", is_flag=True, help="Print only the number of tokens.")
@click.option("--tokens", is_flag=True, help="Show each token's id and text, one per line.")
@click.option(
    "--no-special", is_flag=True, help="Encode <|endoftext|> as plain text, not token 50256."
)
def encode(
    text: str | None, model: str | None, as_json: bool, count: bool, tokens: bool, no_special: bool
) -> None:
    """Print the token ids of TEXT (or of stdin, when TEXT is absent or -), space-separated.

    stdin is encoded as it is read, so input of any size takes little memory and its ids come
    out as it arrives. A byte on stdin that is not UTF-8 stops it with an error (exit status 2)
    after the ids of the text before it have been printed.
    """
    if as_json + count + tokens > 1:
        raise click.UsageError("choose one of --json, --count and --tokens")
    tokenizer = _tokenizer(model)
    chunks = stdin_chunks("text") if text in (None, "-") else [read_text(text, "text")]
    batches = tokenizer.encode_stream(chunks, allowed_special=not no_special)
    if tokens:
        show_tokens(tokenizer, batches)
    elif count:
        write_stdout(f"{sum(map(len, batches))}\n")
    else:
        write_ids(batches, as_json=as_json)


@cli.command(
    short_help="Print the text of token ids.", context_settings={"ignore_unknown_options": True}
)
@click.argument("ids", nargs=-1)
@_MODEL_OPTION
def decode(ids: tuple[str, ...], model: str | None) -> None:
    """Write the text of token IDS (or of stdin) exactly, with nothing added.

    IDS are integers separated by spaces or commas, or one JSON array such as `[15496, 995]`;
    an empty array is no tokens. `gpt2 encode < f | gpt2 decode` reproduces f byte for byte.
    """
    source = " ".join(ids) if ids else read_text(None, "ids")
    tokens = parse_ids(source, "arguments" if ids else "stdin")
    write_stdout(_tokenizer(model).decode_bytes(tokens))  # bytes: written as they are


@cli.command(short_help="Perplexity and per-token surprisal of texts.")
@click.argument("files", nargs=-1, metavar="[FILE]...")
@click.option("--text", "literal", metavar="TEXT", help="Score TEXT itself instead of files.")
@_model_options
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    help="Start a window every STRIDE tokens in texts longer than the context "
    "[default: half the context, 512 for GPT-2].",
)
@click.option(
    "--no-bos",
    is_flag=True,
    help="Do not put <|endoftext|> before the text as context (its first token is then not "
    "scored), as Hugging Face's perplexity recipe.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input per line.")
@click.option(
    "--tokens",
    is_flag=True,
    help="Every token's logprob and rank: rows when piped, the text coloured by rank (GLTR) on "
    "a terminal, a `tokens` list with --json/--jsonl.",
)
@click.option(
    "--top",
    type=click.IntRange(min=0, max=1000),
    default=0,
    help="With --tokens, also the N most likely tokens at each place.",
)
@click.option(
    "--html",
    "html_out",
    metavar="OUT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the text's tokens coloured by rank, with their details, to OUT as one "
    "self-contained HTML file (gpt2 serve's Inspect view; no server, no network).",
)
@click.option(
    "--kl-divergence",
    "kl",
    is_flag=True,
    help="With --dtype bfloat16 or int8: score with it and with float32, and print the mean KL "
    "divergence per token of its next-token distribution from float32's (nats), its standard "
    "error and how often both models' top token agrees (llama.cpp's measure).",
)
@_dataset_options("text")
def score(
    files: tuple[str, ...],
    literal: str | None,
    model_name: str,
    revision: str | None,
    dtype: str,
    threads: int | None,
    stride: int | None,
    no_bos: bool,
    as_json: bool,
    tokens: bool,
    top: int,
    html_out: Path | None,
    kl: bool,
    **dataset_options: Any,
) -> None:
    """Score text with GPT-2: perplexity, bits per byte and each token's surprisal.

    Reads each FILE (stdin when there is none, or for `-`), or --text. Texts longer than the
    context are scored in Hugging Face's strided windows, every token once (with --stride equal
    to the context, a later window's first token has no context and is not scored, as in that
    recipe). Piped, the default output is tab-separated: a header, then source, tokens,
    perplexity and bits per byte per input. With --jsonl, a field of a line named like a result
    field (n_tokens, perplexity, ...) is replaced by the result.
    """
    from gpt2cli.output import (
        print_gltr,
        print_score_summary,
        print_token_rows,
        token_progress,
    )
    from gpt2cli.score import combined, score_json, score_texts

    if top and not tokens:
        raise click.UsageError("--top goes with --tokens")
    if html_out is not None:
        if as_json or tokens or len(files) > 1 or dataset_options.get("jsonl") is not None:
            raise click.UsageError("--html writes one text's view: one FILE or --text, alone")
        from gpt2cli.webpage import TOP, write_score_html

        top = TOP  # each token's alternatives, as the page's Inspect view shows them
    options = _DatasetOptions(**dataset_options)
    engine = options.checked_engine()
    if kl:
        if tokens or html_out is not None or options.jsonl is not None:
            raise click.UsageError(
                "--kl-divergence goes with FILE or --text, not with --tokens, --html or --jsonl"
            )
        _score_kl(files, literal, model_name, revision, dtype, threads, stride, not no_bos, as_json)
        return
    if options.jsonl is not None:
        from gpt2cli.dataset import ScoreTask

        source = _jsonl_source(options.jsonl, files, literal)
        task = ScoreTask(options.batch_size or 8, stride, not no_bos, top, tokens)
        model = _score_model(model_name, revision, stride, dtype, threads)
        options.run(
            task, model, engine, source, "scoring", model_name=model_name, revision=revision
        )
        return
    inputs = _score_inputs(files, literal)
    if html_out is not None and files and files[0] != "-":
        with contextlib.suppress(OSError):  # a view that does not exist yet is no input
            if os.path.samefile(html_out, files[0]):
                raise GPT2Error(f"{html_out} is the input file; write the view to another file")
    model = _score_model(model_name, revision, stride, dtype, threads)
    names = ["stdin" if name == "-" else name for name, _, _ in inputs]
    with token_progress("scoring") as progress:
        scores = score_texts(
            model,
            [text for _, _, text in inputs],
            stride=stride,
            bos=not no_bos,
            top=top,
            progress=progress,
            names=names,
        )
    tokenizer = model.tokenizer
    if html_out is not None:
        write_score_html(html_out, scores[0], tokenizer, inputs[0][2], inputs[0][1])
    if as_json:
        for (_, fields, _), result in zip(inputs, scores, strict=True):
            write_stdout(score_json(result, tokenizer, tokens=tokens, first=fields))
    elif tokens and sys.stdout.isatty():
        for name, (_, _, text), result in zip(names, inputs, scores, strict=True):
            print_gltr(tokenizer, name, tokenizer.encode(text), result)
    elif tokens:
        print_token_rows(tokenizer, list(zip(names, scores, strict=True)), top)
    else:
        total = combined(scores) if len(scores) > 1 else None
        print_score_summary(list(zip(names, scores, strict=True)), total)


def _score_kl(
    files: tuple[str, ...],
    literal: str | None,
    model_name: str,
    revision: str | None,
    dtype: str,
    n_threads: int | None,
    stride: int | None,
    bos: bool,
    as_json: bool,
) -> None:
    """`gpt2 score --kl-divergence`: each input scored in float32 and in `dtype`, compared."""
    from gpt2cli.model import GPT2
    from gpt2cli.output import token_progress
    from gpt2cli.score import kl_json, kl_table, kl_texts

    if dtype == "float32":
        raise click.UsageError(
            "--kl-divergence compares --dtype bfloat16 or int8 with float32: give one of them"
        )
    inputs = _score_inputs(files, literal)
    reference = _score_model(model_name, revision, stride, "float32", n_threads)
    model = GPT2.from_pretrained(reference.folder or model_name, dtype=dtype)
    names = ["stdin" if name == "-" else name for name, _, _ in inputs]
    texts = [text for _, _, text in inputs]
    with token_progress("comparing") as progress:
        reports = kl_texts(
            reference, model, texts, stride=stride, bos=bos, progress=progress, names=names
        )
    if as_json:
        for (_, fields, _), report in zip(inputs, reports, strict=True):
            write_stdout(kl_json(report, fields | {"dtype": dtype, "reference_dtype": "float32"}))
        return
    rows = [(escape_controls(name), r) for name, r in zip(names, reports, strict=True)]
    write_stdout(kl_table(rows, aligned=sys.stdout.isatty()))


def _score_inputs(
    files: tuple[str, ...], literal: str | None
) -> list[tuple[str, dict[str, Any], str]]:
    """What `gpt2 score` reads, each as (name for messages, first output fields, text)."""
    if literal is not None:
        if files:
            raise click.UsageError("--text goes alone, without FILE arguments or --jsonl")
        return [("<text>", {"source": "<text>"}, argument_text(literal, "--text"))]
    sources = files or ("-",)
    if sources.count("-") > 1:
        raise click.UsageError("stdin (-) can be read only once")
    return [(name, {"source": printable(name)}, read_file(name)) for name in sources]


def _jsonl_source(jsonl: str, files: tuple[str, ...], literal: str | None) -> str:
    """The file `gpt2 score --jsonl` reads: its value, or the one FILE after a bare --jsonl."""
    if literal is not None:
        raise click.UsageError("--text goes alone, without FILE arguments or --jsonl")
    if not files:
        return jsonl
    if jsonl != "-" or len(files) > 1:
        raise click.UsageError("--jsonl reads one file (or stdin)")
    return files[0]


def _score_model(
    name: str, revision: str | None, stride: int | None, dtype: str, n_threads: int | None
) -> GPT2:
    """The model to score with, once --stride is known to fit its context."""
    model = _load_model(name, revision, dtype, n_threads)
    if stride is not None and stride > model.config.n_ctx:
        raise GPT2Error(f"--stride must be between 1 and the context, {model.config.n_ctx} tokens")
    return model


@cli.command(short_help="Serve the OpenAI completions API over HTTP.")
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Sequences decoded together (continuous batching); also the largest n per request.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Sequences (prompts x n) that may wait for a free row; beyond them the answer is 429.",
)
@click.option(
    "--api-key",
    envvar="GPT2_API_KEY",
    help="Require `Authorization: Bearer KEY` on every endpoint but /health [env: GPT2_API_KEY].",
)
@click.option("-q", "--quiet", is_flag=True, help="No access log (one line per request on stderr).")
@click.option("--no-web", is_flag=True, help="No web page at / (then / is a 404 like any path).")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where the decode loops run: this process, or Ray Serve replicas (on --ray-address, "
    "else a local Ray instance); ray needs gpt2cli[ray].",
)
@click.option(
    "--replicas", type=click.IntRange(min=1), help="With --engine ray: replicas (default 1)."
)
@click.option("--autoscale", metavar="MIN:MAX", help="With --engine ray: autoscaled replicas.")
@click.option("--ray-address", metavar="ADDRESS", help="With --engine ray: the cluster.")
@click.option(
    "--threads-per-replica",
    type=click.IntRange(min=1),
    help="With --engine ray: BLAS threads (and CPUs) per replica (default 1).",
)
@click.option("-v", "--verbose", is_flag=True, help="With --engine ray: show Ray's own logs.")
def serve(
    model_name: str,
    revision: str | None,
    dtype: str,
    threads: int | None,
    host: str,
    port: int,
    max_batch: int,
    max_queue: int,
    api_key: str | None,
    quiet: bool,
    no_web: bool,
    engine: str,
    replicas: int | None,
    autoscale: str | None,
    ray_address: str | None,
    threads_per_replica: int | None,
    verbose: bool,
) -> None:
    """Serve the model over HTTP with OpenAI's completions API until Ctrl-C or SIGTERM.

    Endpoints: POST /v1/completions (streamed with "stream": true), GET /v1/models, GET /health,
    POST /tokenize and /detokenize. All requests share one decode batch. The URL is printed on
    stdout once the server listens; errors and logs go to stderr. Open the URL in a browser for
    the web page: a playground and the GLTR view of a text (unless --no-web). With --engine ray
    the decode loops run on Ray Serve replicas, behind this same server (docs/ray-serve.md).
    """
    from gpt2cli.serve import APIServer  # the serve extra: a one-line error when it is missing

    if api_key is None and os.environ.get("GPT2_API_KEY") == "":  # Click reads it as unset
        api_key = ""  # set, to nothing: refused as `--api-key ''` is, never taken as no key
    ray_given = [replicas, autoscale, ray_address, threads_per_replica]
    if engine == "local" and (any(v is not None for v in ray_given) or verbose):
        raise click.UsageError(
            "--replicas, --autoscale, --ray-address, --threads-per-replica and -v go with "
            "--engine ray"
        )
    if engine == "ray":
        from gpt2cli import ray_serve

        ray_serve.require()  # the extra checked before the model loads
        if autoscale is not None:
            ray_serve.parse_autoscale(autoscale)
    model = _load_model(model_name, revision, dtype, threads)
    ray_server = None
    if engine == "ray":
        ray_server = ray_serve.RayServer(
            model,
            replicas=replicas,
            autoscale=autoscale,
            address=ray_address,
            threads=threads_per_replica or 1,
            verbose=verbose,
            max_batch=max_batch,
            max_queue=max_queue,
        )
    try:
        server = APIServer(
            model,
            name=model_name,
            host=host,
            port=port,
            max_batch=max_batch,
            max_queue=max_queue,
            api_key=api_key,
            access_log=not quiet,
            web=not no_web,
            engine=ray_server.engine if ray_server else None,
        )
        if ray_server is not None:
            print(f"gpt2 serve: {ray_serve.describe(ray_server)}", file=sys.stderr, flush=True)
        write_stdout(f"Serving {model_name} at {server.url}\n")  # flushed: scripts wait for it
        server.run()
    finally:
        if ray_server is not None:
            ray_server.stop()


@cli.group("cache", invoke_without_command=True, short_help="List or clear what gpt2cli keeps.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as one JSON object.")
@click.pass_context
def cache_group(ctx: click.Context, as_json: bool) -> None:
    """List what gpt2cli keeps on disk, with sizes: its own cache of derived files and the
    GPT-2 models in the Hugging Face hub cache.

    gpt2cli's cache ($XDG_CACHE_HOME/gpt2cli, ~/.cache/gpt2cli) holds tokenizer tables and each
    model's weight layout (its head and c_proj weights transposed, or with the fast extra every
    weight matrix in panels for its kernels), keyed by the weights' content: the
    same weights in several folders are stored once. The hub cache (HF_HUB_CACHE) holds the
    downloads, shared with transformers.
    """
    if ctx.invoked_subcommand is None:
        from gpt2cli import cachelist

        cachelist.print_listing(cachelist.listing(), as_json=as_json)


@cache_group.command("clear", short_help="Remove gpt2cli's derived files (and hub models named).")
@click.option(
    "--hub",
    "hub_models",
    multiple=True,
    metavar="NAME",
    help="Also remove this model's downloads from the hub cache (gpt2, 124M, owner/name; all "
    "its revisions). Repeatable.",
)
def cache_clear(hub_models: tuple[str, ...]) -> None:
    """Remove gpt2cli's derived files (made again when needed) and print what was freed.

    The hub cache is left alone unless a model is named with --hub.
    """
    from gpt2cli import cache as user_cache
    from gpt2cli import cachelist

    cachelist.print_cleared(cachelist.clear(hub_models), user_cache.folder())


def main() -> None:
    """Run the `gpt2` command: stop signals handled like Ctrl-C, then the Click group."""
    for name in ("COLUMNS", "LINES"):  # rich would draw nothing in a width of 0
        if not os.environ.get(name, "1").isdigit() or int(os.environ.get(name, "1")) < 1:
            del os.environ[name]
    for signum in STOP_SIGNALS:  # one that is ignored (nohup's SIGHUP) stays ignored
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(signum, _on_stop_signal)
    cli.main(prog_name="gpt2")
