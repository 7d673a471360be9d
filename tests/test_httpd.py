"""`gpt2cli.httpd` on its own: the checks every request passes (on Starlette requests built
from ASGI scopes), the body read, and the uvicorn internals the module subclasses, pinned by
name and by behaviour (`httpd.run` serving a tiny app here, with a short headers deadline), so
that a uvicorn release that moves them fails here, loudly, and nowhere else."""

from __future__ import annotations

import ast
import asyncio
import inspect
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import httpx
import pytest
import uvicorn
import uvicorn.server
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2cli import httpd, openai_api
from gpt2cli.errors import STOP_SIGNALS
from gpt2cli.openai_api import APIError

TIMEOUT = 30.0
DEADLINE_S = 0.5  # HEADERS_TIMEOUT_S while httpd.run serves here


def request_of(
    headers: dict[str, str] | list[tuple[str, str]],
    receive: Callable[[], Any] | None = None,
) -> HTTPRequest:
    """A Starlette request with these headers (and body messages from `receive`)."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
    }
    return HTTPRequest(scope, receive) if receive is not None else HTTPRequest(scope)


def status_of(check: Callable[[HTTPRequest], None], request: HTTPRequest) -> APIError | None:
    try:
        check(request)
    except APIError as e:
        return e
    return None


# --- Host: loopback names only ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8000",
        "LocalHost.:8000",
        "a.b.localhost",
        "127.0.0.1",
        "127.255.255.254:1",
        "[::1]",
        "[::1]:8000",
        "[::ffff:127.0.0.1]",
        "localhost:",  # an empty port is no port
    ],
)
def test_a_loopback_host_passes(host: str):
    assert status_of(httpd.check_local_host, request_of({"Host": host})) is None


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost.example.com",
        "localhostx",
        "0.0.0.0",
        "10.0.0.1:8000",
        "[fe80::1]",
        "localhost:80x",
        "localhost:8000@evil.example",
        "[::1]:8000:1",
        "127.0.0.1:8000:1",
        "[::1",
        "",
    ],
)
def test_another_host_is_403_naming_it(host: str):
    error = status_of(httpd.check_local_host, request_of({"Host": host}))
    assert error is not None and error.status == 403 and error.code == "forbidden_host"
    assert error.param is None and "not to this computer" in error.message
    assert repr(host) in error.message


def test_a_request_without_host_passes_as_http_1_0_sends_it():
    assert status_of(httpd.check_local_host, request_of({})) is None


# --- Content-Type: JSON only --------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared",
    [
        "application/json",
        "Application/JSON",
        " application/json ; charset=utf-8",
        "application/problem+json",
        "application/vnd.api+json; ext=x",
    ],
)
def test_a_body_declared_json_passes(declared: str):
    request = request_of({"Content-Type": declared})
    assert status_of(httpd.check_content_type, request) is None


@pytest.mark.parametrize(
    "declared",
    [
        "text/plain",
        "text/plain; charset=application/json",
        "text/json",
        "application/json-seq",
        "application/jsonp",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "+json",
        None,
    ],
)
def test_a_body_not_declared_json_is_415_naming_what_it_was(declared: str | None):
    request = request_of({} if declared is None else {"Content-Type": declared})
    error = status_of(httpd.check_content_type, request)
    assert error is not None and error.status == 415 and error.code == "unsupported_media_type"
    assert "Content-Type: application/json" in error.message
    assert (repr(declared) if declared else "without a Content-Type") in error.message


# --- the body: size, time, stopping, disconnects -------------------------------------------------


def read(
    messages: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    *,
    stop_after: float | None = None,
    then: str = "wait",
) -> tuple[bytes | Exception, int]:
    """`read_body` over these receive messages, then (`then`) waiting for ever or a disconnect;
    the body or the error, and how many messages were read. `stop_after`: seconds after which
    the server starts stopping."""
    calls = 0

    async def main() -> bytes | Exception:
        stopping = asyncio.Event()
        pending = list(messages)

        async def receive() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if pending:
                return pending.pop(0)
            if then == "disconnect":
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()  # a client that sends nothing more
            raise AssertionError("unreachable")

        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stopping.set)
        request = request_of({"Content-Type": "application/json"} | (headers or {}), receive)
        try:
            return await httpd.read_body(request, stopping)
        except (APIError, httpd.ClientGone) as e:
            return e

    return asyncio.run(main()), calls


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_body_is_read_whole_from_its_chunks():
    got, _ = read([body(b'{"a":', True), body(b" 1}", True), body(b"")])
    assert got == b'{"a": 1}'


def test_a_body_over_the_limit_is_413_by_its_content_length_before_any_is_read():
    got, calls = read([body(b"{}")], {"Content-Length": str(openai_api.MAX_BODY + 1)})
    assert isinstance(got, APIError) and got.status == 413 and got.code == "request_too_large"
    assert calls == 0
    huge, calls = read([body(b"{}")], {"Content-Length": "9" * 40})  # no int() of 40 digits
    assert isinstance(huge, APIError) and huge.status == 413 and calls == 0


def test_a_body_over_the_limit_is_413_as_it_arrives_without_content_length():
    chunk = b"x" * (1 << 16)
    chunks = [body(chunk, True)] * (openai_api.MAX_BODY // len(chunk)) + [body(b"x", True)]
    got, calls = read(chunks)
    assert isinstance(got, APIError) and got.status == 413
    assert calls == len(chunks)  # refused at the first byte beyond, not at the end
    exact, _ = read([body(chunk, True)] * (openai_api.MAX_BODY // len(chunk)) + [body(b"")])
    assert isinstance(exact, bytes) and len(exact) == openai_api.MAX_BODY


def test_a_content_length_with_leading_zeros_is_its_value():
    got, _ = read([body(b"{}")], {"Content-Length": "0000000002"})
    assert got == b"{}"


def test_a_body_slower_than_the_body_timeout_is_408(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(httpd, "BODY_TIMEOUT_S", 0.2)
    started = time.monotonic()
    got, _ = read([body(b'{"prompt"', True)])
    assert isinstance(got, APIError) and got.status == 408 and got.code == "request_timeout"
    assert "0.2 s" in got.message and time.monotonic() - started < 5


def test_a_body_still_arriving_when_the_server_stops_is_503_server_shutdown():
    got, _ = read([body(b'{"prompt"', True)], stop_after=0.05)
    assert isinstance(got, APIError) and got.status == 503 and got.code == "server_shutdown"
    assert got.body() == httpd.shutting_down().body()


def test_a_client_that_disconnects_while_sending_its_body_is_gone():
    got, _ = read([body(b'{"prompt"', True)], then="disconnect")
    assert isinstance(got, httpd.ClientGone)


def test_a_body_not_declared_json_is_refused_before_it_is_read():
    async def main() -> tuple[APIError | None, int]:
        calls = 0

        async def receive() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            return body(b"{}")

        try:
            await httpd.read_body(
                request_of({"Content-Type": "text/plain"}, receive), asyncio.Event()
            )
        except APIError as e:
            return e, calls
        return None, calls

    error, calls = asyncio.run(main())
    assert error is not None and error.status == 415 and calls == 0


# --- quiet_when_answered --------------------------------------------------------------------------


def test_an_app_whose_reply_cannot_be_sent_is_quiet_and_any_other_failure_is_not():
    async def replying(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("a bug")

    async def closed(message: Any) -> None:  # uvicorn has answered this connection itself
        raise RuntimeError("Unexpected ASGI message 'http.response.start' sent")

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    asyncio.run(httpd.quiet_when_answered(replying)({"type": "http"}, gone, closed))
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(httpd.quiet_when_answered(failing)({"type": "http"}, gone, closed))


# --- the uvicorn internals httpd relies on ------------------------------------------------------


def _statements(function: Callable[..., Any]) -> list[str]:
    """A function's statements as source, without its docstring."""
    definition = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    assert isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef)
    body = definition.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(s) for s in body]


def test_uvicorns_internals_that_httpd_subclasses_are_still_there():
    """HeadersDeadline overrides H11Protocol.connection_made and data_received and uses its
    loop, conn, handle_events and keep-alive timer; _Server overrides uvicorn.Server's
    capture_signals and shutdown, which uvicorn must still call. If this fails, uvicorn has
    changed under httpd: read its new h11_impl.py and server.py, and update httpd to match."""
    why = "uvicorn changed under gpt2cli.httpd: "
    for name in ("connection_made", "data_received", "handle_events", "timeout_keep_alive_handler"):
        assert callable(getattr(H11Protocol, name, None)), why + f"H11Protocol.{name} is gone"
    assert list(inspect.signature(H11Protocol.connection_made).parameters) == [
        "self",
        "transport",
    ], why + "H11Protocol.connection_made(transport) changed"
    # HeadersDeadline.data_received is uvicorn's without its first statement (which ends the
    # keep-alive timer at the first byte): uvicorn's must still be exactly these three
    assert _statements(H11Protocol.data_received) == [
        "self._unset_keepalive_if_required()",
        "self.conn.receive_data(data)",
        "self.handle_events()",
    ], why + "H11Protocol.data_received changed: HeadersDeadline.data_received copies it"
    # the deadline ends when the headers are complete: uvicorn ends its timer on a request
    assert "self._unset_keepalive_if_required()" in inspect.getsource(H11Protocol.handle_events), (
        why + "H11Protocol.handle_events no longer ends the keep-alive timer on a request"
    )
    assert "self.timeout_keep_alive_task = self.loop.call_later(" in inspect.getsource(
        H11Protocol.on_response_complete
    ), why + "H11Protocol no longer arms timeout_keep_alive_task after a response"

    server = uvicorn.Server(uvicorn.Config(lambda scope, receive, send: None))
    signals = server.capture_signals()  # not entered: no handler is installed
    assert hasattr(signals, "__enter__") and hasattr(signals, "__exit__"), (
        why + "uvicorn.Server.capture_signals is no longer a context manager method"
    )
    assert "with self.capture_signals():" in inspect.getsource(uvicorn.Server.serve), (
        why + "uvicorn.Server.serve no longer enters self.capture_signals()"
    )
    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == [
        "self",
        "sig",
        "frame",
    ], why + "uvicorn.Server.handle_exit(sig, frame) changed"
    assert list(inspect.signature(uvicorn.Server.shutdown).parameters) == ["self", "sockets"], (
        why + "uvicorn.Server.shutdown(sockets) changed"
    )
    assert "await self.shutdown(sockets=sockets)" in inspect.getsource(uvicorn.server), (
        why + "uvicorn.Server no longer calls self.shutdown(sockets=sockets) to stop"
    )
    assert server.should_exit is False, why + "uvicorn.Server.should_exit is gone"


def test_httpd_run_serves_with_a_deadline_on_headers_and_stops_cleanly(
    monkeypatch: pytest.MonkeyPatch,
):
    """httpd.run as `gpt2 serve` runs it (in the main thread, which signals need), with a
    short headers deadline: a connection that sends nothing, or its headers a line at a time,
    is closed after it; one whose headers were whole in time is served however slow its body;
    an idle kept-alive connection is closed after it too. Stopped as a signal would stop it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("httpd.run installs signal handlers: it runs in the main thread")
    monkeypatch.setattr(httpd, "HEADERS_TIMEOUT_S", DEADLINE_S)
    servers: list[uvicorn.Server] = []
    made: list[httpd.HeadersDeadline] = []

    class Recorded(httpd._Server):
        def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
            super().__init__(config, on_stop)
            servers.append(self)

    connection_made = httpd.HeadersDeadline.connection_made

    def recording(self: httpd.HeadersDeadline, transport: asyncio.Transport) -> None:
        connection_made(self, transport)
        made.append(self)

    monkeypatch.setattr(httpd, "_Server", Recorded)
    monkeypatch.setattr(httpd.HeadersDeadline, "connection_made", recording)

    async def echo(request: HTTPRequest) -> Response:
        return JSONResponse({"bytes": len(await request.body())})

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/health", health)])
    sock = httpd.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stopped = threading.Event()
    found: dict[str, Any] = {}
    failure: list[BaseException] = []

    def closes_within(conn: socket.socket, seconds: float, feed: bytes = b"") -> float | None:
        """Seconds until the server closes `conn` (sending `feed` every 0.1 s meanwhile)."""
        started = time.monotonic()
        conn.settimeout(0.1)
        while time.monotonic() - started < seconds:
            try:
                if conn.recv(1024) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                if feed:
                    conn.sendall(feed)
        return None

    def response_of(conn: socket.socket) -> bytes:
        """What the server sent until its JSON body ended."""
        data = b""
        while not data.endswith(b"}"):
            chunk = conn.recv(1024)
            assert chunk, data
            data += chunk
        return data

    def probe() -> None:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
                assert client.get("/health").json() == {"status": "ok"}
                found["handler"] = signal.getsignal(signal.SIGTERM)  # while serving
                address = ("127.0.0.1", port)
                with socket.create_connection(address, timeout=TIMEOUT) as silent:
                    found["silent"] = closes_within(silent, 10 * DEADLINE_S)
                with socket.create_connection(address, timeout=TIMEOUT) as trickling:
                    trickling.sendall(b"GET /health HTTP/1.1\r\n")
                    found["trickling"] = closes_within(trickling, 10 * DEADLINE_S, b"X-Slow: 1\r\n")
                with socket.create_connection(address, timeout=TIMEOUT) as slow_body:
                    slow_body.sendall(
                        b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n"
                    )
                    time.sleep(2 * DEADLINE_S)  # the headers were whole: no deadline now
                    slow_body.sendall(b"{}")
                    found["slow_body"] = response_of(slow_body)
                    # the response sent, the next request's headers have the deadline again
                    found["kept_alive"] = closes_within(slow_body, 10 * DEADLINE_S)
                found["conn"], found["loop"] = made[0].conn, made[0].loop
                assert client.get("/health").status_code == 200  # it served others all along
        except BaseException as e:  # reported by the main thread
            failure.append(e)
        finally:
            deadline = time.monotonic() + TIMEOUT
            while not servers and time.monotonic() < deadline:
                time.sleep(0.01)
            for server in servers:
                server.should_exit = True  # what handle_exit does on a signal

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        httpd.run(app, sock, stopped.set)
    finally:
        thread.join(TIMEOUT)
        sock.close()
    if failure:
        raise failure[0]
    [server] = servers
    assert server.config.timeout_keep_alive == DEADLINE_S
    assert server.config.http is httpd.HeadersDeadline
    assert stopped.is_set()  # on_stop is called as stopping begins
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == handlers  # put back after
    assert getattr(found["handler"], "__func__", None) is uvicorn.Server.handle_exit
    for name in ("silent", "trickling", "kept_alive"):
        seconds = found[name]
        assert seconds is not None and 0.5 * DEADLINE_S < seconds < 6 * DEADLINE_S, (name, found)
    assert found["slow_body"].startswith(b"HTTP/1.1 200") and found["slow_body"].endswith(
        b'{"bytes":2}'
    )
    assert isinstance(found["conn"], h11.Connection)
    assert isinstance(found["loop"], asyncio.AbstractEventLoop)
