"""`gpt2 serve`: the OpenAI completions API over HTTP, all requests decoded in one shared batch.

Three thin layers. Starlette routes read a request (at most 1 MB, checked field by field by
`gpt2cli.openai_api`), tokenize it and hand it to the `Engine` as a `Job`. The engine's one worker
thread owns the model and a `gpt2cli.scheduler.Scheduler`, which decodes every running request
as one batch (continuous batching): between decode steps the worker cancels the requests whose
clients went away, takes new ones from a bounded queue (full: 429), scores prompts for `echo` with
`gpt2cli.score`, admits them into free rows, runs one step, and hands each job its events through
the event loop (`call_soon_threadsafe`). uvicorn serves the app; on Ctrl-C or SIGTERM it stops
accepting, open requests end with a `server_shutdown` error, and `APIServer.run` returns.

Starlette and uvicorn are the `serve` extra: importing this module without them raises the
GPT2Error that names it, and no other module imports this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from gpt2cli import jsonfile, openai_api
from gpt2cli.errors import GPT2Error
from gpt2cli.openai_api import APIError, Completion, Fields, Top
from gpt2cli.scheduler import Event, Request, Scheduler

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError:
    raise GPT2Error("gpt2 serve needs the serve extra: pip install 'gpt2cli[serve]'") from None

if TYPE_CHECKING:
    from gpt2cli.model import GPT2

MAX_QUEUE = 64  # requests that may wait for rows before the server answers 429
RETRY_AFTER = "1"  # seconds a client told 429 should wait
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 10.0  # seconds open connections get to finish once the server is stopping
BODY_TIMEOUT_S = 30.0  # seconds a client has to send its whole request body
HEADERS_TIMEOUT_S = 10  # seconds a connection has to send a request's headers, first or next


def _log(message: str) -> None:
    """One line on the server's stderr."""
    print(f"gpt2 serve: {message}", file=sys.stderr, flush=True)


class Echo(NamedTuple):
    """A prompt's own tokens, which start its choices with `echo`; logprobs when asked."""

    prompt: int
    logprobs: list[float | None] | None
    tops: list[Top | None] | None


class Token(NamedTuple):
    """A scheduler event, with the prompt it belongs to and its sample's OpenAI finish reason."""

    prompt: int
    event: Event
    finish_reason: str | None


Item = Echo | Token | Exception  # what a job's inbox gets; an exception (APIError) ends it


class Job:
    """One completions request's work on the worker: its prompts, one scheduler `Request` per
    prompt (none with max_tokens 0), and the inbox where the route awaits the results."""

    def __init__(
        self,
        prompts: list[list[int]],
        requests: list[Request],
        *,
        echo: bool,
        score: bool,
        top: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.prompts = prompts
        self.requests = requests
        self.echo = echo
        self.score = score  # echo + logprobs: score each prompt before it generates
        self.top = top
        self.loop = loop
        self.inbox: asyncio.Queue[list[Item]] = asyncio.Queue()
        self.started = 0  # prompts the worker has taken
        self.cancelled = False

    @property
    def waiting(self) -> int:
        """Sequences (rows, or prompts to echo) of the prompts the worker has not taken yet."""
        rest = range(self.started, len(self.prompts))
        return sum(self.requests[i].n for i in rest) if self.requests else len(rest)


class Engine:
    """The worker thread that owns the model and its scheduler, and the queue that feeds it.

    `submit`, `cancel` and `close` are called from the event loop; everything that touches the
    model runs on the worker, so the model is never used by two threads at once.
    """

    def __init__(self, model: GPT2, max_batch: int = 8, max_queue: int = MAX_QUEUE) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._scheduler = Scheduler(model, max_batch)
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()  # jobs with prompts not yet taken by the worker
        self._cancelled: list[Job] = []
        self._free = max_batch  # rows free after the worker's last step: they take jobs at once
        self._closing = False
        self._owners: dict[Request, tuple[Job, int]] = {}  # admitted request -> job, prompt
        self._thread = threading.Thread(target=self._run, name="gpt2-serve-worker", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._thread.start()

    def check_size(self, sequences: int) -> None:
        """400 for a request of more sequences (prompts x n) than the queue and the batch hold
        together: a route checks this before it builds anything for the request, so an oversized
        one costs next to nothing."""
        room = self.max_queue + self.max_batch
        if sequences > room:
            raise APIError(
                400,
                f"This request asks for {sequences} sequences (prompts x n), more than the "
                f"server queues at once ({room}: --max-queue {self.max_queue} plus --max-batch "
                f"{self.max_batch}); send fewer prompts per request.",
                param="prompt",
            )

    def submit(self, job: Job) -> None:
        """Queue a job. The queue counts sequences (a prompt's n samples), not requests, so one
        request of many prompts cannot hold up every other: 400 for a job larger than the whole
        queue (`check_size`), 429 when it does not fit beside those already waiting beyond the
        free rows, 503 once the server is stopping."""
        self.check_size(job.waiting)
        with self._lock:
            if self._closing:
                raise _shutting_down()
            waiting = sum(j.waiting for j in self._waiting)
            if waiting + job.waiting > self.max_queue + self._free:
                raise APIError(
                    429,
                    f"The server is busy: {waiting} sequences are waiting for the "
                    f"{self.max_batch} it decodes at once. Retry after a moment.",
                    code="queue_full",
                    headers={"Retry-After": RETRY_AFTER},
                )
            self._waiting.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away: its rows are free before the next step."""
        with self._lock:
            if not job.cancelled:
                job.cancelled = True
                self._cancelled.append(job)
                self._lock.notify()

    def close(self) -> None:
        """Stop: refuse new jobs (503) and end every open one with a `server_shutdown` error."""
        with self._lock:
            self._closing = True
            self._lock.notify()

    def join(self, timeout: float = GRACE_S) -> None:
        """Wait for the worker to finish its step and stop (after `close`)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        """The worker: cancel, admit, step, until closed."""
        while True:
            with self._lock:
                while not (
                    self._closing or self._cancelled or self._waiting or self._scheduler.running
                ):
                    self._lock.wait()
                if self._closing:
                    break
                cancelled, self._cancelled = self._cancelled, []
            for job in cancelled:
                self._drop(job)
            self._admit()
            if self._scheduler.running:
                self._step()
            with self._lock:
                self._free = self._scheduler.free
        with self._lock:
            jobs = [*self._waiting, *(job for job, _ in self._owners.values())]
            self._waiting.clear()
        for job in dict.fromkeys(jobs):  # each once, in order
            self._post(job, [_shutting_down()])

    def _admit(self) -> None:
        """Start waiting prompts, oldest first, while their samples find free rows: each is
        echoed (and scored) first, then all join the batch in one padded prefill."""
        starting: list[tuple[Job, int]] = []
        with self._lock:
            free = self._scheduler.free
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                prompt = job.started
                if job.requests and job.requests[prompt].n > free:
                    break
                free -= job.requests[prompt].n if job.requests else 0
                starting.append((job, prompt))
                job.started += 1
                if job.started == len(job.prompts):
                    self._waiting.popleft()
        admitted: list[tuple[Job, Request]] = []
        for job, prompt in starting:
            try:
                self._echo(job, prompt)
            except Exception as e:
                self._fail([job], e)
                continue
            if job.requests:
                admitted.append((job, job.requests[prompt]))
                self._owners[job.requests[prompt]] = (job, prompt)
        if not admitted:
            return
        try:
            self._deliver(self._scheduler.admit(*(request for _, request in admitted)))
        except Exception as e:  # a model fault: every job in this prefill gets it
            self._fail([job for job, _ in admitted], e)

    def _echo(self, job: Job, prompt: int) -> None:
        """Echo (and score) one prompt of a job, when it asks for that."""
        if job.echo:
            logprobs, tops = (
                self._score(job.prompts[prompt], job.top) if job.score else (None, None)
            )
            self._post(job, [Echo(prompt, logprobs, tops)])

    def _score(self, ids: list[int], top: int) -> tuple[list[float | None], list[Top | None]]:
        """Each prompt token's logprob given those before it and its `top` alternatives, with
        `gpt2 score --no-bos`'s numbers; the first token has none (null)."""
        from gpt2cli.score import score_ids

        if len(ids) < 2:
            return [None], [None]
        s = score_ids(self.model, ids, top=top)
        tops = [
            list(zip(t.tolist(), lp.tolist(), strict=True))
            for t, lp in zip(s.top_ids, s.top_logprobs, strict=True)
        ]
        return [None, *s.logprobs.tolist()], [None, *tops]

    def _step(self) -> None:
        """One decode step for the batch. If it fails, its state is unknown: every request in it
        gets the error, and a fresh scheduler takes over."""
        try:
            events = self._scheduler.step()
        except Exception as e:
            jobs = [job for job, _ in self._owners.values()]
            self._owners.clear()
            self._scheduler = Scheduler(self.model, self.max_batch)
            self._fail(jobs, e)
            return
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Hand each job its events of this step, in one call to its event loop."""
        batches: dict[Job, list[Item]] = {}
        for event in events:
            job, prompt = self._owners[event.request]
            reason = event.request.completions[event.sample].finish_reason if event.done else None
            batches.setdefault(job, []).append(Token(prompt, event, reason))
        for request in [r for r in self._owners if r.finished]:
            del self._owners[request]
        for job, items in batches.items():
            self._post(job, items)

    def _drop(self, job: Job) -> None:
        """Take a cancelled job out of the queue and its requests out of the batch."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
        for request in job.requests:
            if self._owners.pop(request, None) is not None:
                self._scheduler.cancel(request)

    def _fail(self, jobs: Sequence[Job], error: Exception) -> None:
        """End jobs with an error: a GPT2Error's own message (a model fault, such as logits
        that are not finite), or for anything else a 500 that says nothing of it to the client
        while the traceback goes to the server's stderr."""
        if isinstance(error, GPT2Error):
            _log(f"error: {error}")
            failure = APIError(500, str(error))
        else:
            _log("internal error:\n" + "".join(traceback.format_exception(error)).rstrip())
            failure = openai_api.internal_error()
        for job in dict.fromkeys(jobs):
            self._drop(job)
            self._post(job, [failure])

    @staticmethod
    def _post(job: Job, items: list[Item]) -> None:
        """Put items in a job's inbox, from the worker, through the job's event loop."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            job.loop.call_soon_threadsafe(job.inbox.put_nowait, items)


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", code="server_shutdown")


class _ClientGone(Exception):
    """The client disconnected before its answer (while sending its body, or while a
    non-streamed request ran)."""


Endpoint = Callable[[HTTPRequest], Awaitable[Response]]


class App:
    """The HTTP endpoints over one engine and model: OpenAI's `/v1/models` and
    `/v1/completions`, llama.cpp's `/tokenize` and `/detokenize`, and `/health`."""

    def __init__(
        self,
        engine: Engine,
        names: Sequence[str],
        folder: str,
        api_key: str | None,
        *,
        local_only: bool = True,
    ) -> None:
        self.engine = engine
        self.local_only = local_only  # listening on loopback: only local names may address it
        self.model = engine.model
        self.tokenizer = engine.model.tokenizer
        self.names = list(dict.fromkeys(names))  # the served name first, then its aliases
        self.folder = folder
        self.api_key = api_key
        self.created = int(time.time())
        self.stopping = asyncio.Event()  # set when the server starts stopping: body reads end

    def asgi(self) -> ASGIApp:
        """The ASGI application: Starlette's, and quiet about a connection uvicorn has already
        answered itself (a malformed chunked body gets its 400 while a route is still running;
        the route's own reply then cannot be sent, which is no error of the server's)."""
        app = self.starlette()

        async def quiet(scope: Scope, receive: Receive, send: Send) -> None:
            failed = False

            async def sending(message: Message) -> None:
                nonlocal failed
                try:
                    await send(message)
                except Exception:
                    failed = True
                    raise

            try:
                await app(scope, receive, sending)
            except Exception:
                if not failed:
                    raise
                # uvicorn is closing the connection: once it has noticed, it reports nothing
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_disconnected(receive), timeout=1.0)

        return quiet

    def starlette(self) -> Starlette:
        """The Starlette application: the routes."""
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        routes = [
            Route("/health", self._endpoint(self.health, public=True), methods=["GET"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.model_info), methods=["GET"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/tokenize", self._endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint(self.detokenize), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=every),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
        )
        app.router.redirect_slashes = False  # `/v1/completions/` is a 404, not a redirect
        return app

    def _endpoint(
        self, handler: Callable[[HTTPRequest], Awaitable[Response]], public: bool = False
    ) -> Endpoint:
        """A handler with the API key checked (unless public) and every failure answered with
        OpenAI's error body: an APIError as it says, anything else as a 500 that tells the
        client nothing more (the traceback goes to the server's stderr)."""

        async def endpoint(request: HTTPRequest) -> Response:
            try:
                if self.local_only:
                    _check_local_host(request)
                if not public:
                    self._authorize(request)
                return await handler(request)
            except APIError as e:
                return error_response(e)
            except _ClientGone:
                return Response(status_code=499)  # nobody reads it; for the record
            except Exception:
                _log("internal error:\n" + traceback.format_exc().rstrip())
                return error_response(openai_api.internal_error())

        return endpoint

    def _authorize(self, request: HTTPRequest) -> None:
        """With an API key set, the request must carry `Authorization: Bearer KEY` (401)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # HTTP headers are bytes, read as latin-1
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided: send it as the header `Authorization: Bearer KEY`.",
                code="invalid_api_key",
            )

    async def _http_error(self, request: HTTPRequest, exc: Exception) -> Response:
        """Starlette's own 404 (no such path) and 405 (wrong method), in OpenAI's error body."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        what = "no such path" if status == 404 else "method not allowed"
        message = f"{request.method} {request.url.path}: {what}"
        code = "unknown_url" if status == 404 else None
        return error_response(APIError(status, message, code=code, headers=headers))

    async def _crash(self, request: HTTPRequest, exc: Exception) -> Response:
        """Anything that escaped the endpoints (a bug): a 500 with nothing of it in the body."""
        return error_response(openai_api.internal_error())

    async def health(self, request: HTTPRequest) -> Response:
        """`GET /health`: the server is up (no key needed)."""
        return json_response({"status": "ok"})

    async def models(self, request: HTTPRequest) -> Response:
        """`GET /v1/models`: OpenAI's list object holding the one model."""
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: HTTPRequest) -> Response:
        """`GET /v1/models/{model}`: the model, under its name or an alias; 404 otherwise."""
        openai_api.check_model(request.path_params["model"], self.names)
        return json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.names[0],
            "object": "model",
            "created": self.created,
            "owned_by": "gpt2cli",
            "root": self.folder,
            "parent": None,
            "max_model_len": self.model.config.n_ctx,
        }

    async def chat(self, request: HTTPRequest) -> Response:
        """`/v1/chat/completions`: GPT-2 is not a chat model (404 pointing to completions)."""
        raise APIError(
            404,
            "GPT-2 is not a chat model, so there is no /v1/chat/completions: send a prompt to "
            "/v1/completions instead.",
            code="unknown_url",
        )

    async def completions(self, request: HTTPRequest) -> Response:
        """`POST /v1/completions`: checked, tokenized, queued, then answered whole or streamed."""
        body = openai_api.parse_body(await read_body(request, self.stopping))
        params = openai_api.completion_params(
            body, max_batch=self.engine.max_batch, names=self.names
        )
        self.engine.check_size(len(params.prompts) * (params.n if params.max_tokens else 1))
        # a thread: a long prompt's tokenization must not hold up the streams the loop serves
        ids = await asyncio.to_thread(openai_api.prompt_ids, params.prompts, self.tokenizer)
        openai_api.check_lengths(ids, params.max_tokens, self.model.config.n_ctx)
        requests = [
            Request(
                prompt_ids=prompt,
                max_tokens=params.max_tokens,
                sampling=params.sampling,
                seed=params.seed,
                n=params.n,
                stop=params.stop,
                ignore_eos=params.ignore_eos,
                top_logprobs=params.logprobs or 0,
            )
            for prompt in ids
            if params.max_tokens > 0
        ]
        job = Job(
            ids,
            requests,
            echo=params.echo,
            score=params.echo and params.logprobs is not None,
            top=params.logprobs or 0,
            loop=asyncio.get_running_loop(),
        )
        completion = Completion(params, ids, self.tokenizer, self.names[0])
        self.engine.submit(job)
        if params.stream:
            return StreamingResponse(
                self._stream(job, completion),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return json_response(await self._collect(request, job, completion))

    async def _collect(
        self, request: HTTPRequest, job: Job, completion: Completion
    ) -> dict[str, Any]:
        """Wait for a job's results and build its response; a client that disconnects meanwhile
        has its job cancelled."""
        watch = asyncio.ensure_future(_watch_disconnect(request, job))
        try:
            while not completion.finished:
                _apply(completion, await job.inbox.get())
        finally:
            watch.cancel()
            if not completion.finished:
                self.engine.cancel(job)
        return completion.response()

    async def _stream(self, job: Job, completion: Completion) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per token (and per echoed prompt), the usage chunk when
        asked, then `[DONE]`; a failure is a final error event before `[DONE]`. A client that
        disconnects (Starlette then cancels this generator) has its job cancelled."""
        try:
            while not completion.finished:
                items = await job.inbox.get()
                try:
                    chunks = _apply(completion, items)
                except APIError as e:
                    yield _event(e.body())
                    break
                yield "".join(_event(chunk) for chunk in chunks)
            else:
                if completion.params.include_usage:
                    yield _event(completion.usage_chunk())
            yield "data: [DONE]\n\n"
        except Exception:
            _log("internal error in a stream:\n" + traceback.format_exc().rstrip())
            yield _event(openai_api.internal_error().body()) + "data: [DONE]\n\n"
        finally:
            if not completion.finished:
                self.engine.cancel(job)

    async def tokenize(self, request: HTTPRequest) -> Response:
        """`POST /tokenize` (llama.cpp's): `{"content"}` -> `{"tokens": [ids]}`, or with
        `with_pieces` `[{"id", "piece"}]` (a piece that is not UTF-8 is a list of its bytes).
        `parse_special` (default true) reads `<|endoftext|>` as the special token;
        `add_special` is accepted and adds nothing: GPT-2 puts no BOS token first."""
        fields = Fields(openai_api.parse_body(await read_body(request, self.stopping)))
        content = fields.get("content")
        if not isinstance(content, str):
            raise APIError(400, "content must be a string", param="content")
        openai_api.text(content, "content")
        fields.boolean("add_special")
        parse_special = fields.boolean("parse_special", True)
        with_pieces = fields.boolean("with_pieces")
        fields.done()
        # a thread: a long text's tokens must not hold up the streams the loop serves
        body = await asyncio.to_thread(self._tokens, content, parse_special, with_pieces)
        return Response(body, media_type="application/json")

    def _tokens(self, content: str, parse_special: bool, with_pieces: bool) -> bytes:
        """`/tokenize`'s JSON body."""
        ids = self.tokenizer.encode(content, allowed_special=parse_special)
        if not with_pieces:
            return render({"tokens": ids})
        return render(
            {"tokens": [{"id": i, "piece": _piece(self.tokenizer.token_bytes(i))} for i in ids]}
        )

    async def detokenize(self, request: HTTPRequest) -> Response:
        """`POST /detokenize` (llama.cpp's): `{"tokens": [ids]}` -> `{"content": text}`."""
        fields = Fields(openai_api.parse_body(await read_body(request, self.stopping)))
        tokens = fields.get("tokens")
        fields.done()
        n_vocab = self.tokenizer.n_vocab
        if not isinstance(tokens, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab for i in tokens
        ):
            raise APIError(
                400, f"tokens must be a list of token ids from 0 to {n_vocab - 1}", "tokens"
            )
        return json_response({"content": self.tokenizer.decode(tokens)})


def _piece(raw: bytes) -> str | list[int]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _apply(completion: Completion, items: list[Item]) -> list[dict[str, Any]]:
    """Add the worker's items to a completion and return their stream chunks; an error item
    (or the client going away) is raised."""
    chunks = []
    for item in items:
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Echo):
            chunks += completion.echo(item.prompt, item.logprobs, item.tops)
            continue
        e = item.event
        chunks.append(
            completion.token(
                item.prompt, e.sample, e.id, e.text, e.logprob, e.top, item.finish_reason
            )
        )
    return chunks


async def _disconnected(receive: Receive) -> None:
    """Return once the ASGI server says the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watch_disconnect(request: HTTPRequest, job: Job) -> None:
    """Wait until the client disconnects (the body has been read, so `receive` says nothing else
    before the response), then end the job's wait."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.inbox.put_nowait([_ClientGone()])


async def read_body(request: HTTPRequest, stopping: asyncio.Event) -> bytes:
    """The request body, read at most MAX_BODY bytes far whatever Content-Length says (413),
    within BODY_TIMEOUT_S (408: a client that trickles its body cannot hold a connection), and
    cut off with a 503 when the server starts stopping. A client that disconnects while sending
    it is gone: nothing is logged. A body declared as anything but JSON is refused first."""
    _check_content_type(request)
    reading = asyncio.ensure_future(_read_body(request))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait(
            {reading, stop}, timeout=BODY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stop.cancel()
        if not reading.done():
            reading.cancel()
    if not reading.done() or reading.cancelled():
        raise (
            _shutting_down()
            if stopping.is_set()
            else APIError(
                408,
                f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                code="request_timeout",
            )
        )
    return reading.result()


def _check_local_host(request: HTTPRequest) -> None:
    """403 unless the request is addressed (its Host header) to a loopback name or address: a
    web page whose own name an attacker points at 127.0.0.1 (DNS rebinding) could otherwise
    read a local server's answers. A request without a Host header (HTTP/1.0) passes."""
    declared = request.headers.get("host")
    if declared is None:
        return
    name, port = declared, ""
    if not declared.endswith("]"):  # then a last colon starts a port ([::1] has colons inside)
        head, colon, tail = declared.rpartition(":")
        if colon:
            name, port = head, tail
    name = name.strip("[]").lower().removesuffix(".")
    try:
        address = ipaddress.ip_address(name)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
        loopback = (mapped or address).is_loopback
    except ValueError:
        loopback = name == "localhost" or name.endswith(".localhost")
    loopback = loopback and (port == "" or port.isdigit())
    if not loopback:
        raise APIError(
            403,
            f"The request is addressed to {jsonfile.show(declared)}, not to this computer: a "
            "server listening on a loopback address answers only localhost, 127.0.0.1 and "
            "[::1] (serve with --host to answer other names).",
            code="forbidden_host",
        )


def _check_content_type(request: HTTPRequest) -> None:
    """415 unless the body is declared JSON. A web page may send a text/plain or form body, or
    one with no Content-Type, to any address without the browser asking the server first (a
    CORS "simple request"), so accepting those would let any site a user visits spend a local
    server's compute; a JSON body makes the browser ask, and this server never says yes."""
    declared = request.headers.get("content-type", "")
    media = declared.partition(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise APIError(
            415,
            "The request body must be JSON, sent with Content-Type: application/json, not "
            + (jsonfile.show(declared) if declared else "without a Content-Type")
            + ".",
            code="unsupported_media_type",
        )


async def _read_body(request: HTTPRequest) -> bytes:
    """The body, at most MAX_BODY bytes (413); _ClientGone if the client disconnects."""
    too_large = APIError(
        413,
        f"The request body is larger than {openai_api.MAX_BODY} bytes (1 MB), the limit.",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 9 or int(declared) > openai_api.MAX_BODY)
    ):
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > openai_api.MAX_BODY:
                raise too_large
    except ClientDisconnect:
        raise _ClientGone from None
    return bytes(body)


def render(value: Any) -> bytes:
    """JSON as UTF-8 bytes; NaN or Infinity (which JSON cannot hold) is an error (a bug)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response."""
    return Response(render(value), status, headers, media_type="application/json")


def error_response(error: APIError) -> Response:
    """OpenAI's error body with the error's status (and headers, e.g. Retry-After)."""
    return json_response(error.body(), error.status, error.headers)


def _event(value: Any) -> str:
    """One Server-Sent Event holding a JSON value."""
    return f"data: {render(value).decode()}\n\n"


class _Uvicorn(uvicorn.Server):
    """uvicorn, stopped by Ctrl-C, SIGTERM or SIGHUP without re-raising the signal afterwards
    (so the command exits 0), and ending the engine's open jobs before it waits on connections."""

    def __init__(self, config: uvicorn.Config, app: App) -> None:
        super().__init__(config)
        self.app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our stop signals call `handle_exit` while serving; the previous handlers come back
        after (a signal that was ignored, as nohup ignores SIGHUP, stays ignored)."""
        previous = {
            s: signal.signal(s, self.handle_exit)
            for s in SHUTDOWN_SIGNALS
            if signal.getsignal(s) is not signal.SIG_IGN
        }
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End open jobs (streams get a final error event and `[DONE]`), then uvicorn's own
        shutdown: stop accepting, let connections finish."""
        self.app.stopping.set()
        self.app.engine.close()
        await super().shutdown(sockets)


class _HeadersDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 connection, where a request's headers must be complete within
    HEADERS_TIMEOUT_S of the connection opening or of the previous response. uvicorn's own
    keep-alive timer stops at the first byte of data, so a client that sends nothing, or its
    headers a byte at a time, would hold a connection (and a file descriptor) for ever."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            HEADERS_TIMEOUT_S, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        """As uvicorn's, but the deadline stays until the headers are complete (uvicorn ends it
        when it has them)."""
        self.conn.receive_data(data)
        self.handle_events()


class APIServer:
    """`gpt2 serve`'s server: the listening socket (bound at once, so `url` is known), the
    engine and the app; `run` serves until a stop signal."""

    def __init__(
        self,
        model: GPT2,
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 8,
        max_queue: int = MAX_QUEUE,
        api_key: str | None = None,
    ) -> None:
        from gpt2cli import hub

        if api_key == "":  # `--api-key "$UNSET"` must not serve without a key by mistake
            raise GPT2Error(
                "the API key is empty: give a non-empty --api-key (or GPT2_API_KEY), or none "
                "to serve without one"
            )
        if api_key is not None and (
            api_key != api_key.strip() or any(c < " " or c == "\x7f" for c in api_key)
        ):  # HTTP trims a header's ends and cannot carry controls: no client could send it
            raise GPT2Error(
                "the API key has spaces at an end or control characters, which no client can "
                "send in an HTTP header; choose one without"
            )
        folder = str(model.folder) if model.folder is not None else name
        aliases = [name, folder]
        with contextlib.suppress(GPT2Error):  # a folder has no hub repo
            aliases.append(hub.repo_id_for(name))
        self.engine = Engine(model, max_batch, max_queue)
        model.tokenizer.decode(model.tokenizer.encode("warm"))  # lazy tables built before threads
        self.socket = _listen(host, port)
        bound_host, bound_port = self.socket.getsockname()[:2]
        local_only = ipaddress.ip_address(bound_host).is_loopback
        self.app = App(self.engine, aliases, folder, api_key, local_only=local_only)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"

    def run(self) -> None:
        """Serve until Ctrl-C, SIGTERM or SIGHUP, then stop cleanly and return."""
        config = uvicorn.Config(
            self.app.asgi(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=_HeadersDeadline,
            timeout_keep_alive=HEADERS_TIMEOUT_S,
            timeout_graceful_shutdown=int(GRACE_S),
        )
        self.engine.start()
        try:
            _Uvicorn(config, self.app).run(sockets=[self.socket])
        finally:
            self.engine.close()
            self.engine.join()
            self.socket.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one), or a GPT2Error saying why not."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise GPT2Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
