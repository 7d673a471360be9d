"""Continuous batching: the one decode loop. Requests queue, join the batch and leave it.

`submit` checks a `Request` (a prompt and its `GenerationParams`) and queues it; its
`RequestState` is what the scheduler fills in as it runs: one `Sample` per sample. Each `step`
admits waiting requests in order while their samples find free rows of the KV cache (their
prompts run once, as one padded batch, and each sample's first token is sampled), decodes one
token for every running sample, and releases the rows of finished and cancelled requests. It
returns what happened as events: a `TokenEvent` per sampled token, and a `PromptEvent` when a
request that asked for `echo` is admitted. `gpt2 generate`, `--jsonl` (local and on Ray) and
`gpt2 serve` all run requests through this loop, and nothing else admits or steps.

A request's samples do not depend on what else is in the batch or when it joined: its rows'
logits are those it gets alone (rows never see each other), and its generator draws for its
own rows only, in the same order as a batch of that one request would. So `gpt2 generate
--jsonl`, `gpt2 serve` and `gpt2 generate -n N --seed S` give the same samples.

A beam search (`num_beams` W) runs in W rows: after each step `gpt2cli.beam` chooses its beams
and their KV-cache rows are moved within its own rows; a best_of request draws its M samples in
M rows. Neither streams: their events come when they finish, for the n samples they return.

Text is assembled per sample by `TextStream`: never half a UTF-8 character, never any part of a
stop string. Not thread-safe: one thread drives a scheduler (a server's worker thread).
"""

from __future__ import annotations

import codecs
import functools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from gpt2cli import beam, processors
from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState
from gpt2cli.ops import log_softmax, top_ids
from gpt2cli.params import GenerationParams, ParamError, fit_prompt
from gpt2cli.sampling import check_choice, distribution, sample
from gpt2cli.speculative import Draft, Drafter, DraftRow, accept, lookup, processors_allow

if TYPE_CHECKING:
    from gpt2cli.model import GPT2
    from gpt2cli.score import TextScore
    from gpt2cli.tokenizer import Tokenizer

FinishReason = Literal["length", "stop", "eos"]


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
    drafted: int | None = None  # speculative decoding: tokens drafted (None: it did not run)
    accepted: int = 0  # of them, those the model accepted and the sample kept

    @property
    def tokens_per_s(self) -> float:
        """Decode steps per second (0.0 when there were none)."""
        return self.decoded / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Sample:
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
    score: float | None = None  # beam search: transformers' sequences_scores

    def to_json(self) -> dict[str, Any]:
        """The `gpt2 generate --json` object for this sample."""
        t = self.timings
        out: dict[str, Any] = {
            "text": self.text,
            "ids": self.ids,
            "prompt_ids": self.prompt_ids,
            "finish_reason": self.finish_reason,
            "logprobs": [round(lp, 6) for lp in self.logprobs],
        }
        if self.score is not None:  # -inf (every token ruled out) is not JSON: null
            out["score"] = round(self.score, 6) if np.isfinite(self.score) else None
        out["timings"] = {
            "load_s": round(t.load_s, 6),
            "prefill_s": round(t.prefill_s, 6),
            "decode_s": round(t.decode_s, 6),
            "tokens_per_s": round(t.tokens_per_s, 3),
        }
        if t.drafted is not None:
            out["timings"] |= {"drafted": t.drafted, "accepted": t.accepted}
        return out


class TextStream:
    """Ids of one sample -> text pieces that are safe to print as soon as they are returned.

    Bytes of a UTF-8 character split across tokens are held until the character is complete,
    and text that could be the start of a stop string is held until it is known not to be one.
    Once a stop string appears, `stopped` is set and nothing from it onwards is ever returned.
    With `min_tokens` N, a stop string that ends within the text of the first N - 1 tokens does
    not count (vLLM checks none before N tokens are out): that text is printed like any other.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._min_tokens = min_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that might be the beginning of a stop string
        self._early = 0  # characters of `_held` from the first min_tokens - 1 tokens
        self._pushed = 0  # tokens pushed
        self.stopped = False

    def push(self, id: int) -> str:
        """Add one token; return the text that became safe to print ("" once stopped)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._tokenizer.token_bytes(id))
        self._pushed += 1
        if self._pushed < self._min_tokens:
            self._early = len(self._held)
        ends = (self._held.find(s, max(0, self._early - len(s) + 1)) for s in self._stop)
        cut = min((i for i in ends if i >= 0), default=-1)  # the first that ends after them
        if cut >= 0:
            self.stopped = True
            ready, self._held = self._held[:cut], ""
            return ready
        split = len(self._held) - self._stop_prefix_length(self._held)
        ready, self._held = self._held[:split], self._held[split:]
        self._early = max(0, self._early - split)
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


@dataclass(frozen=True, eq=False)  # compared by identity: each is one request
class Request:
    """One prompt and how to continue it: what a caller submits, never changed after."""

    prompt_ids: Sequence[int]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(eq=False)
class RequestState:
    """A submitted request as it runs: the prompt as it runs (`fit_prompt`), its budget of new
    tokens, one `Sample` per sample (filled in as they run), the prompt's scores (with
    `echo_logprobs`, once admitted) and, while admitted, its rows, generator and text streams.

    A beam search (`num_beams` W > 1) runs W rows under `search` and fills its `n` samples when
    it is done. With `best_of` M > n, `samples` holds the M draws until the n best replace them.
    """

    request: Request
    prompt_ids: list[int]
    budget: int
    samples: list[Sample]
    prompt_score: TextScore | None = None
    cancelled: bool = False
    admitted: bool = False
    rows: list[int] = field(default_factory=list)
    rng: np.random.Generator | None = None
    streams: list[TextStream] = field(default_factory=list)
    logits: Any = None  # [n, V] of each sample's next token
    start: float = 0.0  # when its prefill began
    banned: list[list[int]] = field(default_factory=list)  # its `ban` texts, encoded
    search: beam.BeamSearch | None = None  # num_beams > 1: the search so far
    trail: list[tuple[float, Any, Any]] = field(default_factory=list)  # beam search: each step's
    # time, and its rows' `top_logprobs` most likely ids [W, top] and their logprobs [W, top]
    held: list[Event] = field(default_factory=list)  # best_of: the draws' events so far

    @property
    def params(self) -> GenerationParams:
        """The request's options."""
        return self.request.params

    @property
    def rows_needed(self) -> int:
        """Rows of the batch it takes while it runs: one per sample, beam or best_of draw (none
        for a prompt alone)."""
        return self.params.draws if self.budget else 0

    @property
    def choosing(self) -> bool:
        """It draws more samples than it returns (best_of > n): its events wait for the end."""
        return self.params.num_beams == 1 and self.params.draws > self.params.n

    def next_id(self, i: int, eot: int) -> int:
        """The id its row i runs next: the last one chosen there; `eot` for a finished sample
        of a running request (its logits unused)."""
        if self.search is not None:
            return int(self.search.tokens[i])
        s = self.samples[i]
        return s.ids[-1] if s.finish_reason is None else eot

    @property
    def finished(self) -> bool:
        """Every sample has its finish reason, or the request was cancelled."""
        return self.cancelled or all(s.finish_reason for s in self.samples)


class TokenEvent(NamedTuple):
    """One generated token of one sample of a request, with the text that became printable.

    `text` is often empty (bytes of a split character, a possible stop-string start, or the
    ending `<|endoftext|>`); `logprob` is the token's log-probability under the model itself
    (temperature 1, unfiltered); `top` the request's `top_logprobs` most likely (id, logprob)
    pairs at this position; `finish_reason` is set on the sample's last token.
    """

    sample: int
    id: int
    text: str
    finish_reason: FinishReason | None
    logprob: float
    top: list[tuple[int, float]]
    state: RequestState

    @property
    def done(self) -> bool:
        """This is the sample's last token."""
        return self.finish_reason is not None


class PromptEvent(NamedTuple):
    """A request with `echo` was admitted: its prompt as it runs is `state.prompt_ids`, scored
    in `state.prompt_score` with `echo_logprobs` (None otherwise)."""

    state: RequestState


class FailedEvent(NamedTuple):
    """A request whose prompt could not run (the model's logits for it were not finite, memory
    ran out): it has left, with `error`; the rest of the batch goes on."""

    state: RequestState
    error: Exception


Event = TokenEvent | PromptEvent | FailedEvent


def prepare(model: GPT2, request: Request) -> tuple[list[int], int, list[list[int]]]:
    """The request's prompt as it runs, its budget of new tokens (`fit_prompt`) and its `ban`
    texts encoded, its ids checked against the vocabulary; or a GPT2Error saying why it cannot
    run on `model`."""
    prompt, budget = fit_prompt(
        request.prompt_ids, request.params, model.config.n_ctx, model.tokenizer.eot_token
    )
    model.check_ids(np.asarray(prompt))
    banned = encode_bans(model, request.params)
    vocabulary = min(model.config.n_vocab, model.tokenizer.n_vocab)  # the ids sampling sees
    outside = [id for id, _ in request.params.logit_bias if id >= vocabulary]
    if outside:
        raise ParamError(
            "logit_bias",
            f"logit_bias token id {outside[0]} is outside the vocabulary [0, {vocabulary})",
        )
    return prompt, budget, banned


def encode_bans(model: GPT2, params: GenerationParams) -> list[list[int]]:
    """Each `ban` text of `params` as the model's tokenizer encodes it, or a ParamError for one
    that cannot be encoded or encodes to nothing."""
    banned = []
    for text in params.ban:
        try:
            ids = model.tokenizer.encode(text)
        except GPT2Error as e:  # a lone surrogate, from a JSON escape
            raise ParamError("ban", f"the banned text {text!r}: {e}") from None
        if not ids:
            raise ParamError("ban", f"the banned text {text!r} encodes to no tokens")
        banned.append(ids)
    return banned


class Scheduler:
    """Runs requests in one decode batch of up to `max_batch` rows; see the module docstring.

    The cache holds `capacity` positions per row (n_ctx by default), allocated lazily; a
    request needs a row per sample, and its prompt plus budget must fit in `capacity`.
    """

    def __init__(
        self,
        model: GPT2,
        max_batch: int = 8,
        capacity: int | None = None,
        *,
        draft: GPT2 | None = None,
    ) -> None:
        n_ctx = model.config.n_ctx
        capacity = n_ctx if capacity is None else capacity
        if max_batch < 1:
            raise GPT2Error(f"the batch must hold at least one row, got {max_batch}")
        if not 1 <= capacity <= n_ctx:
            raise GPT2Error(f"capacity must be between 1 and the model's n_ctx ({n_ctx})")
        self.model = model
        self.max_batch = max_batch
        self.cache = DecodeState.empty(model.config, max_batch, capacity, logits=max_batch)
        # a draft model drafts for every request that does not search or look up its prompt
        self.drafter = None if draft is None else Drafter(draft, model, max_batch, capacity)
        self._owner: list[RequestState | None] = [None] * max_batch  # who holds each row
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []

    @property
    def free(self) -> int:
        """Rows free now."""
        return self._owner.count(None)

    @property
    def waiting(self) -> int:
        """Sequences (samples, or prompts alone) of the requests waiting to be admitted."""
        return sum(max(1, s.rows_needed) for s in self._waiting)

    @property
    def queued(self) -> list[RequestState]:
        """Submitted requests not yet admitted, oldest first."""
        return list(self._waiting)

    @property
    def running(self) -> list[RequestState]:
        """Admitted requests that have not finished, in the order they were admitted."""
        return list(self._running)

    @property
    def busy(self) -> bool:
        """Requests are waiting or running: `step` has work."""
        return bool(self._waiting or self._running)

    def check(self, request: Request) -> tuple[list[int], int, list[list[int]]]:
        """`prepare`, then the request's samples and length against this batch's rows and
        capacity: a GPT2Error says why it can never run here."""
        prompt, budget, banned = prepare(self.model, request)
        params = request.params
        if params.draws > self.max_batch:
            name = "best_of" if params.best_of else "n"
            name = "num_beams" if params.num_beams > 1 else name
            raise ParamError(
                name, f"{name} must be at most the batch size {self.max_batch}, got {params.draws}"
            )
        needed, capacity = len(prompt) + budget, self.cache.capacity
        if needed > capacity:
            raise GPT2Error(
                f"prompt ({len(prompt)} tokens) and {budget} new tokens "
                f"need {needed} positions, but this batch holds {capacity} per row"
            )
        return prompt, budget, banned

    def submit(self, request: Request) -> RequestState:
        """Check a request (`check`) and queue it; its state fills in as `step` runs it."""
        prompt, budget, banned = self.check(request)
        params = request.params
        count = params.draws if params.num_beams == 1 else params.n  # best_of draws all of them
        samples = [Sample(prompt_ids=prompt) for _ in range(count)]
        state = RequestState(request, prompt, budget, samples)
        state.banned = banned
        if params.num_beams > 1:
            eos = None if params.ignore_eos else self.model.tokenizer.eot_token
            state.search = beam.BeamSearch.start(
                params.num_beams,
                budget,
                length_penalty=params.length_penalty,
                early_stopping=params.early_stopping,
                eos=eos,
            )
        self._waiting.append(state)
        return state

    def step(self) -> list[Event]:
        """Admit the waiting requests that fit, in order, then decode one token for every
        running sample; returns what happened, in that order."""
        events = self._admit()
        if self._running:
            events += self._decode()
        return events

    def run(self) -> Iterator[Event]:
        """Step until nothing is waiting or running, yielding every event."""
        while self.busy:
            yield from self.step()

    def cancel(self, state: RequestState) -> None:
        """Take a request out of the queue or the batch now (its client went away)."""
        state.cancelled = True
        if state in self._waiting:
            self._waiting.remove(state)
        self._release()

    def flush(self, state: RequestState) -> None:
        """After an interruption: move the text each unfinished sample holds back (a partial
        character or a stop-string prefix) into its `text`."""
        for s, stream in zip(state.samples, state.streams, strict=False):
            if s.finish_reason is None:
                s.text += stream.finish()

    def _admit(self) -> list[Event]:
        """Admit waiting requests, oldest first, while their samples find free rows: their
        prompts run as one padded prefill into those rows (a prompt alone needs no rows, and no
        prefill unless it is scored), and each sample's first token is sampled."""
        free = [row for row, owner in enumerate(self._owner) if owner is None]
        joining: list[RequestState] = []
        while self._waiting and self._waiting[0].rows_needed <= len(free):
            state = self._waiting.popleft()
            state.rows, free = free[: state.rows_needed], free[state.rows_needed :]
            joining.append(state)
        if not joining:
            return []
        start = time.perf_counter()
        ran = [s for s in joining if s.budget or s.params.echo_logprobs]
        events: list[Event] = []
        try:
            logits, hidden = self._prefill(ran)
        except Exception as e:  # these requests fail; the batch goes on without them
            for state in ran:
                state.cancelled = True
                events.append(FailedEvent(state, e))
            joining = [s for s in joining if s not in ran]
            ran, logits, hidden = [], [], []
        generating = []
        for state in joining:
            state.admitted, state.start = True, start
            if state in ran:
                i = ran.index(state)
                state.prompt_score = hidden[i]
                state.logits = np.broadcast_to(logits[i], (len(state.rows), len(logits[i])))
            if state.params.echo:
                events.append(PromptEvent(state))
            if not state.budget:  # the prompt alone: done once echoed
                for s in state.samples:
                    s.finish_reason = "length"
                continue
            state.rng = np.random.default_rng(state.params.seed)
            state.streams = [
                TextStream(self.model.tokenizer, state.params.stop, state.params.min_tokens)
                for _ in state.rows
            ]
            for row in state.rows:
                self._owner[row] = state
            self._running.append(state)
            generating.append(state)
        return events + self._sample(generating)

    def _prefill(self, states: list[RequestState]) -> tuple[Any, list[TextScore | None]]:
        """Run the prompts of `states` into their rows as one padded batch: each one's next-token
        logits [B, V], and the prompt's scores for those that asked for `echo_logprobs`."""
        if not states:
            return [], []
        logits, hidden = self.model.prefill_into(
            self.cache,
            [s.prompt_ids for s in states],
            [s.rows for s in states],
            hidden=[s.params.echo_logprobs for s in states],
        )
        drafting = [s for s in states if s.rows and self._drafter_for(s)]
        if self.drafter is not None and drafting:  # the draft model's rows follow the same prompts
            self.drafter.prefill([s.prompt_ids for s in drafting], [s.rows for s in drafting])
        scores = [
            None if h is None else _score_prompt(self.model, h, s)
            for h, s in zip(hidden, states, strict=True)
        ]
        return logits, scores

    def _decode(self) -> list[Event]:
        """One decode step for every running request: an event per unfinished sample."""
        if any(self._speculates(s) for s in self._running):
            return self._speculate()
        ids = self._next_ids()  # [used]
        logits = self.model.step(self.cache.rows(0, len(ids)), ids)  # [used, V]
        for state in self._running:
            state.logits = logits[state.rows]
        return self._sample(self._running)

    def _next_ids(self) -> NDArray[np.intp]:
        """The id each of rows 0..used-1 runs next (`RequestState.next_id`), up to the last row
        in use [used]; free rows among them are emptied and fed id 0 at position 0, their
        logits ignored."""
        used = 1 + max(row for s in self._running for row in s.rows)
        ids = np.zeros(used, np.intp)
        for row in range(used):
            owner = self._owner[row]
            if owner is None:
                self.cache.lengths[row] = 0
            else:
                ids[row] = owner.next_id(owner.rows.index(row), self.model.tokenizer.eot_token)
        return ids

    def _speculates(self, state: RequestState) -> bool:
        """It decodes speculatively: it looks up its prompt, or the scheduler has a draft model
        (never a beam search)."""
        return state.search is None and bool(state.params.prompt_lookup or self.drafter)

    def _drafter_for(self, state: RequestState) -> bool:
        """The draft model drafts for it (it speculates and does not look up its prompt)."""
        return self._speculates(state) and not state.params.prompt_lookup

    def _speculate(self) -> list[Event]:
        """A decode step that verifies drafts (`gpt2cli.speculative`): every row runs its next
        id and its draft as one multi-token pass; each sample of a speculating request keeps
        the tokens `accept` keeps, an event each, and its rows roll back past the rest; the
        other requests take one token, as in `_decode`."""
        drafts = self._drafts()  # {row: draft}
        first = self._next_ids()  # [used]
        used = len(first)
        width = 1 + max((len(d.tokens) for d in drafts.values()), default=0)
        ids = np.zeros((used, width), np.intp)  # [used, T]: rows right-padded with id 0
        ids[:, 0] = first
        for row, draft in drafts.items():
            ids[row, 1 : 1 + len(draft.tokens)] = draft.tokens
        before = self.cache.lengths[:used].copy()  # [used]
        logits = self.model.step_many(self.cache.rows(0, used), ids)  # [used, T, V]
        self.cache.lengths[:used] = before + 1  # one token kept; speculating rows: `_verify`
        speculating = [s for s in self._running if self._speculates(s)]
        plain = [s for s in self._running if not self._speculates(s)]
        for state in plain:
            state.logits = logits[state.rows, 0]
        events = self._sample(plain)
        for state in speculating:
            verify = functools.partial(self._verify, state, logits, drafts, before)
            events += self._alone(state, verify)
        self._release()
        return events

    def _drafts(self) -> dict[int, Draft]:
        """The draft of each unfinished sample of the speculating requests, by row: prompt
        lookup's, or the draft model's (all its rows at once). Up to the request's K tokens, and
        fewer than the sample's budget has left: the model adds one of its own."""
        eot = self.model.tokenizer.eot_token
        drafts: dict[int, Draft] = {}
        asked: list[DraftRow] = []
        for state in filter(self._speculates, self._running):
            params = state.params
            for row, s in zip(state.rows, state.samples, strict=True):
                k = min(params.prompt_lookup or params.draft_tokens, state.budget - len(s.ids) - 1)
                if s.finish_reason is not None or k < 1:
                    continue
                ids, prompt = state.prompt_ids + s.ids, len(state.prompt_ids)
                history = processors.RowHistory(params, ids, prompt, state.banned)
                if params.prompt_lookup:
                    allowed = processors_allow(history, self.model.tokenizer.n_vocab, eot)
                    drafts[row] = Draft(lookup(ids, k, eot, allowed=allowed))
                else:
                    assert state.rng is not None
                    asked.append(DraftRow(row, history, k, state.rng))
        if self.drafter is not None and asked:
            proposed = self.drafter.propose(asked, eot)
            drafts |= {r.row: d for r, d in zip(asked, proposed, strict=True)}
        return drafts

    def _verify(
        self, state: RequestState, logits: Any, drafts: dict[int, Draft], before: Any
    ) -> list[Event]:
        """Each unfinished sample of a speculating request keeps what `accept` keeps of its
        draft, given the model's logits [used, T, V] after each of its row's fed tokens: an event
        per token, none past the sample's end. Its rows (and its draft model rows) roll back to
        the tokens kept: a finished sample's to `before` [used], where it stood."""
        events: list[Event] = []
        now = time.perf_counter()
        eot, known = self.model.tokenizer.eot_token, self.model.tokenizer.n_vocab
        params = state.params
        assert state.rng is not None
        for i, (row, s) in enumerate(zip(state.rows, state.samples, strict=True)):
            if s.finish_reason is not None:
                self.cache.lengths[row] = before[row]
                continue
            draft = drafts.get(row, Draft([]))
            raw = logits[row, : len(draft.tokens) + 1, :known]  # [k + 1, V]
            ids, prompt = state.prompt_ids + s.ids, len(state.prompt_ids)
            histories = [
                processors.RowHistory(params, ids + draft.tokens[:j], prompt, state.banned)
                for j in range(len(draft.tokens) + 1)
            ]
            scores = processors.process(raw.copy(), histories, eot)  # [k + 1, V]
            p = [distribution(x, params.sampling) for x in scores]
            kept = accept(p, draft.tokens, draft.q, state.rng, greedy=params.sampling.greedy)
            logprobs = log_softmax(raw[: len(kept)])  # [m, V]
            best = top_ids(logprobs, params.top_logprobs)  # [m, top]
            taken = 0
            while s.finish_reason is None and taken < len(kept):
                id, top = kept[taken], [(int(t), float(logprobs[taken, t])) for t in best[taken]]
                events.append(self._advance(state, i, id, float(logprobs[taken, id]), top, now))
                taken += 1
            s.timings.drafted = (s.timings.drafted or 0) + len(draft.tokens)
            s.timings.accepted += min(taken, len(kept) - 1)  # drafted tokens among those taken
            self.cache.lengths[row] = before[row] + taken  # its fed id, the drafts taken but last
            if self.drafter is not None and self._drafter_for(state):
                self.drafter.keep(row, int(self.cache.lengths[row]))
        return _out_now(state, events)

    def _sample(self, batch: list[RequestState]) -> list[Event]:
        """Choose each running sample's next id from its logits; finish and release requests."""
        events: list[Event] = []
        now = time.perf_counter()
        known = self.model.tokenizer.n_vocab  # a padded vocabulary (nanoGPT's 50,304) has more
        processed = self._processed([s for s in batch if s.search is None], known)
        for state in batch:
            if state.search is not None:
                events += self._alone(state, functools.partial(self._search, state, now))
            else:
                draw = functools.partial(self._draw, state, processed.get(state), now)
                events += self._alone(state, draw)
        self._release()
        return events

    def _draw(self, state: RequestState, scores: Any, now: float) -> list[Event]:
        """Draw each unfinished sample's next id from `scores` [n, V] (its processed logits, or
        None for the model's own): an event each."""
        events: list[Event] = []
        params = state.params
        known = self.model.tokenizer.n_vocab  # a padded vocabulary (nanoGPT's) has more
        logits = np.asarray(state.logits)[:, :known]  # [n, V]: only ids that have a text
        assert state.rng is not None
        scores = logits if scores is None else scores  # [n, V]
        ids = sample(scores, state.rng, params.sampling)  # [n]: all n drawn, as alone
        logprobs = log_softmax(logits)  # [n, V]
        chosen = logprobs[np.arange(len(ids)), ids]  # [n]
        best = top_ids(logprobs, params.top_logprobs)  # [n, top]
        for i, s in enumerate(state.samples):
            if s.finish_reason is None:
                top = [(int(t), float(logprobs[i, t])) for t in best[i]]
                events.append(self._advance(state, i, int(ids[i]), float(chosen[i]), top, now))
        return _out_now(state, events)

    def _alone(self, state: RequestState, work: Callable[[], list[Event]]) -> list[Event]:
        """One request's part of a step: its events or, if it fails (every token ruled out, a
        numeric fault), a FailedEvent that ends that request alone, as a failed prefill does;
        the rest of the batch goes on."""
        try:
            return work()
        except Exception as e:
            state.cancelled = True
            return [FailedEvent(state, e)]

    def _processed(self, batch: list[RequestState], known: int) -> dict[RequestState, Any]:
        """The next-token scores [n, V] of each request in `batch` that uses a logits processor
        (`gpt2cli.processors`), the rows of all of them processed at once."""
        using = [s for s in batch if processors.active(s.params)]
        if not using:
            return {}
        rows = [
            processors.RowHistory(s.params, s.prompt_ids + sample.ids, len(s.prompt_ids), s.banned)
            for s in using
            for sample in s.samples
        ]
        logits = np.concatenate([np.asarray(s.logits)[:, :known] for s in using])  # [B, V]
        scores = processors.process(logits, rows, self.model.tokenizer.eot_token)  # [B, V]
        ends = np.cumsum([len(s.samples) for s in using])[:-1]
        return dict(zip(using, np.split(scores, ends), strict=True))

    def _search(self, state: RequestState, now: float) -> list[Event]:
        """A beam search's step: its beams chosen from its rows' logits (`gpt2cli.beam`), and
        their KV-cache rows moved to follow them; once the search is done, its samples filled
        from the best hypotheses, with their events."""
        assert state.search is not None
        params, prompt = state.params, state.prompt_ids
        logits = np.asarray(state.logits)[:, : self.model.tokenizer.n_vocab]  # [W, V]
        logprobs = log_softmax(logits)  # [W, V]
        scores = logprobs  # [W, V]: processed, as transformers scores beams
        if processors.active(params):
            rows = [
                processors.RowHistory(params, prompt + ids, len(prompt), state.banned)
                for ids in state.search.ids.tolist()
            ]
            scores = processors.process(logprobs.copy(), rows, self.model.tokenizer.eot_token)
            check_choice(scores.reshape(-1))  # some beam must have a token left
        search = state.search = beam.step(state.search, scores, logprobs)
        best = top_ids(logprobs, params.top_logprobs)  # [W, top]
        state.trail.append((now, best, np.take_along_axis(logprobs, best, axis=-1)))
        if search.done:
            return self._finish_search(state, search)
        if search.length > 1:  # before the first step every row held the same prompt
            self.cache.reorder(state.rows, search.sources.tolist())
        return []

    def _finish_search(self, state: RequestState, search: beam.BeamSearch) -> list[Event]:
        """Fill a finished beam search's samples from its n best hypotheses, each token as
        `_advance` would have taken it at its step (its time, its row's alternatives), and
        return their events, sample by sample. A stop string ends a sample where it appears."""
        events: list[Event] = []
        params = state.params
        for i, h in enumerate(beam.finalize(search, params.n)):
            state.samples[i].score = h.score
            state.streams[i] = TextStream(self.model.tokenizer, params.stop, params.min_tokens)
            for id, logprob, row, (when, top, values) in zip(
                h.ids, h.logprobs, h.rows, state.trail, strict=False
            ):
                pairs = [(int(t), float(v)) for t, v in zip(top[row], values[row], strict=True)]
                events.append(self._advance(state, i, id, logprob, pairs, when))
                if state.samples[i].finish_reason:
                    break
        return events

    def _advance(
        self,
        state: RequestState,
        i: int,
        id: int,
        logprob: float,
        top: list[tuple[int, float]],
        now: float,
    ) -> TokenEvent:
        """Append one sampled id to sample i of a running request, finishing it if due."""
        params, s, stream = state.params, state.samples[i], state.streams[i]
        s.ids.append(id)
        s.logprobs.append(logprob)
        elapsed = now - state.start
        if len(s.ids) == 1:
            s.timings.prefill_s = elapsed
        else:
            s.timings.decode_s, s.timings.decoded = elapsed - s.timings.prefill_s, len(s.ids) - 1
        eos = id == self.model.tokenizer.eot_token and not params.ignore_eos
        text = "" if eos else stream.push(id)
        if eos or stream.stopped or len(s.ids) == state.budget:
            s.finish_reason = "eos" if eos else "stop" if stream.stopped else "length"
            text += stream.finish()
        s.text += text
        return TokenEvent(i, id, text, s.finish_reason, logprob, top, state)

    def _release(self) -> None:
        """Free the rows of every finished or cancelled request."""
        for state in [s for s in self._running if s.finished]:
            self._running.remove(state)
            for row in state.rows:
                self._owner[row] = None


def _out_now(state: RequestState, fresh: list[Event]) -> list[Event]:
    """A step's new events of `state` that go out now: all of them, but a best_of request's
    wait until its best draws are known (`_best_of`)."""
    if not state.choosing:
        return fresh
    state.held += fresh
    return _best_of(state) if state.finished else []


def _best_of(state: RequestState) -> list[Event]:
    """A finished best_of request: its n draws of highest mean logprob (OpenAI's rule; the
    earlier first among equal means) become its samples, and their held events, renumbered,
    are returned in the order they happened."""
    means = [float(np.mean(s.logprobs)) for s in state.samples]
    chosen = sorted(range(len(means)), key=lambda i: -means[i])[: state.params.n]
    state.samples[:] = [state.samples[i] for i in chosen]
    number = {draw: i for i, draw in enumerate(chosen)}
    return [
        e._replace(sample=number[e.sample])
        for e in state.held
        if isinstance(e, TokenEvent) and e.sample in number
    ]


def _score_prompt(model: GPT2, hidden: Any, state: RequestState) -> TextScore:
    """The prompt's own tokens scored from its prefill's hidden states (`gpt2 score --no-bos`'s
    numbers: the first token has no context and is not scored)."""
    from gpt2cli.score import score_hidden

    return score_hidden(model, hidden, state.prompt_ids, top=state.params.top_logprobs)
