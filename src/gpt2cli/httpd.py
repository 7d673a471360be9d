"""The HTTP layer of `gpt2 serve`: uvicorn, and the checks every request passes first.

What a local server must refuse before any route runs: a request addressed to a name that is not
loopback (DNS rebinding), a body not declared JSON (a web page's simple request), a body over
1 MB or slower than BODY_TIMEOUT_S, headers slower than HEADERS_TIMEOUT_S. All the code that
knows uvicorn is here (`HeadersDeadline` and `_Server` subclass its classes; `run` serves), so a
uvicorn release that changes what they rely on breaks this module's tests and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import time
from collections.abc import Callable, Iterator

from gpt2cli import jsonfile, openai_api
from gpt2cli.errors import STOP_SIGNALS, GPT2Error, missing_extra
from gpt2cli.openai_api import APIError

try:
    import uvicorn
    from starlette.requests import ClientDisconnect
    from starlette.requests import Request as HTTPRequest
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError:
    raise missing_extra("serve", "gpt2 serve") from None

GRACE_S = 10  # seconds open connections get to finish once the server is stopping
BODY_TIMEOUT_S = 30.0  # seconds a client has to send its whole request body
HEADERS_TIMEOUT_S = 10  # seconds a connection has to send a request's headers, first or next


class ClientGone(Exception):
    """The client disconnected before its answer (while sending its body, or while a
    non-streamed request ran)."""


def shutting_down() -> APIError:
    """The error of a request cut off because the server is stopping."""
    return APIError(503, "The server is shutting down.", code="server_shutdown")


async def read_body(request: HTTPRequest, stopping: asyncio.Event) -> bytes:
    """The request body, read at most MAX_BODY bytes far whatever Content-Length says (413),
    within BODY_TIMEOUT_S (408: a client that trickles its body cannot hold a connection), and
    cut off with a 503 when the server starts stopping. A client that disconnects while sending
    it is gone: nothing is logged. A body declared as anything but JSON is refused first."""
    check_content_type(request)
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
            shutting_down()
            if stopping.is_set()
            else APIError(
                408,
                f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                code="request_timeout",
            )
        )
    return reading.result()


def check_local_host(request: HTTPRequest) -> None:
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


def check_content_type(request: HTTPRequest) -> None:
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
    declared = request.headers.get("content-length", "").lstrip("0")  # leading zeros: nothing
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
        raise ClientGone from None
    return bytes(body)


def quiet_when_answered(app: ASGIApp) -> ASGIApp:
    """`app`, quiet about a connection uvicorn has already answered itself (a malformed chunked
    body gets its 400 while a route is still running; the route's own reply then cannot be sent,
    which is no error of the server's)."""

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


def access_log(app: ASGIApp, log: Callable[[str], None]) -> ASGIApp:
    """`app`, logging one line per request once its response ends: client, method, path,
    status, what the route adds (`request.state.detail()`, e.g. its tokens) and the time taken.
    Controls in the path are escaped (a request line must not drive the server's terminal)."""
    from gpt2cli.output import escape_controls

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start, status = time.perf_counter(), 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-",)
            detail = scope.get("state", {}).get("detail")
            parts = [
                escape_controls(str(client[0])),
                scope["method"],
                escape_controls(scope["path"]),
                str(status or "-"),
                *([detail()] if detail is not None else []),
                f"{time.perf_counter() - start:.3f} s",
            ]
            log(" ".join(parts))

    return logged


async def _disconnected(receive: Receive) -> None:
    """Return once the ASGI server says the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Server(uvicorn.Server):
    """uvicorn, stopped by Ctrl-C, SIGTERM or SIGHUP without re-raising the signal afterwards
    (so the command exits 0), calling `on_stop` (which ends open requests) before it waits on
    connections."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our stop signals call `handle_exit` while serving; the previous handlers come back
        after (a signal that was ignored, as nohup ignores SIGHUP, stays ignored)."""
        previous = {
            s: signal.signal(s, self.handle_exit)
            for s in STOP_SIGNALS
            if signal.getsignal(s) is not signal.SIG_IGN
        }
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """`on_stop` (open streams get a final error event and `[DONE]`), then uvicorn's own
        shutdown: stop accepting, let connections finish."""
        self.on_stop()
        await super().shutdown(sockets)


class HeadersDeadline(H11Protocol):
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


def run(app: ASGIApp, sock: socket.socket, on_stop: Callable[[], None]) -> None:
    """Serve `app` on the listening socket until Ctrl-C, SIGTERM or SIGHUP; `on_stop` is called
    as stopping begins."""
    config = uvicorn.Config(
        quiet_when_answered(app),
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=HeadersDeadline,
        proxy_headers=False,  # the peer is who connected: X-Forwarded-For is any client's text
        timeout_keep_alive=HEADERS_TIMEOUT_S,
        timeout_graceful_shutdown=GRACE_S,
    )
    _Server(config, on_stop).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
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
