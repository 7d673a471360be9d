"""Generating from one prompt: a batch of samples, as ids and as printable text.

`Generation` runs one request on a `gpt2cli.scheduler.Scheduler` of its own, sized to fit it:
the prompt is run once, then one cached step per token for `n` samples at once. Iterating it
yields each id as it is sampled, with the text it made safe to print: never half of a UTF-8
character and never any part of a stop string. `generate_text` is the one-sample text
shorthand; `generate_ids` the one-sample ids shorthand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpt2cli.params import GenerationParams, fit_prompt
from gpt2cli.scheduler import FailedEvent, Request, Scheduler, TokenEvent

if TYPE_CHECKING:
    from gpt2cli.model import GPT2


class Generation:
    """`params.n` continuations of one prompt, run when iterated.

    Iterating yields a `TokenEvent` for each id as it is sampled; `samples` fill in as it runs,
    so after an interruption they still hold everything generated so far. The random generator
    is seeded once for the batch: the same seed and options give the same samples. The prompt
    runs as `gpt2cli.params.fit_prompt` keeps it (`samples[i].prompt_ids`). `load_s` is
    reported in each sample's timings. A `draft` model (a smaller GPT-2 of the same vocabulary)
    drafts tokens for the model to verify (`gpt2cli.speculative`) unless it searches beams.
    """

    def __init__(
        self,
        model: GPT2,
        prompt_ids: Sequence[int],
        params: GenerationParams | None = None,
        *,
        load_s: float = 0.0,
        draft: GPT2 | None = None,
    ) -> None:
        params = params or GenerationParams()
        prompt, budget = fit_prompt(
            prompt_ids, params, model.config.n_ctx, model.tokenizer.eot_token
        )
        # refuses what memory can't hold
        self.scheduler = Scheduler(model, params.draws, len(prompt) + budget, draft=draft)
        self.state = self.scheduler.submit(Request(prompt_ids, params))
        self.samples = self.state.samples  # filled in as it runs
        for s in self.samples:
            s.timings.load_s = load_s

    def __iter__(self) -> Iterator[TokenEvent]:
        """Run the batch, yielding each sampled id and the text it made safe to print."""
        for event in self.scheduler.run():
            if isinstance(event, FailedEvent):
                raise event.error
            if isinstance(event, TokenEvent):
                yield event

    def flush(self) -> None:
        """Stop where it is (after an interruption): move the text each unfinished sample holds
        back (a partial character or stop-string prefix) into its `text`."""
        self.scheduler.flush(self.state)


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
    params = GenerationParams(
        max_tokens, temperature, top_k, top_p, seed, 1, tuple(stop), ignore_eos, truncate
    )
    for token in Generation(model, model.tokenizer.encode(prompt), params):
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

    The options are `gpt2 generate`'s (see `gpt2cli.params.GenerationParams`), with ids-level
    defaults: greedy, and `<|endoftext|>` yielded like any other id (with `ignore_eos=False` it
    is the last id). It ends after `max_new_tokens` ids, or earlier when prompt plus
    continuation reach n_ctx (finish reason "length" either way; a prompt of n_ctx tokens
    yields nothing). A longer prompt is an error, or with `truncate=True` keeps its last
    tokens, leaving room for `max_new_tokens`.
    """
    prompt = np.asarray(ids).tolist()
    if max_new_tokens < 1 or (len(prompt) == model.config.n_ctx and not truncate):
        return
    params = GenerationParams(
        max_new_tokens, temperature, top_k, top_p, seed, 1, (), ignore_eos, truncate
    )
    for token in Generation(model, prompt, params):
        yield token.id
