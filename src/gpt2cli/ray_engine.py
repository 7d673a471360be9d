"""`--engine ray`: a data-set job on Ray Data, on a Ray cluster or a local Ray instance.

The driver (the `gpt2` process) has already read, checked and tokenized the rows and opened the
model (memory-mapped). It connects to the cluster named by `--ray-address` or `RAY_ADDRESS`, or
starts a local instance, and puts the model in Ray's object store: its weights once, and its
tokenizer as loaded. Each actor of a fixed pool takes the weights from the object store
(zero-copy: actors on one node share one copy in shared memory, as they would share a
memory-mapped file's pages) and runs the same task function as the local engine on chunks of
rows (`ray.data.from_items` -> `map_batches`), so the output is the local engine's: the same
ids, text and fields, and floats within 1e-4 (an actor's BLAS runs with its own thread count).
Workers never read the model from disk nor from the hub: a cluster needs no shared file system
and no hub access, only gpt2cli[ray] installed on every node and room in each node's object
store for the weights (float32: 4 bytes per parameter, 0.5 GB for gpt2; int8 about a quarter).
Each actor runs the model in the driver's dtype (`--dtype`), on the weights the driver converted.

Each actor asks Ray for `threads` CPUs and runs its BLAS (and the compiled kernels of int8 and
bfloat16) with that many threads; the pool has as
many actors as fit on the nodes' CPUs (per node: CPUs // threads), so actors x threads never
exceed the CPUs Ray offers. Ray's own logs and progress bars stay off stdout (worker output is
not forwarded to the driver), which carries only the results.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import signal
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt2cli.dataset import Result, Row, Task
from gpt2cli.errors import STOP_SIGNALS, GPT2Error, missing_extra
from gpt2cli.threads import THREAD_VARIABLES, THREADS_VARIABLE

if TYPE_CHECKING:
    from gpt2cli.config import GPT2Config
    from gpt2cli.model import GPT2

CHUNK_BATCHES = 4  # at most this many of the task's batches per chunk of rows sent to an actor
CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster's address to answer
FAILED = -1  # the position of an actor's row that carries a GPT2Error's message


def require() -> Any:
    """The `ray` module, or a GPT2Error naming the extra to install."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read as ray.data is imported
    try:
        import ray
        import ray.data
    except ImportError:
        raise missing_extra("ray", "--engine ray") from None
    return ray


def engine(
    address: str | None = None, threads: int = 1
) -> Callable[[Task, GPT2, Sequence[Row]], Iterator[Result]]:
    """An engine for `gpt2cli.dataset.run` that runs on Ray (`address` as `ray.init` takes it:
    None for RAY_ADDRESS or else a new local instance), `threads` BLAS threads per actor."""
    require()
    if threads < 1:
        raise GPT2Error(f"each Ray actor needs at least one thread, got {threads}")

    def run(task: Task, model: GPT2, rows: Sequence[Row]) -> Iterator[Result]:
        return run_ray(task, model, rows, address=address, threads=threads)

    return run


@dataclass(frozen=True)
class ModelPackage:
    """A model as the driver ships it: its config and dtype, and its weights and tokenizer (as
    the driver loaded them) in the object store."""

    config: GPT2Config
    params: Any  # a ray.ObjectRef of the nested dict of weight arrays (in the driver's layout)
    tokenizer: Any  # a ray.ObjectRef of the Tokenizer
    dtype: str = "float32"  # of the weight matrices, as the driver converted them


def package(ray: Any, model: GPT2) -> ModelPackage:
    """Put `model` in the object store."""
    return ModelPackage(model.config, ray.put(model.params), ray.put(model.tokenizer), model.dtype)


def unpack(ray: Any, shipped: ModelPackage) -> GPT2:
    """The model an actor runs: weights from the object store (read-only, shared by the actors
    of a node), no file read; int8 and bfloat16's kernels compiled (or loaded) first."""
    from gpt2cli import quant
    from gpt2cli.model import GPT2

    if shipped.dtype != "float32":
        quant.load_kernels(shipped.dtype)
    model = GPT2(shipped.config, ray.get(shipped.params), dtype=shipped.dtype)
    model.tokenizer = ray.get(shipped.tokenizer)
    return model


def thread_variables(threads: int) -> dict[str, str]:
    """The environment that runs an actor's products, BLAS's and the kernels', on `threads`."""
    return dict.fromkeys([*THREAD_VARIABLES, THREADS_VARIABLE], str(threads))


class Actor:
    """A Ray Data actor: loads the model once, then runs the task on each chunk of rows."""

    def __init__(self, task: Task, shipped: ModelPackage) -> None:
        import ray

        self.task = task
        self.model = unpack(ray, shipped)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Chunks (`start`, pickled rows) -> their results (global position, line, tokens). A
        GPT2Error comes back as one row of position FAILED with its message as the line."""
        out: dict[str, list[Any]] = {"position": [], "line": [], "tokens": []}
        try:
            for start, payload in zip(batch["start"].tolist(), batch["rows"], strict=True):
                for result in self.task.run(self.model, pickle.loads(payload)):
                    out["position"].append(start + result.position)
                    out["line"].append(result.line)
                    out["tokens"].append(result.tokens)
        except GPT2Error as e:  # Ray would pass on its text only, inside its own report
            out = {"position": [FAILED], "line": [str(e)], "tokens": [0]}
        return {
            "position": np.array(out["position"], np.int64),
            "line": np.array(out["line"], dtype=object),
            "tokens": np.array(out["tokens"], np.int64),
        }


def actor_count(ray: Any, threads: int) -> int:
    """Actors of `threads` CPUs that fit on the live nodes, each node counted on its own."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return sum(int(c) // threads for c in cpus)


def run_ray(
    task: Task, model: GPT2, rows: Sequence[Row], *, address: str | None, threads: int
) -> Iterator[Result]:
    """The results of `rows` run on Ray, as they arrive (chunk by chunk, in order)."""
    ray = require()
    if not rows:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is on stderr; Ray's would mix with it
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True
    started = connect(ray, address)
    try:
        actors = actor_count(ray, threads)
        if actors < 1:
            raise GPT2Error(
                f"no node of the Ray cluster has {threads} CPUs for an actor; "
                "use fewer --threads-per-actor"
            )
        batches_per_chunk = min(
            CHUNK_BATCHES, max(1, math.ceil(len(rows) / (task.batch_size * actors)))
        )
        size = task.batch_size * batches_per_chunk  # whole batches: the local engine's
        chunks = [
            {"start": start, "rows": pickle.dumps(list(rows[start : start + size]))}
            for start in range(0, len(rows), size)
        ]
        # an actor holds the model's object-store refs from its constructor: one restarted after
        # a crash could find them gone (Ray says so at error level on every run), so a crashed
        # actor fails the job instead, with its error. Ray 2.60 takes max_restarts as a remote
        # argument, a form it calls deprecated while naming no other.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            data = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
                Actor,
                fn_constructor_kwargs={"task": task, "shipped": package(ray, model)},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(actors, len(chunks))),
                num_cpus=threads,
                runtime_env={"env_vars": thread_variables(threads)},
                max_restarts=0,
            )
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                for position, line, tokens in zip(
                    batch["position"].tolist(), batch["line"], batch["tokens"].tolist(), strict=True
                ):
                    if position == FAILED:
                        raise GPT2Error(str(line))
                    yield Result(position, str(line), tokens)
        except GPT2Error:
            raise
        except Exception as e:
            raise _explain(e) from None
    finally:
        if started:
            ray.shutdown()


def connect(
    ray: Any, address: str | None, *, verbose: bool = False, namespace: str | None = None
) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a new local instance (never the
    dead cluster Ray recorded last); return whether this call did (and so must shut it down).
    Ray's log lines stay off unless `verbose`; a failure is one line, naming token
    authentication (Ray 2.60's default for `ray start --head` once ~/.ray/auth_token exists)
    when that is what failed."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address)
    # ray.init sets SIGTERM to exit 15 and prints `*** SIGTERM received` at error level: the
    # handlers there were (the CLI's, a server's) come back after it
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
            namespace=namespace,
        )
    except Exception as e:
        raise GPT2Error(connect_error(address, e)) from None
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    return address is None


def connect_error(address: str | None, error: Exception) -> str:
    """The one line for a failure to start or join a Ray cluster."""
    where = address or "a new local instance"
    text = last_line(error)
    token_file = Path.home() / ".ray" / "auth_token"
    auth = "authenticat" in f"{type(error).__name__} {text}".lower() or "token" in text.lower()
    if address and not auth and os.environ.get("RAY_AUTH_MODE") != "token" and token_file.exists():
        auth = isinstance(error, ConnectionError)
    if auth:
        return (
            f"cannot join the Ray cluster at {where}: it requires token authentication "
            f"(Ray starts `ray start --head` with it when {token_file} exists): run with "
            "RAY_AUTH_MODE=token, and the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        )
    return f"cannot start or reach the Ray cluster ({where}): {text}"


def _probe(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A GPT2Error unless the cluster's `host:port` takes a TCP connection within `timeout`
    seconds (ray.init would retry an unreachable one for minutes). Other forms (`auto`,
    `ray://...`) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise GPT2Error(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start one with "
            "`ray start --head`, or check --ray-address / RAY_ADDRESS"
        ) from None


def _explain(error: Exception) -> GPT2Error:
    """A failure of the Ray job (not a GPT2Error, which actors return as a row) as one line: the
    last line of Ray's report, which names the exception and its message."""
    return GPT2Error(f"the Ray job failed: {last_line(error)}")


def last_line(error: Exception) -> str:
    """The last line of an error's text (Ray's reports end with the exception and its
    message), without Ray's colours; the error's type when it says nothing."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the names in its reports
