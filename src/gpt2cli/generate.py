"""Generating from one prompt: a batch of samples, as ids and as printable text.

`Generation` runs the model's incremental decoder (prefill the prompt once, then one cached step
per token) for `num_samples` rows at once, as one request on a `gpt2cli.scheduler.Scheduler`:
each next id is chosen with `gpt2cli.sampling`, and each row stops on `<|endoftext|>`, a stop
string, `max_tokens` or the context limit. Iterating it yields each id as it is sampled, with
the text it made safe to print: never half of a UTF-8 character and never any part of a stop
string. `generate_text` is the one-sample text shorthand; `generate_ids` the one-sample ids
shorthand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpt2cli.errors import GPT2Error
from gpt2cli.sampling import SamplingOptions
from gpt2cli.scheduler import Event, Request, Scheduler

if TYPE_CHECKING:
    from gpt2cli.model import GPT2


class Generation:
    """A batch of `num_samples` continuations of one prompt, run when iterated.

    Iterating yields an `Event` for each id as it is sampled; `completions` fill in as it runs,
    so after an interruption they still hold everything generated so far. The random generator
    is seeded once for the batch: the same seed and options give the same samples. A prompt that
    leaves no room in the context is an error, or with `truncate` keeps its last tokens, leaving
    room for `max_tokens` (`completions[i].prompt_ids` are the ids kept). It is one request
    on a `Scheduler` of its own, sized to fit it exactly.
    """

    def __init__(
        self,
        model: GPT2,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int = 40,
        sampling: SamplingOptions | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        truncate: bool = False,
        load_s: float = 0.0,
    ) -> None:
        self.request = Request(
            prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling or SamplingOptions(),
            seed=seed,
            n=num_samples,
            stop=stop,
            ignore_eos=ignore_eos,
            truncate=truncate,
            load_s=load_s,
        )
        self.request.prepare(model)
        capacity = len(self.request.prompt_ids) + self.request.budget
        self.scheduler = Scheduler(model, num_samples, capacity)  # refuses what memory can't hold
        self.request.open()
        self.completions = self.request.completions  # filled in as it runs

    def __iter__(self) -> Iterator[Event]:
        """Run the batch, yielding each sampled id and the text it made safe to print."""
        events = self.scheduler.admit(self.request)
        while events:
            yield from events
            events = self.scheduler.step()

    def flush(self) -> None:
        """Stop where it is (after an interruption): move the text each unfinished sample holds
        back (a partial character or stop-string prefix) into its `text`."""
        self.scheduler.flush(self.request)


def generate_text(
    model: GPT2,
    prompt: str,
    *,
    max_tokens: int = 40,
    temperature: float = 1.0,
    top_k: int = 5,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    truncate: bool = False,
) -> Iterator[str]:
    """Continue `prompt` with one sample, yielding text pieces as soon as they are safe to print.

    The options and defaults are `gpt2 generate`'s; joined, the pieces are the continuation.
    """
    generation = Generation(
        model,
        model.tokenizer.encode(prompt),
        max_tokens=max_tokens,
        sampling=SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        truncate=truncate,
    )
    for token in generation:
        if token.text:
            yield token.text


def generate_ids(
    model: GPT2,
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    ignore_eos: bool = True,
    truncate: bool = False,
) -> Iterator[int]:
    """Yield the continuation of `ids`, one id at a time: greedy unless a temperature is set.

    The options are `gpt2 generate`'s (see `gpt2cli.sampling.SamplingOptions`), with
    ids-level defaults: greedy, and `<|endoftext|>` yielded like any other id (with
    `ignore_eos=False` it is the last id). It ends after `max_new_tokens` ids, or earlier when
    prompt plus continuation reach n_ctx (finish reason "length" either way; a prompt of n_ctx
    tokens yields nothing). A longer prompt is an error, or with `truncate=True` keeps its last
    tokens, leaving room for `max_new_tokens`.
    """
    prompt = np.asarray(ids).tolist()
    n_ctx = model.config.n_ctx
    if len(prompt) > n_ctx and not truncate:
        raise GPT2Error(
            f"prompt is {len(prompt)} tokens but the model's context is {n_ctx} tokens; "
            f"shorten it, or truncate it to its last {n_ctx} tokens"
        )
    if max_new_tokens < 1 or (len(prompt) == n_ctx and not truncate):
        return
    generation = Generation(
        model,
        prompt,
        max_tokens=max_new_tokens,
        sampling=SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed,
        ignore_eos=ignore_eos,
        truncate=truncate,
    )
    for token in generation:
        yield token.id
