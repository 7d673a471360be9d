"""Beam search and best_of: the K best beams and their scores as transformers' `generate` finds
them, whatever else shares the batch; best_of keeps the n best of its draws."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2cli import beam
from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.kvcache import DecodeState
from gpt2cli.model import GPT2
from gpt2cli.ops import log_softmax
from gpt2cli.params import EarlyStopping, GenerationParams
from gpt2cli.scheduler import Event, Request, RequestState, Sample, Scheduler, TokenEvent
from gpt2cli.tokenizer import Tokenizer
from tests.factory import TINY, reference_model, write_random_gpt2

EOT = 50256
TOL = 1e-4
SAMPLED: dict[str, Any] = {"temperature": 0.9, "top_k": 40}

# (W, length_penalty, early_stopping, K): every width 2..8, each penalty and each mode
SEARCHES: list[tuple[int, float, EarlyStopping, int]] = [
    (2, 1.0, False, 1),
    (3, 0.5, True, 2),
    (4, 2.0, "never", 4),
    (5, 1.0, "never", 3),
    (6, 0.5, False, 2),
    (7, 2.0, True, 5),
    (8, 1.0, True, 8),
    (8, 0.5, "never", 3),
    (4, 2.0, False, 2),
    (3, 1.0, "never", 3),
    (5, 2.0, True, 1),
    (6, 0.5, "never", 6),
]


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model with <|endoftext|> made likely (the final layer norm's bias leans
    towards its embedding): beams end at every length, so the finished hypotheses, the length
    penalty and the early-stopping rules all come into play (plain random weights never end)."""
    folder = write_random_gpt2(tmp_path_factory.mktemp("eos-gpt2"), TINY, seed=0)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["ln_f.bias"] += 5.0 * tensors["wte.weight"][EOT]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def eos_model(eos_dir: Path) -> GPT2:
    return GPT2.from_pretrained(eos_dir)


@pytest.fixture(scope="module")
def reference_eos(eos_dir: Path) -> Any:
    return reference_model(eos_dir)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, EOT, n).tolist()


def _run(model: GPT2, prompt: list[int], params: GenerationParams) -> tuple[list[Sample], list]:
    """The request run alone: its samples and its token events."""
    generation = Generation(model, prompt, params)
    events = list(generation)
    return generation.samples, events


def _transformers_beams(
    reference: Any, prompt: list[int], params: GenerationParams
) -> list[tuple[list[int], float]]:
    """transformers' K best beams (generated ids, padded with <|endoftext|>) and their
    sequences_scores for the same options."""
    import torch

    ids = torch.tensor([prompt])
    bans = [Tokenizer.default().encode(text) for text in params.ban]
    with torch.inference_mode():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=params.num_beams,
            num_return_sequences=params.n,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            no_repeat_ngram_size=params.no_repeat_ngram,
            repetition_penalty=params.repetition_penalty,
            min_new_tokens=params.min_tokens,
            bad_words_ids=bans or None,
            max_new_tokens=params.max_tokens,
            eos_token_id=[] if params.ignore_eos else EOT,
            pad_token_id=EOT,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return [
        (row[len(prompt) :].tolist(), float(score))
        for row, score in zip(out.sequences, out.sequences_scores, strict=True)
    ]


def _assert_as_transformers(
    model: GPT2, reference: Any, prompt: list[int], params: GenerationParams
) -> list[Sample]:
    """Our K samples are transformers' K best beams: the same ids (theirs padded after an
    ending <|endoftext|>) and scores within 1e-4."""
    samples, _ = _run(model, prompt, params)
    expected = _transformers_beams(reference, prompt, params)
    assert len(samples) == len(expected) == params.n
    for s, (ids, score) in zip(samples, expected, strict=True):
        assert ids == s.ids + [EOT] * (len(ids) - len(s.ids))
        assert s.score is not None and abs(s.score - score) <= TOL
    return samples


@pytest.mark.parametrize(("width", "penalty", "early", "k"), SEARCHES)
def test_the_k_best_beams_and_their_scores_are_transformers(
    eos_model: GPT2,
    reference_eos: Any,
    width: int,
    penalty: float,
    early: EarlyStopping,
    k: int,
) -> None:
    params = GenerationParams(
        max_tokens=24 + 4 * width,
        n=k,
        num_beams=width,
        length_penalty=penalty,
        early_stopping=early,
    )
    samples = _assert_as_transformers(eos_model, reference_eos, _prompt(5, width), params)
    assert [s.score for s in samples] == sorted((s.score for s in samples), reverse=True)


def test_the_searches_exercise_every_ending(eos_model: GPT2) -> None:
    """The model above ends beams at <|endoftext|> at various lengths and by the budget."""
    reasons: set[str | None] = set()
    lengths: set[int] = set()
    for width, penalty, early, k in SEARCHES[:6]:
        params = GenerationParams(
            max_tokens=32, n=k, num_beams=width, length_penalty=penalty, early_stopping=early
        )
        samples, _ = _run(eos_model, _prompt(5, width), params)
        reasons |= {s.finish_reason for s in samples}
        lengths |= {len(s.ids) for s in samples}
    assert reasons == {"eos", "length"}
    assert len(lengths) >= 5


@pytest.mark.parametrize(
    ("width", "ngram", "early"), [(3, 2, False), (5, 3, "never"), (8, 2, True)]
)
def test_no_repeat_ngram_beams_are_transformers(
    eos_model: GPT2, reference_eos: Any, width: int, ngram: int, early: EarlyStopping
) -> None:
    params = GenerationParams(
        max_tokens=40, n=2, num_beams=width, no_repeat_ngram=ngram, early_stopping=early
    )
    samples = _assert_as_transformers(eos_model, reference_eos, _prompt(6, ngram), params)
    for s in samples:  # the processor really ran: no n-gram twice in prompt + output
        seq = _prompt(6, ngram) + s.ids
        grams = [tuple(seq[i : i + ngram]) for i in range(len(seq) - ngram + 1)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.3},
        {"min_tokens": 8, "ban": (" the", "ing")},
        {"repetition_penalty": 0.8, "no_repeat_ngram": 2, "min_tokens": 4},
    ],
)
def test_beams_under_other_processors_are_transformers(
    eos_model: GPT2, reference_eos: Any, options: dict[str, Any]
) -> None:
    """The processors shape the log-softmax scores of every beam, under its own history."""
    params = GenerationParams(max_tokens=30, n=2, num_beams=4, **options)
    _assert_as_transformers(eos_model, reference_eos, _prompt(6, 3), params)


def test_ignore_eos_beams_run_the_whole_budget_as_transformers_without_an_eos(
    eos_model: GPT2, reference_eos: Any
) -> None:
    params = GenerationParams(max_tokens=30, n=3, num_beams=4, ignore_eos=True)
    samples = _assert_as_transformers(eos_model, reference_eos, _prompt(4, 9), params)
    assert all(len(s.ids) == 30 and s.finish_reason == "length" for s in samples)


@pytest.mark.parametrize(
    ("width", "penalty", "early", "ngram"), [(4, 1.0, False, 0), (3, 2.0, "never", 2)]
)
def test_124m_beams_are_transformers(
    ours_124m: GPT2,
    reference_124m: Any,
    width: int,
    penalty: float,
    early: EarlyStopping,
    ngram: int,
) -> None:
    params = GenerationParams(
        max_tokens=32,
        n=2,
        num_beams=width,
        length_penalty=penalty,
        early_stopping=early,
        no_repeat_ngram=ngram,
    )
    _assert_as_transformers(ours_124m, reference_124m, _prompt(8, width), params)


def test_beam_events_come_at_the_end_and_spell_each_sample(eos_model: GPT2) -> None:
    params = GenerationParams(max_tokens=30, n=3, num_beams=4, top_logprobs=2)
    prompt = _prompt(5, 1)
    scheduler = Scheduler(eos_model, 4)
    state = scheduler.submit(Request(prompt, params))
    steps = [scheduler.step() for _ in range(60) if scheduler.busy]
    assert all(not events for events in steps[:-1])  # nothing streams during the search
    events = steps[-1]
    assert all(isinstance(e, TokenEvent) for e in events)
    for i, s in enumerate(state.samples):
        mine = [e for e in events if isinstance(e, TokenEvent) and e.sample == i]
        assert [e.id for e in mine] == s.ids
        assert "".join(e.text for e in mine) == s.text
        assert [e.logprob for e in mine] == s.logprobs
        assert mine[-1].finish_reason == s.finish_reason and s.finish_reason in ("eos", "length")
        assert all(len(e.top) == 2 for e in mine)
    assert scheduler.free == 4 and not scheduler.busy


def test_beam_logprobs_and_alternatives_are_the_models_own(eos_model: GPT2) -> None:
    """Each token's logprob and alternatives are the model's unprocessed log-softmax at its
    position in the hypothesis, as a full forward pass over prompt + ids computes them."""
    prompt = _prompt(5, 2)
    params = GenerationParams(max_tokens=20, n=2, num_beams=3, no_repeat_ngram=2, top_logprobs=3)
    samples, events = _run(eos_model, prompt, params)
    for i, s in enumerate(samples):
        logprobs = log_softmax(eos_model(prompt + s.ids)[len(prompt) - 1 : -1])  # [t, V]
        np.testing.assert_allclose(
            s.logprobs, logprobs[np.arange(len(s.ids)), s.ids], rtol=0, atol=TOL
        )
        for t, e in enumerate(e for e in events if e.sample == i):
            ids = [id for id, _ in e.top]
            assert ids == np.argsort(-logprobs[t], kind="stable")[:3].tolist()
            np.testing.assert_allclose([lp for _, lp in e.top], logprobs[t, ids], atol=TOL)


def test_a_stop_string_cuts_a_beam_after_the_search(tiny: GPT2) -> None:
    prompt = _prompt(5, 3)
    params = GenerationParams(max_tokens=30, n=2, num_beams=3, ignore_eos=True)
    full, _ = _run(tiny, prompt, params)
    stop = full[0].text[len(full[0].text) // 2 :][:3]
    assert stop and stop in full[0].text
    cut, events = _run(tiny, prompt, replace(params, stop=(stop,)))
    for before, after in zip(full, cut, strict=True):
        assert after.score == before.score  # the search itself is the same
        if stop not in before.text:
            assert (after.ids, after.text, after.finish_reason) == (
                before.ids,
                before.text,
                "length",
            )
            continue
        assert after.finish_reason == "stop"
        assert after.text == before.text[: before.text.index(stop)]
        assert after.ids == before.ids[: len(after.ids)]
        assert stop in tiny.tokenizer.decode(after.ids) and stop not in tiny.tokenizer.decode(
            after.ids[:-1]
        )
    assert [e.id for e in events if e.sample == 0] == cut[0].ids


def test_score_is_in_the_json_of_beams_only(tiny: GPT2) -> None:
    beams, _ = _run(tiny, _prompt(4, 4), GenerationParams(max_tokens=5, n=2, num_beams=2))
    sampled, _ = _run(tiny, _prompt(4, 4), GenerationParams(max_tokens=5, seed=1))
    assert [list(s.to_json()) for s in beams[:1] + sampled] == [
        ["text", "ids", "prompt_ids", "finish_reason", "logprobs", "score", "timings"],
        ["text", "ids", "prompt_ids", "finish_reason", "logprobs", "timings"],
    ]
    assert beams[0].to_json()["score"] == round(beams[0].score or 0.0, 6)


def _drain(scheduler: Scheduler) -> list[Event]:
    events: list[Event] = []
    for _ in range(10_000):  # bounded: every step moves every running request on
        if not scheduler.busy:
            return events
        events += scheduler.step()
    raise AssertionError("the scheduler did not finish")


def _mixed() -> list[Request]:
    """Beam searches (with and without processors) beside seeded sampling and best_of."""
    return [
        Request(_prompt(7, 10), GenerationParams(max_tokens=12, n=2, seed=3, **SAMPLED)),
        Request(_prompt(3, 11), GenerationParams(max_tokens=20, n=2, num_beams=3)),
        Request(_prompt(12, 12), GenerationParams(max_tokens=9, seed=4, **SAMPLED)),
        Request(
            _prompt(5, 13),
            GenerationParams(max_tokens=16, n=1, num_beams=4, no_repeat_ngram=2, length_penalty=2),
        ),
        Request(_prompt(9, 14), GenerationParams(max_tokens=10, n=2, best_of=3, seed=5, **SAMPLED)),
    ]


def _outcome(state: RequestState) -> list[tuple[list[int], str | None, float | None]]:
    return [(s.ids, s.finish_reason, s.score) for s in state.samples]


@pytest.mark.parametrize("together", [True, False])
def test_a_beam_request_in_a_batch_gets_what_it_gets_alone(eos_model: GPT2, together: bool):
    """Beams share the decode batch with sampling rows, joining at once or one per step while
    the others decode: reordering a search's cache rows touches no one else's."""
    requests = _mixed()
    alone = []
    for request in requests:
        scheduler = Scheduler(eos_model, request.params.draws)
        alone.append(scheduler.submit(request))
        _drain(scheduler)
    scheduler = Scheduler(eos_model, 12)
    states = []
    for request in requests:
        states.append(scheduler.submit(request))
        if not together:
            scheduler.step()
    _drain(scheduler)
    for state, single in zip(states, alone, strict=True):
        ours, theirs = _outcome(state), _outcome(single)
        assert [o[:2] for o in ours] == [t[:2] for t in theirs]
        for (_, _, a), (_, _, b) in zip(ours, theirs, strict=True):
            assert (a is None) == (b is None) and abs((a or 0.0) - (b or 0.0)) <= TOL


def test_best_of_keeps_the_n_draws_of_highest_mean_logprob(tiny: GPT2) -> None:
    prompt = _prompt(6, 5)
    drawn, _ = _run(tiny, prompt, GenerationParams(max_tokens=12, n=5, seed=8, **SAMPLED))
    params = GenerationParams(max_tokens=12, n=2, best_of=5, seed=8, **SAMPLED)
    scheduler = Scheduler(tiny, 5)
    state = scheduler.submit(Request(prompt, params))
    steps = [scheduler.step() for _ in range(30) if scheduler.busy]
    assert all(not events for events in steps[:-1])  # its events wait for the choice
    means = [float(np.mean(s.logprobs)) for s in drawn]
    best = sorted(range(5), key=lambda i: -means[i])[:2]
    assert [s.ids for s in state.samples] == [drawn[i].ids for i in best]
    assert [s.text for s in state.samples] == [drawn[i].text for i in best]
    events = [e for e in steps[-1] if isinstance(e, TokenEvent)]
    for i, s in enumerate(state.samples):
        assert [e.id for e in events if e.sample == i] == s.ids
        assert "".join(e.text for e in events if e.sample == i) == s.text


def test_best_of_ties_keep_the_earlier_draws(eos_model: GPT2) -> None:
    """Greedy draws are all the same sequence, so every mean ties: the first n draws are kept."""
    params = GenerationParams(max_tokens=6, n=2, best_of=4, temperature=0)
    generation = Generation(eos_model, _prompt(3, 6), params)
    draws = list(generation.samples)
    events = list(generation)
    assert len(draws) == 4 and generation.samples == draws[:2]
    assert all(a is b for a, b in zip(generation.samples, draws, strict=False))
    assert sorted({e.sample for e in events}) == [0, 1]


def test_a_cancelled_search_frees_its_rows_and_says_nothing(tiny: GPT2) -> None:
    scheduler = Scheduler(tiny, 6)
    state = scheduler.submit(Request(_prompt(4, 7), GenerationParams(max_tokens=20, num_beams=4)))
    other = scheduler.submit(Request(_prompt(4, 8), GenerationParams(max_tokens=20, seed=1)))
    events = scheduler.step() + scheduler.step()
    assert scheduler.free == 1 and all(e.state is other for e in events)
    scheduler.cancel(state)
    assert scheduler.free == 5 and scheduler.running == [other]
    events = _drain(scheduler)
    assert all(e.state is other for e in events) and all(not s.ids for s in state.samples)


def test_a_search_wider_than_the_batch_is_refused_naming_it(tiny: GPT2) -> None:
    scheduler = Scheduler(tiny, 4)
    with pytest.raises(GPT2Error, match="num_beams must be at most the batch size 4, got 5"):
        scheduler.submit(Request([1, 2], GenerationParams(n=2, num_beams=5)))
    with pytest.raises(GPT2Error, match="best_of must be at most the batch size 4, got 6"):
        scheduler.submit(Request([1, 2], GenerationParams(n=2, best_of=6)))


@pytest.mark.parametrize("seed", range(20))
def test_the_best_candidates_are_a_full_sorts_ties_and_all(seed: int) -> None:
    """`largest` orders only the scores near the best, yet picks what a full sort by score,
    then index, picks: spread or clustered scores, ties, -inf and the first step's -1e9 rows."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal(4 * 500) * rng.choice([0.1, 3.0, 40.0]), 1).astype(np.float32)
    x[rng.random(len(x)) < 0.3] = -np.inf
    if seed % 3 == 0:
        x[500:] = x[500:] + np.float32(-1e9)  # beams 1..3 of a first step
    if seed % 5 == 0:
        x[:] = -np.inf
        x[rng.integers(0, len(x), 3)] = 0.0  # fewer finite scores than asked for
    k = int(rng.integers(1, 17))
    expected = np.lexsort((np.arange(len(x)), -x))[:k]
    assert beam.largest(x, k).tolist() == expected.tolist()


def test_reorder_copies_only_moved_rows_positions_in_use() -> None:
    """Row rows[i] takes row rows[sources[i]]'s keys, values and length (a cycle included);
    rows outside the request and positions past the length are untouched."""
    state = DecodeState.empty(TINY, 6, 8, logits=6)
    rng = np.random.default_rng(0)
    for cache in (state.keys, state.values):
        cache[...] = rng.standard_normal(cache.shape, dtype=np.float32)
    state.lengths[:] = [5, 4, 4, 4, 4, 7]
    keys, values = state.keys.copy(), state.values.copy()
    state.reorder([1, 2, 3, 4], [1, 0, 0, 3])  # rows 1, 2 swap; 3 copies 1; 4 stays
    for row, source in [(1, 2), (2, 1), (3, 1), (4, 4), (0, 0), (5, 5)]:
        n = 4 if row in (1, 2, 3, 4) else 8
        np.testing.assert_array_equal(state.keys[:, row, :, :n], keys[:, source, :, :n])
        np.testing.assert_array_equal(state.values[:, row, :, :n], values[:, source, :, :n])
        np.testing.assert_array_equal(state.keys[:, row, :, n:], keys[:, row, :, n:])
    assert state.lengths.tolist() == [5, 4, 4, 4, 4, 7]
