"""Normalising logits: the softmax the model's attention and sampling share, and its log.

Below both `model` and `sampling`, so neither imports the other. float32 in, float32 out.
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
