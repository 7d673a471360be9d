"""`gpt2 serve`: the OpenAI completions API over HTTP, all requests decoded in one shared batch.

Three layers, and the path of a request through them: `gpt2cli.httpd` (uvicorn, and the checks
every request passes first: Host, content type, body size and time) hands it to a route here;
the route checks its fields (`gpt2cli.openai_api`), tokenizes its prompts and submits them to the
`gpt2cli.engine.Engine` as a `Job`; the engine's worker runs them in the one scheduler loop with
every other request (continuous batching) and posts the job its events, which the route turns
into the response or stream chunks (`openai_api.Completion`). On Ctrl-C or SIGTERM the server
stops accepting, open requests end with a `server_shutdown` error, and `APIServer.run` returns.

Starlette and uvicorn are the `serve` extra: importing this module without them raises the
GPT2Error that names it, and no other module imports this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import sys
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from gpt2cli import httpd, jsonfile, openai_api, webpage
from gpt2cli.engine import MAX_QUEUE, Call, Engine, Job, QueueFull, Stopping, TooLarge
from gpt2cli.errors import GPT2Error, missing_extra
from gpt2cli.openai_api import APIError, Completion, Fields
from gpt2cli.params import MAX_TOP_LOGPROBS, ParamError
from gpt2cli.scheduler import FailedEvent, PromptEvent, Request, TokenEvent

try:
    from anyio import CancelScope
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
    from starlette.types import Send
except ModuleNotFoundError:
    raise missing_extra("serve", "gpt2 serve") from None

if TYPE_CHECKING:
    from gpt2cli.engine import Item
    from gpt2cli.model import GPT2

RETRY_AFTER = "1"  # seconds a client told 429 should wait
TOKENIZING = 2  # requests whose prompts are tokenized at once; the others wait their turn
SHOWN_PATH = 200  # characters of an unknown path an error repeats
SCORE_CONTEXTS = 32  # /v1/score takes texts of at most this many contexts' tokens


def _log(message: str) -> None:
    """One line on the server's stderr."""
    print(f"gpt2 serve: {message}", file=sys.stderr, flush=True)


def api_error(error: Exception) -> APIError:
    """The response for an engine's or model's error: the queue full (429), a request too large
    (400), the server stopping (503), a model fault (500 with its own message, such as logits
    that are not finite); anything else is a bug: a 500 that says nothing of it to the client
    while the traceback goes to the server's stderr."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFull):
        return APIError(429, str(error), code="queue_full", headers={"Retry-After": RETRY_AFTER})
    if isinstance(error, TooLarge):
        return APIError(400, str(error), param="prompt")
    if isinstance(error, Stopping):
        return httpd.shutting_down()
    if isinstance(error, ParamError):  # a request option the model refuses (a banned text
        return openai_api.param_error(error)  # that encodes to nothing, an id beyond its vocab)
    if isinstance(error, GPT2Error):
        _log(f"error: {error}")
        return APIError(500, str(error))
    _log("internal error:\n" + "".join(traceback.format_exception(error)).rstrip())
    return openai_api.internal_error()


Endpoint = Callable[[HTTPRequest], Awaitable[Response]]


class App:
    """The HTTP endpoints over one engine and model: OpenAI's `/v1/models` and
    `/v1/completions`, `/v1/score`, llama.cpp's `/tokenize` and `/detokenize`, `/health`, and
    (unless `web` is off) the web page at `/` with its files under `/web/`."""

    def __init__(
        self,
        engine: Engine,
        names: Sequence[str],
        folder: str,
        api_key: str | None,
        *,
        local_only: bool = True,
        web: bool = True,
    ) -> None:
        self.engine = engine
        self.web = web  # serve the page at / (gpt2cli.webpage)
        self.local_only = local_only  # listening on loopback: only local names may address it
        self.model = engine.model
        self.tokenizer = engine.model.tokenizer
        self.names = list(dict.fromkeys(names))  # the served name first, then its aliases
        self.folder = folder
        self.api_key = api_key
        self.created = int(time.time())
        self.stopping = asyncio.Event()  # set when the server starts stopping: body reads end
        # prompts tokenized at once, each on a thread: more would only queue for the two cores
        self.tokenizing = asyncio.Semaphore(TOKENIZING)

    def starlette(self) -> Starlette:
        """The Starlette application: the routes."""
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        routes = [
            Route("/health", self._endpoint(self.health, public=True), methods=["GET"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.model_info), methods=["GET"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/score", self._endpoint(self.score), methods=["POST"]),
            Route("/tokenize", self._endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint(self.detokenize), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=every),
        ]
        if self.web:  # public: the page must load to ask for the key; the Host check applies
            routes += [
                Route("/", self._endpoint(self.page, public=True), methods=["GET"]),
                Route("/web/{name}", self._endpoint(self.web_file, public=True), methods=["GET"]),
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
                    httpd.check_local_host(request)
                if not public:
                    self._authorize(request)
                return await handler(request)
            except APIError as e:
                return error_response(e)
            except GPT2Error as e:
                return error_response(api_error(e))
            except httpd.ClientGone:
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
        path = request.url.path
        shown = path if len(path) <= SHOWN_PATH else path[: SHOWN_PATH - 3] + "..."
        message = f"{request.method} {shown}: {what}"  # a 100 KB path is not sent back whole
        code = "unknown_url" if status == 404 else None
        return error_response(APIError(status, message, code=code, headers=headers))

    async def _crash(self, request: HTTPRequest, exc: Exception) -> Response:
        """Anything that escaped the endpoints (a bug): a 500 with nothing of it in the body."""
        return error_response(openai_api.internal_error())

    async def health(self, request: HTTPRequest) -> Response:
        """`GET /health`: the server is up (no key needed)."""
        return json_response({"status": "ok"})

    async def page(self, request: HTTPRequest) -> Response:
        """`GET /`: the web page (Playground and Inspect), no key needed to load it."""
        return Response(webpage.page(), media_type="text/html", headers=webpage.HEADERS)

    async def web_file(self, request: HTTPRequest) -> Response:
        """`GET /web/NAME`: one of the page's own files (gpt2cli/web/), or a 404."""
        found = webpage.static_file(request.path_params["name"])
        if found is None:
            raise APIError(404, f"GET {request.url.path}: no such file", code="unknown_url")
        body, media = found
        return Response(body, media_type=media, headers=webpage.HEADERS)

    async def models(self, request: HTTPRequest) -> Response:
        """`GET /v1/models`: OpenAI's list object holding the one model."""
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: HTTPRequest) -> Response:
        """`GET /v1/models/{model}`: the model, under its name or an alias; 404 otherwise."""
        name = request.path_params["model"]
        if not name:
            raise APIError(
                404,
                f"GET /v1/models/ names no model: ask for /v1/models/{self.names[0]}, or "
                "/v1/models for the list.",
                code="unknown_url",
            )
        openai_api.check_model(name, self.names)
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
            "dtype": self.model.dtype,
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
        body = openai_api.parse_body(await httpd.read_body(request, self.stopping))
        params = openai_api.completion_params(
            body, max_batch=self.engine.max_batch, names=self.names
        )
        rows = params.generation.draws if params.max_tokens else 1  # per prompt
        self.engine.check_size(len(params.prompts) * rows)
        n_ctx = self.model.config.n_ctx
        openai_api.check_text_lengths(params.prompts, n_ctx, self.tokenizer.max_token_bytes)
        async with self.tokenizing:  # a thread: tokenizing must not hold up the loop's streams
            ids = await asyncio.to_thread(openai_api.prompt_ids, params.prompts, self.tokenizer)
        openai_api.check_lengths(ids, params.max_tokens, n_ctx)
        job = Job([Request(p, params.generation) for p in ids], asyncio.get_running_loop())
        completion = Completion(params, ids, self.tokenizer, self.names[0])
        request.state.detail = completion.tokens_line  # the access log's tokens, once it ends
        self.engine.submit(job)
        if params.stream:
            return _Stream(self._stream(job, completion))
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

    async def _stream(self, job: Job, completion: Completion) -> AsyncGenerator[str, None]:
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

    async def score(self, request: HTTPRequest) -> Response:
        """`POST /v1/score`: `{"text", "top": 5, "stride": null, "bos": true}` -> exactly what
        `gpt2 score --json --tokens --top TOP --text TEXT` prints: the totals and each token's
        logprob, rank and top alternatives, a text longer than the context in strided windows.
        Its windows run on the engine's worker a batch at a time, between decode steps."""
        from gpt2cli.score import score_json, score_windows, scoring_sequence, scoring_steps

        body = openai_api.parse_body(await httpd.read_body(request, self.stopping))
        fields = Fields(body)
        openai_api.check_model(fields.get("model"), self.names)
        text = fields.get("text")
        if not isinstance(text, str):
            raise APIError(400, f"text must be a string, not {jsonfile.show(text)}", param="text")
        openai_api.text(text, "text")
        top = fields.integer("top", MAX_TOP_LOGPROBS, 0, MAX_TOP_LOGPROBS)
        n_ctx = self.model.config.n_ctx
        given = fields.get("stride")  # absent: gpt2 score's default
        stride = None if given is None else fields.integer("stride", 0, 1, n_ctx)
        bos = fields.boolean("bos", True)
        fields.done()
        async with self.tokenizing:  # a thread: tokenizing must not hold up the loop's streams
            ids = await asyncio.to_thread(self.tokenizer.encode, text)
        most = SCORE_CONTEXTS * n_ctx
        if len(ids) > most:
            raise APIError(
                400,
                f"text is {len(ids)} tokens; /v1/score takes at most {most} (gpt2 score has no "
                "limit)",
                param="text",
                code="context_length_exceeded",
            )
        try:
            scoring_sequence(self.model, ids, bos=bos)
        except GPT2Error as e:
            raise APIError(400, str(e), param="text") from None
        windows = score_windows(len(ids) + bos, n_ctx, stride or n_ctx // 2)
        positions, most_positions = sum(end - begin for begin, end, _ in windows), 2 * most
        if positions > most_positions:  # a small stride makes a window per token or so
            raise APIError(
                400,
                f"scoring this text with stride {stride} runs {positions} positions through "
                f"the model; /v1/score runs at most {most_positions}: use a larger stride "
                "(gpt2 score has no limit)",
                param="stride",
            )
        steps = scoring_steps(self.model, [text], stride=stride, bos=bos, top=top, encoded=[ids])
        call = Call(steps, asyncio.get_running_loop())
        self.engine.submit(call)
        watch = asyncio.ensure_future(_watch_disconnect(request, call))
        try:
            [result] = await call.inbox.get()
        finally:
            watch.cancel()
            self.engine.cancel(call)  # nothing once it has ended
        if isinstance(result, Exception):
            raise result if isinstance(result, httpd.ClientGone) else api_error(result)
        line = score_json(result[0], self.tokenizer, tokens=True, first={"source": "<text>"})
        return Response(line.encode(), media_type="application/json")

    async def tokenize(self, request: HTTPRequest) -> Response:
        """`POST /tokenize` (llama.cpp's): `{"content"}` -> `{"tokens": [ids]}`, or with
        `with_pieces` `[{"id", "piece"}]` (a piece that is not UTF-8 is a list of its bytes).
        `parse_special` (default true) reads `<|endoftext|>` as the special token;
        `add_special` is accepted and adds nothing: GPT-2 puts no BOS token first."""
        fields = Fields(openai_api.parse_body(await httpd.read_body(request, self.stopping)))
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
        fields = Fields(openai_api.parse_body(await httpd.read_body(request, self.stopping)))
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


class _Stream(StreamingResponse):
    """Server-Sent Events from `events`, closed however the response ends: Starlette leaves a
    generator that was cancelled while sending (its client went away) to the garbage collector,
    and until then the generator's `finally` has not cancelled the job, which keeps its rows."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._events = events

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with CancelScope(shield=True):  # runs even in a cancelled task
                await self._events.aclose()


def _apply(completion: Completion, items: list[Item]) -> list[dict[str, Any]]:
    """Add the engine's items to a completion and return their stream chunks; an error item
    (or the client going away) is raised as the APIError it answers with."""
    chunks = []
    for item in items:
        if isinstance(item, httpd.ClientGone):
            raise item
        if isinstance(item, Exception):
            raise api_error(item)
        prompt, event = item
        if isinstance(event, FailedEvent):
            raise api_error(event.error)
        if isinstance(event, PromptEvent):
            logprobs, tops = openai_api.echo_logprobs(event.state.prompt_score)
            chunks += completion.echo(prompt, logprobs, tops)
        elif isinstance(event, TokenEvent):
            chunks.append(
                completion.token(
                    prompt,
                    event.sample,
                    event.id,
                    event.text,
                    event.logprob,
                    event.top,
                    event.finish_reason,
                )
            )
    return chunks


async def _watch_disconnect(request: HTTPRequest, job: Job | Call) -> None:
    """Wait until the client disconnects (the body has been read, so `receive` says nothing else
    before the response), then end the job's wait."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.inbox.put_nowait([httpd.ClientGone()])


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
        access_log: bool = True,
        web: bool = True,
        engine: Engine | None = None,
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
        # another engine of the same interface: gpt2cli.ray_serve's, on Ray Serve replicas
        self.engine = engine or Engine(model, max_batch, max_queue)
        model.tokenizer.decode(model.tokenizer.encode("warm"))  # lazy tables built before threads
        self.socket = httpd.listen(host, port)
        bound_host, bound_port = self.socket.getsockname()[:2]
        local_only = ipaddress.ip_address(bound_host).is_loopback
        self.app = App(self.engine, aliases, folder, api_key, local_only=local_only, web=web)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self.access_log = access_log

    def run(self) -> None:
        """Serve until Ctrl-C, SIGTERM or SIGHUP, then stop cleanly and return."""
        self.engine.start()
        try:
            app = self.app.starlette()
            httpd.run(
                httpd.access_log(app, _log) if self.access_log else app, self.socket, self.stop
            )
        finally:
            self.engine.close()
            self.engine.join()
            self.socket.close()

    def stop(self) -> None:
        """Begin stopping: body reads end, new requests are refused and open ones end with a
        `server_shutdown` error (streams with a final error event and `[DONE]`)."""
        self.app.stopping.set()
        self.engine.close()
