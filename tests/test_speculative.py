"""Speculative decoding: prompt lookup and a draft model draft tokens that one multi-token pass
verifies; the output is what plain decoding gives (greedy: the same ids; sampling: the same
distribution), batched or alone, and the KV cache rolls back past what was rejected."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from gpt2cli.processors import RowHistory
from gpt2cli.sampling import distribution
from gpt2cli.scheduler import Request, Sample, Scheduler, TokenEvent
from gpt2cli.speculative import accept, lookup, processors_allow
from tests.factory import write_random_gpt2

EOT = 50256
GREEDY: dict[str, Any] = {"temperature": 0, "ignore_eos": True}
SAMPLED: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "ignore_eos": True}
# every processor on (transformers' and OpenAI's), so drafts are verified against processed scores
PROCESSED: dict[str, Any] = {
    "repetition_penalty": 1.3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "no_repeat_ngram": 4,
    "logit_bias": ((13, 5.0), (262, -100.0)),
    "ban": ("the cat",),
    "min_tokens": 20,
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> GPT2:
    """A smaller random GPT-2 of the same vocabulary: one layer, other weights."""
    config = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=32, n_head=4, n_layer=1)
    return GPT2.from_pretrained(write_random_gpt2(tmp_path_factory.mktemp("draft"), config, seed=3))


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50257, n).tolist()


def _run(model: GPT2, prompt: list[int], draft: GPT2 | None = None, **params: Any) -> list[Sample]:
    generation = Generation(model, prompt, GenerationParams(**params), draft=draft)
    list(generation)
    return generation.samples


def _ids(samples: list[Sample]) -> list[list[int]]:
    return [s.ids for s in samples]


# --- prompt lookup's draft --------------------------------------------------------------------


def _transformers_lookup(ids: list[int], k: int) -> list[int]:
    """transformers' PromptLookupCandidateGenerator's candidates for ids (no length limit)."""
    import torch
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    generator = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor([EOT]), num_output_tokens=k, max_length=10_000
    )
    candidates, _ = generator.get_candidates(torch.tensor([ids]))
    return candidates[0, len(ids) :].tolist()


def test_lookup_drafts_what_transformers_prompt_lookup_drafts():
    rng = np.random.default_rng(0)
    for case in range(300):  # small alphabets, so n-grams recur; eos among them
        alphabet = [EOT, *range(1, int(rng.integers(2, 6)))]
        ids = rng.choice(alphabet, int(rng.integers(1, 30))).tolist()
        k = int(rng.integers(1, 12))
        assert lookup(ids, k, EOT) == _transformers_lookup(ids, k), (case, ids, k)


def test_lookup_cuts_drafts_where_the_processors_forbid_as_transformers_does():
    """No repeated 3-grams and two banned sequences over a vocabulary of 8: a draft is cut at
    its first forbidden token, and one cut to nothing gives way to the next occurrence."""
    import torch
    from transformers import (
        LogitsProcessorList,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
    )
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    banned = [[2, 3], [4, 1, 4]]
    theirs = LogitsProcessorList(
        [NoRepeatNGramLogitsProcessor(3), NoBadWordsLogitsProcessor(banned, eos_token_id=EOT)]
    )
    params = GenerationParams(no_repeat_ngram=3, ban=("two texts, encoded as `banned`",))
    rng = np.random.default_rng(1)
    for case in range(200):
        ids = rng.integers(1, 5, int(rng.integers(2, 30))).tolist()
        k = int(rng.integers(1, 8))
        generator = PromptLookupCandidateGenerator(
            eos_token_id=torch.tensor([EOT]),
            num_output_tokens=k,
            max_length=10_000,
            logits_processor=theirs,
            vocab_size=8,
        )
        candidates, _ = generator.get_candidates(torch.tensor([ids]))
        history = RowHistory(params, ids, 1, banned)
        allowed = processors_allow(history, 8, eos=7)  # any id below 8: min_tokens is off
        assert lookup(ids, k, EOT, allowed=allowed) == candidates[0, len(ids) :].tolist(), case


def test_lookup_prefers_the_longer_ngram_and_its_first_occurrence():
    #     0  1  2  3  4  5  6  7  8  9
    ids = [5, 1, 2, 3, 9, 2, 7, 1, 2, 8, 1, 2]  # "1 2" first at 1: then 3 9 2; "2" alone: 3 9
    assert lookup(ids, 3, EOT) == [3, 9, 2]
    assert lookup([4, 2, 6, 3, 2], 2, EOT) == [6, 3]  # no bigram recurs: the unigram "2"
    assert lookup([1, 2, 3], 5, EOT) == []  # nothing recurs
    assert lookup([1, 7, EOT, 4, 1], 5, EOT) == [7]  # cut before <|endoftext|>


# --- the multi-token step ---------------------------------------------------------------------


def test_step_many_gives_each_positions_logits_and_rolls_back_by_length(tiny: GPT2):
    prompts = [_prompt(5, 1), _prompt(9, 2)]
    fed = np.array([_prompt(4, 3), _prompt(4, 4)])  # [2, 4]
    state, _ = tiny.prefill(prompts, capacity=16)
    logits = tiny.step_many(state, fed)  # [2, 4, V]
    for b in range(2):
        full = tiny([*prompts[b], *fed[b]])  # [T, V]
        np.testing.assert_allclose(logits[b], full[len(prompts[b]) :], atol=1e-4)
    # keep row 0's first two fed tokens only: its next step is as if the rest never ran
    state.lengths[0] = len(prompts[0]) + 2
    after = tiny.step_many(state, np.array([[11, 12], [13, 14]]))  # row 1: 15 of 16
    np.testing.assert_allclose(after[0], tiny([*prompts[0], *fed[0, :2], 11, 12])[-2:], atol=1e-4)
    np.testing.assert_allclose(after[1], tiny([*prompts[1], *fed[1], 13, 14])[-2:], atol=1e-4)
    assert state.lengths.tolist() == [len(prompts[0]) + 4, 15]


def test_padding_past_the_capacity_never_touches_a_rows_own_positions(tiny: GPT2):
    """Rows of 6 of 9 positions fed 1 and 2 tokens, padded to 5: the padding past the capacity
    runs at the last position, which neither row's own tokens reach."""
    prompt = _prompt(6, 5)
    state, _ = tiny.prefill([prompt, prompt], capacity=9)
    logits = tiny.step_many(state, np.array([[21, 0, 0, 0, 0], [21, 22, 0, 0, 0]]))
    np.testing.assert_allclose(logits[0, 0], tiny([*prompt, 21])[-1], atol=1e-4)
    np.testing.assert_allclose(logits[1, :2], tiny([*prompt, 21, 22])[-2:], atol=1e-4)
    assert state.lengths.tolist() == [9, 9]
    state.lengths[:] = [7, 8]  # each keeps its own tokens
    again = tiny.step(state, np.array([23, 24]))
    np.testing.assert_allclose(again[0], tiny([*prompt, 21, 23])[-1], atol=1e-4)
    np.testing.assert_allclose(again[1], tiny([*prompt, 21, 22, 24])[-1], atol=1e-4)


def test_step_many_refuses_a_full_row_and_a_wrong_shape(tiny: GPT2):
    state, _ = tiny.prefill([_prompt(4, 6)], capacity=4)
    with pytest.raises(GPT2Error, match="already holds 4 positions"):
        tiny.step_many(state, np.array([[1, 2]]))
    with pytest.raises(GPT2Error, match=r"ids \[B, T\] with B = 1 rows"):
        tiny.step_many(state, np.array([1, 2]))


# --- greedy: the same ids as plain greedy -------------------------------------------------------

CASES = {  # prompt, options: the tiny model soon repeats itself (drafts accepted) or not yet
    "repeating": (_prompt(12, 0), {"max_tokens": 60}),
    "early": (_prompt(40, 9), {"max_tokens": 8}),
    "processed": (_prompt(12, 0), {"max_tokens": 60, **PROCESSED}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("drafting", ["lookup", "draft", "self"])
def test_greedy_output_is_plain_greedys(tiny: GPT2, draft: GPT2, case: str, drafting: str):
    prompt, options = CASES[case]
    plain = _run(tiny, prompt, **GREEDY, **options)
    if drafting == "lookup":
        fast = _run(tiny, prompt, **GREEDY, **options, prompt_lookup=10)
    else:
        other = draft if drafting == "draft" else tiny
        fast = _run(tiny, prompt, other, **GREEDY, **options, draft_tokens=6)
    assert _ids(fast) == _ids(plain)
    assert [s.text for s in fast] == [s.text for s in plain]
    np.testing.assert_allclose(fast[0].logprobs, plain[0].logprobs, atol=1e-4)


def test_drafts_are_accepted_when_the_model_repeats_itself_and_rejected_when_not(
    tiny: GPT2, draft: GPT2
):
    prompt, options = CASES["repeating"]
    looked_up = _run(tiny, prompt, **GREEDY, **options, prompt_lookup=10)[0].timings
    assert looked_up.drafted is not None and looked_up.accepted > 40
    itself = _run(tiny, prompt, tiny, **GREEDY, **options)[0].timings
    assert itself.drafted is not None and itself.accepted == itself.drafted > 40
    other = _run(tiny, prompt, draft, **GREEDY, **options)[0].timings
    assert other.drafted is not None and 0 < other.accepted < other.drafted
    prompt, options = CASES["early"]
    early = _run(tiny, prompt, draft, **GREEDY, **options)[0].timings
    assert early.drafted is not None and early.drafted > 0 and early.accepted == 0


def test_no_draft_is_looked_up_that_no_repeat_ngram_forbids(tiny: GPT2):
    """With no repeated bigrams, whatever followed the last token before would repeat a
    bigram: prompt lookup drafts nothing (transformers' processor check), and decodes alike."""
    prompt, options = CASES["repeating"]
    plain = _run(tiny, prompt, **GREEDY, **options, no_repeat_ngram=2)
    fast = _run(tiny, prompt, **GREEDY, **options, no_repeat_ngram=2, prompt_lookup=10)
    assert _ids(fast) == _ids(plain)
    assert fast[0].timings.drafted == 0


def test_stop_strings_and_the_budget_end_a_sample_mid_draft(tiny: GPT2):
    prompt, _ = CASES["repeating"]
    plain = _run(tiny, prompt, **GREEDY, max_tokens=60)
    text = plain[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for max_tokens, stops in [(13, ()), (60, (stop,))]:
        expected = _run(tiny, prompt, **GREEDY, max_tokens=max_tokens, stop=stops)
        fast = _run(tiny, prompt, **GREEDY, max_tokens=max_tokens, stop=stops, prompt_lookup=10)
        assert _ids(fast) == _ids(expected)
        assert [s.text for s in fast] == [s.text for s in expected]
        assert fast[0].finish_reason == expected[0].finish_reason


def test_124m_greedy_is_plain_greedy_with_a_tiny_draft_and_with_itself(ours_124m: GPT2, tiny: GPT2):
    prompt = _prompt(20, 3)
    plain = _run(ours_124m, prompt, **GREEDY, max_tokens=24)
    for other in (tiny, ours_124m):
        fast = _run(ours_124m, prompt, other, **GREEDY, max_tokens=24, draft_tokens=3)
        assert _ids(fast) == _ids(plain)
    looked_up = _run(ours_124m, prompt, **GREEDY, max_tokens=24, prompt_lookup=10)
    assert _ids(looked_up) == _ids(plain)


# --- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(tiny: GPT2, draft: GPT2):
    prompt = _prompt(10, 4)
    options = {**SAMPLED, "max_tokens": 30, "n": 2, "seed": 11}
    for other, lookup_k in [(draft, 0), (None, 10)]:
        first = _run(tiny, prompt, other, **options, prompt_lookup=lookup_k)
        again = _run(tiny, prompt, other, **options, prompt_lookup=lookup_k)
        assert _ids(first) == _ids(again)
        assert _ids(first) != _ids(_run(tiny, prompt, other, **options | {"seed": 12}))


def test_prompt_lookup_samples_with_plain_samplings_own_draws(tiny: GPT2):
    """A looked-up draft is a point mass: each position draws from p as plain sampling does, and
    one sample consumes the generator in the same order, so a seed gives the same sample."""
    prompt = _prompt(6, 8) * 3  # a prompt that repeats: drafts to check
    for options in (SAMPLED, {"temperature": 0.7, "top_k": 3, "ignore_eos": True}):
        drafted = 0
        for seed in range(6):  # several: whether a sample repeats the prompt is up to the seed
            plain = _run(tiny, prompt, **options, max_tokens=50, seed=seed)
            fast = _run(tiny, prompt, **options, max_tokens=50, seed=seed, prompt_lookup=10)
            assert _ids(fast) == _ids(plain)
            drafted += fast[0].timings.drafted
        assert drafted  # drafts were checked


def _exact(
    model: GPT2, prompt: list[int], options: Any, length: int
) -> dict[tuple[int, ...], float]:
    """Plain sampling's probability of each continuation of `length` tokens (all > 0 ones)."""
    paths: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for path, p in paths.items():
            ids, probs = distribution(model([*prompt, *path])[-1], options)
            grown |= {(*path, int(t)): p * float(q) for t, q in zip(ids, probs, strict=True)}
        paths = grown
    return paths


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2, GPT2]:
    """A target and a draft model over a 64-token vocabulary: sampling from it costs little."""
    folder = tmp_path_factory.mktemp("small_vocab")
    models = []
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        config = GPT2Config(n_vocab=64, n_ctx=32, n_embd=32, n_head=4, n_layer=layers)
        models.append(
            GPT2.from_pretrained(
                write_random_gpt2(folder / name, config, seed=seed, tokenizer=False)
            )
        )
    return models[0], models[1]


def test_a_draft_model_leaves_the_sampled_distribution_unchanged(small_vocab: tuple[GPT2, GPT2]):
    """4-token continuations from 4,000 seeds against plain sampling's exact probabilities:
    every frequency within 5 standard deviations (plus 1/N) of its probability, a bound the
    draft's own distribution breaks by far, so keeping drafts unchecked would fail."""
    target, draft = small_vocab
    prompt, runs = [5, 17, 3, 40, 22, 9], 4000
    options = {"temperature": 1.5, "top_k": 3, "ignore_eos": True, "max_tokens": 4}
    exact = _exact(target, prompt, GenerationParams(**options).sampling, 4)
    scheduler = Scheduler(target, 64, draft=draft)
    states = [
        scheduler.submit(Request(prompt, GenerationParams(**options, seed=seed, draft_tokens=2)))
        for seed in range(runs)
    ]
    list(scheduler.run())
    counts: dict[tuple[int, ...], int] = {}
    for state in states:
        key = tuple(state.samples[0].ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    bounds = {path: 5 * np.sqrt(p * (1 - p) / runs) + 1 / runs for path, p in exact.items()}
    for path, p in exact.items():
        assert abs(counts.get(path, 0) / runs - p) <= bounds[path], (path, counts.get(path), p)
    timings = [s.samples[0].timings for s in states]
    assert 0 < sum(t.accepted for t in timings) < sum(t.drafted or 0 for t in timings)
    drafted = _exact(draft, prompt, GenerationParams(**options).sampling, 4)
    assert max(abs(drafted.get(path, 0.0) - p) / bounds[path] for path, p in exact.items()) > 3


def test_accept_keeps_a_draft_with_probability_p_over_q():
    """One position, p = (0.2, 0.8) over ids (1, 2), a draft of id 2 drawn from q = (0.5, 0.5):
    kept with probability min(1, 0.8 / 0.5) = 1; a draft of id 1: kept with 0.2 / 0.5 = 0.4,
    else replaced from norm(max(0, p - q)) = id 2."""
    p = (np.array([1, 2]), np.array([0.2, 0.8], np.float32))
    q = (np.array([1, 2]), np.array([0.5, 0.5], np.float32))
    rng = np.random.default_rng(0)
    kept_2 = [accept([p, p], [2], [q], rng, greedy=False)[0] for _ in range(200)]
    assert kept_2 == [2] * 200
    kept_1 = [accept([p, p], [1], [q], rng, greedy=False) for _ in range(4000)]
    share = sum(k[0] == 1 for k in kept_1) / 4000
    assert abs(share - 0.4) < 0.04
    assert all(k == [2] for k in kept_1 if k[0] != 1)  # rejected: the residual, and no more
    assert all(len(k) == 2 for k in kept_1 if k[0] == 1)  # kept: then a token from p


# --- the batch, the counts, the cache -----------------------------------------------------------


def test_each_request_gets_what_it_gets_alone_in_a_batch_with_a_draft_model(
    tiny: GPT2, draft: GPT2
):
    requests = [
        Request(_prompt(12, 0), GenerationParams(**GREEDY, max_tokens=30)),
        Request(_prompt(5, 1), GenerationParams(**SAMPLED, max_tokens=20, seed=4, n=2)),
        Request(_prompt(30, 2), GenerationParams(**GREEDY, max_tokens=25, prompt_lookup=8)),
        Request(_prompt(7, 3), GenerationParams(**SAMPLED, max_tokens=29, seed=5, **PROCESSED)),
        Request(
            _prompt(6, 4) * 3, GenerationParams(**SAMPLED, max_tokens=15, seed=6, prompt_lookup=4)
        ),
        Request(_prompt(9, 5), GenerationParams(**GREEDY, max_tokens=12, num_beams=2)),
        Request(_prompt(8, 6), GenerationParams(**SAMPLED, max_tokens=10, seed=7, best_of=3)),
    ]
    scheduler = Scheduler(tiny, 8, draft=draft)
    states = []
    for request in requests:  # one joins per step, while the others decode
        states.append(scheduler.submit(request))
        scheduler.step()
    list(scheduler.run())
    for request, state in zip(requests, states, strict=True):
        other = None if request.params.num_beams > 1 else draft  # a search ignores the draft
        alone = _run(tiny, list(request.prompt_ids), other, **asdict(request.params))
        assert _ids(state.samples) == _ids(alone)


def test_timings_count_drafted_and_accepted_tokens_only_when_speculating(tiny: GPT2):
    prompt, options = CASES["repeating"]
    plain = _run(tiny, prompt, **GREEDY, **options)[0].to_json()["timings"]
    assert "drafted" not in plain and "accepted" not in plain
    fast = _run(tiny, prompt, tiny, **GREEDY, **options, draft_tokens=4)[0]
    timings = fast.to_json()["timings"]
    assert timings["drafted"] == fast.timings.drafted and timings["accepted"] >= 40
    # a draft of 4 each step, one fewer near the end of the budget, and one step per 5 tokens
    assert timings["drafted"] <= 4 * (len(fast.ids) - 1) / 5 + 4


def test_events_stream_every_kept_token_in_order(tiny: GPT2):
    prompt, options = CASES["repeating"]
    generation = Generation(tiny, prompt, GenerationParams(**GREEDY, **options, prompt_lookup=10))
    events = [e for e in generation if isinstance(e, TokenEvent)]
    assert [e.id for e in events] == generation.samples[0].ids
    assert "".join(e.text for e in events) == generation.samples[0].text
    assert [e.done for e in events] == [False] * (len(events) - 1) + [True]


def test_rolled_back_rows_hold_what_a_plain_run_holds(tiny: GPT2, draft: GPT2):
    prompt = _prompt(12, 0)
    runs = {}
    for name, other, lookup_k in [("plain", None, 0), ("lookup", None, 10), ("draft", draft, 0)]:
        generation = Generation(
            tiny,
            prompt,
            GenerationParams(**GREEDY, max_tokens=50, prompt_lookup=lookup_k),
            draft=other,
        )
        list(generation)
        runs[name] = generation.scheduler.cache
    length = len(prompt) + 50 - 1  # every token but the last has run
    for name in ("lookup", "draft"):
        assert runs[name].lengths[0] == runs["plain"].lengths[0] == length
        for kv in ("keys", "values"):
            np.testing.assert_allclose(
                getattr(runs[name], kv)[:, 0, :, :length],
                getattr(runs["plain"], kv)[:, 0, :, :length],
                atol=1e-5,
            )


def test_a_draft_model_must_share_the_vocabulary_and_fit_the_rows(tiny: GPT2, tmp_path: Path):
    small = GPT2Config(n_vocab=50257, n_ctx=32, n_embd=32, n_head=4, n_layer=1)
    short = GPT2.from_pretrained(write_random_gpt2(tmp_path / "short", small, seed=1))
    with pytest.raises(GPT2Error, match=r"draft model's context \(32 tokens\) is shorter"):
        Scheduler(tiny, 2, draft=short)
    odd = GPT2Config(n_vocab=300, n_ctx=128, n_embd=32, n_head=4, n_layer=1)
    other = GPT2.from_pretrained(write_random_gpt2(tmp_path / "odd", odd, tokenizer=False))
    with pytest.raises(GPT2Error, match="must share its tokenizer"):
        Scheduler(tiny, 2, draft=other)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_every_lookup_width_decodes_like_plain_greedy(tiny: GPT2, k: int):
    prompt = _prompt(6, 8) * 3
    plain = _run(tiny, prompt, **GREEDY, max_tokens=40)
    assert _ids(_run(tiny, prompt, **GREEDY, max_tokens=40, prompt_lookup=k)) == _ids(plain)
