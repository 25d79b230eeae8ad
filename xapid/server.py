"""HTTP serving: XML-RPC on every POST path but ``/jsonrpc``, JSON-RPC there (wire.md 1).

This is the one boundary where an :class:`~xapid.errors.ApiError` becomes a
``Failure`` envelope, and where any unexpected exception becomes
``INTERNAL_ERROR`` (logged with its traceback, never sent).  Malformed bodies
get xapi's HTTP 500; bodies over the size cap get 413.

How clients are kept from locking each other out:

* One asyncio event loop owns every connection and reads requests itself.  A
  connection costs a file descriptor and a small buffer, never a thread, until
  its request is complete: slow or idle clients hold nothing others need.
* Each request has a total time budget for its headers (``header-timeout``,
  from its first byte; a trickled byte does not reset it) and for its body
  (``body-timeout``); the first request of a connection gets ``header-timeout``
  from the accept, later ones ``keepalive-timeout`` of idleness.
* Connections are capped per listener (``max-connections``) and per client
  address (``max-connections-per-ip``).  At a cap, a connection that is not
  executing a call is closed to make room (:meth:`Conn.eviction_order`: ones
  that never completed a request first, the oldest first); only when every
  connection is busy is the newcomer refused with 503.
* Complete calls run on lanes, each a fixed set of threads: ``worker-threads``
  for ordinary calls, ``login-threads`` for logins (a failed login waits
  before answering), and a lane for calls that park (``event.from``,
  ``event.next``), which :mod:`xapid.events` caps per user and overall.
* Bodies are refused from their ``content-length`` before being read when over
  the cap (``max-request-size``: xapi's 300 KiB for RPC), and decoded by
  :data:`DECODERS` threads at most, each bounded by :data:`xapid.wire.MAX_ITEMS`.
* Framing follows RFC 9112: ``transfer-encoding`` together with
  ``content-length``, several or malformed ``content-length`` values, folded or
  malformed header lines are 400 and close the connection; a chunked body is
  refused with 411 (xapi reads request bodies by ``content-length`` only).
* :meth:`ApiServer.stop` answers every parked call, lets calls in progress
  finish for ``shutdown-timeout`` seconds at most, then closes everything.

Routing lives in one table per listener (:meth:`Listener.routes`): method,
path prefix (the longest wins), handler.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from xapid.auth import short_ref
from xapid.config import Config, ConfigError
from xapid.daemon import Daemon
from xapid.dispatch import Reply
from xapid.errors import ApiError
from xapid.hw.faults import PATH as FAULT_PATH
from xapid.wire import (
    BadRequest,
    decode_jsonrpc,
    decode_xmlrpc,
    json_failure,
    json_success,
    xml_bare,
    xml_failure,
    xml_success,
)

log = structlog.get_logger("xapid.server")

ERROR_PAGE = (
    "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; "
    "please wait a while and try again. If the problem persists, please contact your support "
    "representative.<h1> Additional information </h1>{detail}</body></html>"
)

# Calls that park until something changes: they run on their own lane, capped by xapid.events.
WAIT_METHODS = frozenset({"event.from", "event.next"})
# Calls that hash a password (and wait after a failure): their own lane too.
LOGIN_METHODS = frozenset({"session.login_with_password", "session.slave_login",
                           "session.slave_local_login_with_password", "session.change_password"})
DECODERS = 2  # request bodies parsed at once: parsing memory is DECODERS x one body's worth
MAX_HEADER_LINES = 100
LEADING_EMPTY_LINES = 4  # RFC 9112 2.2: ignore a few empty lines before a request line
LINGER = 1.0  # seconds an error answer waits for the client's unread bytes before closing
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
           431: "Request Header Fields Too Large", 500: "Internal Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
_LENGTH = re.compile(r"[0-9]{1,19}\Z")


# -- limits -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The connection-side limits, from xapi.conf (README "Configuration")."""

    max_connections: int
    max_connections_per_ip: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_header_size: int
    max_request_size: int
    max_upload_size: int
    worker_threads: int
    login_threads: int
    max_waiting_calls: int
    max_waiting_calls_per_user: int
    shutdown_timeout: float

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """Read and check the limits; a value out of range is a :class:`ConfigError`."""
        values: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            value = config[key]
            if not value > 0:
                raise ConfigError(f"{key} must be positive, got {value}")
            values[name] = int(value) if f.type == "int" else float(value)
        if values["max_header_size"] < 256:
            raise ConfigError("max-header-size must be at least 256 bytes")
        return cls(**values)


# -- requests, responses, routes ----------------------------------------------------------------------


class Refused(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    version: tuple[int, int]
    headers: dict[str, list[str]]
    body: bytes = b""
    close: bool = False  # the answer ends the connection (asked for, or HTTP/1.0 by default)
    local: bool = False  # arrived on the Unix socket

    def header(self, name: str, default: str = "") -> str:
        values = self.headers.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    close: bool = False
    headers: list[tuple[str, str]] | None = None  # None: xapi's usual no-cache and CORS headers


Handler = Callable[["ApiServer", Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """``method`` requests whose path starts with ``prefix`` (or equals it, if ``exact``)."""

    method: str
    prefix: str
    handler: Handler
    exact: bool = False
    body_cap: str = "max_request_size"  # the Limits field bounding its body


def find_route(routes: list[Route], method: str, path: str) -> Route | None:
    """The route with the longest matching prefix (xapi's radix-tree lookup)."""
    best: Route | None = None
    for r in routes:
        if r.method != method:
            continue
        if (path == r.prefix) if r.exact else path.startswith(r.prefix):
            if best is None or len(r.prefix) > len(best.prefix):
                best = r
    return best


# -- lanes -------------------------------------------------------------------------------------------


class Lane:
    """A bounded set of daemon threads running blocking work for the event loop, in FIFO order.

    Threads start on demand up to ``threads``; they are daemon threads, so a call that never
    returns cannot keep the process from exiting.
    """

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue ``fn``; the future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._idle <= 0 and self._started < self.threads:
                self._started += 1
                self._idle += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True).start()
            self._idle -= 1
        self._queue.put((loop, fut, fn))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            loop, fut, fn = item
            try:
                result, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                result, error = None, e
            with self._lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this answer any more

    def close(self) -> None:
        with self._lock:
            started = self._started
        for _ in range(started):
            self._queue.put(None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


# -- connections ---------------------------------------------------------------------------------------

IDLE, READING, BUSY = "idle", "reading", "busy"


class Conn:
    """One client connection, what it is doing and how many requests it has had answered."""

    __slots__ = ("ip", "writer", "state", "since", "served")

    def __init__(self, ip: str, writer: asyncio.StreamWriter) -> None:
        self.ip = ip
        self.writer = writer
        self.state = IDLE
        self.since = time.monotonic()
        self.served = 0

    def eviction_order(self) -> tuple[bool, bool, float]:
        """Connections that never completed a request go first (idle floods and slow headers look
        like that), then idle kept-alive ones, then half-received requests; the oldest first."""
        return self.served > 0, self.served > 0 and self.state != IDLE, self.since

    def set(self, state: str) -> None:
        self.state = state
        self.since = time.monotonic()

    def abort(self) -> None:
        self.writer.transport.abort()


class Registry:
    """The open connections of one listener, capped overall and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.conns: dict[Conn, None] = {}
        self.by_ip: dict[str, int] = {}
        self.evicted = 0
        self.refused = 0

    def admit(self, conn: Conn) -> bool:
        """Register ``conn``, closing the oldest non-busy connection over a cap; False if all are busy."""
        if self.by_ip.get(conn.ip, 0) >= self.per_ip and not self._evict(conn.ip):
            self.refused += 1
            return False
        if len(self.conns) >= self.total and not self._evict(None):
            self.refused += 1
            return False
        self.conns[conn] = None
        self.by_ip[conn.ip] = self.by_ip.get(conn.ip, 0) + 1
        return True

    def _evict(self, ip: str | None) -> bool:
        victim = min((c for c in self.conns if c.state != BUSY and (ip is None or c.ip == ip)),
                     key=Conn.eviction_order, default=None)
        if victim is None:
            return False
        self.remove(victim)
        victim.abort()
        self.evicted += 1
        return True

    def remove(self, conn: Conn) -> None:
        if self.conns.pop(conn, 0) is None:
            left = self.by_ip[conn.ip] - 1
            if left:
                self.by_ip[conn.ip] = left
            else:
                del self.by_ip[conn.ip]

    def busy(self) -> int:
        return sum(1 for c in self.conns if c.state == BUSY)


# -- listeners ------------------------------------------------------------------------------------------


class Listener:
    """A bound socket the server accepts on, and the routes it serves."""

    local = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.registry: Registry | None = None

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/", ApiServer.xmlrpc),
            Route("POST", "/jsonrpc", ApiServer.jsonrpc),
            Route("OPTIONS", "/", ApiServer.options),
        ]

    def close(self) -> None:
        self.sock.close()


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: any free one); raises :class:`OSError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class XapiServer(Listener):
    """HTTP (or HTTPS with ``tls``) on a bound TCP socket (see :func:`bind_tcp`)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(sock)
        self.tls = tls

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port


class UnixXapiServer(Listener):
    """The local socket (xapi's ``/var/lib/xcp/xapi``): same protocol, pre-authenticated root,
    plus the fault service at ``POST /xapid/fault``.

    The socket is created owner-only (0600) because whoever can connect is root.
    """

    local = True

    def __init__(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(128)
        super().__init__(sock)
        self.path = path

    def routes(self) -> list[Route]:
        return [*super().routes(), Route("POST", FAULT_PATH, ApiServer.fault, exact=True)]

    def close(self) -> None:
        super().close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# -- the server -------------------------------------------------------------------------------------------


class ApiServer:
    """Serves every listener from one event loop thread; :meth:`call` is the error boundary."""

    def __init__(self, daemon: Daemon, limits: Limits) -> None:
        self.daemon = daemon
        self.limits = limits
        self.listeners: list[Listener] = []
        self.calls = Lane("call", limits.worker_threads)
        self.logins = Lane("login", limits.login_threads)
        # Parked calls are capped by xapid.events, which wakes the oldest to make room; the slack
        # lets a newcomer start (and so make that room) while every parked call holds a thread.
        self.waits = Lane("wait", limits.max_waiting_calls + 16)
        self.decoders = Lane("decode", DECODERS)
        daemon.events.limit_waiting(limits.max_waiting_calls, limits.max_waiting_calls_per_user)
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self.loop.run_forever, name="serve", daemon=True)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self._last_warning = 0.0

    # -- life cycle -------------------------------------------------------------------------------

    def serve(self, listener: Listener) -> None:
        """Add a listener (before :meth:`start`)."""
        self.listeners.append(listener)

    def start(self) -> None:
        """Start accepting on every listener."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        lim = self.limits
        for listener in self.listeners:
            per_ip = lim.max_connections if listener.local else lim.max_connections_per_ip
            registry = listener.registry = Registry(lim.max_connections, per_ip)
            routes = listener.routes()

            def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           listener: Listener = listener, registry: Registry = registry,
                           routes: list[Route] = routes) -> None:
                task = self.loop.create_task(self._connection(listener, registry, routes, reader, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            if isinstance(listener, XapiServer):
                server = await asyncio.start_server(
                    on_connect, sock=listener.sock, ssl=listener.tls, limit=lim.max_header_size + 16,
                    ssl_handshake_timeout=lim.header_timeout if listener.tls else None)
            else:
                server = await asyncio.start_unix_server(on_connect, sock=listener.sock,
                                                         limit=lim.max_header_size + 16)
            self._servers.append(server)

    def stop(self) -> None:
        """Stop serving, in at most ``shutdown-timeout`` seconds plus about one whatever clients hold.

        Parked calls are answered at once (:meth:`xapid.events.Events.shutdown`), idle and
        half-received connections closed, calls in progress given ``shutdown-timeout`` to answer;
        what is left then is closed unanswered.  Every answer sent while stopping says
        ``connection: close``.
        """
        self.daemon.events.shutdown()
        if self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            try:
                fut.result(self.limits.shutdown_timeout + 2.0)
            except Exception as e:  # noqa: BLE001 - stopping goes on regardless
                log.warning("shutdown did not complete cleanly", error=f"{type(e).__name__}: {e}")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(2.0)
        for lane in (self.calls, self.logins, self.waits, self.decoders):
            lane.close()
        for listener in self.listeners:
            listener.close()

    async def _shutdown(self) -> None:
        self.stopping = True
        for server in self._servers:
            server.close()
        registries = [lst.registry for lst in self.listeners if lst.registry is not None]
        for reg in registries:
            for conn in list(reg.conns):
                if conn.state != BUSY:
                    reg.remove(conn)
                    conn.abort()
        deadline = self.loop.time() + self.limits.shutdown_timeout
        while any(reg.conns for reg in registries) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for reg in registries:
            for conn in list(reg.conns):
                reg.remove(conn)
                conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    # -- one connection -------------------------------------------------------------------------

    async def _connection(self, listener: Listener, registry: Registry, routes: list[Route],
                          reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        conn = Conn(ip, writer)
        if self.stopping or not registry.admit(conn):
            self._warn_limits(registry, ip)
            await self._answer(writer, Response(503, b"too many connections", close=True), linger=reader)
            writer.transport.abort()
            return
        lim = self.limits
        idle_limit = lim.header_timeout  # the first request: counted from the accept (as xapi)
        try:
            while not self.stopping:
                conn.set(IDLE)
                try:
                    first = await asyncio.wait_for(reader.read(1), idle_limit)
                except TimeoutError:
                    break
                if not first:
                    break
                idle_limit = lim.keepalive_timeout
                conn.set(READING)
                try:
                    request, route, length = await self._read_head(reader, first, listener, routes)
                    request.body = await self._read_body(reader, writer, request, length)
                except Refused as e:
                    await self._answer(writer, Response(e.status, str(e).encode(), close=True), linger=reader)
                    break
                conn.set(BUSY)
                if route is None:
                    response = Response(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
                else:
                    response = await route.handler(self, request)
                if request.method == "HEAD":
                    response.body = b""
                close = response.close or request.close or self.stopping
                response.close = close
                if not await self._answer(writer, response) or close:
                    break
                conn.served += 1
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stopping
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the loop
            log.exception("unexpected exception serving a connection")
        finally:
            registry.remove(conn)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close after what was written has gone out (``abort`` would drop it), within ``body-timeout``."""
        if writer.transport.is_closing():
            writer.transport.abort()  # already closing: make sure the socket goes now
            return
        writer.close()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                await writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader, first: bytes, listener: Listener,
                         routes: list[Route]) -> tuple[Request, Route | None, int]:
        """Read and check request line and headers within ``header-timeout`` (a total budget)."""
        lim = self.limits
        try:
            async with asyncio.timeout(lim.header_timeout):
                lines: list[str] = []
                size = 0
                pending = first
                empty = 0
                while True:
                    try:
                        raw = pending + await reader.readuntil(b"\n") if pending != b"\n" else pending
                    except asyncio.LimitOverrunError:
                        raise Refused(431, "request header line too long") from None
                    pending = b""
                    size += len(raw)
                    if size > lim.max_header_size:
                        raise Refused(431, f"request headers over {lim.max_header_size} bytes")
                    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
                    if not lines and not line:
                        empty += 1
                        if empty > LEADING_EMPTY_LINES:
                            raise Refused(400, "no request line")
                        continue
                    if not line:
                        break
                    if len(lines) > MAX_HEADER_LINES:
                        raise Refused(431, f"more than {MAX_HEADER_LINES} header lines")
                    if b"\r" in line or b"\0" in line:
                        raise Refused(400, "bare CR or NUL in the request head")
                    lines.append(line.decode("latin-1"))
        except TimeoutError:
            raise Refused(408, f"request headers not received within {lim.header_timeout:g} s") from None
        return self._parse_head(lines, listener, routes)

    def _parse_head(self, lines: list[str], listener: Listener,
                    routes: list[Route]) -> tuple[Request, Route | None, int]:
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise Refused(400, "malformed request line")
        method, target, version_text = parts
        m = _VERSION.match(version_text)
        if not m:
            raise Refused(400, "malformed HTTP version")
        version = (int(m.group(1)), int(m.group(2)))
        if version[0] != 1:
            raise Refused(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            if line[:1] in (" ", "\t"):
                raise Refused(400, "obsolete line folding in a header")  # RFC 9112 5.2
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.match(name):
                raise Refused(400, "malformed header line")  # RFC 9112 5.1: no space before the colon
            headers.setdefault(name.lower(), []).append(value.strip(" \t"))
        if len(headers.get("host", ())) > 1 or (version >= (1, 1) and "host" not in headers):
            raise Refused(400, "an HTTP/1.1 request needs exactly one host header")  # RFC 9112 3.2
        tokens = {t.strip().lower() for v in headers.get("connection", ()) for t in v.split(",")}
        close = "keep-alive" not in tokens if version < (1, 1) else "close" in tokens
        path = target
        if "://" in target:  # absolute form
            path = "/" + target.split("://", 1)[1].partition("/")[2]
        path = path.split("?", 1)[0].split("#", 1)[0] or "/"
        request = Request(method, path, version, headers, close=close, local=listener.local)
        route = find_route(routes, method, path)
        return request, route, self._framing(request, route)

    def _framing(self, request: Request, route: Route | None) -> int:
        """The body length (RFC 9112 6); anything ambiguous is refused, so nothing can be smuggled."""
        te = request.headers.get("transfer-encoding")
        cl = request.headers.get("content-length")
        if te is not None:
            if cl is not None:
                raise Refused(400, "both transfer-encoding and content-length")
            if request.version < (1, 1):
                raise Refused(400, "transfer-encoding in an HTTP/1.0 request")
            codings = [c.strip().lower() for v in te for c in v.split(",")]
            if codings[-1] != "chunked":
                raise Refused(400, "transfer-encoding does not end in chunked")
            raise Refused(411, "chunked request bodies are not accepted: send content-length")
        if cl is None:
            if request.method == "POST":
                raise Refused(411, "content-length required")
            return 0
        if len(cl) > 1:
            raise Refused(400, "several content-length headers")
        if not _LENGTH.match(cl[0]):
            raise Refused(400, f"invalid content-length {cl[0][:40]!r}")
        length = int(cl[0])
        cap = getattr(self.limits, route.body_cap) if route is not None else self.limits.max_request_size
        if length > cap:
            raise Refused(413, f"request body too large (at most {cap} bytes)")
        return length

    async def _read_body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request,
                         length: int) -> bytes:
        expect = request.header("expect")
        if expect:
            if expect.lower() != "100-continue" or request.version < (1, 1):
                raise Refused(417, f"unsupported expectation {expect[:40]!r}")
            if length:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not length:
            return b""
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await reader.readexactly(length)
        except TimeoutError:
            raise Refused(408, f"request body not received within {self.limits.body_timeout:g} s") from None

    async def _answer(self, writer: asyncio.StreamWriter, response: Response,
                      linger: asyncio.StreamReader | None = None) -> bool:
        """Send ``response`` within ``body-timeout``; False if the client did not take it.

        With ``linger`` (the connection's reader), half-close and discard what the client still
        sends for a moment, so that it reads the answer rather than a reset (closing a socket with
        unread bytes makes the kernel send RST).
        """
        status = response.status
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
                f"content-type: {response.content_type}", f"content-length: {len(response.body)}",
                f"connection: {'close' if response.close else 'keep-alive'}"]
        extra = response.headers if response.headers is not None else [
            ("cache-control", "no-cache, no-store"), ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Headers", "X-Requested-With")]
        head.extend(f"{k}: {v}" for k, v in extra)
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            writer.write(response.body)
            async with asyncio.timeout(self.limits.body_timeout):
                await writer.drain()
        except (TimeoutError, OSError, ssl.SSLError, RuntimeError):
            return False
        if linger is not None:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
                async with asyncio.timeout(LINGER):
                    while await linger.read(65536):
                        pass
            except (TimeoutError, OSError, ssl.SSLError):
                pass
        return True

    @staticmethod
    def _loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What asyncio reports (a failed TLS handshake, a callback error): one log line, no traceback."""
        error = context.get("exception")
        log.warning("event loop", message=str(context.get("message", ""))[:200],
                    error=f"{type(error).__name__}: {error}"[:300] if error is not None else "")

    def _warn_limits(self, registry: Registry, ip: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:  # at most one line per 10 s under a flood
            self._last_warning = now
            log.warning("connection refused: every connection is busy", client=ip,
                        connections=len(registry.conns), refused=registry.refused, evicted=registry.evicted)

    # -- handlers ---------------------------------------------------------------------------------

    def lane(self, method: str) -> Lane:
        """The lane a call runs on, by its canonical name."""
        m = self.daemon.dispatcher.resolve(method)
        name = m.name if m is not None else method
        if name in WAIT_METHODS:
            return self.waits
        if name in LOGIN_METHODS:
            return self.logins
        return self.calls

    @staticmethod
    def bad(detail: str) -> Response:
        """xapi's answer to a body it cannot parse: HTTP 500 with an HTML page, then close."""
        body = ERROR_PAGE.format(detail=detail.replace("&", "&amp;").replace("<", "&lt;")).encode()
        return Response(500, body, "text/html", close=True)

    async def xmlrpc(self, request: Request) -> Response:
        try:
            method, params = await self.decoders.run(lambda: decode_xmlrpc(request.body))
        except BadRequest as e:
            return self.bad(str(e))
        except Exception as e:  # noqa: BLE001 - the boundary
            log.exception("unexpected exception parsing a request")
            return self.bad(type(e).__name__)

        def work() -> bytes:
            reply, error = self.call(method, params, request.local)
            try:
                if error is None:
                    assert reply is not None
                    value = self.daemon.encoder.xml(reply.value, reply.type)
                    return xml_bare(value) if reply.bare else xml_success(value)
            except Exception as e:  # noqa: BLE001 - the boundary: an encoding bug is an INTERNAL_ERROR
                log.exception("unexpected exception encoding a result", method=method[:200])
                error = ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]
            return xml_failure(error)

        return Response(200, await self.lane(method).run(work), "text/xml")

    async def jsonrpc(self, request: Request) -> Response:
        try:
            call = await self.decoders.run(lambda: decode_jsonrpc(request.body))
        except BadRequest as e:
            return self.bad(str(e))
        except Exception as e:  # noqa: BLE001 - the boundary
            log.exception("unexpected exception parsing a request")
            return self.bad(type(e).__name__)

        def work() -> bytes:
            reply, error = self.call(call.method, call.params, request.local)
            try:
                if error is None:
                    assert reply is not None
                    return json_success(call, self.daemon.encoder.json(reply.value, reply.type))
            except Exception as e:  # noqa: BLE001 - the boundary: an encoding bug is an INTERNAL_ERROR
                log.exception("unexpected exception encoding a result", method=call.method[:200])
                error = ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]
            return json_failure(call, error)

        return Response(200, await self.lane(call.method).run(work), "application/json")

    async def options(self, request: Request) -> Response:
        """CORS preflight (wire.md 1.1)."""
        requested = request.header("access-control-request-headers")
        return Response(200, b"", "text/plain", headers=[
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Headers", f"{requested}, X-Requested-With".lstrip(", ")),
            ("Access-Control-Allow-Methods", "PUT")])

    async def fault(self, request: Request) -> Response:
        """``xapid fault`` requests (Unix socket only, see :class:`UnixXapiServer`)."""
        answer = await self.calls.run(lambda: self.daemon.faults.handle(request.body))
        return Response(200, json.dumps(answer).encode(), "application/json")

    # -- the call boundary --------------------------------------------------------------------------

    def call(self, method: str, params: list[Any], local: bool = False) -> tuple[Reply | None, list[str] | None]:
        """Dispatch one call; return (reply, None) or (None, ErrorDescription). Logs one line."""
        start = time.monotonic()
        session = params[0] if params and isinstance(params[0], str) and params[0].startswith("OpaqueRef:") else None
        try:
            reply = self.daemon.dispatcher.dispatch(method, params, local=local)
            result: tuple[Reply | None, list[str] | None] = (reply, None)
            code = "Success"
        except ApiError as e:
            result = (None, e.description)
            code = e.code
        except Exception as e:  # noqa: BLE001 - the boundary: nothing leaks as a traceback
            log.exception("unexpected exception", method=method[:200])
            result = (None, ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]])
            code = "INTERNAL_ERROR"
        log.info("call", method=method if len(method) < 200 else method[:200] + "...",
                 user=self.daemon.sessions.user(session) if session else "",
                 session=short_ref(session) if session else "", result=code,
                 duration_ms=round((time.monotonic() - start) * 1000, 2))
        return result

