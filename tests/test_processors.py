"""Logits processors and the min-p / typical-p warpers against transformers' own, and in the
scheduler: greedy ids equal `GPT2LMHeadModel.generate` with the matching arguments, rows with
different options batched together each get what they get alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams, ParamError
from gpt2cli.processors import RowHistory, process
from gpt2cli.sampling import SamplingOptions, distribution, sample
from gpt2cli.scheduler import Request, Scheduler, TextStream
from gpt2cli.tokenizer import Tokenizer
from tests.factory import reference_model

EOS = 50256
VOCAB = 50257
NEW_TOKENS = 64
PROMPT = "The history of the printing press begins in"


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, as its documentation writes them:
    mu[j] -= c[j] * frequency_penalty + float(c[j] > 0) * presence_penalty, where c[j] counts
    token j in the output so far (the prompt not included)."""

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            for j, c in Counter(ids).items():
                scores[row, j] -= c * self.frequency + float(c > 0) * self.presence
        return scores


def reference_processors(
    params: GenerationParams, banned: list[list[int]], prompt_length: int
) -> LogitsProcessorList:
    """transformers' processors for `params`, in `_get_logits_processor`'s order, with OpenAI's
    penalties right after the repetition penalty (vLLM's place for them)."""
    procs: list[LogitsProcessor] = []
    if params.logit_bias:
        bias = [[[id], float("-inf") if b == -100 else b] for id, b in params.logit_bias]
        procs.append(SequenceBiasLogitsProcessor(sequence_bias=bias))
    if params.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        procs.append(
            OpenAIPenalties(params.presence_penalty, params.frequency_penalty, prompt_length)
        )
    if params.no_repeat_ngram:
        procs.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram))
    if banned:
        procs.append(NoBadWordsLogitsProcessor(banned, eos_token_id=EOS))
    if params.min_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, params.min_tokens, EOS))
    return LogitsProcessorList(procs)


def reference_scores(x: np.ndarray, row: RowHistory) -> np.ndarray:
    """transformers' processed scores [V] for logits x [V] under one row's options."""
    procs = reference_processors(row.params, [list(b) for b in row.banned], row.prompt_length)
    scores = procs(torch.tensor([list(row.ids)]), torch.from_numpy(x[None].copy()))
    return scores[0].numpy()


def assert_same_scores(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same -inf entries, and the finite ones within 1e-5."""
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5, atol=1e-5)


def gpt2_like_logits(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Logits [batch, V] spanning tens of units with a heavy head, both signs, like GPT-2's."""
    x = rng.standard_normal((batch, VOCAB)).astype(np.float32) * 3
    x[:, :60] += rng.uniform(-10, 15, (batch, 60)).astype(np.float32)  # the ids histories use
    return x


def row(
    rng: np.random.Generator, prompt: int, generated: int, ids: int = 60, **options: Any
) -> RowHistory:
    """A row with a random history over the first `ids` ids (so ids and n-grams repeat);
    `banned` given as ids in options, or made to include sequences the history's end starts."""
    ids = rng.integers(0, ids, prompt + generated).tolist()
    banned = options.pop("banned", None)
    if banned is None and options.pop("bans", False):
        # one id, one pair whose first id ends the history, one triple whose first two do,
        # and one triple that does not match
        banned = [[7], [ids[-1], 3], [*ids[-2:], 11], [ids[-1], ids[-1] + 1, 5]]
    params = GenerationParams(max_tokens=generated + 100, **options)
    return RowHistory(params, ids, prompt, banned or [])


ROWS: dict[str, Callable[[np.random.Generator], RowHistory]] = {
    "plain": lambda r: row(r, 12, 20),
    "logit_bias": lambda r: row(r, 5, 9, logit_bias=((3, -100.0), (10, 5.5), (999, -2.25))),
    "repetition_penalty": lambda r: row(r, 30, 40, repetition_penalty=1.3),
    "repetition_penalty<1": lambda r: row(r, 3, 10, repetition_penalty=0.7),
    "presence": lambda r: row(r, 10, 30, presence_penalty=0.8),
    "frequency": lambda r: row(r, 10, 30, frequency_penalty=-0.4),
    "presence+frequency, nothing generated": lambda r: row(
        r, 10, 0, presence_penalty=1.0, frequency_penalty=2.0
    ),
    "no_repeat_ngram=1": lambda r: row(r, 4, 4, no_repeat_ngram=1),
    "no_repeat_ngram=2": lambda r: row(r, 50, 50, ids=10, no_repeat_ngram=2),
    "no_repeat_ngram=3": lambda r: row(r, 100, 200, ids=5, no_repeat_ngram=3),
    "no_repeat_ngram longer than the history": lambda r: row(r, 2, 1, no_repeat_ngram=4),
    "bans": lambda r: row(r, 8, 8, bans=True),
    "min_tokens, not reached": lambda r: row(r, 5, 3, min_tokens=4),
    "min_tokens, reached": lambda r: row(r, 5, 4, min_tokens=4),
    "all": lambda r: row(
        r,
        40,
        60,
        ids=8,
        logit_bias=((0, 3.0), (EOS, 10.0)),
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        no_repeat_ngram=2,
        bans=True,
        min_tokens=80,
    ),
}


UNCHANGED = {
    "plain",
    "presence+frequency, nothing generated",
    "no_repeat_ngram longer than the history",
    "min_tokens, reached",
}


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_processor_equals_transformers_on_random_logits(name: str, seed: int):
    rng = np.random.default_rng(seed)
    history = ROWS[name](rng)
    x = gpt2_like_logits(rng, 1)
    expected = reference_scores(x[0], history)
    assert_same_scores(process(x.copy(), [history], EOS)[0], expected)
    # each changes something on these logits, but where it has nothing to act on
    assert np.array_equal(expected, x[0]) == (name in UNCHANGED)


def test_a_batch_of_rows_with_different_options_gives_each_row_its_own_scores():
    rng = np.random.default_rng(5)
    rows = [make(rng) for make in ROWS.values()] * 2  # every kind twice, the plain rows too
    x = gpt2_like_logits(rng, len(rows))
    processed = process(x.copy(), rows, EOS)
    for b, history in enumerate(rows):
        assert_same_scores(processed[b], reference_scores(x[b], history))


def test_rows_at_their_defaults_are_left_as_they_are():
    rng = np.random.default_rng(0)
    rows = [ROWS["plain"](rng) for _ in range(3)]
    x = gpt2_like_logits(rng, 3)
    assert np.array_equal(process(x.copy(), rows, EOS), x)


def test_a_bias_of_minus_100_bans_the_token_as_openai_says():
    rng = np.random.default_rng(0)
    history = row(rng, 3, 3, logit_bias=((5, -100.0), (6, -99.0)))
    x = gpt2_like_logits(rng, 1)
    out = process(x.copy(), [history], EOS)[0]
    assert out[5] == -np.inf
    assert out[6] == np.float32(x[0, 6] - np.float32(99.0))


# --- warpers: min-p and typical-p, alone and after temperature, top-k and top-p ---

WARPERS = [
    SamplingOptions(top_k=0, min_p=0.1),
    SamplingOptions(top_k=0, min_p=1.0),
    SamplingOptions(temperature=0.7, top_k=0, min_p=0.05),
    SamplingOptions(temperature=1.3, top_k=50, min_p=0.2),
    SamplingOptions(temperature=1.0, top_k=0, top_p=0.9, min_p=0.1),
    SamplingOptions(top_k=0, typical_p=0.9),
    SamplingOptions(top_k=0, typical_p=0.2),
    SamplingOptions(temperature=0.8, top_k=40, typical_p=0.5),
    SamplingOptions(temperature=1.5, top_k=0, top_p=0.95, typical_p=0.8),
    SamplingOptions(temperature=1.2, top_k=100, top_p=0.9, min_p=0.05, typical_p=0.9),
    SamplingOptions(temperature=1.0, top_k=0, min_p=0.02, typical_p=0.95),
]


def reference_probs(x: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """The distribution transformers samples from: its warpers in `_get_logits_processor`'s
    order (temperature, top-k, top-p, min-p, typical-p), then a float64 softmax (see
    tests/test_sampling.py for why float64)."""
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(options.temperature)]
    if options.top_k:
        warpers.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1:
        warpers.append(TopPLogitsWarper(options.top_p))
    if options.min_p:
        warpers.append(MinPLogitsWarper(options.min_p))
    if options.typical_p < 1:
        warpers.append(TypicalLogitsWarper(options.typical_p))
    scores = LogitsProcessorList(warpers)(None, torch.from_numpy(x[None].copy()))
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


def processed_logits(seed: int) -> np.ndarray:
    """GPT-2-like logits [V] as processors leave them: some ids -inf (banned), some biased."""
    rng = np.random.default_rng(seed)
    x = gpt2_like_logits(rng, 1)[0]
    x[rng.integers(0, 60, 10)] = -np.inf
    x[rng.integers(0, VOCAB, 1000)] = -np.inf
    return x


@pytest.mark.parametrize("options", WARPERS, ids=str)
@pytest.mark.parametrize("logits", ["raw", "processed"])
def test_min_p_and_typical_p_distributions_equal_transformers_warpers(
    options: SamplingOptions, logits: str
):
    x = gpt2_like_logits(np.random.default_rng(3), 1)[0] if logits == "raw" else processed_logits(4)
    ids, probs = distribution(x, options)
    expected = reference_probs(x, options)
    assert probs.dtype == np.float32
    assert ids.tolist() == np.flatnonzero(expected).tolist()
    dense = np.zeros(VOCAB, np.float32)
    dense[ids] = probs
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-7)
    unfiltered = reference_probs(x, SamplingOptions(options.temperature, options.top_k))
    assert np.count_nonzero(expected) < np.count_nonzero(unfiltered)  # the warper did cut


@pytest.mark.parametrize("options", WARPERS, ids=str)
def test_sampled_tokens_stay_in_the_support_transformers_allows(options: SamplingOptions):
    x = processed_logits(9)
    allowed = set(np.flatnonzero(reference_probs(x, options)).tolist())
    draws = sample(np.repeat(x[None], 100, axis=0), np.random.default_rng(0), options)
    assert set(draws.tolist()) <= allowed


# --- greedy decoding: ids identical to transformers' generate() with the same options ---


def ours_greedy(model: GPT2, prompt_ids: list[int], **options: Any) -> list[int]:
    """Our greedy continuation of NEW_TOKENS ids (ending early at <|endoftext|>)."""
    params = GenerationParams(max_tokens=NEW_TOKENS, temperature=0.0, **options)
    generation = Generation(model, prompt_ids, params)
    for _ in generation:
        pass
    return generation.samples[0].ids


def transformers_greedy(
    reference: Any, prompt_ids: list[int], *processors: LogitsProcessor, **kwargs: Any
) -> list[int]:
    """GPT2LMHeadModel.generate's greedy continuation, cut after its first <|endoftext|>."""
    prompt = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=EOS,
            logits_processor=LogitsProcessorList(processors),
            **kwargs,
        )
    ids: list[int] = out[0, len(prompt_ids) :].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


# Each case: from the plain greedy ids, our options and transformers' generate() arguments
# (custom processors first): options chosen from what plain decoding does, so each one bites.
Case = Callable[[list[int], Tokenizer, int], tuple[dict[str, Any], list[Any], dict[str, Any]]]


def _bias(
    plain: list[int], _: Tokenizer, __: int
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    first, other = plain[0], (plain[0] + 1) % EOS
    pairs = tuple(sorted([(first, -100.0), (other, 4.5)]))
    return {"logit_bias": pairs}, [], {"sequence_bias": {(first,): float("-inf"), (other,): 4.5}}


def _bans(
    plain: list[int], tok: Tokenizer, _: int
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    texts = (tok.decode(plain[:1]), tok.decode(plain[4:6]))
    return {"ban": texts}, [], {"bad_words_ids": [tok.encode(t) for t in texts]}


def _min_tokens(
    _: list[int], __: Tokenizer, ___: int
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    # <|endoftext|> pushed far above everything: it comes exactly after the 20th new token
    ours = {"logit_bias": ((EOS, 100.0),), "min_tokens": 20}
    return ours, [], {"sequence_bias": {(EOS,): 100.0}, "min_new_tokens": 20}


def _penalties(
    _: list[int], __: Tokenizer, prompt: int
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    return (
        {"presence_penalty": 0.7, "frequency_penalty": 0.4},
        [OpenAIPenalties(0.7, 0.4, prompt)],
        {},
    )


def _everything(
    plain: list[int], tok: Tokenizer, prompt: int
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    bias, _, bias_hf = _bias(plain, tok, prompt)
    bans, _, bans_hf = _bans(plain, tok, prompt)
    ours = (
        bias
        | bans
        | {
            "repetition_penalty": 1.2,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.2,
            "no_repeat_ngram": 3,
            "min_tokens": 30,
        }
    )
    hf = bias_hf | bans_hf
    hf |= {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "min_new_tokens": 30}
    return ours, [OpenAIPenalties(0.3, 0.2, prompt)], hf


CASES: dict[str, Case] = {
    "repetition_penalty": lambda *_: ({"repetition_penalty": 1.3}, [], {"repetition_penalty": 1.3}),
    "no_repeat_ngram": lambda *_: ({"no_repeat_ngram": 2}, [], {"no_repeat_ngram_size": 2}),
    "logit_bias": _bias,
    "ban": _bans,
    "min_tokens": _min_tokens,
    "presence and frequency penalties": _penalties,
    "all of them": _everything,
}


def check_greedy_case(name: str, ours: GPT2, reference: Any, plain: list[int]) -> None:
    """Our greedy ids under the options of CASES[name] equal transformers', and differ from the
    `plain` greedy ids."""
    tok = ours.tokenizer
    prompt_ids = tok.encode(PROMPT)
    options, processors, hf = CASES[name](plain, tok, len(prompt_ids))
    got = ours_greedy(ours, prompt_ids, **options)
    assert got == transformers_greedy(reference, prompt_ids, *processors, **hf)
    assert got != plain  # the options changed the output: the comparison has teeth
    if name == "min_tokens":
        assert len(got) == 21 and got[-1] == EOS


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference_tiny(tiny_model_dir: Path) -> Any:
    return reference_model(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tiny(tiny: GPT2) -> list[int]:
    return ours_greedy(tiny, tiny.tokenizer.encode(PROMPT))


@pytest.fixture(scope="module")
def plain_124m(ours_124m: GPT2) -> list[int]:
    return ours_greedy(ours_124m, ours_124m.tokenizer.encode(PROMPT))


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_ids_equal_transformers_generate_on_the_tiny_model(
    name: str, tiny: GPT2, reference_tiny: Any, plain_tiny: list[int]
):
    check_greedy_case(name, tiny, reference_tiny, plain_tiny)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_ids_equal_transformers_generate_on_124m(
    name: str, ours_124m: GPT2, reference_124m: Any, plain_124m: list[int]
):
    check_greedy_case(name, ours_124m, reference_124m, plain_124m)


# --- the scheduler: batched rows with different options, min_tokens and stop strings ---

BATCHED = [
    GenerationParams(max_tokens=30, seed=1, top_k=0, repetition_penalty=1.4),
    GenerationParams(max_tokens=25, seed=2, n=2, presence_penalty=1.0, frequency_penalty=0.5),
    GenerationParams(max_tokens=30, seed=3, top_k=0, min_p=0.05, no_repeat_ngram=2),
    GenerationParams(max_tokens=20, seed=4, top_k=0, typical_p=0.7, ban=(" the", ","), n=2),
    GenerationParams(max_tokens=30, seed=5),
    GenerationParams(max_tokens=30, temperature=0, logit_bias=((EOS, 50.0),), min_tokens=12),
]


def test_each_request_gets_what_it_gets_alone_batched_with_other_options(tiny: GPT2):
    prompts = [tiny.tokenizer.encode(t) for t in ("Once upon", "A", "The cat sat", "1, 2, 3")]
    requests = [Request(prompts[i % len(prompts)], p) for i, p in enumerate(BATCHED)]
    scheduler = Scheduler(tiny, max_batch=6)  # fewer rows than samples: some wait and join
    states = [scheduler.submit(r) for r in requests]
    for _ in scheduler.run():
        pass
    for request, state in zip(requests, states, strict=True):
        alone = Generation(tiny, request.prompt_ids, request.params)
        for _ in alone:
            pass
        assert [s.ids for s in state.samples] == [s.ids for s in alone.samples]
    assert len(states[-1].samples[0].ids) == 13  # 12 new tokens, then the boosted end of text


def test_the_logprob_of_each_token_is_the_models_own_not_the_processed_one(tiny: GPT2):
    prompt = tiny.tokenizer.encode("Hello there")
    forced = 464  # " The", pushed far above everything: every token is it
    params = GenerationParams(max_tokens=6, temperature=0, logit_bias=((forced, 100.0),))
    generation = Generation(tiny, prompt, params)
    list(generation)
    c = generation.samples[0]
    logits = tiny(prompt + c.ids)[len(prompt) - 1 : -1].astype(np.float64)  # [6, V]
    expected = logits[:, forced] - np.log(np.exp(logits).sum(axis=-1))
    assert c.ids == [forced] * 6
    np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)
    assert max(c.logprobs) < -1  # far from the processed distribution's log 1 = 0


def test_a_stop_string_in_the_first_min_tokens_tokens_does_not_end_the_sample(
    tiny: GPT2, plain_tiny: list[int]
):
    tok, plain = tiny.tokenizer, plain_tiny
    prompt = tok.encode(PROMPT)
    stop = tok.decode(plain[:2])  # printed by the first two tokens
    early = Generation(tiny, prompt, GenerationParams(temperature=0, stop=(stop,)))
    late = Generation(tiny, prompt, GenerationParams(temperature=0, stop=(stop,), min_tokens=6))
    for _ in early:
        pass
    for _ in late:
        pass
    assert early.samples[0].finish_reason == "stop" and len(early.samples[0].ids) == 2
    assert (
        len(late.samples[0].ids) >= 6 and late.samples[0].ids == plain[: len(late.samples[0].ids)]
    )
    assert late.samples[0].text.startswith(stop)  # the early stop string is printed


@pytest.mark.parametrize(
    ("min_tokens", "stops_at"),
    [(0, 3), (3, 3), (4, 6), (6, 6), (7, None)],  # the first "ab" ends in token 3, the next in 6
)
def test_text_stream_checks_stop_strings_from_the_min_tokens_th_token_on(
    min_tokens: int, stops_at: int | None
):
    tok = Tokenizer.default()
    pieces = ["x", "a", "b", "z", "a", "b", "y"]
    ids = [tok.encode(p) for p in pieces]
    assert all(len(i) == 1 for i in ids)
    stream = TextStream(tok, ["ab"], min_tokens)
    printed = ""
    pushed = 0
    for [id] in ids:
        printed += stream.push(id)
        pushed += 1
        if stream.stopped:
            break
    printed += stream.finish()
    assert (pushed if stream.stopped else None) == stops_at
    assert printed == {3: "x", 6: "xabz", None: "xabzaby"}[stops_at]


def test_a_logit_bias_id_outside_the_vocabulary_is_a_param_error(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=1)
    params = GenerationParams(logit_bias=((VOCAB, 1.0),))
    with pytest.raises(ParamError, match=r"token id 50257 is outside the vocabulary") as e:
        scheduler.submit(Request([1, 2], params))
    assert e.value.param == "logit_bias"


def test_a_ban_that_cannot_be_encoded_is_a_param_error(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=1)
    with pytest.raises(ParamError, match=r"banned text '\\ud800': .*lone surrogate") as e:
        scheduler.submit(Request([1, 2], GenerationParams(ban=("\ud800",))))
    assert e.value.param == "ban"
