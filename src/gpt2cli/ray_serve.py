"""`gpt2 serve --engine ray`: the OpenAI server's decode loops on Ray Serve replicas.

The `gpt2 serve` process keeps the ingress: `gpt2cli.serve.App` (the routes, OpenAI's error
bodies, the API key, the Host check, the web page, 429 with Retry-After) over a `RayEngine`, which
has the local `gpt2cli.engine.Engine`'s interface. Each generation `Job` goes to a Ray Serve
deployment through a DeploymentHandle as a stream; each replica runs today's engine (one worker
thread, the scheduler's continuous batching) on the model rebuilt from the object store (as the
Ray Data actors of `gpt2cli.ray_engine` do: weights read-only, in the `--dtype` the ingress
converted them to, no file system, no hub), and
streams back its events of each step, which arrive in the job's inbox as the local engine's
items, so the routes cannot tell the engines apart. A request's answer is the same whichever
replica serves it: greedy ids, and seeded samples (a request's generator is its own).

Admission: the ingress counts the sequences in flight against replicas x (--max-batch +
--max-queue) and answers 429 beyond them; Ray Serve sends a replica no more than its
max_ongoing_requests (--max-batch + --max-queue requests), and its own back-pressure is a 429 too.
A client that goes away cancels the stream, which cancels the job on its replica before the next
decode step. A replica whose process dies is restarted by Ray Serve; a request on it that had
received nothing yet is sent again once, one that had (a stream under way) ends with a 500 error
body naming the replica's death. `/v1/score` runs in the `gpt2 serve` process (a local engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gpt2cli.engine import Call, Engine, Job, QueueFull, Stopping, post
from gpt2cli.errors import GPT2Error, missing_extra
from gpt2cli.ray_engine import connect, last_line, thread_variables
from gpt2cli.scheduler import FailedEvent, PromptEvent, Request, TokenEvent

if TYPE_CHECKING:
    from gpt2cli.model import GPT2
    from gpt2cli.params import GenerationParams

DEPLOYMENT = "gpt2"
READY_TIMEOUT_S = 600.0  # seconds for every replica to load its model and report healthy
WireItem = tuple[Any, ...]  # ("t", prompt, sample, id, text, finish, logprob, top) | ("p", ...)


class ReplicaFailed(GPT2Error):
    """The replica serving a request died (its process was killed) or failed while it ran."""


def require() -> Any:
    """The `ray` module with Ray Serve, or a GPT2Error naming the extra to install."""
    try:
        import ray
        import ray.serve  # needs ray[serve]
    except ImportError:
        raise missing_extra("ray", "gpt2 serve --engine ray") from None
    return ray


# -- on the replicas -----------------------------------------------------------------------------


class Replica:
    """One Ray Serve replica: the model from the object store and an engine running it."""

    def __init__(self, shipped: Any, max_batch: int, max_queue: int) -> None:
        import ray

        from gpt2cli.ray_engine import unpack

        model = unpack(ray, shipped)
        model.tokenizer.decode(model.tokenizer.encode("warm"))  # lazy tables built before threads
        self.engine = Engine(model, max_batch, max_queue)
        self.engine.start()
        self.jobs = 0  # taken
        self.active = 0  # taken and not yet ended
        self.cancelled = 0  # ended by their caller before they finished

    def stats(self) -> dict[str, int]:
        """This replica's process id and its jobs: taken, open, cancelled (for tests and
        operators: `serve.get_deployment_handle("gpt2", app_name).stats.remote()`)."""
        return {
            "pid": os.getpid(),
            "jobs": self.jobs,
            "active": self.active,
            "cancelled": self.cancelled,
        }

    async def generate(
        self, requests: Sequence[tuple[list[int], GenerationParams]]
    ) -> AsyncIterator[list[WireItem | Exception]]:
        """A job's items, a list per decode step, as plain picklable tuples; an error is the
        last item. Cancelled by its caller: the job leaves the batch before the next step."""
        job = Job([Request(ids, params) for ids, params in requests], asyncio.get_running_loop())
        try:
            self.engine.submit(job)
        except GPT2Error as e:
            yield [e]
            return
        self.jobs += 1
        self.active += 1
        left: dict[int, int] = {}  # prompt -> samples still to finish, once its state is known
        done = False
        try:
            while not done:
                out: list[WireItem | Exception] = []
                for item in await job.inbox.get():
                    if isinstance(item, Exception):
                        out.append(item)
                        done = True
                        continue
                    prompt, event = item
                    state = event.state
                    left.setdefault(prompt, state.params.n if state.budget else 0)
                    if isinstance(event, FailedEvent):
                        out.append(event.error)
                        done = True
                    elif isinstance(event, PromptEvent):
                        out.append(("p", prompt, state.prompt_score))
                    else:
                        out.append(("t", prompt, *event[:6]))
                        if event.finish_reason is not None:
                            left[prompt] -= 1
                done = done or (len(left) == len(job.requests) and not any(left.values()))
                yield out
        finally:
            self.active -= 1
            if not done:
                self.cancelled += 1
                self.engine.cancel(job)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


def _item(wire: WireItem | Exception) -> Any:
    """A replica's item as the local engine posts it."""
    if isinstance(wire, Exception):
        return wire
    if wire[0] == "p":
        return (wire[1], PromptEvent(SimpleNamespace(prompt_score=wire[2])))  # type: ignore[arg-type]
    return (wire[1], TokenEvent(*wire[2:8], None))  # type: ignore[call-arg]


# -- in the `gpt2 serve` process -----------------------------------------------------------------


class RayEngine(Engine):
    """`gpt2cli.engine.Engine` over a Ray Serve deployment of `Replica`s: generation jobs go to
    the replicas; the `Call`s (`/v1/score`) run on this process's own worker, as locally."""

    def __init__(
        self, model: GPT2, handle: Any, replicas: int, max_batch: int, max_queue: int
    ) -> None:
        super().__init__(model, max_batch, max_queue)
        self.replicas = replicas
        self._handle = handle.options(stream=True)
        self._tasks: dict[Job, asyncio.Task[None]] = {}
        self._in_flight = 0  # sequences sent to the replicas, not yet answered
        self._stopping = False

    def submit(self, job: Job | Call) -> None:
        """Send a job to the deployment (QueueFull when every replica's room is taken)."""
        if isinstance(job, Call):
            super().submit(job)
            return
        self.check_size(job.sequences)
        with self._lock:
            if self._stopping:
                raise Stopping("The server is shutting down.")
            room = self.replicas * (self.max_batch + self.max_queue)
            if self._in_flight + job.sequences > room:
                raise QueueFull(
                    f"The server is busy: {self._in_flight} sequences are in flight on "
                    f"{self.replicas} replicas of {self.max_batch + self.max_queue} each. "
                    "Retry after a moment."
                )
            self._in_flight += job.sequences
        self._tasks[job] = job.loop.create_task(self._forward(job))

    def cancel(self, job: Job | Call) -> None:
        """Drop a job whose client went away: its stream is cancelled on its replica."""
        if isinstance(job, Call):
            super().cancel(job)
            return
        job.cancelled = True
        task = self._tasks.get(job)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Refuse new jobs; open ones end with Stopping."""
        with self._lock:
            self._stopping = True
        super().close()
        for job, task in list(self._tasks.items()):
            with contextlib.suppress(RuntimeError):  # its loop has closed
                job.loop.call_soon_threadsafe(task.cancel)
            post(job, [Stopping("The server is shutting down.")])

    async def _forward(self, job: Job) -> None:
        """Stream a job from a replica into its inbox; a replica that dies before the job's
        first item gets the job again once, after that the job ends with ReplicaFailed."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        payload = [(list(r.prompt_ids), r.params) for r in job.requests]
        delivered = False
        try:
            for attempt in range(2):
                stream = self._handle.generate.remote(payload)
                try:
                    async for wire in stream:
                        delivered = True
                        job.inbox.put_nowait([_item(w) for w in wire])
                    return
                except asyncio.CancelledError:
                    stream.cancel()
                    raise
                except BackPressureError:
                    busy = QueueFull("Every replica is busy. Retry after a moment.")
                    job.inbox.put_nowait([busy])
                    return
                except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                    if delivered or attempt or self._stopping:
                        job.inbox.put_nowait([_died(e)])
                        return
                except DeploymentUnavailableError as e:
                    job.inbox.put_nowait(
                        [ReplicaFailed(f"no replica is available: {last_line(e)}")]
                    )
                    return
                except Exception as e:
                    job.inbox.put_nowait([ReplicaFailed(f"the replica failed: {last_line(e)}")])
                    return
        finally:
            self._tasks.pop(job, None)
            with self._lock:
                self._in_flight -= job.sequences


def _died(error: Exception) -> ReplicaFailed:
    return ReplicaFailed(
        "the replica serving this request died while it ran (Ray Serve restarts it); "
        f"send the request again ({type(error).__name__})"
    )


# -- start-up and shutdown -----------------------------------------------------------------------


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (min, max) replicas, 0 <= min <= max, max >= 1."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise GPT2Error(f"--autoscale takes MIN:MAX replicas such as 1:4, not {text!r}")
    lo, hi = int(low), int(high)
    if hi < 1 or lo > hi:
        raise GPT2Error(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


class RayServer:
    """`gpt2 serve --engine ray`: Ray connected, the deployment running, the ingress bound."""

    def __init__(
        self,
        model: GPT2,
        *,
        replicas: int | None,
        autoscale: str | None,
        address: str | None,
        threads: int,
        verbose: bool,
        max_batch: int,
        max_queue: int,
    ) -> None:
        ray = require()
        if replicas is not None and autoscale is not None:
            raise GPT2Error("give --replicas N or --autoscale MIN:MAX, not both")
        if threads < 1:
            raise GPT2Error(f"each replica needs at least one thread, got {threads}")
        bounds = parse_autoscale(autoscale) if autoscale is not None else None
        if not verbose:
            for name in ("ray", "ray.serve"):
                logging.getLogger(name).setLevel(logging.ERROR)
        from ray import serve

        from gpt2cli.ray_engine import package

        self.ray, self.serve = ray, serve
        self.started = connect(ray, address, verbose=verbose, namespace="serve")
        self.app_name = f"gpt2cli-{os.getpid()}"
        try:
            serve.start(
                proxy_location="Disabled",  # the ingress is ours: no Ray HTTP proxy, no port
                logging_config={"log_level": "INFO" if verbose else "ERROR"},
            )
            options: dict[str, Any] = {
                "name": DEPLOYMENT,
                "max_ongoing_requests": max_batch + max_queue,
                "ray_actor_options": {
                    "num_cpus": threads,
                    "runtime_env": {"env_vars": thread_variables(threads)},
                },
                "health_check_period_s": 2,
                "health_check_timeout_s": 30,
                "graceful_shutdown_timeout_s": 2,
                "logging_config": {"log_level": "INFO" if verbose else "ERROR"},
            }
            if bounds is None:
                options["num_replicas"] = replicas or 1
                self.replicas = replicas or 1
            else:
                options["autoscaling_config"] = {
                    "min_replicas": bounds[0],
                    "max_replicas": bounds[1],
                    "target_ongoing_requests": max_batch,
                }
                self.replicas = bounds[1]
            deployment = serve.deployment(Replica).options(**options)  # type: ignore[attr-defined]
            shipped = package(ray, model)
            # a replica queues whatever the ingress lets through (every replica's room): Ray
            # Serve's routing and max_ongoing_requests spread the load, the ingress bounds it
            room = self.replicas * (max_batch + max_queue) - max_batch
            handle = serve.run(
                deployment.bind(shipped, max_batch, room),
                name=self.app_name,
                route_prefix=None,
            )
        except GPT2Error:
            self.stop()
            raise
        except BaseException as e:
            self.stop()
            if isinstance(e, Exception):
                raise GPT2Error(f"cannot start the Ray Serve deployment: {last_line(e)}") from None
            raise
        self.engine = RayEngine(model, handle, self.replicas, max_batch, max_queue)

    def stop(self) -> None:
        """Delete our application; stop Serve and Ray if we started the instance."""
        with contextlib.suppress(Exception):
            self.serve.delete(self.app_name, _blocking=True)
        if self.started:
            with contextlib.suppress(Exception):
                self.serve.shutdown()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                self.ray.shutdown()


def describe(server: RayServer) -> str:
    """The stderr line naming what runs where."""
    return (
        f"Ray Serve application {server.app_name}: {server.replicas} replica(s) "
        f"{'on a local Ray instance' if server.started else 'on the cluster'}"
    )
