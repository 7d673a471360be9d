"""The generation loop: a batch of samples from one prompt, as ids and as printable text.

`Generation` runs the model's incremental decoder (prefill the prompt once, then one cached step
per token) for `num_samples` rows at once, chooses each next id with `gpt2cli.sampling`, and
stops each row on `<|endoftext|>`, a stop string, `max_tokens` or the context limit. Iterating it
yields each id as it is sampled, with the text it made safe to print: never half of a UTF-8
character and never any part of a stop string. `generate_text` is the one-sample text shorthand;
`generate_ids` the one-sample ids shorthand.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from gpt2cli.errors import GPT2Error
from gpt2cli.sampling import SamplingOptions, sample, token_logprobs

if TYPE_CHECKING:
    from gpt2cli.model import GPT2
    from gpt2cli.tokenizer import Tokenizer

FinishReason = Literal["length", "stop", "eos"]


@dataclass
class Timings:
    """Where one sample's time went, in seconds.

    `prefill_s` runs from the start of the prompt's forward pass to the first sampled token (the
    time to first token once the model is loaded); `decode_s` covers every later token until the
    sample finished, so `tokens_per_s` is the steady decoding speed.
    """

    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decoded: int = 0  # tokens produced by decode steps (all but the first)

    @property
    def tokens_per_s(self) -> float:
        """Decode steps per second (0.0 when there were none)."""
        return self.decoded / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Completion:
    """One sample: its ids, their log-probabilities, its text and why it ended.

    `ids` holds every generated id, including an ending `<|endoftext|>` or the tokens of a stop
    string; `text` is the continuation before them (what was printed).
    """

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None  # None while the sample is still running
    timings: Timings = field(default_factory=Timings)

    def to_json(self) -> dict[str, Any]:
        """The `gpt2 generate --json` object for this sample."""
        t = self.timings
        return {
            "text": self.text,
            "ids": self.ids,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "logprobs": [round(lp, 6) for lp in self.logprobs],
            "timings": {
                "load_s": round(t.load_s, 6),
                "prefill_s": round(t.prefill_s, 6),
                "decode_s": round(t.decode_s, 6),
                "tokens_per_s": round(t.tokens_per_s, 3),
            },
        }


class Token(NamedTuple):
    """One generated token of one sample, with the text that became printable with it.

    `text` is often empty (bytes of a split character, a possible stop-string start, or the
    ending `<|endoftext|>`); `done` marks the sample's last token.
    """

    sample: int
    id: int
    text: str
    done: bool


class TextStream:
    """Ids of one sample -> text pieces that are safe to print as soon as they are returned.

    Bytes of a UTF-8 character split across tokens are held until the character is complete,
    and text that could be the start of a stop string is held until it is known not to be one.
    Once a stop string appears, `stopped` is set and nothing from it onwards is ever returned.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that might be the beginning of a stop string
        self.stopped = False

    def push(self, id: int) -> str:
        """Add one token; return the text that became safe to print ("" once stopped)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._tokenizer.token_bytes(id))
        cut = min((i for i in (self._held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            ready, self._held = self._held[:cut], ""
            return ready
        split = len(self._held) - self._stop_prefix_length(self._held)
        ready, self._held = self._held[:split], self._held[split:]
        return ready

    def finish(self) -> str:
        """End of the sample: return everything still held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        rest, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return rest

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of text that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stop), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self._stop):
                return n
        return 0


class Generation:
    """A batch of `num_samples` continuations of one prompt, run when iterated.

    Iterating yields a `Token` for each id as it is sampled; `completions` fill in as it runs, so
    after an interruption they still hold everything generated so far. The random generator is
    seeded once for the batch: the same seed and options give the same samples. A prompt that
    leaves no room in the context is an error, or with `truncate` keeps its last tokens, leaving
    room for `max_tokens` (`completions[i].prompt_ids` are the ids kept).
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
        n_ctx = model.config.n_ctx
        if max_tokens < 1:
            raise GPT2Error(f"max_tokens must be at least 1, got {max_tokens}")
        if num_samples < 1:
            raise GPT2Error(f"num_samples must be at least 1, got {num_samples}")
        if any(s == "" for s in stop):
            raise GPT2Error("a stop string must not be empty")
        prompt = list(prompt_ids) or [model.tokenizer.eot_token]
        if truncate:  # keep the last tokens, leaving room for max_tokens (and at least one token)
            prompt = prompt[-max(1, n_ctx - max_tokens) :]
        if len(prompt) >= n_ctx:
            raise GPT2Error(
                f"prompt is {len(prompt)} tokens but the model's context is {n_ctx} tokens; "
                f"shorten it to at most {n_ctx - 1} tokens to leave room to generate, "
                "or truncate it to its last tokens"
            )
        self.budget = min(max_tokens, n_ctx - len(prompt))  # new tokens that fit in the context
        model.check_fits(num_samples, len(prompt) + self.budget, logits=num_samples)
        self.model = model
        self.sampling = sampling or SamplingOptions()
        self.ignore_eos = ignore_eos
        self.rng = np.random.default_rng(seed)
        self.streams = [TextStream(model.tokenizer, stop) for _ in range(num_samples)]
        self.completions = [
            Completion(prompt_ids=prompt, timings=Timings(load_s=load_s))
            for _ in range(num_samples)
        ]

    def __iter__(self) -> Iterator[Token]:
        """Run the batch, yielding each sampled id and the text it made safe to print."""
        eot = self.model.tokenizer.eot_token
        prompt = self.completions[0].prompt_ids
        n = len(self.completions)
        start = time.perf_counter()
        state, logits = self.model.prefill([prompt] * n, len(prompt) + self.budget)  # [n, V]
        for _ in range(self.budget):
            ids = sample(logits, self.rng, self.sampling)  # [n]
            logprobs = token_logprobs(logits, ids)  # [n]
            now = time.perf_counter()
            for row, completion in enumerate(self.completions):
                if completion.finish_reason is None:
                    yield self._advance(row, int(ids[row]), float(logprobs[row]), now - start)
            if all(c.finish_reason is not None for c in self.completions):
                return
            ids[[c.finish_reason is not None for c in self.completions]] = eot
            logits = self.model.step(state, ids)  # [n, V]

    def flush(self) -> None:
        """Stop where it is (after an interruption): move the text each unfinished sample holds
        back (a partial character or stop-string prefix) into its `text`."""
        for completion, stream in zip(self.completions, self.streams, strict=True):
            if completion.finish_reason is None:
                completion.text += stream.finish()

    def _advance(self, row: int, id: int, logprob: float, elapsed: float) -> Token:
        """Append one sampled id to sample `row`, finishing the sample if it is due."""
        c, stream = self.completions[row], self.streams[row]
        c.ids.append(id)
        c.logprobs.append(logprob)
        if len(c.ids) == 1:
            c.timings.prefill_s = elapsed
        else:
            c.timings.decode_s, c.timings.decoded = elapsed - c.timings.prefill_s, len(c.ids) - 1
        eos = id == self.model.tokenizer.eot_token and not self.ignore_eos
        text = "" if eos else stream.push(id)
        if eos or stream.stopped or len(c.ids) == self.budget:
            c.finish_reason = "eos" if eos else "stop" if stream.stopped else "length"
            text += stream.finish()
        c.text += text
        return Token(row, id, text, done=c.finish_reason is not None)


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
