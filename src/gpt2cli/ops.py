"""Normalising logits: softmax (sampling), its log and logsumexp (scoring), and the largest
entries of a row (the top alternatives scoring and serving report).

Below `model`, `sampling` and `scheduler`, so none of them imports another for this math.
float32 in, float32 out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating[Any]]


def softmax(x: Array, *, out: Array | None = None) -> Array:
    """Probabilities along the last axis; the max is subtracted first, so exp never overflows.

    `out=x` computes them in place (attention scores can be tens of MB).
    """
    e: Array = np.subtract(x, x.max(axis=-1, keepdims=True), out=out)  # [..., n]
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def logsumexp(x: Array) -> Array:
    """log(sum(exp(x))) along the last axis, the max taken out first so exp never overflows."""
    top = x.max(axis=-1)  # [...]
    shifted = x - top[..., None]  # [..., n]
    np.exp(shifted, out=shifted)
    out: Array = np.log(shifted.sum(axis=-1)) + top  # [...]
    return out


def log_softmax(x: Array) -> Array:
    """Log-probabilities along the last axis: x - logsumexp(x)."""
    logprobs: Array = x - logsumexp(x)[..., None]  # [..., V]
    return logprobs


def top_ids(x: Array, k: int) -> NDArray[np.intp]:
    """Ids of the k largest entries of each row of x [n, V] -> [n, k], largest first; among
    equal values the lower id first, so ties at the edge of the top k are chosen the same way
    whatever the batch or the machine."""
    out = np.zeros((len(x), k), np.intp)  # [n, k]
    if k:
        kth = -np.partition(-x, k - 1, axis=-1)[:, k - 1]  # [n]: each row's k-th largest
        for row, values in enumerate(x):
            candidates = np.flatnonzero(values >= kth[row])  # >= k of them, edge ties too
            # by value descending, then id (lexsort's last key is the primary one)
            out[row] = candidates[np.lexsort((candidates, -values[candidates]))[:k]]
    return out
