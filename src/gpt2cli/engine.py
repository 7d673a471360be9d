"""The serving engine: one worker thread runs the scheduler's loop for every client at once.

An event loop (the server's) `submit`s a `Job` (the scheduler requests of one API request) and
awaits its `inbox`; the worker hands them to the `gpt2cli.scheduler.Scheduler`, steps it, and
posts each job its events of a step in one call to the job's loop. The engine refuses work
beyond its queue (`QueueFull`), drops cancelled jobs before the next step, and recovers from a
failed step with a fresh scheduler: the jobs in that batch get the error, those waiting go on.
Nothing here knows HTTP: `gpt2cli.serve` turns these into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

from gpt2cli.errors import GPT2Error
from gpt2cli.scheduler import Event, FailedEvent, Request, RequestState, Scheduler

if TYPE_CHECKING:
    from gpt2cli.model import GPT2
    from gpt2cli.threads import CpuSampler

MAX_QUEUE = 64  # sequences that may wait for rows before the engine refuses more
GRACE_S = 10.0  # seconds the worker gets to finish its step once the engine is closing
REFIT_S = 10.0  # seconds between fits of BLAS's threads to the idle cores

Item = tuple[int, Event] | Exception  # (prompt, event), or an error that ends the job


class QueueFull(GPT2Error):
    """The engine holds as much work as it queues: retry after a moment."""


class TooLarge(GPT2Error):
    """A job of more sequences than the queue and the batch hold together: it can never run."""


class Stopping(GPT2Error):
    """The engine is closing: no new jobs; open ones end with this."""


class Job:
    """One API request's work: a scheduler request per prompt, and the inbox where the server
    awaits their events (a list per step, each event with its prompt's index)."""

    def __init__(self, requests: Sequence[Request], loop: asyncio.AbstractEventLoop) -> None:
        self.requests = list(requests)
        self.loop = loop
        self.inbox: asyncio.Queue[list[Item]] = asyncio.Queue()
        self.cancelled = False

    @property
    def sequences(self) -> int:
        """Rows (or prompts alone) its requests take."""
        return sum(r.params.draws if r.params.max_tokens else 1 for r in self.requests)


class Call:
    """Work on the model that is not a generation, such as scoring a long text: a generator the
    worker advances one step per loop (between the batch's decode steps, so streams go on), whose
    return value, or error, reaches the inbox."""

    sequences = 1  # what it counts against the queue

    def __init__(self, steps: Generator[Any, None, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.steps = steps
        self.loop = loop
        self.inbox: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.cancelled = False


class Engine:
    """The worker thread that owns the model and its scheduler, and the queue that feeds it.

    `submit`, `cancel` and `close` are called from event loops; everything that touches the
    model runs on the worker, so the model is never used by two threads at once.
    """

    def __init__(self, model: GPT2, max_batch: int = 8, max_queue: int = MAX_QUEUE) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._scheduler = Scheduler(model, max_batch)
        self._lock = threading.Condition()
        self._new: deque[Job] = deque()  # submitted, not yet handed to the scheduler
        self._calls: deque[Call] = deque()  # advanced one step each, in turn, between steps
        self._cancelled: list[Job | Call] = []
        self._queued = 0  # sequences waiting in the scheduler after the worker's last step
        self._free = max_batch  # rows free after the worker's last step: they take jobs at once
        self._closing = False
        self._owners: dict[RequestState, tuple[Job, int]] = {}  # state -> its job and prompt
        self._sampler: CpuSampler | None = None  # the cores' use since the last thread fit
        self._refit_at = time.monotonic() + REFIT_S
        self._thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._thread.start()

    def check_size(self, sequences: int) -> None:
        """TooLarge for more sequences (prompts x n, or x beams or best_of) than the queue and the
        batch hold together: checked before anything is built for a request, so an oversized one
        costs nothing."""
        room = self.max_queue + self.max_batch
        if sequences > room:
            raise TooLarge(
                f"This request asks for {sequences} sequences (prompts x n, beams or best_of), "
                "more than the "
                f"server queues at once ({room}: --max-queue {self.max_queue} plus --max-batch "
                f"{self.max_batch}); send fewer prompts per request."
            )

    def submit(self, job: Job | Call) -> None:
        """Queue a job. The queue counts sequences (a prompt's n samples), not requests, so one
        request of many prompts cannot hold up every other: TooLarge beyond the whole queue,
        QueueFull when it does not fit beside those already waiting beyond the free rows,
        Stopping once the engine is closing."""
        self.check_size(job.sequences)
        with self._lock:
            if self._closing:
                raise Stopping("The server is shutting down.")
            queued: list[Job | Call] = [*self._new, *self._calls]
            waiting = self._queued + sum(j.sequences for j in queued)
            if waiting + job.sequences > self.max_queue + self._free:
                raise QueueFull(
                    f"The server is busy: {waiting} sequences are waiting for the "
                    f"{self.max_batch} it decodes at once. Retry after a moment."
                )
            if isinstance(job, Call):
                self._calls.append(job)
            else:
                self._new.append(job)
            self._lock.notify()

    def cancel(self, job: Job | Call) -> None:
        """Drop a job whose client went away: its rows are free before the next step."""
        with self._lock:
            if not job.cancelled:
                job.cancelled = True
                self._cancelled.append(job)
                self._lock.notify()

    def close(self) -> None:
        """Stop: refuse new jobs and end every open one with Stopping."""
        with self._lock:
            self._closing = True
            self._lock.notify()

    def join(self, timeout: float = GRACE_S) -> None:
        """Wait for the worker to finish its step and stop (after `close`)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        """The worker: take new and cancelled jobs, then one scheduler step, until closed."""
        while True:
            with self._lock:
                while not (
                    self._closing
                    or self._cancelled
                    or self._new
                    or self._calls
                    or self._scheduler.busy
                ):
                    self._lock.wait()
                if self._closing:
                    break
                cancelled, self._cancelled = self._cancelled, []
                new, self._new = list(self._new), deque()
                call = self._calls.popleft() if self._calls else None
            for job in cancelled:
                if isinstance(job, Job):
                    self._drop(job)
            for job in new:
                self._take(job)
            self._count()  # the jobs just taken wait in the scheduler now: counted there
            self._fit_threads()
            if call is not None:
                self._advance(call)
            if self._scheduler.busy:
                self._step()
            self._count()
        with self._lock:
            jobs: list[Job | Call] = [*self._new, *self._calls]
            jobs += [job for job, _ in self._owners.values()]
            self._new.clear()
            self._calls.clear()
        for job in dict.fromkeys(jobs):  # each once, in order
            post(job, [Stopping("The server is shutting down.")])

    def _fit_threads(self) -> None:
        """Every REFIT_S, BLAS's threads fitted again to the cores other processes left idle
        since the last time (`gpt2cli.threads`; the user's OPENBLAS_NUM_THREADS wins): a server
        runs for days, through other loads. Here, between steps, no product is running."""
        from gpt2cli import threads

        now = time.monotonic()
        if now < self._refit_at:
            return
        if self._sampler is not None:
            threads.fit_to_idle_cores(self._sampler)
        self._sampler, self._refit_at = threads.CpuSampler(), now + REFIT_S

    def _count(self) -> None:
        """Publish what `submit` counts against the queue: the scheduler's waiting sequences and
        free rows."""
        with self._lock:
            self._queued, self._free = self._scheduler.waiting, self._scheduler.free

    def _advance(self, call: Call) -> None:
        """One step of a call, which then waits for its next turn; its end reaches its inbox."""
        if call.cancelled:
            return
        try:
            next(call.steps)
        except StopIteration as finished:
            post(call, [finished.value])
            return
        except Exception as e:
            post(call, [e])
            return
        with self._lock:
            self._calls.append(call)

    def _take(self, job: Job) -> None:
        """Hand a new job's requests to the scheduler (one that cannot run fails the job)."""
        if job.cancelled:
            return
        states = []
        try:
            for request in job.requests:
                states.append(self._scheduler.submit(request))
        except Exception as e:
            for state in states:
                self._scheduler.cancel(state)
            post(job, [e])
            return
        for prompt, state in enumerate(states):
            self._owners[state] = (job, prompt)

    def _step(self) -> None:
        """One scheduler step. If it fails, the batch's state is unknown: every running request
        gets the error, and a fresh scheduler takes over those still waiting."""
        try:
            events = self._scheduler.step()
        except Exception as e:
            old, self._scheduler = self._scheduler, Scheduler(self.model, self.max_batch)
            failed = [self._owners.pop(state)[0] for state in old.running]
            for state in old.queued:
                job, prompt = self._owners.pop(state)
                self._owners[self._scheduler.submit(state.request)] = (job, prompt)
            self._fail(failed, e)
            return
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Hand each job its events of this step, in one call to its event loop; a request that
        failed ends its job with the error."""
        batches: dict[Job, list[Item]] = {}
        failed = []
        for event in events:
            job, prompt = self._owners[event.state]
            if isinstance(event, FailedEvent):
                failed.append((job, event.error))
            batches.setdefault(job, []).append((prompt, event))
        for state in [s for s in self._owners if s.finished]:
            del self._owners[state]
        for job, error in failed:
            self._fail([job], error)
            batches.pop(job, None)
        for job, items in batches.items():
            post(job, items)

    def _drop(self, job: Job) -> None:
        """Take a cancelled job's requests out of the queue and the batch."""
        with self._lock:
            if job in self._new:
                self._new.remove(job)
        for state in [s for s, (owner, _) in self._owners.items() if owner is job]:
            del self._owners[state]
            self._scheduler.cancel(state)

    def _fail(self, jobs: Sequence[Job], error: Exception) -> None:
        """End jobs with an error; their other requests leave the batch."""
        for job in dict.fromkeys(jobs):
            self._drop(job)
            post(job, [error])


def post(job: Job | Call, items: list[Any]) -> None:
    """Put items in a job's inbox, from the worker, through the job's event loop."""
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        job.loop.call_soon_threadsafe(job.inbox.put_nowait, items)
