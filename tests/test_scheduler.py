"""Continuous batching: requests queue, join and leave one decode batch, each as it would run
alone; the scheduler's `step` is the one loop every front end drives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from gpt2cli.scheduler import (
    Event,
    FailedEvent,
    PromptEvent,
    Request,
    RequestState,
    Scheduler,
    TokenEvent,
)
from gpt2cli.score import score_ids

GREEDY: dict[str, Any] = {"temperature": 0}
SAMPLED: dict[str, Any] = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50257, n).tolist()


def _request(prompt: list[int], **params: Any) -> Request:
    return Request(prompt, GenerationParams(**params))


def _requests() -> list[Request]:
    """Mixed prompt lengths, budgets, samples and options: greedy, seeded and stop strings."""
    return [
        _request(_prompt(3, 0), max_tokens=9, **GREEDY, ignore_eos=True),
        _request(_prompt(17, 1), max_tokens=4, **SAMPLED, seed=5, n=2, ignore_eos=True),
        _request(_prompt(40, 2), max_tokens=12, **SAMPLED, seed=6, ignore_eos=True),
        _request(_prompt(1, 3), max_tokens=2, **GREEDY, ignore_eos=True),
        _request(_prompt(25, 4), max_tokens=7, **SAMPLED, seed=7, n=3, ignore_eos=True),
        _request(_prompt(9, 5), max_tokens=10, **GREEDY, stop=("e",)),
    ]


def _alone(model: GPT2, request: Request) -> list[list[int]]:
    """The request's samples when it runs by itself (`gpt2 generate -n N --seed S`)."""
    generation = Generation(model, request.prompt_ids, request.params)
    list(generation)
    return [s.ids for s in generation.samples]


def _drain(scheduler: Scheduler) -> list[Event]:
    """Step until the scheduler has nothing waiting or running; every event, in order."""
    events: list[Event] = []
    for _ in range(10_000):  # bounded: every step finishes a token of every running sample
        if not scheduler.busy:
            return events
        events += scheduler.step()
    raise AssertionError("the scheduler did not finish")


def _submit_all(
    scheduler: Scheduler, requests: list[Request], *, together: bool
) -> tuple[list[RequestState], list[Event]]:
    """Submit every request at once, or one per step while the others decode; run them all."""
    states, events = [], []
    for request in requests:
        states.append(scheduler.submit(request))
        if not together:
            events += scheduler.step()
    return states, events + _drain(scheduler)


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
@pytest.mark.parametrize("max_batch", [3, 4, 8])
def test_each_request_gets_what_it_gets_alone_whatever_joins_the_batch(
    tiny: GPT2, max_batch: int, together: bool
):
    requests = _requests()
    expected = [_alone(tiny, r) for r in requests]
    states, _ = _submit_all(Scheduler(tiny, max_batch=max_batch), requests, together=together)
    assert [[s.ids for s in state.samples] for state in states] == expected
    assert all(state.finished and not state.cancelled for state in states)


def test_events_spell_each_samples_ids_text_and_finish(tiny: GPT2):
    states, events = _submit_all(Scheduler(tiny, max_batch=4), _requests(), together=False)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == len(events)  # no echo asked for, no failure
    for state in states:
        for i, s in enumerate(state.samples):
            mine = [e for e in tokens if e.state is state and e.sample == i]
            assert [e.id for e in mine] == s.ids
            assert "".join(e.text for e in mine) == s.text
            assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].finish_reason == s.finish_reason
            assert s.logprobs == pytest.approx([e.logprob for e in mine])
    assert states[5].samples[0].finish_reason == "stop"  # its stop string "e"
    assert "e" not in states[5].samples[0].text


def test_requests_wait_in_order_until_their_samples_find_free_rows(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=2)
    first = scheduler.submit(_request([1, 2, 3], max_tokens=5, **GREEDY, ignore_eos=True))
    pair = scheduler.submit(_request([4, 5], max_tokens=4, **GREEDY, n=2, ignore_eos=True))
    last = scheduler.submit(_request([6], max_tokens=2, **GREEDY, ignore_eos=True))
    scheduler.step()
    # one row is free, but the pair needs two, and the last does not overtake it
    assert scheduler.running == [first] and scheduler.waiting == 3 and scheduler.free == 1
    while first.admitted and not first.finished:
        scheduler.step()
    scheduler.step()
    assert scheduler.running == [pair] and scheduler.queued == [last]
    _drain(scheduler)
    assert all(s.finished for s in (first, pair, last))


def test_a_request_admitted_while_others_decode_reuses_a_freed_row(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=2, capacity=64)
    short = scheduler.submit(_request(_prompt(30, 8), max_tokens=2, **GREEDY, ignore_eos=True))
    long = scheduler.submit(_request(_prompt(5, 9), max_tokens=20, **GREEDY, ignore_eos=True))
    scheduler.step()  # both join; short gets its second token, leaves, and its row frees
    assert short.finished and scheduler.free == 1
    late = scheduler.submit(
        _request(_prompt(4, 10), max_tokens=6, **SAMPLED, seed=3, ignore_eos=True)
    )
    _drain(scheduler)
    for state in (long, late):
        assert [s.ids for s in state.samples] == _alone(tiny, state.request)


def test_top_logprobs_are_the_most_likely_tokens_best_first(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=1)
    state = scheduler.submit(_request(_prompt(6, 11), max_tokens=5, **GREEDY, top_logprobs=5))
    event = scheduler.step()[0]  # the first token, sampled from the prompt's own logits
    logits = tiny(state.prompt_ids)[-1].astype(np.float64)  # [V]
    logprobs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-logprobs)[:5]
    assert isinstance(event, TokenEvent)
    assert [t for t, _ in event.top] == best.tolist()
    assert [lp for _, lp in event.top] == pytest.approx(logprobs[best], abs=1e-4)
    assert event.id == best[0] and event.logprob == pytest.approx(logprobs[best[0]], abs=1e-4)


def test_echo_scores_the_prompt_from_its_own_prefill_then_generates(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=2)
    prompt = _prompt(20, 14)
    params = {"max_tokens": 3, **GREEDY, "ignore_eos": True, "top_logprobs": 3}
    echoed = scheduler.submit(_request(prompt, **params, echo=True, echo_logprobs=True))
    events = _drain(scheduler)
    assert isinstance(events[0], PromptEvent) and events[0].state is echoed
    score, expected = echoed.prompt_score, score_ids(tiny, prompt, top=3)
    assert score is not None
    np.testing.assert_allclose(score.logprobs, expected.logprobs, atol=1e-4)
    np.testing.assert_array_equal(score.top_ids, expected.top_ids)
    assert echoed.samples[0].ids == _alone(tiny, _request(prompt, **params))[0]


def test_a_prompt_alone_takes_no_row_and_ends_once_echoed(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=1)
    running = scheduler.submit(_request([1, 2], max_tokens=50, **GREEDY, ignore_eos=True))
    scheduler.step()
    alone = scheduler.submit(_request([3] * 128, max_tokens=0, echo=True))  # the whole context
    events = scheduler.step()
    assert [e.state for e in events if isinstance(e, PromptEvent)] == [alone]
    assert alone.finished and alone.prompt_score is None and alone.samples[0].ids == []
    assert scheduler.running == [running]


def test_a_prompt_that_fails_leaves_with_its_error_and_the_batch_goes_on(tiny: GPT2):
    params = dict(tiny.params)
    params["wpe"] = tiny.params["wpe"].copy()
    params["wpe"][6] = np.nan  # a prompt of 7 tokens or more has logits that are not finite
    broken = GPT2(tiny.config, params, tiny.folder)
    scheduler = Scheduler(broken, max_batch=2)
    kept = scheduler.submit(_request([1, 2], max_tokens=3, **GREEDY, ignore_eos=True))
    scheduler.step()
    failing = scheduler.submit(_request(_prompt(10, 15), max_tokens=3, **GREEDY))
    events = _drain(scheduler)
    [failed] = [e for e in events if isinstance(e, FailedEvent)]
    assert failed.state is failing and "not finite" in str(failed.error)
    assert failing.finished and kept.finished and len(kept.samples[0].ids) == 3


@pytest.mark.parametrize(
    "ruled_out",
    [
        {"temperature": 0},  # greedy
        {"top_k": 5, "seed": 1},  # sampled
        {"num_beams": 2, "temperature": 0},  # searched
        {"prompt_lookup": 3, "temperature": 0},  # drafted
    ],
)
def test_a_request_with_no_token_left_fails_alone_and_the_batch_goes_on(
    tiny: GPT2, ruled_out: dict[str, Any]
):
    every = tuple((id, -100.0) for id in range(tiny.config.n_vocab))
    scheduler = Scheduler(tiny, max_batch=4)
    kept = scheduler.submit(_request([1, 2], max_tokens=6, **GREEDY, ignore_eos=True))
    scheduler.step()
    failing = scheduler.submit(_request([1, 2, 1, 2], max_tokens=4, logit_bias=every, **ruled_out))
    events = _drain(scheduler)
    [failed] = [e for e in events if isinstance(e, FailedEvent)]
    assert failed.state is failing and "no token is left to choose" in str(failed.error)
    assert kept.finished and len(kept.samples[0].ids) == 6
    assert scheduler.free == 4


def test_a_cancelled_request_leaves_at_once_and_frees_its_rows(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=4)
    gone = scheduler.submit(_request(_prompt(8, 12), max_tokens=50, **GREEDY, n=3, ignore_eos=True))
    kept = scheduler.submit(_request(_prompt(8, 13), max_tokens=6, **GREEDY, ignore_eos=True))
    waiting = scheduler.submit(_request([1], max_tokens=6, n=4))
    scheduler.step()
    scheduler.cancel(gone)
    scheduler.cancel(waiting)
    assert scheduler.running == [kept] and scheduler.free == 3 and not scheduler.queued
    events = scheduler.step()
    assert {e.state for e in events} == {kept}
    _drain(scheduler)
    assert [s.ids for s in kept.samples] == _alone(tiny, kept.request)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([1, 2], {"n": 5}, "n must be at most the batch size 4"),
        ([1] * 60, {"max_tokens": 10}, r"need 70 positions, but this batch holds 64"),
        ([1, 2], {"top_logprobs": 6}, "top_logprobs must be between 0 and 5"),
        ([1, 2], {"max_tokens": 0}, "max_tokens must be at least 1"),
        ([1, 2], {"stop": ("",)}, "a stop string must not be empty"),
        ([1, 50257], {}, "token id 50257 at position 1 is outside the vocabulary"),
        ([1] * 128, {}, "prompt is 128 tokens but the model's context is 128"),
    ],
)
def test_a_request_that_can_never_run_is_refused_before_any_work(
    tiny: GPT2, prompt: list[int], params: dict[str, Any], message: str
):
    scheduler = Scheduler(tiny, max_batch=4, capacity=64)
    with pytest.raises(GPT2Error, match=message):
        scheduler.submit(_request(prompt, **params))
    assert scheduler.free == 4 and not scheduler.busy


def test_a_padded_vocabulary_never_yields_an_id_the_tokenizer_lacks(tiny: GPT2):
    """nanoGPT pads the vocabulary to 50,304 rows; the 47 extra ids have no text. Here the final
    norm outputs its bias alone (gain 0), so id 50,300's logit, 100, is the model's argmax; the
    choice and the top alternatives still come from the 50,257 ids the tokenizer knows."""
    from dataclasses import replace

    params = dict(tiny.params)
    d = tiny.config.n_embd
    wte = np.zeros((50304, d), np.float32)
    wte[:50257, 0] = np.random.default_rng(0).standard_normal(50257, dtype=np.float32)
    wte[50300, 0] = 100.0
    params["wte"] = wte
    params["ln_f"] = {"g": np.zeros(d, np.float32), "b": np.eye(d, dtype=np.float32)[0]}
    padded = GPT2(replace(tiny.config, n_vocab=50304), params, tiny.folder)
    assert int(padded.prefill([[1, 2]])[1].argmax()) == 50300
    scheduler = Scheduler(padded, 2)
    scheduler.submit(_request([1, 2], max_tokens=3, **GREEDY, ignore_eos=True, top_logprobs=5))
    events = [e for e in _drain(scheduler) if isinstance(e, TokenEvent)]
    assert [e.id for e in events] == [int(wte[:50257, 0].argmax())] * 3
    assert all(t < 50257 for e in events for t, _ in e.top)
