"""Scoring against transformers: per-token logprobs, Hugging Face's strided windows, ranks, and
the totals' formulas; batches of texts score as each text alone."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState
from gpt2cli.model import GPT2
from gpt2cli.score import (
    ScoredBlock,
    _reduce,
    combined,
    score_hidden,
    score_ids,
    score_text,
    score_texts,
    score_windows,
    scored_logits,
    scoring_sequence,
    token_logprobs,
)
from tests.factory import TINY, reference_model, write_random_gpt2

EOT = 50256
LOGPROB_TOL = 1e-4  # per token, against torch.log_softmax of transformers' logits
TOTAL_RTOL = 1e-5  # total NLL, against the strided recipe run with transformers


def small_vocab_model(folder: Path, n_ctx: int) -> Path:
    """Narrow, with a 512-token vocabulary: thousands of windows stay cheap for both models."""
    config = GPT2Config(n_vocab=512, n_ctx=n_ctx, n_embd=32, n_head=4, n_layer=2)
    return write_random_gpt2(folder, config, tokenizer=False)


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's context of 1,024 positions on the small model."""
    return small_vocab_model(tmp_path_factory.mktemp("small-vocab"), 1024)


def hf_strided_recipe(hf: Any, sequence: list[int], n_ctx: int, stride: int) -> dict[str, Any]:
    """The "Perplexity of fixed-length models" recipe, run with transformers' own loss.

    Window by window, labels before `trg_len = end - prev_end` are -100 and the model's loss is
    the mean over the labels left after its internal shift; each window adds the loss times the
    number of those labels (not `num_valid - 1`, which drops one token per later window,
    transformers #30975). Also returns every scored token's log_softmax, by position.
    """
    ids = torch.tensor([sequence])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    logprobs: dict[int, float] = {}
    ranks: dict[int, tuple[int, int]] = {}
    for begin in range(0, len(sequence), stride):
        end = min(begin + n_ctx, len(sequence))
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.inference_mode():
            out = hf(window, labels=labels)
        counted = int((labels[:, 1:] != -100).sum())
        if counted:
            nll_sum += float(out.loss) * counted
            n_tokens += counted
        logits = out.logits[0].double()
        table = torch.log_softmax(logits, dim=-1)
        for p in range(max(prev_end, begin + 1), end):
            row, target = logits[p - 1 - begin], sequence[p]
            logprobs[p] = float(table[p - 1 - begin, target])
            chosen = row[target]
            rank = 1 + int((row > chosen).sum()) + int((row[:target] == chosen).sum())
            near = int((torch.abs(row - chosen) < 2 * LOGPROB_TOL).sum()) - 1
            ranks[p] = (rank, near)
        prev_end = end
        if end == len(sequence):
            break
    return {"nll": nll_sum, "n_tokens": n_tokens, "logprobs": logprobs, "ranks": ranks}


def check_against_recipe(model: GPT2, hf: Any, ids: list[int], stride: int, bos: bool) -> None:
    sequence = [EOT, *ids] if bos else ids
    reference = hf_strided_recipe(hf, sequence, model.config.n_ctx, stride)
    ours = token_logprobs(model, ids, stride=stride, bos=bos)
    expected = np.array([reference["logprobs"][p] for p in sorted(reference["logprobs"])])
    assert len(ours) == reference["n_tokens"] == len(expected)
    np.testing.assert_allclose(ours, expected, atol=LOGPROB_TOL, rtol=0)
    nll = -float(ours.astype(np.float64).sum())
    assert nll == pytest.approx(reference["nll"], rel=TOTAL_RTOL)
    # perplexity = exp(mean NLL): relative 1e-5 on its logarithm. On these random weights the
    # mean NLL is ~40 nats a token (GPT-2's own is ~3), which exp turns into a relative error
    # 40 times larger on the perplexity itself than on the mean.
    assert math.log(score_perplexity(ours)) == pytest.approx(
        reference["nll"] / reference["n_tokens"], rel=TOTAL_RTOL
    )


def score_perplexity(logprobs: np.ndarray) -> float:
    return math.exp(-float(logprobs.astype(np.float64).mean()))


@pytest.mark.parametrize(
    ("n", "stride", "bos"),
    [
        (1, 512, True),
        (2, 512, False),
        (1023, 512, True),
        (1024, 1024, False),
        (1025, 512, True),
        (1025, 1024, True),
        (1025, 512, False),
    ],
)
def test_124m_scores_equal_the_strided_recipe_with_transformers(
    ours_124m: GPT2, reference_124m: Any, n: int, stride: int, bos: bool
) -> None:
    ids = np.random.default_rng(n + stride).integers(0, 50257, n).tolist()
    check_against_recipe(ours_124m, reference_124m, ids, stride, bos)


def test_124m_scores_a_5000_token_text_as_the_recipe_does(
    ours_124m: GPT2, reference_124m: Any
) -> None:
    ids = np.random.default_rng(5000).integers(0, 50257, 5000).tolist()
    check_against_recipe(ours_124m, reference_124m, ids, 512, bos=True)


def check_small_vocab(folder: Path, n: int, stride: int, bos: bool) -> None:
    """`bos` by hand: the 512-token vocabulary has no <|endoftext|> at 50256, so its last id,
    511, goes first, which is what bos=True does with a model's end-of-text id."""
    model, hf = GPT2.from_pretrained(folder), reference_model(folder)
    ids = np.random.default_rng(n * stride).integers(0, 512, n).tolist()
    sequence = [511, *ids] if bos else ids
    reference = hf_strided_recipe(hf, sequence, model.config.n_ctx, stride)
    ours = token_logprobs(model, sequence, stride=stride, bos=False)
    expected = np.array([reference["logprobs"][p] for p in sorted(reference["logprobs"])])
    np.testing.assert_allclose(ours, expected, atol=LOGPROB_TOL, rtol=0)
    assert -float(ours.astype(np.float64).sum()) == pytest.approx(reference["nll"], rel=TOTAL_RTOL)


@pytest.mark.parametrize(
    ("n", "stride", "bos"),
    [
        (n, stride, bos)
        for n in [1, 2, 1023, 1024, 1025, 5000]
        for stride in [1, 256, 512, 1024]
        for bos in [True, False]
        if (n > 1 or bos) and (n, stride) != (5000, 1)  # one token needs bos; 5000/1 below
    ],
)
def test_every_length_and_stride_equals_the_recipe_on_a_narrow_model(
    small_vocab_dir: Path, n: int, stride: int, bos: bool
) -> None:
    """The full grid on GPT-2's context of 1,024, on a model whose windows cost milliseconds,
    but for stride 1 over 5,000 tokens (3,977 windows of 1,024 positions, minutes for
    transformers), which runs below on a 128-position context: 4,873 windows of 128."""
    check_small_vocab(small_vocab_dir, n, stride, bos)


@pytest.mark.parametrize("bos", [True, False])
def test_stride_1_over_5000_tokens_scores_each_with_a_full_window(tmp_path: Path, bos: bool):
    check_small_vocab(small_vocab_model(tmp_path / "ctx128", 128), 5000, 1, bos)


def test_ranks_equal_the_ranks_of_transformers_logits(ours_124m: GPT2, reference_124m: Any) -> None:
    """Rank 1 is the model's top choice; equal logits are ordered by id. Where another logit
    lies within the float tolerance of the actual token's, the two models' ranks may differ by
    at most the number of such near-ties."""
    text = "The quick brown fox jumps over the lazy dog. " * 30
    result = score_text(ours_124m, text, stride=512)
    sequence = [EOT, *ours_124m.tokenizer.encode(text)]
    reference = hf_strided_recipe(reference_124m, sequence, 1024, 512)["ranks"]
    expected = [reference[p + 1] for p in result.positions.tolist()]
    for ours, (theirs, near) in zip(result.ranks.tolist(), expected, strict=True):
        assert abs(ours - theirs) <= near
    exact = sum(ours == theirs for ours, (theirs, _) in zip(result.ranks, expected, strict=True))
    assert exact >= 0.95 * len(expected)


def test_ties_are_ranked_by_id(tiny_model_dir: Path) -> None:
    """Equal rows of an untied head give equal logits everywhere: the lowest id ranks first."""
    model = GPT2.from_pretrained(tiny_model_dir)
    words = {" the": 262, " to": 284, " of": 286, " and": 290}
    head = model.params["wte"][np.arange(model.config.n_vocab)]  # a copy, panels or not
    head[list(words.values())] = head[262]
    tied = GPT2(model.config, {**model.params, "lm_head": head}, model.folder)
    scores = {word: score_text(tied, "Hello" + word) for word in words}
    assert {w: int(s.ids[-1]) for w, s in scores.items()} == words
    ranks = [int(scores[w].ranks[-1]) for w in words]  # the same logits row for each
    assert ranks == [ranks[0], ranks[0] + 1, ranks[0] + 2, ranks[0] + 3]
    logits = next(b for b in scored_logits(tied, [[EOT, 15496, 262]]) if b.positions[-1] == 2)
    row = logits.logits[-1]
    assert ranks[0] == 1 + int((row > row[262]).sum())


def near_ties(model: GPT2, text: str) -> np.ndarray:
    """For each scored token of `text`: how many other logits lie within 2e-4 of its own, the
    float noise between two batch shapes, within which a rank may move."""
    ids = scoring_sequence(model, model.tokenizer.encode(text), bos=True)
    counts = np.zeros(len(ids), np.intp)
    for block in scored_logits(model, [ids]):
        chosen = block.logits[np.arange(len(block.targets)), block.targets]
        counts[block.positions] = (np.abs(block.logits - chosen[:, None]) < 2e-4).sum(-1) - 1
    return counts[1:]


def test_a_batch_of_texts_scores_as_each_text_alone(ours_124m: GPT2) -> None:
    """Ids exactly, logprobs within 1e-4; a rank only where another logit ties within float
    noise (BLAS sums in another order for another batch shape)."""
    texts = ["Hello world", "A longer text, with commas; and more words. " * 40, "x", "日本語 🤖"]
    together = score_texts(ours_124m, texts, top=3)
    for text, batched in zip(texts, together, strict=True):
        alone = score_text(ours_124m, text, top=3)
        np.testing.assert_array_equal(batched.ids, alone.ids)
        np.testing.assert_allclose(batched.logprobs, alone.logprobs, atol=1e-4)
        np.testing.assert_allclose(batched.top_logprobs, alone.top_logprobs, atol=1e-4)
        assert (np.abs(batched.ranks - alone.ranks) <= near_ties(ours_124m, text)).all()


def test_totals_follow_their_formulas_on_multibyte_text(ours_124m: GPT2) -> None:
    text = "Naïve café — 日本語 🤖 and  spaces\ttabs\n"
    s = score_text(ours_124m, text)
    nll = -float(np.sum(s.logprobs, dtype=np.float64))
    n_bytes, n_words = len(text.encode()), len(re.split(r"\s+", text))
    assert (s.n_bytes, s.n_words, s.n_tokens) == (n_bytes, n_words, len(s.ids))
    assert s.nll == pytest.approx(nll)
    assert s.mean_nll == pytest.approx(nll / s.n_tokens)
    assert s.perplexity == pytest.approx(math.exp(nll / s.n_tokens))
    assert s.bits_per_byte == pytest.approx(nll / n_bytes / math.log(2))
    assert s.byte_perplexity == pytest.approx(math.exp(nll / n_bytes))
    assert s.word_perplexity == pytest.approx(math.exp(nll / n_words))
    std = np.std(-s.logprobs.astype(np.float64), ddof=1)
    assert s.nll_stderr == pytest.approx(std / math.sqrt(s.n_tokens))


def test_totals_of_several_texts_are_pooled(ours_124m: GPT2) -> None:
    a, b = score_text(ours_124m, "One text."), score_text(ours_124m, "And another, longer one.")
    both = combined([a, b])
    assert both.n_tokens == a.n_tokens + b.n_tokens and both.n_bytes == a.n_bytes + b.n_bytes
    assert both.perplexity == pytest.approx(math.exp((a.nll + b.nll) / both.n_tokens))


def test_top_alternatives_are_the_most_likely_tokens_in_order(ours_124m: GPT2) -> None:
    s = score_text(ours_124m, "The meaning of life is", top=5)
    [block] = list(scored_logits(ours_124m, [[EOT, *ours_124m.tokenizer.encode("The meaning")]]))
    logits = block.logits[0]
    expected = np.lexsort((np.arange(len(logits)), -logits))[:5]
    np.testing.assert_array_equal(s.top_ids[0], expected)
    assert (np.diff(s.top_logprobs, axis=1) <= 0).all()
    assert s.top_logprobs.max() <= 0


def test_an_overflowing_word_perplexity_is_none_in_json_not_an_error(tiny_model_dir: Path) -> None:
    model = GPT2.from_pretrained(tiny_model_dir)
    s = score_text(model, "x" * 3000)  # one word, hundreds of tokens, each surprising
    assert s.word_perplexity == math.inf
    assert s.totals()["word_perplexity"] is None


@pytest.mark.parametrize(
    ("text", "bos", "message"),
    [
        ("", True, "the text is empty"),
        ("", False, "the text is empty"),
        ("Hi", False, "one token has no context"),
    ],
)
def test_a_text_with_nothing_to_score_is_an_error(
    tiny_model_dir: Path, text: str, bos: bool, message: str
) -> None:
    model = GPT2.from_pretrained(tiny_model_dir)
    with pytest.raises(GPT2Error, match=message):
        score_texts(model, ["fine text", text], bos=bos)


@pytest.mark.parametrize("stride", [0, -1, 129])
def test_a_stride_outside_the_context_is_an_error(tiny_model_dir: Path, stride: int) -> None:
    model = GPT2.from_pretrained(tiny_model_dir)
    with pytest.raises(GPT2Error, match="stride must be between 1 and the model's n_ctx"):
        token_logprobs(model, [1, 2, 3], stride=stride)


def test_windows_score_each_token_once_with_the_most_context() -> None:
    for n in [2, 5, 9, 10, 11, 40]:
        for stride in [1, 3, 4, 10]:
            scored = [
                p for _, end, first in score_windows(n, 10, stride) for p in range(first, end)
            ]
            assert scored == sorted(set(scored))  # once each, in order
            assert set(scored) <= set(range(1, n))
            if stride < 10:  # windows overlap: every token but the first has context
                assert scored == list(range(1, n))


def test_ranks_and_top_alternatives_order_equal_logits_by_id() -> None:
    """A block with ties at the top and at the edge of the top 3: lower ids first, always."""
    logits = np.zeros((2, 10), np.float32)
    logits[0, [7, 2, 5]] = 3.0  # three tied for first
    logits[1, [9]], logits[1, [8, 4, 1]] = 5.0, 2.0  # one first, three tied for second
    block = ScoredBlock(
        row=0, positions=np.array([1, 2]), targets=np.array([5, 8]), logits=logits.copy()
    )
    reduced = _reduce(block, top=3)
    assert reduced.ranks.tolist() == [2, 4]  # 2 < 5 < 7; then 9, 1, 4 before 8
    assert reduced.top_ids.tolist() == [[2, 5, 7], [9, 1, 4]]
    np.testing.assert_allclose(reduced.logprobs, block.logprobs())
    np.testing.assert_allclose(
        np.exp(reduced.top_logprobs[0]).sum(), 3 * np.exp(3) / (3 * np.exp(3) + 7), rtol=1e-6
    )


@pytest.mark.parametrize("n", [1, 2, 17, TINY.n_ctx])
def test_scores_from_a_prefills_hidden_states_equal_score_ids(tiny_model_dir: Path, n: int):
    """The echo path: a prompt's own prefill (`prefill_into(..., hidden=...)`) scores it as
    `score_ids` does in a second pass. Alone, the same forward pass: ids, ranks and top ids
    exactly; in a padded batch with a longer prompt, logprobs within float noise."""
    model = GPT2.from_pretrained(tiny_model_dir)
    ids = np.random.default_rng(n).integers(0, TINY.n_vocab, n).tolist()
    state = DecodeState.empty(model.config, 3, TINY.n_ctx, logits=3)
    _, [hidden] = model.prefill_into(state, [ids], [[1]], hidden=[True])
    assert hidden is not None and hidden.shape == (n, TINY.n_embd) and hidden.dtype == np.float32
    ours = score_hidden(model, hidden, ids, top=3)
    if n == 1:  # nothing to score: no tokens, where score_ids is an error
        assert ours.n_tokens == 0 and ours.top_ids.shape == ours.top_logprobs.shape == (0, 3)
        with pytest.raises(GPT2Error, match="one token has no context"):
            score_ids(model, ids, top=3)
        return
    expected = score_ids(model, ids, top=3)
    for field in ("positions", "ids", "ranks", "top_ids"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(expected, field))
    np.testing.assert_allclose(ours.logprobs, expected.logprobs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.top_logprobs, expected.top_logprobs, rtol=0, atol=1e-4)
    assert (ours.n_bytes, ours.n_words) == (expected.n_bytes, expected.n_words)
    longer = np.random.default_rng(0).integers(0, TINY.n_vocab, TINY.n_ctx).tolist()
    _, [none, batched] = model.prefill_into(state, [longer, ids], [[0], [2]], hidden=[False, True])
    assert none is None and batched is not None
    together = score_hidden(model, batched, ids, top=3)
    np.testing.assert_array_equal(together.ids, expected.ids)
    np.testing.assert_allclose(together.logprobs, expected.logprobs, rtol=0, atol=1e-4)


def test_hidden_states_that_do_not_match_the_ids_are_an_error(tiny_model_dir: Path) -> None:
    model = GPT2.from_pretrained(tiny_model_dir)
    with pytest.raises(GPT2Error, match=r"got ids \[3\] and hidden states \[4, 32\]"):
        score_hidden(model, np.zeros((4, TINY.n_embd), np.float32), [1, 2, 3])
