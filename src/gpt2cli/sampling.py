"""Next-token choice: logits -> id, by greedy argmax or by sampling a filtered distribution.

The filters run in transformers' order: temperature, then top-k, top-p (nucleus), min-p and
typical-p, so a seed and a set of options mean the same distribution here as in
`GPT2LMHeadModel.generate`. Everything is float32, and no step sorts the whole 50,257-entry
vocabulary: top-k is one partition, min-p one comparison, and top-p and typical-p without top-k
sort only as many of the most likely (most typical) tokens as they need to reach their mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gpt2cli.errors import GPT2Error
from gpt2cli.ops import log_softmax, softmax

Array = NDArray[np.float32]
Ids = NDArray[np.int64]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_ROUNDS_TO_ZERO = float(np.finfo(np.float32).smallest_subnormal) / 2  # ties to even: 0
_NUCLEUS_FIRST_GUESS = 64  # tokens partitioned off first when top-p runs over the whole vocabulary


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen; the defaults are the `gpt2 generate` command's.

    `temperature` 0 means greedy (argmax; the other filters are then irrelevant), and so does
    one that float32 rounds to 0 (at most about 7e-46); a tiny positive one gives every token
    but the most likely (and any tied with it) probability 0. `top_k` 0 turns top-k off, `top_p`
    1.0 nucleus sampling, `min_p` 0 min-p and `typical_p` 1.0 typical sampling.
    """

    temperature: float = 1.0  # logits are divided by it: < 1 sharpens, > 1 flattens
    top_k: int = 5  # keep the k most likely tokens (and any tied with the k-th), as GPT-2's demo
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities reach top_p
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the likeliest (0: off)
    typical_p: float = 1.0  # keep the most typical tokens whose mass reaches typical_p (1: off)

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= _FLOAT32_MAX:  # also rejects NaN and infinities
            raise GPT2Error(
                f"temperature must be a number from 0 (greedy) to {_FLOAT32_MAX:.3g} (float32's "
                f"largest), got {self.temperature}"
            )
        if self.top_k < 0:
            raise GPT2Error(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GPT2Error(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise GPT2Error(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p}")
        if not 0 < self.typical_p <= 1:
            raise GPT2Error(f"typical_p must be in (0, 1] (1 turns it off), got {self.typical_p}")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax and needs no random numbers."""
        return self.temperature <= _FLOAT32_ROUNDS_TO_ZERO


def top_k_candidates(x: Array, k: int) -> Ids:
    """Ids of the k largest entries of x [V] and any tied with the k-th, as transformers keeps."""
    if k == 0 or k >= x.shape[-1]:
        return np.arange(x.shape[-1])
    kth = np.partition(x, x.shape[-1] - k)[x.shape[-1] - k]  # the k-th largest value, O(V)
    return np.flatnonzero(x >= kth)  # [>= k], in id order


def nucleus(probs: Array, top_p: float) -> Ids:
    """Positions into probs [m], ascending, of the fewest most likely tokens whose mass
    reaches top_p.

    A token is kept while the mass of the tokens likelier than it is below top_p (transformers'
    rule), and the likeliest is always kept.
    """
    head = _head(-probs, probs, top_p)  # [size], most likely first
    mass_above = np.cumsum(probs[head], dtype=np.float32) - probs[head]  # [size]
    return np.sort(head[: max(1, int(np.count_nonzero(mass_above < top_p)))])  # in index order


def min_p_kept(probs: Array, min_p: float) -> Ids:
    """Positions into probs [m], ascending, of the tokens at least min_p times as likely as the
    likeliest (transformers' MinPLogitsWarper; the likeliest is always kept)."""
    return np.flatnonzero(probs >= np.float32(min_p) * probs.max())


def typical(logits: Array, typical_p: float) -> Ids:
    """Positions into logits [m], ascending, of the most typical tokens whose mass reaches
    typical_p (transformers' TypicalLogitsWarper).

    A token is typical when its surprisal -log p is close to the distribution's entropy; tokens
    are taken from the most typical on until their mass reaches typical_p, and any tied with the
    last one taken are kept too.
    """
    logp = log_softmax(logits)  # [m]
    probs = np.exp(logp)  # [m]
    terms = np.multiply(logp, probs, out=np.zeros_like(probs), where=probs > 0)  # 0 * -inf: 0
    entropy = -terms.sum(dtype=np.float32)
    distance = np.abs(-logp - entropy)  # [m]
    head = _head(distance, probs, typical_p)  # [size], most typical first
    below = int(np.count_nonzero(np.cumsum(probs[head], dtype=np.float32) < typical_p))
    return np.flatnonzero(distance <= distance[head[min(below, len(head) - 1)]])


def _head(key: Array, probs: Array, mass: float) -> Ids:
    """Positions into key [m] of its smallest entries, smallest first, enough of them for their
    probs to reach `mass` (all m when they never do).

    Only a prefix of the ordering is sorted, grown until its mass reaches `mass`, so a peaked
    distribution costs one partition of the vocabulary rather than a sort of it.
    """
    m = key.shape[0]
    size = min(m, _NUCLEUS_FIRST_GUESS)
    while True:
        head = np.arange(m) if size >= m else np.argpartition(key, size - 1)[:size]
        head = head[np.argsort(key[head], kind="stable")]  # [size], smallest key first
        if size >= m or probs[head].sum(dtype=np.float32) >= mass:
            return head
        size *= 4


def distribution(x: Array, options: SamplingOptions) -> tuple[Ids, Array]:
    """The filtered next-token distribution for logits x [V]: (ids [m], probs [m]).

    ids are the tokens sampling may pick, in id order; probs are float32 and sum to 1.
    """
    check_choice(x)
    if options.greedy:
        return np.array([int(x.argmax())]), np.ones(1, np.float32)
    shifted = x.astype(np.float32) - x.max()  # [V], <= 0: dividing by a tiny T cannot give +inf
    with np.errstate(over="ignore"):  # a tiny T takes every token but the top ones to -inf
        scaled = shifted / np.float32(options.temperature)  # [V]
    ids = top_k_candidates(scaled, options.top_k)  # [k'] (all V when top-k is off)
    probs = softmax(scaled[ids])  # [k']
    if options.top_p < 1:
        ids, probs = _kept(ids, probs, nucleus(probs, options.top_p))
    if options.min_p > 0:
        ids, probs = _kept(ids, probs, min_p_kept(probs, options.min_p))
    if options.typical_p < 1:
        ids, probs = _kept(ids, probs, typical(scaled[ids], options.typical_p))
    return ids, probs


def _kept(ids: Ids, probs: Array, kept: Ids) -> tuple[Ids, Array]:
    """The tokens at positions `kept` of (ids [m], probs [m]), their probabilities renormalised."""
    return ids[kept], probs[kept] / probs[kept].sum(dtype=np.float32)


def check_choice(scores: Array) -> None:
    """A GPT2Error unless every row of scores [..., V] leaves some token possible: logit biases
    of -100, bans and no-repeat n-grams together can rule out every one."""
    if np.isneginf(scores.max(axis=-1)).any():
        raise GPT2Error(
            "no token is left to choose: the logit biases, banned texts and no-repeat n-grams "
            "rule out every one"
        )


def sample(logits: Array, rng: np.random.Generator, options: SamplingOptions) -> Ids:
    """One next id per row of logits [B, V] -> [B] int64, drawing from rng unless greedy."""
    if options.greedy:
        check_choice(logits)
        argmax: Ids = logits.argmax(axis=-1).astype(np.int64)  # [B]
        return argmax
    chosen = np.empty(logits.shape[0], np.int64)  # [B]
    for row, x in enumerate(logits):
        ids, probs = distribution(x, options)  # [m], [m]
        chosen[row] = ids[race(probs, rng)]
    return chosen


def race(probs: Array, rng: np.random.Generator) -> int:
    """One draw from probs [m]: the index of the first of m exponential clocks, clock i running
    at rate probs[i], to ring, which is i with probability probs[i].

    Why not one uniform number against the cumulative sums: logits computed in another batch
    differ by float rounding (about 1e-7), and over 50,257 sums that moves a boundary past the
    number in about 4 draws of 1,000 (measured on a flat distribution), so a seeded sample of
    60 tokens would change with its batch about one time in five. Here the draw changes only if
    the two earliest clocks ring within rounding of each other (none in 20,000 such draws).

    The clocks come from a generator seeded with one number drawn from `rng`, so each draw
    takes one number from `rng` whatever m is: where rounding moves a cutoff (top-p, min-p,
    typical-p) by one token in another batch, this draw may change (rarely: only if that token
    rings first), but the draws after it do not.
    """
    clocks = np.random.default_rng(int(rng.integers(1 << 63))).standard_exponential(
        len(probs), dtype=np.float32
    )  # [m]
    times = np.full(len(probs), np.inf, np.float32)  # a token of probability 0 never rings
    with np.errstate(over="ignore"):  # a clock over a tiny probability: inf, never first
        np.divide(clocks, probs, out=times, where=probs > 0)
    return int(times.argmin())
