"""Continuous batching: requests join and leave one decode batch, each as it would run alone."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest

from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.sampling import SamplingOptions
from gpt2cli.scheduler import Event, Request, Scheduler

GREEDY = SamplingOptions(temperature=0)
SAMPLED = SamplingOptions(temperature=0.9, top_k=40, top_p=0.95)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50257, n).tolist()


def _requests() -> list[Request]:
    """Mixed prompt lengths, budgets, samples and options: greedy, seeded and stop strings."""
    return [
        Request(_prompt(3, 0), max_tokens=9, sampling=GREEDY, ignore_eos=True),
        Request(_prompt(17, 1), max_tokens=4, sampling=SAMPLED, seed=5, n=2, ignore_eos=True),
        Request(_prompt(40, 2), max_tokens=12, sampling=SAMPLED, seed=6, ignore_eos=True),
        Request(_prompt(1, 3), max_tokens=2, sampling=GREEDY, ignore_eos=True),
        Request(_prompt(25, 4), max_tokens=7, sampling=SAMPLED, seed=7, n=3, ignore_eos=True),
        Request(_prompt(9, 5), max_tokens=10, sampling=GREEDY, stop=["e"]),
    ]


def _alone(model: GPT2, request: Request) -> list[list[int]]:
    """The request's samples when it runs by itself (`gpt2 generate -n N --seed S`)."""
    generation = Generation(
        model,
        request.prompt_ids,
        max_tokens=request.max_tokens,
        sampling=request.sampling,
        seed=request.seed,
        num_samples=request.n,
        stop=request.stop,
        ignore_eos=request.ignore_eos,
    )
    list(generation)
    return [c.ids for c in generation.completions]


def _run_all(
    scheduler: Scheduler, requests: list[Request], *, together: bool = False
) -> list[Event]:
    """Admit requests as rows free up (one at a time, or all that fit in one call), stepping in
    between; every event, in order."""
    pending, events = deque(requests), []
    for _ in range(10_000):  # bounded: every step finishes a token of every running sample
        joining: list[Request] = []
        while pending and pending[0].n <= scheduler.free - sum(r.n for r in joining):
            joining.append(pending.popleft())
            if not together:
                events += scheduler.admit(joining.pop())
        events += scheduler.admit(*joining)
        if not pending and not scheduler.running:
            return events
        events += scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
@pytest.mark.parametrize("max_batch", [3, 4, 8])
def test_each_request_gets_what_it_gets_alone_whatever_joins_the_batch(
    tiny: GPT2, max_batch: int, together: bool
):
    requests = _requests()
    expected = [_alone(tiny, r) for r in _requests()]
    _run_all(Scheduler(tiny, max_batch=max_batch), requests, together=together)
    assert [[c.ids for c in r.completions] for r in requests] == expected
    assert all(r.finished and not r.cancelled for r in requests)


def test_events_spell_each_samples_ids_text_and_finish(tiny: GPT2):
    requests = _requests()
    events = _run_all(Scheduler(tiny, max_batch=4), requests)
    for request in requests:
        for i, c in enumerate(request.completions):
            mine = [e for e in events if e.request is request and e.sample == i]
            assert [e.id for e in mine] == c.ids
            assert "".join(e.text for e in mine) == c.text
            assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]
            assert c.logprobs == pytest.approx([e.logprob for e in mine])
    assert requests[5].completions[0].finish_reason == "stop"  # its stop string "e"
    assert "e" not in requests[5].completions[0].text


def test_a_request_admitted_while_others_decode_reuses_a_freed_row(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=2, capacity=64)
    short = Request(_prompt(30, 8), max_tokens=2, sampling=GREEDY, ignore_eos=True)
    long = Request(_prompt(5, 9), max_tokens=20, sampling=GREEDY, ignore_eos=True)
    scheduler.admit(short)
    scheduler.admit(long)
    assert scheduler.free == 0
    scheduler.step()  # short's second token: it leaves, its row (which held 31 positions) frees
    assert short.finished and scheduler.free == 1
    late = Request(_prompt(4, 10), max_tokens=6, sampling=SAMPLED, seed=3, ignore_eos=True)
    scheduler.admit(late)
    for _ in range(30):
        if not scheduler.running:
            break
        scheduler.step()
    for request in (long, late):
        fresh = Request(request.prompt_ids, max_tokens=request.max_tokens, seed=request.seed)
        fresh.sampling, fresh.ignore_eos = request.sampling, True
        assert [c.ids for c in request.completions] == _alone(tiny, fresh)


def test_top_logprobs_are_the_most_likely_tokens_best_first(tiny: GPT2):
    request = Request(_prompt(6, 11), max_tokens=5, sampling=GREEDY, top_logprobs=5)
    events = Scheduler(tiny, max_batch=1).admit(request)
    logits = tiny(request.prompt_ids)[-1].astype(np.float64)  # [V]
    logprobs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-logprobs)[:5]
    (event,) = events
    assert [t for t, _ in event.top] == best.tolist()
    assert [lp for _, lp in event.top] == pytest.approx(logprobs[best], abs=1e-4)
    assert event.id == best[0] and event.logprob == pytest.approx(logprobs[best[0]], abs=1e-4)


def test_a_cancelled_request_leaves_at_once_and_frees_its_rows(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=4)
    gone = Request(_prompt(8, 12), max_tokens=50, sampling=GREEDY, n=3, ignore_eos=True)
    kept = Request(_prompt(8, 13), max_tokens=6, sampling=GREEDY, ignore_eos=True)
    scheduler.admit(gone)
    scheduler.admit(kept)
    scheduler.step()
    scheduler.cancel(gone)
    assert scheduler.running == [kept] and scheduler.free == 3
    events = scheduler.step()
    assert {e.request for e in events} == {kept}
    for _ in range(10):
        if not scheduler.running:
            break
        scheduler.step()
    fresh = Request(kept.prompt_ids, max_tokens=6, sampling=GREEDY, ignore_eos=True)
    assert [c.ids for c in kept.completions] == _alone(tiny, fresh)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request([1, 2], n=5), r"n \(samples\) must be at most the batch size 4"),
        (Request([1] * 60, max_tokens=10), r"need 70 positions, but this batch holds 64"),
        (Request([1, 2], top_logprobs=6), "top_logprobs must be between 0 and 5"),
        (Request([1, 2], max_tokens=0), "max_tokens must be at least 1"),
        (Request([1, 2], stop=[""]), "a stop string must not be empty"),
        (Request([1, 50257]), "token id 50257 at position 1 is outside the vocabulary"),
        (Request([1] * 128), "prompt is 128 tokens but the model's context is 128"),
    ],
)
def test_a_request_that_can_never_run_is_refused_before_any_work(
    tiny: GPT2, request_: Request, message: str
):
    scheduler = Scheduler(tiny, max_batch=4, capacity=64)
    with pytest.raises(GPT2Error, match=message):
        scheduler.check(request_)
    with pytest.raises(GPT2Error, match=message):
        scheduler.admit(request_)
    assert scheduler.free == 4 and not scheduler.running


def test_admitting_more_samples_than_free_rows_is_an_error(tiny: GPT2):
    scheduler = Scheduler(tiny, max_batch=2)
    scheduler.admit(Request([1, 2, 3], max_tokens=5, sampling=GREEDY, ignore_eos=True))
    with pytest.raises(GPT2Error, match="2 rows needed, 1 free"):
        scheduler.admit(Request([4, 5], n=2))


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
    request = Request([1, 2], max_tokens=3, sampling=GREEDY, ignore_eos=True, top_logprobs=5)
    events = _run_all(scheduler, [request])
    assert [e.id for e in events] == [int(wte[:50257, 0].argmax())] * 3
    assert all(t < 50257 for e in events for t, _ in e.top)
