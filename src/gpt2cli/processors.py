"""Logits processors: a batch's next-token scores shaped by each row's options and history.

Each processor is transformers' (or OpenAI's) rule as a small function over scores [B, V] whose
rows may carry different options: the rows that use it are picked, their ids concatenated, and
one fancy-indexed update changes the entries it touches (never a loop over the vocabulary). A
row whose options are all at their defaults costs nothing, and `process` returns at once when no
row uses any. They run in transformers' `_get_logits_processor` order, so the same options give
the same ids as `GPT2LMHeadModel.generate`:

1. logit bias (transformers' `sequence_bias` of one-token sequences; OpenAI's -100 bans: -inf)
2. repetition penalty (`RepetitionPenaltyLogitsProcessor`, over prompt and generated ids)
3. presence and frequency penalties (OpenAI's formula over generated ids; transformers has no
   such processor, and vLLM applies them right after the repetition penalty, as here)
4. no repeated n-grams (`NoRepeatNGramLogitsProcessor`, over prompt and generated ids)
5. banned sequences (`NoBadWordsLogitsProcessor`)
6. minimum new tokens (`MinNewTokensLengthLogitsProcessor`: no `<|endoftext|>` before then)

The warpers that only sampling uses (temperature, top-k, top-p, min-p, typical-p) are in
`gpt2cli.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from gpt2cli.params import GenerationParams

Array = NDArray[np.float32]
Ids = NDArray[np.int64]


class RowHistory(NamedTuple):
    """What the processors know of one row of the batch."""

    params: GenerationParams  # the row's request's options
    ids: Sequence[int]  # the prompt (as it runs) and the ids generated so far on this row
    prompt_length: int  # how many of `ids` are the prompt
    banned: Sequence[Sequence[int]]  # the request's `ban` texts, each encoded to ids


def active(params: GenerationParams) -> bool:
    """Whether a request with `params` uses any processor (else `process` skips its rows)."""
    return bool(
        params.logit_bias
        or params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
        or params.no_repeat_ngram
        or params.ban
        or params.min_tokens
    )


def process(scores: Array, rows: Sequence[RowHistory], eos: int) -> Array:
    """transformers' logits processors, in `_get_logits_processor`'s order, for scores [B, V]
    (row b under rows[b]): returns [B, V], which is `scores` modified in place."""
    if not any(active(row.params) or row.banned for row in rows):
        return scores
    logit_bias(scores, rows)
    repetition_penalty(scores, rows)
    presence_frequency_penalties(scores, rows)
    no_repeat_ngram(scores, rows)
    ban_sequences(scores, rows)
    min_new_tokens(scores, rows, eos)
    return scores


def _picked(rows: Sequence[RowHistory], uses: Callable[[RowHistory], object]) -> list[int]:
    """Indices of the rows for which `uses(row)` is true."""
    return [b for b, row in enumerate(rows) if uses(row)]


def _flat(
    picked: Sequence[int], seqs: Sequence[Sequence[int] | NDArray[np.integer[Any]]]
) -> tuple[NDArray[np.intp], Ids, NDArray[np.intp]]:
    """The sequences concatenated: each entry's row (from `picked`) [T], the ids [T], and each
    sequence's end offset into them [R]."""
    lengths = np.fromiter(map(len, seqs), np.intp, len(seqs))  # [R]
    ids = np.concatenate([np.asarray(seq, np.int64) for seq in seqs] or [np.zeros(0, np.int64)])
    return np.repeat(np.asarray(picked, np.intp), lengths), ids, np.cumsum(lengths)


def logit_bias(scores: Array, rows: Sequence[RowHistory]) -> None:
    """OpenAI's logit_bias: add each (id, bias) of a row's map to its score; a bias of -100 (the
    lowest allowed) bans the token outright (-inf), as OpenAI documents."""
    picked = _picked(rows, lambda row: row.params.logit_bias)
    if not picked:
        return
    arrays = [rows[b].params.bias_arrays for b in picked]  # ([m], [m]) each, -100 as -inf
    where, ids, _ = _flat(picked, [ids for ids, _ in arrays])  # [T], [T]
    scores[where, ids] += np.concatenate([bias for _, bias in arrays])  # distinct ids: none lost


def repetition_penalty(scores: Array, rows: Sequence[RowHistory]) -> None:
    """transformers' repetition penalty: the score of every id in the row's prompt or output is
    divided by the penalty when positive, multiplied by it when negative."""
    picked = _picked(rows, lambda row: row.params.repetition_penalty != 1.0)
    if not picked:
        return
    where, ids, _ = _flat(picked, [rows[b].ids for b in picked])  # [T], [T]
    penalty = _per_row(len(scores), picked, [rows[b].params.repetition_penalty for b in picked])
    seen = scores[where, ids]  # [T]; an id seen twice gets the same new value twice
    scores[where, ids] = np.where(seen < 0, seen * penalty[where], seen / penalty[where])


def presence_frequency_penalties(scores: Array, rows: Sequence[RowHistory]) -> None:
    """OpenAI's penalties over the ids generated so far: an id generated c > 0 times loses
    presence_penalty + frequency_penalty * c."""
    picked = _picked(rows, lambda row: row.params.presence_penalty or row.params.frequency_penalty)
    where, ids, _ = _flat(picked, [rows[b].ids[rows[b].prompt_length :] for b in picked])
    if not ids.size:
        return
    vocab = scores.shape[-1]
    keys, counts = np.unique(where * vocab + ids, return_counts=True)  # [U]: (row, id) pairs
    row, id = np.divmod(keys, vocab)  # [U], [U]
    presence = _per_row(len(scores), picked, [rows[b].params.presence_penalty for b in picked])
    frequency = _per_row(len(scores), picked, [rows[b].params.frequency_penalty for b in picked])
    scores[row, id] -= presence[row] + frequency[row] * counts.astype(np.float32)


def _per_row(batch: int, picked: Sequence[int], values: Sequence[float]) -> Array:
    """One float32 value per row of the batch [B]: values[i] for row picked[i], else 0."""
    out = np.zeros(batch, np.float32)
    out[list(picked)] = values
    return out


def no_repeat_ngram(scores: Array, rows: Sequence[RowHistory]) -> None:
    """transformers' no_repeat_ngram_size n: an id that would complete an n-gram already in the
    row's prompt and output (one starting with its last n - 1 ids) is banned (-inf)."""
    sizes = {row.params.no_repeat_ngram for row in rows} - {0}
    for n in sorted(sizes):  # rows asking for the same n run together
        picked = [
            b for b, row in enumerate(rows) if row.params.no_repeat_ngram == n and len(row.ids) >= n
        ]
        if picked:
            where, ids = _ngram_completions(picked, [rows[b].ids for b in picked], n)
            scores[where, ids] = -np.inf


def _ngram_completions(
    picked: Sequence[int], seqs: Sequence[Sequence[int]], n: int
) -> tuple[NDArray[np.intp], Ids]:
    """(row, id) of each n-gram in seqs (each at least n long) whose first n - 1 ids are the
    last n - 1 of its sequence: the ids the next token must not be."""
    where, flat, ends = _flat(picked, seqs)  # [T], [T], [R]
    windows = sliding_window_view(flat, n)  # [T - n + 1, n]: some straddle two sequences
    seq = np.searchsorted(ends, np.arange(len(windows)), side="right")  # [W]: where each starts
    inside = np.arange(len(windows)) + n <= ends[seq]  # [W]: the window ends in its sequence
    tails = sliding_window_view(flat, n - 1)[ends - (n - 1)]  # [R, n - 1]: each one's last ids
    matches = inside & (windows[:, :-1] == tails[seq]).all(axis=-1)  # [W]
    return where[: len(windows)][matches], windows[matches, -1]


def ban_sequences(scores: Array, rows: Sequence[RowHistory]) -> None:
    """transformers' bad_words_ids: a banned one-token sequence is always -inf; a longer one's
    last id is -inf when the row's ids end with the rest of it."""
    hits = [
        (b, ban[-1])
        for b, row in enumerate(rows)
        for ban in row.banned
        if _ends_with(row.ids, ban[:-1])
    ]
    if hits:
        where, ids = zip(*hits, strict=True)
        scores[list(where), list(ids)] = -np.inf


def _ends_with(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    """Whether ids end with prefix (always, for an empty prefix)."""
    return len(prefix) <= len(ids) and list(ids[len(ids) - len(prefix) :]) == list(prefix)


def min_new_tokens(scores: Array, rows: Sequence[RowHistory], eos: int) -> None:
    """transformers' min_new_tokens: `<|endoftext|>` is -inf until the row has generated
    min_tokens ids."""
    picked = _picked(rows, lambda row: len(row.ids) - row.prompt_length < row.params.min_tokens)
    scores[picked, eos] = -np.inf
