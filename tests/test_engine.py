"""The serving engine on a tiny model, without HTTP: jobs submitted from an event loop (one
`asyncio.run` per test), their inboxes awaited, against the scheduler run alone.

Where a test must act while the worker is at a known point, a `Gate` holds the worker inside the
model's decode step until the test lets it go: what the worker does between steps is then fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2cli.engine import Call, Engine, Item, Job, QueueFull, Stopping, TooLarge
from gpt2cli.errors import GPT2Error
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from gpt2cli.scheduler import PromptEvent, Request, Scheduler, TokenEvent
from tests.factory import TINY, write_random_gpt2

TIMEOUT = 60.0  # seconds for anything to arrive

Outcome = tuple[dict[tuple[int, int], list[int]], Exception | None]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> GPT2:
    """The tiny model with NaN in position 6's embedding: a prompt of 7+ tokens fails in its
    prefill, a shorter one when its decoding feeds position 6."""
    folder = write_random_gpt2(tmp_path_factory.mktemp("nan-gpt2"), TINY, seed=0)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["wpe.weight"][6] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return GPT2.from_pretrained(folder)


class Gate:
    """Holds the worker in `model.step` (a decode step) until steps are allowed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._allowed: int | None = 0  # steps that may still start; None: every one
        self._waiting = 0  # steps held now

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            with self._cond:
                self._waiting += 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._allowed is None or self._allowed > 0)
                if self._allowed is not None:
                    self._allowed -= 1
                self._waiting -= 1
            return step(*args, **kwargs)

        return gated

    def held(self) -> None:
        """Return once the worker waits at the gate (inside a step)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self._waiting > 0, TIMEOUT), "no step began"

    def open(self) -> None:
        """Let every step run, now and from now on."""
        with self._cond:
            self._allowed = None
            self._cond.notify_all()


@pytest.fixture
def gate(model: GPT2, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """The tiny model's decode steps held at a gate (opened at the end, whatever happens)."""
    gate = Gate()
    monkeypatch.setattr(model, "step", gate.wrap(model.step))
    yield gate
    gate.open()


@contextlib.contextmanager
def engine_of(
    model: GPT2, max_batch: int = 2, max_queue: int = 4, *, start: bool = True
) -> Iterator[Engine]:
    """An engine (its worker started unless not `start`), closed and joined after."""
    engine = Engine(model, max_batch, max_queue)
    if start:
        engine.start()
    try:
        yield engine
    finally:
        engine.close()
        engine.join()


def job_of(*requests: tuple[Sequence[int], GenerationParams]) -> Job:
    """A job on the running loop."""
    return Job([Request(ids, params) for ids, params in requests], asyncio.get_running_loop())


async def outcome(job: Job, steps: list[list[Item]] | None = None) -> Outcome:
    """Each (prompt, sample)'s generated ids until all are done, or the error that ended the job;
    each inbox list is appended to `steps` when given."""
    ids: dict[tuple[int, int], list[int]] = {}
    pending = {(p, s) for p, r in enumerate(job.requests) for s in range(r.params.n)}
    while pending:
        items = await asyncio.wait_for(job.inbox.get(), TIMEOUT)
        if steps is not None:
            steps.append(items)
        for item in items:
            if isinstance(item, Exception):
                return ids, item
            prompt, event = item
            if isinstance(event, PromptEvent) and not event.state.budget:  # the prompt alone
                pending -= {(prompt, s) for s in range(event.state.params.n)}
            elif isinstance(event, TokenEvent):
                ids.setdefault((prompt, event.sample), []).append(event.id)
                if event.done:
                    pending.discard((prompt, event.sample))
    return ids, None


def alone(model: GPT2, ids: Sequence[int], params: GenerationParams) -> list[list[int]]:
    """Each sample's ids, from the scheduler alone."""
    scheduler = Scheduler(model, max_batch=params.n)
    state = scheduler.submit(Request(ids, params))
    for _ in scheduler.run():
        pass
    return [s.ids for s in state.samples]


def received(job: Job) -> list[Item]:
    """Everything in a job's inbox now."""
    items: list[Item] = []
    while not job.inbox.empty():
        items += job.inbox.get_nowait()
    return items


GREEDY = GenerationParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)
SHORT = GenerationParams(max_tokens=3, temperature=0)


def test_a_job_gets_what_the_scheduler_gives_each_request_alone_a_list_per_step(
    model: GPT2,
):
    first, second = model.tokenizer.encode("Once upon a time"), model.tokenizer.encode("In")
    seeded = GenerationParams(max_tokens=6, top_k=0, seed=7, n=2)
    steps: list[list[Item]] = []

    async def main() -> Outcome:
        with engine_of(model, max_batch=4) as engine:
            job = job_of((first, GREEDY), (second, seeded))
            engine.submit(job)
            return await outcome(job, steps)

    ids, error = asyncio.run(main())
    assert error is None
    assert [ids[0, 0]] == alone(model, first, GREEDY)
    assert [ids[1, 0], ids[1, 1]] == alone(model, second, seeded)
    scheduler = Scheduler(model, max_batch=4)  # the same requests, stepped alone
    scheduler.submit(Request(first, GREEDY))
    scheduler.submit(Request(second, seeded))
    n_steps = 0
    while scheduler.busy:
        scheduler.step()
        n_steps += 1
    assert len(steps) == n_steps  # each step's events in one list


def test_an_echoed_prompt_alone_is_its_scored_prompt_event(model: GPT2):
    ids = model.tokenizer.encode("Score me, please")
    params = GenerationParams(max_tokens=0, echo=True, echo_logprobs=True, top_logprobs=2)

    async def main() -> list[Item]:
        with engine_of(model) as engine:
            job = job_of((ids, params))
            engine.submit(job)
            steps: list[list[Item]] = []
            assert await outcome(job, steps) == ({}, None)
            return [item for items in steps for item in items]

    [(prompt, event)] = asyncio.run(main())
    assert prompt == 0 and isinstance(event, PromptEvent)
    score = event.state.prompt_score
    assert score is not None and score.n_tokens == len(ids) - 1  # the first has no context
    assert score.top_ids.shape == (len(ids) - 1, 2)


def test_job_sequences_count_samples_and_a_prompt_alone_as_one():
    async def main() -> list[int]:
        echo = GenerationParams(max_tokens=0, echo=True, n=3)
        return [
            job_of(([1], GenerationParams(n=3)), ([2], GenerationParams())).sequences,
            job_of(([1], echo), ([2], echo)).sequences,
        ]

    assert asyncio.run(main()) == [4, 2]


def test_a_cancelled_job_frees_its_row_before_the_next_step(model: GPT2, gate: Gate):
    ids = model.tokenizer.encode("Hello")

    async def main() -> tuple[list[Item], Outcome]:
        with engine_of(model, max_batch=1, max_queue=1) as engine:
            long = job_of((ids, LONG))
            engine.submit(long)
            gate.held()  # the worker is in its first step: the long job holds the only row
            short = job_of((ids, SHORT))
            engine.submit(short)  # it waits for that row
            engine.cancel(long)
            gate.open()
            got = await outcome(short)
            return received(long), got

    long_items, (short_ids, error) = asyncio.run(main())
    assert error is None and [short_ids[0, 0]] == alone(model, ids, SHORT)
    # the long job got its first step's tokens, then nothing: it never finished
    tokens = [item[1] for item in long_items if isinstance(item, tuple)]
    assert len(tokens) == len(long_items)
    assert 0 < len(tokens) <= 2 and not any(isinstance(e, TokenEvent) and e.done for e in tokens)


def test_cancelling_a_job_still_waiting_drops_it_and_twice_is_once(model: GPT2, gate: Gate):
    ids = model.tokenizer.encode("Hello")

    async def main() -> tuple[list[Item], Outcome]:
        with engine_of(model, max_batch=1, max_queue=2) as engine:
            running = job_of((ids, SHORT))
            engine.submit(running)
            gate.held()
            waiting, after = job_of((ids, LONG)), job_of((ids, SHORT))
            engine.submit(waiting)
            engine.submit(after)
            engine.cancel(waiting)
            engine.cancel(waiting)
            gate.open()
            assert (await outcome(running))[1] is None
            return received(waiting), await outcome(after)

    waiting_items, (after_ids, error) = asyncio.run(main())
    assert waiting_items == [] and error is None
    assert [after_ids[0, 0]] == alone(model, ids, SHORT)


def test_a_full_queue_is_queue_full_counting_sequences_beyond_the_free_rows(model: GPT2):
    ids = model.tokenizer.encode("Hi")

    async def main() -> list[Outcome]:
        with engine_of(model, max_batch=1, max_queue=2, start=False) as engine:
            # before the worker runs: one free row and two queue places, three sequences
            first, pair = job_of((ids, SHORT)), job_of((ids, SHORT), (ids, SHORT))
            engine.submit(first)
            engine.submit(pair)
            with pytest.raises(QueueFull, match="busy: 3 sequences are waiting"):
                engine.submit(job_of((ids, SHORT)))
            engine.start()
            done = [await outcome(first), await outcome(pair)]
            for _ in range(200):  # the worker counts the queue again after its step
                try:
                    last = job_of((ids, SHORT))
                    engine.submit(last)
                    break
                except QueueFull:
                    await asyncio.sleep(0.01)
            return [*done, await outcome(last)]

    outcomes = asyncio.run(main())
    expected = alone(model, ids, SHORT)[0]
    assert outcomes[0] == ({(0, 0): expected}, None)
    assert outcomes[1] == ({(0, 0): expected, (1, 0): expected}, None)
    assert outcomes[2] == ({(0, 0): expected}, None)


def test_jobs_taken_during_a_step_still_count_against_the_queue(model: GPT2, gate: Gate):
    ids = model.tokenizer.encode("Hi")

    async def main() -> bool:
        with engine_of(model, max_batch=1, max_queue=1) as engine:
            engine.submit(job_of((ids, LONG)))
            gate.held()  # it was taken, and holds the only row, in the step now running
            engine.submit(job_of((ids, SHORT)))  # the one queue place
            try:
                engine.submit(job_of((ids, SHORT)))
            except QueueFull:
                return True
            finally:
                gate.open()
            return False

    assert asyncio.run(main()), "a third job was queued beside a full queue and a busy row"


def test_a_job_beyond_the_queue_and_the_batch_together_is_too_large(model: GPT2):
    async def main() -> None:
        with engine_of(model, max_batch=2, max_queue=3) as engine:
            engine.check_size(5)
            with pytest.raises(TooLarge, match=r"6 sequences .* \(5: --max-queue 3 plus"):
                engine.check_size(6)
            three = GenerationParams(max_tokens=2, n=3)
            with pytest.raises(TooLarge):
                engine.submit(job_of(([1], three), ([2], three)))
            beams = GenerationParams(max_tokens=2, num_beams=2, temperature=0)  # 2 rows, n 1
            drawn = GenerationParams(max_tokens=2, best_of=2)
            with pytest.raises(TooLarge):
                engine.submit(job_of(([1], beams), ([2], drawn), ([3], beams)))

    asyncio.run(main())


def test_closing_ends_running_and_waiting_jobs_with_stopping_and_refuses_new_ones(
    model: GPT2, gate: Gate
):
    ids = model.tokenizer.encode("Hi")

    async def main() -> tuple[Outcome, Outcome]:
        engine = Engine(model, max_batch=1, max_queue=2)
        engine.start()
        running, waiting = job_of((ids, LONG)), job_of((ids, SHORT))
        engine.submit(running)
        gate.held()
        engine.submit(waiting)
        engine.close()
        with pytest.raises(Stopping):
            engine.submit(job_of((ids, SHORT)))
        gate.open()
        ended = await outcome(running), await outcome(waiting)
        await asyncio.to_thread(engine.join)
        return ended

    (running_ids, running_error), (waiting_ids, waiting_error) = asyncio.run(main())
    assert isinstance(running_error, Stopping) and len(running_ids.get((0, 0), [])) <= 2
    assert isinstance(waiting_error, Stopping) and waiting_ids == {}


def test_a_closed_engine_that_never_started_refuses_jobs(model: GPT2):
    async def main() -> None:
        engine = Engine(model)
        engine.close()
        with pytest.raises(Stopping, match="shutting down"):
            engine.submit(job_of(([1], SHORT)))

    asyncio.run(main())


def test_a_job_whose_request_cannot_run_gets_the_error_and_runs_none_of_them(model: GPT2):
    ids = model.tokenizer.encode("Hi")
    too_long = [1] * TINY.n_ctx  # no room left for a new token

    async def main() -> tuple[Outcome, Outcome]:
        with engine_of(model) as engine:
            bad = job_of((ids, LONG), (too_long, SHORT))
            engine.submit(bad)
            failed = await outcome(bad)
            good = job_of((ids, SHORT))
            engine.submit(good)
            return failed, await outcome(good)

    (bad_ids, error), good = asyncio.run(main())
    assert isinstance(error, GPT2Error) and "context" in str(error) and bad_ids == {}
    assert good == ({(0, 0): alone(model, ids, SHORT)[0]}, None)


def test_a_prompt_that_fails_its_prefill_ends_only_its_job_while_the_batch_goes_on(
    nan_model: GPT2, monkeypatch: pytest.MonkeyPatch
):
    gate = Gate()
    monkeypatch.setattr(nan_model, "step", gate.wrap(nan_model.step))
    hi = nan_model.tokenizer.encode("Hi")
    six = GenerationParams(max_tokens=6, temperature=0, ignore_eos=True)  # feeds positions 1-5
    failing = nan_model.tokenizer.encode("one two three four five six seven eight")
    assert len(hi) == 1 and len(failing) > 7

    async def main() -> tuple[Outcome, Outcome]:
        with engine_of(nan_model, max_batch=2) as engine:
            try:
                healthy = job_of((hi, six))
                engine.submit(healthy)
                gate.held()  # it runs, in its first step
                broken = job_of((failing, SHORT))
                engine.submit(broken)  # joins the batch in the next step, and fails there
            finally:
                gate.open()
            return await outcome(healthy), await outcome(broken)

    (healthy_ids, healthy_error), (broken_ids, broken_error) = asyncio.run(main())
    assert healthy_error is None and [healthy_ids[0, 0]] == alone(nan_model, hi, six)
    assert isinstance(broken_error, GPT2Error) and "not finite" in str(broken_error)
    assert broken_ids == {}


def test_a_failed_decode_step_ends_the_running_jobs_and_the_waiting_ones_run_on(
    nan_model: GPT2,
):
    hi = nan_model.tokenizer.encode("Hi")
    far = GenerationParams(max_tokens=20, temperature=0, ignore_eos=True)  # feeds position 6

    async def main() -> tuple[Outcome, Outcome]:
        with engine_of(nan_model, max_batch=1, max_queue=1, start=False) as engine:
            failing, waiting = job_of((hi, far)), job_of((hi, SHORT))
            engine.submit(failing)
            engine.submit(waiting)
            engine.start()
            return await outcome(failing), await outcome(waiting)

    (failing_ids, error), waiting = asyncio.run(main())
    assert isinstance(error, GPT2Error) and "not finite" in str(error)
    assert len(failing_ids[0, 0]) == 6  # the first from the prefill, then positions 1-5 fed
    assert waiting == ({(0, 0): alone(nan_model, hi, SHORT)[0]}, None)


def test_a_call_advances_one_step_per_loop_between_decode_steps(model: GPT2):
    """A call (scoring a long text) takes one step per worker loop, in turn with the batch's
    decode steps: a stream keeps going while it runs, and its result reaches its inbox."""
    ids = model.tokenizer.encode("Hi")
    decoded: list[int] = []  # tokens the running job had at each of the call's steps

    async def main() -> tuple[Outcome, Any]:
        with engine_of(model) as engine:
            long = GenerationParams(max_tokens=100, temperature=0, ignore_eos=True)
            job = job_of((ids, long))
            engine.submit(job)
            first = await asyncio.wait_for(job.inbox.get(), TIMEOUT)  # it runs

            def steps() -> Iterator[int]:
                for _ in range(5):
                    running = engine._scheduler.running
                    decoded.append(len(running[0].samples[0].ids) if running else 100)
                    yield 0
                return "scored"

            call = Call(steps(), asyncio.get_running_loop())  # type: ignore[arg-type]
            engine.submit(call)
            [result] = await asyncio.wait_for(call.inbox.get(), TIMEOUT)
            rest = await outcome(job)
            return (rest, first), result

    (rest, first), result = asyncio.run(main())
    assert result == "scored"
    assert decoded == sorted(decoded)
    growing = [d for d in decoded if d < 100]  # while the job still ran: a step between each
    assert len(set(growing)) == len(growing) and len(growing) >= 2
    assert len(first) + sum(len(v) for v in rest[0].values()) >= 100


def test_a_call_that_fails_ends_with_its_error(model: GPT2):
    def steps() -> Iterator[int]:
        yield 0
        raise GPT2Error("nothing to score")

    async def main() -> Any:
        with engine_of(model) as engine:
            call = Call(steps(), asyncio.get_running_loop())  # type: ignore[arg-type]
            engine.submit(call)
            [result] = await asyncio.wait_for(call.inbox.get(), TIMEOUT)
            return result

    result = asyncio.run(main())
    assert isinstance(result, GPT2Error) and str(result) == "nothing to score"


def test_a_running_engine_fits_blas_threads_to_the_idle_cores_again_and_again(
    model: GPT2, monkeypatch: pytest.MonkeyPatch
):
    """A server runs for days: every REFIT_S its worker fits BLAS's threads again, between
    steps, from the cores' use since the last time."""
    from gpt2cli import engine as engine_module
    from gpt2cli import threads

    fits: list[Any] = []
    real = threads.fit_to_idle_cores
    monkeypatch.setattr(engine_module, "REFIT_S", 0.0)
    monkeypatch.setattr(threads, "fit_to_idle_cores", lambda s=None: fits.append(real(s)))
    ids = model.tokenizer.encode("Hi")

    async def main() -> Outcome:
        with engine_of(model) as engine:
            job = job_of((ids, GenerationParams(max_tokens=6, temperature=0, ignore_eos=True)))
            engine.submit(job)
            return await outcome(job)

    ids_out, error = asyncio.run(main())
    assert error is None and len(ids_out[(0, 0)]) == 6
    assert len(fits) >= 2  # a fit per loop once the first sampler has run
    assert all(f is None or f.threads >= 1 for f in fits)
