"""Continuous batching: many requests share one decode batch, joining and leaving between steps.

A `Request` is one prompt with its options: `n` samples drawn together from one random
generator. A `Scheduler` owns one KV cache of `max_batch` rows. `admit` runs requests' prompts
once (one padded batch) into free rows and samples each sample's first token; `step` feeds
every running sample its last token and samples the next. A request leaves the batch as soon as
all its samples have finished (or it is cancelled), and its rows are free for the next `admit`.

A request's samples do not depend on what else is in the batch or when it joined: its rows'
logits are those it gets alone (rows never see each other), and its generator draws for its
own rows only, in the same order as a batch of that one request would. So `gpt2 generate
--jsonl`, `gpt2 serve` and `gpt2 generate -n N --seed S` give the same samples.

Text is assembled per sample by `TextStream`: never half a UTF-8 character, never any part of a
stop string. Not thread-safe: one thread drives a scheduler (a server's worker thread).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from gpt2cli.errors import GPT2Error
from gpt2cli.ops import log_softmax, top_ids
from gpt2cli.sampling import SamplingOptions, sample

if TYPE_CHECKING:
    from gpt2cli.model import GPT2, DecodeState
    from gpt2cli.tokenizer import Tokenizer

FinishReason = Literal["length", "stop", "eos"]
MAX_TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's limit)


@dataclass
class Timings:
    """Where one sample's time went, in seconds.

    `prefill_s` runs from the start of the prompt's forward pass to the first sampled token (the
    time to first token once the model is loaded and the request admitted); `decode_s` covers
    every later token until the sample finished, so `tokens_per_s` is its steady decoding speed.
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


@dataclass(eq=False)  # compared by identity: a scheduler tracks requests as objects
class Request:
    """One prompt and its options: `n` samples drawn together from one generator.

    An empty prompt starts from `<|endoftext|>`. A prompt that leaves no room in the context is
    an error, or with `truncate` keeps its last tokens, leaving room for `max_tokens`. The
    scheduler fills `completions` (one per sample, filled in as they run) and `budget` (the new
    tokens that fit: at most `max_tokens`, at most what the context has left).
    """

    prompt_ids: Sequence[int]
    max_tokens: int = 16
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    seed: int | None = None
    n: int = 1
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives returned with each token, most likely first
    truncate: bool = False
    load_s: float = 0.0  # reported in each sample's timings
    completions: list[Completion] = field(default_factory=list)
    budget: int = 0
    cancelled: bool = False

    def prepare(self, model: GPT2) -> None:
        """Check the options against `model` and fill the kept prompt and `budget`, or raise
        GPT2Error naming the first bad one. Idempotent."""
        n_ctx = model.config.n_ctx
        if self.max_tokens < 1:
            raise GPT2Error(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.n < 1:
            raise GPT2Error(f"n (samples) must be at least 1, got {self.n}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise GPT2Error(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}"
            )
        if any(not s for s in self.stop):
            raise GPT2Error("a stop string must not be empty")
        prompt = list(self.prompt_ids) or [model.tokenizer.eot_token]
        if self.truncate:  # keep the last tokens, leaving room for max_tokens (and >= 1)
            prompt = prompt[-max(1, n_ctx - self.max_tokens) :]
        if len(prompt) >= n_ctx:
            raise GPT2Error(
                f"prompt is {len(prompt)} tokens but the model's context is {n_ctx} tokens; "
                f"shorten it to at most {n_ctx - 1} tokens to leave room to generate, "
                "or truncate it to its last tokens"
            )
        model.check_ids(np.asarray(prompt))
        self.prompt_ids, self.budget = prompt, min(self.max_tokens, n_ctx - len(prompt))

    def open(self) -> None:
        """Create the samples' completions, empty, once prepared and known to fit in memory."""
        if not self.completions:
            self.completions.extend(
                Completion(prompt_ids=list(self.prompt_ids), timings=Timings(load_s=self.load_s))
                for _ in range(self.n)
            )

    @property
    def finished(self) -> bool:
        """Every sample has its finish reason, or the request was cancelled."""
        return self.cancelled or all(c.finish_reason for c in self.completions)


class Event(NamedTuple):
    """One generated token of one sample of a request, with the text that became printable.

    `text` is often empty (bytes of a split character, a possible stop-string start, or the
    ending `<|endoftext|>`); `logprob` is the token's log-probability under the model itself
    (temperature 1, unfiltered); `top` the request's `top_logprobs` most likely (id, logprob)
    pairs at this position; `done` marks the sample's last token.
    """

    sample: int
    id: int
    text: str
    done: bool
    logprob: float
    top: list[tuple[int, float]]
    request: Request


@dataclass(eq=False)
class _Running:
    """An admitted request: its rows in the cache, generator, text streams and last logits."""

    request: Request
    rows: list[int]
    rng: np.random.Generator
    streams: list[TextStream]
    logits: Any  # [n, V] of the next tokens
    start: float  # when its prefill began


class Scheduler:
    """Runs requests in one decode batch of up to `max_batch` rows; see the module docstring.

    The cache holds `capacity` positions per row (n_ctx by default), allocated lazily; a
    request needs a row per sample, and its prompt plus budget must fit in `capacity`.
    """

    def __init__(self, model: GPT2, max_batch: int = 8, capacity: int | None = None) -> None:
        n_ctx = model.config.n_ctx
        capacity = n_ctx if capacity is None else capacity
        if max_batch < 1:
            raise GPT2Error(f"the batch must hold at least one row, got {max_batch}")
        if not 1 <= capacity <= n_ctx:
            raise GPT2Error(f"capacity must be between 1 and the model's n_ctx ({n_ctx})")
        self.model = model
        self.max_batch = max_batch
        self.state: DecodeState = model.empty_state(max_batch, capacity, logits=max_batch)
        self._owner: list[_Running | None] = [None] * max_batch  # which request holds each row
        self._running: list[_Running] = []

    @property
    def free(self) -> int:
        """Rows free now: a request of n samples can be admitted when n <= free."""
        return self._owner.count(None)

    @property
    def running(self) -> list[Request]:
        """Admitted requests that have not finished, in the order they were admitted."""
        return [r.request for r in self._running]

    def check(self, request: Request) -> None:
        """Validate `request` for this batch (`Request.prepare`, then its samples and length
        against the rows and capacity), or raise GPT2Error saying why it can never run here."""
        request.prepare(self.model)
        if request.n > self.max_batch:
            raise GPT2Error(
                f"n (samples) must be at most the batch size {self.max_batch}, got {request.n}"
            )
        needed, capacity = len(request.prompt_ids) + request.budget, self.state.capacity
        if needed > capacity:
            raise GPT2Error(
                f"prompt ({len(request.prompt_ids)} tokens) and {request.budget} new tokens "
                f"need {needed} positions, but this batch holds {capacity} per row"
            )

    def admit(self, *requests: Request) -> list[Event]:
        """Run the requests' prompts into free rows and sample each sample's first token.

        Needs their samples to fit the free rows. The prompts run as one padded batch (one
        forward pass for all, about as fast as one) and each is copied to its n rows. Returns
        one event per sample (a sample may already be done).
        """
        for request in requests:
            self.check(request)
        free = [row for row, owner in enumerate(self._owner) if owner is None]
        needed = sum(r.n for r in requests)
        if needed > len(free):
            raise GPT2Error(f"{needed} rows needed, {len(free)} free")
        if not requests:
            return []
        groups = []
        for request in requests:
            groups.append(free[: request.n])
            free = free[request.n :]
        start = time.perf_counter()
        logits = self.model.prefill_into(self.state, [r.prompt_ids for r in requests], groups)
        tokenizer = self.model.tokenizer
        admitted = []
        for request, rows, first in zip(requests, groups, logits, strict=True):
            request.open()
            running = _Running(
                request,
                rows,
                np.random.default_rng(request.seed),
                [TextStream(tokenizer, request.stop) for _ in rows],
                np.broadcast_to(first, (len(rows), len(first))),
                start,
            )
            for row in rows:
                self._owner[row] = running
            self._running.append(running)
            admitted.append(running)
        return self._sample(admitted)

    def step(self) -> list[Event]:
        """One decode step for every running request: an event per unfinished sample."""
        if not self._running:
            return []
        used = 1 + max(row for r in self._running for row in r.rows)  # rows 0..used-1 run
        ids = np.zeros(used, np.intp)  # free rows are fed id 0 at position 0, then ignored
        for row in range(used):
            owner = self._owner[row]
            if owner is None:
                self.state.lengths[row] = 0
            else:
                c = owner.request.completions[owner.rows.index(row)]
                # a finished sample of a running request is fed <|endoftext|>, logits unused
                ids[row] = c.ids[-1] if c.finish_reason is None else self.model.tokenizer.eot_token
        logits = self.model.step(self.state.rows(0, used), ids)  # [used, V]
        for r in self._running:
            r.logits = logits[r.rows]
        return self._sample(self._running)

    def cancel(self, request: Request) -> None:
        """Take `request` out of the batch now (its client went away); its rows are freed."""
        request.cancelled = True
        self._release()

    def _sample(self, batch: list[_Running]) -> list[Event]:
        """Choose each running sample's next id from its logits; finish and release requests."""
        events = []
        now = time.perf_counter()
        known = self.model.tokenizer.n_vocab  # a padded vocabulary (nanoGPT's 50,304) has more
        for r in batch:
            request = r.request
            logits = np.asarray(r.logits)[:, :known]  # [n, V]: only ids that have a text
            ids = sample(logits, r.rng, request.sampling)  # [n]: all n drawn, as alone
            logprobs = log_softmax(logits)  # [n, V]
            chosen = logprobs[np.arange(len(ids)), ids]  # [n]
            best = top_ids(logprobs, request.top_logprobs)  # [n, top]
            for i, c in enumerate(request.completions):
                if c.finish_reason is None:
                    top = [(int(t), float(logprobs[i, t])) for t in best[i]]
                    events.append(
                        self._advance(r, i, int(ids[i]), float(chosen[i]), top, now - r.start)
                    )
        self._release()
        return events

    def _advance(
        self,
        r: _Running,
        i: int,
        id: int,
        logprob: float,
        top: list[tuple[int, float]],
        elapsed: float,
    ) -> Event:
        """Append one sampled id to sample i of a running request, finishing it if due."""
        request, c, stream = r.request, r.request.completions[i], r.streams[i]
        c.ids.append(id)
        c.logprobs.append(logprob)
        if len(c.ids) == 1:
            c.timings.prefill_s = elapsed
        else:
            c.timings.decode_s, c.timings.decoded = elapsed - c.timings.prefill_s, len(c.ids) - 1
        eos = id == self.model.tokenizer.eot_token and not request.ignore_eos
        text = "" if eos else stream.push(id)
        if eos or stream.stopped or len(c.ids) == request.budget:
            c.finish_reason = "eos" if eos else "stop" if stream.stopped else "length"
            text += stream.finish()
        c.text += text
        return Event(i, id, text, c.finish_reason is not None, logprob, top, request)

    def _release(self) -> None:
        """Free the rows of every finished or cancelled request."""
        for r in [r for r in self._running if r.request.finished]:
            self._running.remove(r)
            for row in r.rows:
                self._owner[row] = None

    def flush(self, request: Request) -> None:
        """After an interruption: move the text each unfinished sample of `request` holds back
        (a partial character or a stop-string prefix) into its `text`."""
        for r in self._running:
            if r.request is request:
                for c, stream in zip(request.completions, r.streams, strict=True):
                    if c.finish_reason is None:
                        c.text += stream.finish()
