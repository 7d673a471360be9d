"""`gpt2cli.score.kl_divergence`: llama.cpp's `perplexity --kl-divergence` measure (mean KL
divergence per token against float32, its standard error, top-1 agreement), checked against
the sum over the vocabulary, and the int8 and bfloat16 weights measured on a 124M-shaped model
with heavy-tailed weights and outlier channels: held to what they give now, and to issue 22's
bounds, which they do not meet yet (marked xfail, strict)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt2cli.errors import GPT2Error
from gpt2cli.model import GPT2
from gpt2cli.score import kl_divergence, kl_json, kl_table, kl_texts, token_logprobs
from tests.factory import GPT2_124M, TINY, write_random_gpt2

NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(
    not NUMBA, reason="int8 and bfloat16 weights need numba (pip install 'gpt2cli[fast]')"
)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> GPT2:
    """Another model of the tiny shape: other weights, so its distributions differ."""
    return GPT2.from_pretrained(write_random_gpt2(tmp_path_factory.mktemp("other"), TINY, seed=1))


def test_a_model_against_itself_diverges_nowhere_and_always_agrees(reference: GPT2):
    same = GPT2(reference.config, reference.params)
    ids = np.random.default_rng(0).integers(0, TINY.n_vocab, 300)
    report = kl_divergence(reference, same, ids)
    assert report.n_tokens == 300
    assert report.mean_kld == 0.0 and report.kld_stderr == 0.0
    assert report.top1_agreement == 1.0
    assert report.totals()["perplexity"] == report.totals()["reference_perplexity"]


def test_each_tokens_kld_is_the_sum_over_the_vocabulary_of_the_full_logits(
    reference: GPT2, other: GPT2
):
    ids = np.random.default_rng(1).integers(0, TINY.n_vocab, 60)
    sequence = np.concatenate([[reference.tokenizer.eot_token], ids])
    p = reference(sequence)[:-1].astype(np.float64)  # [T, V]: what predicts each token
    q = other(sequence)[:-1].astype(np.float64)
    log_p, log_q = _log_softmax(p), _log_softmax(q)
    expected = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    report = kl_divergence(reference, other, ids)
    np.testing.assert_allclose(report.kld, expected, rtol=1e-4, atol=1e-6)
    assert report.mean_kld > 0.1  # other weights: far apart, so the check above means something
    np.testing.assert_array_equal(report.same_top, p.argmax(-1) == q.argmax(-1))
    assert report.top1_agreement == np.mean(p.argmax(-1) == q.argmax(-1))
    expected_stderr = expected.std(ddof=1) / np.sqrt(len(expected))
    assert report.kld_stderr == pytest.approx(expected_stderr, rel=1e-4)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize(("stride", "bos"), [(None, True), (50, True), (128, False)])
def test_a_long_text_is_compared_on_the_tokens_score_scores_each_once(
    reference: GPT2, other: GPT2, stride: int | None, bos: bool
):
    ids = np.random.default_rng(2).integers(0, TINY.n_vocab, 300)  # over two contexts of 128
    report = kl_divergence(reference, other, ids, stride=stride, bos=bos)
    np.testing.assert_array_equal(
        report.reference_logprobs, token_logprobs(reference, ids, stride=stride, bos=bos)
    )
    np.testing.assert_array_equal(
        report.logprobs, token_logprobs(other, ids, stride=stride, bos=bos)
    )


@needs_numba
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_narrow_weights_are_compared_token_by_token_though_their_blocks_are_cut_elsewhere(
    reference: GPT2, tiny_model_dir: Path, dtype: str
):
    """Narrow weights run other numbers of positions per pass and per head product than
    float32, so the two runs' blocks of logits end at other places: each token is still compared
    with itself (a text of many windows in one batch, whose passes differ)."""
    model = GPT2.from_pretrained(tiny_model_dir, dtype=dtype)
    ids = np.random.default_rng(3).integers(0, TINY.n_vocab, 1_000)
    report = kl_divergence(reference, model, ids, stride=100)
    assert report.n_tokens == 1_000
    np.testing.assert_array_equal(
        report.reference_logprobs, token_logprobs(reference, ids, stride=100)
    )
    np.testing.assert_array_equal(report.logprobs, token_logprobs(model, ids, stride=100))
    assert report.top1_agreement > 0.9  # the same weights, narrowed: each token met its own


def test_several_texts_are_checked_before_any_runs(reference: GPT2, other: GPT2):
    with pytest.raises(GPT2Error, match=r"^b\.txt: nothing to score: the text is empty$"):
        kl_texts(reference, other, ["some text", ""], names=["a.txt", "b.txt"])
    seen: list[tuple[int, int]] = []
    reports = kl_texts(
        reference, other, ["one text", "and another one"], progress=lambda d, t: seen.append((d, t))
    )
    assert [r.n_tokens for r in reports] == [2, 3]
    assert seen[-1] == (5, 5)


def test_the_report_prints_as_a_table_and_as_json(reference: GPT2, other: GPT2):
    report = kl_divergence(reference, other, reference.tokenizer.encode("Hello world, again"))
    piped = kl_table([("a.txt", report)], aligned=False).splitlines()
    assert piped[0] == "source\ttokens\tmean_kld\tkld_stderr\ttop1_agreement"
    assert piped[1].split("\t")[:3] == ["a.txt", "4", f"{report.mean_kld:.6g}"]
    line = kl_json(report, {"source": "a.txt", "dtype": "int8"})
    assert line.startswith('{"source": "a.txt", "dtype": "int8", "n_tokens": 4, "mean_kld": ')
    assert line.endswith("\n") and line.count("\n") == 1


@pytest.fixture(scope="module")
def measured(heavy_tailed_124m_dir: Path) -> Callable[[str], dict[str, Any]]:
    """`kl_divergence(float32, dtype)` on 2,048 random ids, by dtype, each measured once."""
    reference = GPT2.from_pretrained(heavy_tailed_124m_dir)
    ids = np.random.default_rng(0).integers(0, GPT2_124M.n_vocab - 1, 2048)

    @functools.cache
    def totals(dtype: str) -> dict[str, Any]:
        model = GPT2.from_pretrained(heavy_tailed_124m_dir, dtype=dtype)
        assert model.dtype == dtype
        return kl_divergence(reference, model, ids).totals()

    return totals


# what they measure now (below), with room: a kernel or quantiser that gets worse fails here
@needs_numba
@pytest.mark.parametrize(
    ("dtype", "most_kld", "least_agreement"), [("int8", 0.01, 0.93), ("bfloat16", 5e-4, 0.985)]
)
def test_quantised_weights_stay_near_float32_on_heavy_tailed_weights(
    measured: Callable[[str], dict[str, Any]], dtype: str, most_kld: float, least_agreement: float
):
    totals = measured(dtype)
    assert totals["n_tokens"] == 2048
    assert 0 < totals["mean_kld"] <= most_kld, f"{dtype}: {totals}"
    assert totals["top1_agreement"] >= least_agreement, f"{dtype}: {totals}"
    assert measured("bfloat16")["mean_kld"] < measured("int8")["mean_kld"] / 10


# Issue 22's bounds, not met yet (gpt2cli.quant's int8 of 32-input blocks after its per-input
# scaling, bfloat16 to nearest even), measured on this fixture over these 2,048 tokens: int8 mean
# KLD 5.2e-3, top-1 agreement 95.1%; bfloat16 2.8e-4 and 99.07%. Plain q8_0 simulated on
# `random_params` (Gaussian, no outliers) gives 3.8e-3 and 97.7%: on random weights, with which
# no activation aligns, the logits' noise is about eps * sqrt(layers) * their spread whatever the
# quantiser (eps: a weight's relative rounding error, about 1% for int8 over heavy tails), so
# KL ~ (eps sqrt(L) sigma)^2 / 2. strict: once a change meets the bounds, the marks must go.
NOT_MET = pytest.mark.xfail(
    strict=True, reason="issue 22's bounds are not met on heavy-tailed random weights (see above)"
)


@needs_numba
@pytest.mark.parametrize(
    ("dtype", "most_kld", "least_agreement"),
    [
        pytest.param("int8", 2e-3, 0.98, marks=NOT_MET),
        pytest.param("bfloat16", 2e-4, 0.995, marks=NOT_MET),
    ],
)
def test_quantised_weights_meet_issue_22s_bounds_on_heavy_tailed_weights(
    measured: Callable[[str], dict[str, Any]], dtype: str, most_kld: float, least_agreement: float
):
    totals = measured(dtype)
    assert totals["mean_kld"] <= most_kld, f"{dtype}: {totals}"
    assert totals["top1_agreement"] >= least_agreement, f"{dtype}: {totals}"
