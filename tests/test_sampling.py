"""Sampling against transformers' own logits warpers: same allowed set, same probabilities."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2cli.errors import GPT2Error
from gpt2cli.sampling import SamplingOptions, distribution, sample

OPTIONS = [
    SamplingOptions(temperature=1.0, top_k=5, top_p=1.0),
    SamplingOptions(temperature=0.7, top_k=40, top_p=1.0),
    SamplingOptions(temperature=1.3, top_k=0, top_p=0.9),
    SamplingOptions(temperature=1.0, top_k=0, top_p=0.5),
    SamplingOptions(temperature=0.8, top_k=50, top_p=0.95),
    SamplingOptions(temperature=1.0, top_k=0, top_p=1.0),
    SamplingOptions(temperature=2.0, top_k=1, top_p=1.0),
    SamplingOptions(temperature=1.0, top_k=0, top_p=0.001),
]


def gpt2_like_logits(seed: int, vocab: int = 50257, batch: int = 1) -> np.ndarray:
    """Logits spanning tens of units with a heavy head, like a trained GPT-2's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, vocab)).astype(np.float32) * 3
    x[:, rng.integers(0, vocab, 30)] += rng.uniform(5, 15, 30).astype(np.float32)
    return x


def reference_probs(x: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """The distribution transformers samples from: its warpers in its order, then softmax.

    The softmax runs in float64: on an AVX2 machine (Zen 3) torch's float32 softmax was off the
    exact value by up to 1.5e-5 relative where ours was within 2e-6 (on AVX-512 both were close),
    so float32 torch is no reference to 1e-5."""
    scores = torch.from_numpy(x[None].copy())
    warpers = [TemperatureLogitsWarper(options.temperature)]
    if options.top_k:
        warpers.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1:
        warpers.append(TopPLogitsWarper(options.top_p))
    for warp in warpers:
        scores = warp(None, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


def as_dense(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    dense = np.zeros(vocab, np.float32)
    dense[ids] = probs
    return dense


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filtered_distribution_equals_transformers_warpers(options: SamplingOptions, seed: int):
    x = gpt2_like_logits(seed)[0]
    ids, probs = distribution(x, options)
    expected = reference_probs(x, options)
    assert probs.dtype == np.float32
    assert set(ids.tolist()) == set(np.flatnonzero(expected).tolist())
    np.testing.assert_allclose(as_dense(ids, probs, x.size), expected, rtol=1e-5, atol=1e-7)


def test_top_k_keeps_tokens_tied_with_the_kth_as_transformers_does():
    x = np.zeros(100, np.float32)
    x[[3, 10, 20, 30]] = [5.0, 4.0, 4.0, 4.0]
    options = SamplingOptions(top_k=2)
    ids, probs = distribution(x, options)
    expected = reference_probs(x, options)
    assert sorted(ids.tolist()) == np.flatnonzero(expected).tolist()
    np.testing.assert_allclose(as_dense(ids, probs, x.size), expected, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS[:5], ids=str)
def test_draws_never_leave_the_allowed_set(options: SamplingOptions):
    x = gpt2_like_logits(7)[0]
    allowed = set(np.flatnonzero(reference_probs(x, options)).tolist())
    draws = sample(np.repeat(x[None], 2000, axis=0), np.random.default_rng(0), options)
    assert set(draws.tolist()) <= allowed


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=1.0, top_k=0, top_p=1.0),
        SamplingOptions(temperature=0.5, top_k=6, top_p=1.0),
        SamplingOptions(temperature=1.5, top_k=0, top_p=0.8),
        SamplingOptions(temperature=1.0, top_k=8, top_p=0.7),
    ],
    ids=str,
)
def test_empirical_frequencies_match_the_filtered_distribution(options: SamplingOptions):
    """40,000 seeded draws over a 12-token vocabulary: total variation distance below 0.015.

    With at most 12 outcomes the expected distance is about 0.4 * sqrt(12 / 40000) = 0.007, so
    0.015 is a > 2x margin; a sampler ignoring the filters lands above 0.1 on these logits.
    """
    x = np.linspace(-2.0, 3.0, 12, dtype=np.float32)[np.random.default_rng(3).permutation(12)]
    n = 40_000
    draws = sample(np.repeat(x[None], n, axis=0), np.random.default_rng(1234), options)
    freq = np.bincount(draws, minlength=x.size) / n
    expected = reference_probs(x, options)
    unfiltered = reference_probs(x, SamplingOptions(temperature=1.0, top_k=0, top_p=1.0))
    assert 0.5 * np.abs(freq - expected).sum() < 0.015
    if not np.allclose(expected, unfiltered):
        assert 0.5 * np.abs(expected - unfiltered).sum() > 0.1  # the test can tell them apart


def test_same_seed_same_draws_and_different_seed_different_draws():
    x = gpt2_like_logits(0, batch=64)
    options = SamplingOptions(top_k=0, top_p=0.9)
    first = sample(x, np.random.default_rng(42), options)
    assert np.array_equal(first, sample(x, np.random.default_rng(42), options))
    assert not np.array_equal(first, sample(x, np.random.default_rng(43), options))


@pytest.mark.parametrize(
    ("options", "draws"),
    [  # top-p over a flat distribution sorts most of it: 11 ms a draw, so fewer of those
        (SamplingOptions(top_k=0), 2000),
        (SamplingOptions(top_k=0, top_p=0.95), 200),
        (SamplingOptions(top_k=40), 2000),
    ],
    ids=str,
)
def test_a_seeded_draw_survives_the_float_noise_of_another_batch_shape(
    options: SamplingOptions, draws: int
):
    """Logits from another batch differ by rounding (about 1e-7 relative); over flat 50,257-token
    distributions (random weights' kind) seeded draws must still all agree. Inverse-CDF
    sampling, one uniform number against the cumulative sums, disagreed in 4 of 1,000 without
    top-k: with 2,000 draws it fails the first case but for a chance of about e^-8."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1, 50257)) * 0.5).astype(np.float32)
    noisy = x * (1 + rng.uniform(-3e-7, 3e-7, x.shape)).astype(np.float32)
    assert not np.array_equal(x, noisy)
    for seed in range(draws):
        a = sample(x, np.random.default_rng(seed), options)
        assert np.array_equal(a, sample(noisy, np.random.default_rng(seed), options)), seed


def test_temperature_zero_and_top_k_one_are_the_argmax():
    x = gpt2_like_logits(5, batch=8)
    argmax = torch.from_numpy(x).argmax(dim=-1).numpy()
    rng = np.random.default_rng(0)
    assert np.array_equal(sample(x, rng, SamplingOptions(temperature=0.0)), argmax)
    assert np.array_equal(sample(x, rng, SamplingOptions(temperature=1.7, top_k=1)), argmax)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a number from 0 (greedy) to 3.4e+38"),
        ({"temperature": float("nan")}, "temperature must be a number from 0 (greedy)"),
        ({"temperature": float("inf")}, "temperature must be a number from 0 (greedy)"),
        ({"temperature": 1e39}, "temperature must be a number from 0 (greedy)"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"top_k": -3}, "top_k must be >= 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs: dict[str, float], message: str):
    with pytest.raises(GPT2Error, match=re.escape(message)):
        SamplingOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-300, 5e-324, 7.006e-46, 7.007e-46])
def test_a_temperature_too_small_for_float32_is_greedy_without_warnings(temperature: float):
    logits = np.random.default_rng(0).standard_normal((3, 50257)).astype(np.float32) * 5
    options = SamplingOptions(temperature=temperature, top_k=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning would fail the test
        chosen = sample(logits, np.random.default_rng(1), options)
    np.testing.assert_array_equal(chosen, logits.argmax(axis=-1))
