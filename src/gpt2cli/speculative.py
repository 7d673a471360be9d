"""Speculative decoding: draft a few next tokens cheaply, check them in one pass of the model.

A draft comes from the text itself (prompt lookup: transformers' `PromptLookupCandidateGenerator`,
`lookup`) or from a smaller GPT-2 of the same vocabulary (`Drafter`, with KV cache rows of its own
beside the target's). The scheduler feeds each row's last token and its draft to the target as
one `GPT2.step_many`, and `accept` keeps what the target itself would have produced:

- greedy: the drafted tokens while they equal the target's argmax, then the target's own next
  token, so the output is plain greedy's;
- sampling with a draft model: the speculative-sampling rule (Leviathan et al. 2023, transformers'
  `_speculative_sampling`): keep a token drafted from q with probability min(1, p/q); on a
  rejection draw from norm(max(0, p - q)); all kept, one more from p. The output is distributed
  as plain sampling's;
- sampling with prompt lookup (a draft with no q: a point mass): draw from p at each position and
  keep going while the draw is the drafted token. Each draw is from p, so the output is
  distributed as plain sampling's (with one sample, the very same text for a seed; with several,
  the samples draw in another order, so other texts).

p and q are the processed, warped distributions (`gpt2cli.processors`, then
`gpt2cli.sampling.distribution`), each over the history up to its position, drafts included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState
from gpt2cli.processors import RowHistory, active, process
from gpt2cli.sampling import distribution, race

if TYPE_CHECKING:
    from gpt2cli.model import GPT2

Array = NDArray[np.float32]
Ids = NDArray[np.int64]
Dist = tuple[Ids, Array]  # a next-token distribution as `distribution` gives it: ids [m], probs [m]

MAX_NGRAM = 2  # transformers' max_matching_ngram_size default for prompt lookup


def lookup(
    ids: Sequence[int],
    k: int,
    eos: int,
    max_ngram: int = MAX_NGRAM,
    allowed: Callable[[list[int]], int] = len,
) -> list[int]:
    """Up to k tokens that followed the first earlier occurrence of the text's last n-gram
    (n from `max_ngram` down to 1), cut before an `eos`: transformers' prompt-lookup draft of
    `ids` (prompt and text so far). [] when no n-gram recurs.

    `allowed(draft)` is how many of a draft's first tokens the request's processors allow
    (`processors_allow`): the draft is cut there, and where nothing is left the next
    occurrence is tried, as transformers does.
    """
    seq = np.asarray(ids, np.int64)  # [L]
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = sliding_window_view(seq[:-1], n)  # [L - n, n]: each has a token after it
        for hit in np.flatnonzero((windows == seq[-n:]).all(axis=1)):  # leftmost first
            drafted = [int(t) for t in seq[hit + n : hit + n + k]]
            drafted = drafted[: allowed(drafted)]
            if drafted:
                return drafted[: drafted.index(eos) if eos in drafted else k]
    return []


def processors_allow(history: RowHistory, vocab: int, eos: int) -> Callable[[list[int]], int]:
    """For `lookup`: how many of a draft's first tokens the processors of `history`'s request
    allow, each after the ones before it (transformers runs them on scores of ones: a token
    they make -inf ends the draft). The first token's verdicts are computed once."""
    if not active(history.params):
        return len
    first = np.isfinite(process(np.ones((1, vocab), np.float32), [history], eos)[0])  # [V]

    def allowed(drafted: list[int]) -> int:
        if not first[drafted[0]]:
            return 0
        rows = [history._replace(ids=[*history.ids, *drafted[:j]]) for j in range(1, len(drafted))]
        scores = process(np.ones((len(rows), vocab), np.float32), rows, eos)  # [k - 1, V]
        fine = np.isfinite(scores[np.arange(len(rows)), drafted[1:]])  # [k - 1]
        return 1 + (int(fine.argmin()) if not fine.all() else len(rows))

    return allowed


def accept(
    p: Sequence[Dist],
    drafted: Sequence[int],
    q: Sequence[Dist] | None,
    rng: np.random.Generator,
    *,
    greedy: bool,
) -> list[int]:
    """The tokens a verification keeps: the accepted drafts, then one of the target's own.

    p holds the target's k + 1 distributions (after the last kept token and after each of the
    k `drafted` tokens), q the k distributions a draft model sampled them from, or None when
    the draft is a point mass (prompt lookup, a greedy draft model).
    """
    kept: list[int] = []
    for j, (ids, probs) in enumerate(p):
        if j == len(drafted):  # every draft kept: the target's next token, as plain decoding
            kept.append(_draw(ids, probs, rng, greedy))
        elif q is None:
            kept.append(_draw(ids, probs, rng, greedy))
            if kept[-1] == drafted[j]:
                continue
        elif rng.random(dtype=np.float32) * _prob(q[j], drafted[j]) < _prob(p[j], drafted[j]):
            kept.append(drafted[j])  # kept with probability min(1, p/q)
            continue
        else:
            kept.append(_residual(p[j], q[j], rng))
        return kept
    return kept


def _draw(ids: Ids, probs: Array, rng: np.random.Generator, greedy: bool) -> int:
    """One token from a distribution, as `sampling.sample` draws it (greedy: its one id)."""
    return int(ids[0] if greedy else ids[race(probs, rng)])


def _prob(dist: Dist, token: int) -> float:
    """The probability of `token` under dist (0 outside its support, whose ids ascend)."""
    ids, probs = dist
    at = int(np.searchsorted(ids, token))
    return float(probs[at]) if at < len(ids) and ids[at] == token else 0.0


def _residual(p: Dist, q: Dist, rng: np.random.Generator) -> int:
    """A draw from norm(max(0, p - q)), what a rejected draft is replaced by (p itself where
    rounding leaves no mass)."""
    ids, probs = p
    q_ids, q_probs = q
    at = np.searchsorted(q_ids, ids).clip(max=len(q_ids) - 1)  # [m]
    under_q = np.where(q_ids[at] == ids, q_probs[at], np.float32(0.0))  # [m]
    excess = np.maximum(probs - under_q, np.float32(0.0))  # [m]
    total = excess.sum(dtype=np.float32)
    return int(ids[race(excess / total if total > 0 else probs, rng)])


class DraftRow(NamedTuple):
    """A row to draft for: its history (prompt and ids so far, the last one not yet run), how
    many tokens to draft, and its request's generator (sampled drafts draw from it)."""

    row: int
    history: RowHistory
    k: int
    rng: np.random.Generator


class Draft(NamedTuple):
    """Drafted tokens and, when sampled from a draft model, the distributions q they were
    drawn from (None: a point mass each)."""

    tokens: list[int]
    q: list[Dist] | None = None


class Drafter:
    """A smaller GPT-2 drafting for a target: its own KV cache, row for row the target's.

    Rows hold the draft model's keys and values of their sequence's first `lengths[row]`
    tokens; `propose` first runs what they lack (the last token, and the last accepted draft
    when all were kept), then one token per drafted one.
    """

    def __init__(self, model: GPT2, target: GPT2, max_batch: int, capacity: int) -> None:
        mine, theirs = (min(m.config.n_vocab, m.tokenizer.n_vocab) for m in (model, target))
        if mine != theirs:
            raise GPT2Error(
                f"the draft model's vocabulary ({mine} tokens) is not the model's ({theirs}): "
                "a draft model must share its tokenizer"
            )
        if model.config.n_ctx < capacity:
            raise GPT2Error(
                f"the draft model's context ({model.config.n_ctx} tokens) is shorter than "
                f"the {capacity} positions a row of this batch holds"
            )
        self.model = model
        self.cache = DecodeState.empty(model.config, max_batch, capacity, logits=max_batch)

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> None:
        """Run prompts into their rows (`GPT2.prefill_into`), as the target's are."""
        self.model.prefill_into(self.cache, prompts, rows)

    def keep(self, row: int, length: int) -> None:
        """The row's sequence is valid up to `length` tokens: roll back what lies past it."""
        self.cache.lengths[row] = min(int(self.cache.lengths[row]), length)

    def propose(self, rows: Sequence[DraftRow], eos: int) -> list[Draft]:
        """Draft rows[i].k >= 1 tokens for each row, greedily or sampled (keeping q) as its
        request decodes, all rows at once: one pass for what each row lacks, then one per token.
        Rows not drafting (up to the last that is) run padding past their length, which keeps."""
        cache, known = self.cache, self.model.tokenizer.n_vocab
        used = 1 + max(r.row for r in rows)
        where = [r.row for r in rows]
        before = cache.lengths[:used].copy()  # [used]
        lacking = [r.history.ids[before[r.row] :] for r in rows]
        ran = before[where] + [len(t) for t in lacking]  # [n]: each row's length once run
        ids = np.zeros((used, max(map(len, lacking))), np.intp)  # [used, P], right-padded
        for r, tokens in zip(rows, lacking, strict=True):
            ids[r.row, : len(tokens)] = tokens
        logits = self.model.step_many(cache.rows(0, used), ids)  # [used, P, V]
        last = logits[where, [len(t) - 1 for t in lacking], :known]  # [n, V]
        drafts = [Draft([], None if r.history.params.sampling.greedy else []) for r in rows]
        for j in range(max(r.k for r in rows)):
            live = [i for i, r in enumerate(rows) if j < r.k]
            histories = [
                rows[i].history._replace(ids=[*rows[i].history.ids, *drafts[i].tokens])
                for i in live
            ]
            scores = process(last[live], histories, eos)  # [live, V]: a copy, processed
            for i, x in zip(live, scores, strict=True):
                options = rows[i].history.params.sampling
                dist = distribution(x, options)
                tokens, q = drafts[i]
                tokens.append(_draw(*dist, rows[i].rng, options.greedy))
                if q is not None:
                    q.append(dist)
            going = [i for i in live if j + 1 < rows[i].k]  # rows that draft another token
            if going:
                fed = np.zeros(used, np.intp)  # [used]
                fed[[where[i] for i in going]] = [drafts[i].tokens[-1] for i in going]
                cache.lengths[:used] = before
                cache.lengths[where] = ran
                step = self.model.step(cache.rows(0, used), fed)  # [used, V]
                last[going] = step[[where[i] for i in going], :known]
                ran[going] += 1
        cache.lengths[:used] = before
        cache.lengths[where] = ran  # what ran: what each lacked and its drafts but the last
        return drafts
