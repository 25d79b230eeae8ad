"""HTTP serving: XML-RPC on every POST path but ``/jsonrpc``, JSON-RPC there (wire.md 1).

This is the one boundary where an :class:`~xapid.errors.ApiError` becomes a
``Failure`` envelope, and where any unexpected exception becomes
``INTERNAL_ERROR`` (logged with its traceback, never sent).  Malformed bodies
get xapi's HTTP 500; bodies over the size cap get 413.

How clients are kept from locking each other out:

* Connections waiting for their next request wait together in one event loop
  (:mod:`xapid.reactor`, ``epoll``; ``inline-reads``, on by default, for plain
  TCP and the Unix socket on the pool's address).  It serves, in its own thread
  and batched as ``epoll`` reports them, the requests that cannot block: whole,
  small XML-RPC/JSON-RPC calls of the generic reads (:data:`INLINE_IMPLS`),
  whose answer need not wait for the disk (else :class:`NotNow`), and of the
  generic field writes (:data:`INLINE_WRITE_IMPLS`), whose answers it holds
  until one disk write at the end of its batch covers them all (group commit
  without a thread hand-off).  Anything else (other writes, long polls, logins,
  HTTP handlers, large or trickled requests, a frozen host's) goes to a thread,
  as is every TLS connection and every one on a host's own address; a thread
  keeps its connection while the client goes on at once (:data:`STAY`), then
  gives it back.  Eight busy readers or writers thus cost no GIL hand-off per
  call between connection threads.
* A connection on a thread reads, runs and answers its requests there.  What is
  bounded is what others need: the calls running at once (``worker-threads``,
  the event loop's included), the logins (``login-threads``), the parked
  ``event.from``/``event.next`` calls (capped per user and overall by
  :mod:`xapid.events`), and the connections.  Reading a request, or waiting for
  one, holds none of these.
* Each request has a total time budget for its headers (``header-timeout``,
  from its first byte; a trickled byte does not reset it: every ``recv`` waits
  only for what is left) and for its body (``body-timeout``); the first request
  of a connection gets ``header-timeout`` from the accept, later ones
  ``keepalive-timeout`` of idleness; an answer must leave within
  ``body-timeout`` too.
* Connections are capped per listener (``max-connections``) and per client
  address (``max-connections-per-ip``).  At a cap, a connection that is not
  executing a call is closed to make room (:meth:`Conn.eviction_order`: ones
  that never completed a request first, the oldest first); only when every
  connection is busy is the newcomer refused with 503.
* Bodies are refused from their ``content-length`` before being read when over
  the cap (``max-request-size``: xapi's 300 KiB for RPC); large ones are decoded
  :data:`DECODERS` at a time, each bounded by :data:`xapid.wire.MAX_ITEMS`.
* Framing follows RFC 9112: ``transfer-encoding`` together with
  ``content-length``, several or malformed ``content-length`` values, folded or
  malformed header lines are 400 and close the connection; a chunked RPC body is
  refused with 411 (xapi reads request bodies by ``content-length`` only).  Routes
  with ``stream`` (the data handlers) read theirs as it arrives, chunked too, and a
  ``PUT`` there without ``content-length`` or ``transfer-encoding`` is read up to
  the client's close after a 200 head sent first, as xapi's handlers do
  (:class:`BodyReader`).
* :meth:`ApiServer.stop` answers every parked call, lets calls in progress
  finish for ``shutdown-timeout`` seconds at most, then closes everything.

Routing lives in one table per listener (:meth:`Listener.routes`): method,
path prefix (the longest wins), handler.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog

from xapid import console, unixsock
from xapid.auth import short_ref
from xapid.config import Config, ConfigError
from xapid.daemon import Daemon
from xapid.dispatch import Reply
from xapid.errors import ApiError
from xapid.hw.faults import PATH as FAULT_PATH
from xapid.logging import access_log
from xapid.logging import flush as flush_log
from xapid.reactor import Reactor
from xapid.wire import (
    BadRequest,
    decode_jsonrpc,
    decode_xmlrpc,
    json_failure,
    json_success,
    xml_bare,
    xml_failure,
    xml_success,
    xml_success_parts,
)

log = structlog.get_logger("xapid.server")

ERROR_PAGE = (
    "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; "
    "please wait a while and try again. If the problem persists, please contact your support "
    "representative.<h1> Additional information </h1>{detail}</body></html>"
)

# Calls that park until something changes: capped by xapid.events, not by worker-threads.
WAIT_METHODS = frozenset({"event.from", "event.next"})
# Calls that hash a password (and wait after a failure): login-threads, not worker-threads.
LOGIN_METHODS = frozenset({"session.login_with_password", "session.slave_login",
                           "session.slave_local_login_with_password", "session.change_password"})
DECODERS = 2  # large request bodies parsed at once: parsing memory is DECODERS x one body's worth
SMALL_BODY = 16 * 1024  # bodies this small are parsed without waiting for a decoder
ACCEPT_POLL = 0.2  # seconds between checks for a stop while accepting
MAX_HEADER_LINES = 100
LEADING_EMPTY_LINES = 4  # RFC 9112 2.2: ignore a few empty lines before a request line
LINGER = 1.0  # seconds an error answer waits for the client's unread bytes before closing
REASONS = {100: "Continue", 200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorised", 403: "Forbidden",
           404: "Not Found", 406: "Not Acceptable", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
           431: "Request Header Fields Too Large", 500: "Internal Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
_VERSIONS = {"HTTP/1.1": (1, 1), "HTTP/1.0": (1, 0)}
# Header names and methods already found to be tokens, and header names' lower case (bounded:
# clients choose the names).
_TOKENS: dict[str, bool] = {}
_LOWER: dict[str, str] = {}
_NAME_CACHE = 512


def _token(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method or a header name)."""
    known = _TOKENS.get(text)
    if known is None:
        known = _TOKEN.match(text) is not None
        if len(_TOKENS) < _NAME_CACHE:
            _TOKENS[text] = known
            if known:
                _LOWER[text] = text.lower()
    return known
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)  # buffers per sendmsg
UNTIL_CLOSE = -2  # _framing: a PUT body without framing, up to the client's close
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
    # 1: idle keep-alive connections wait in one event loop, which answers calls that cannot block
    # itself (see "Serving" above); 0: every connection keeps a thread of its own.
    inline_reads: int = 1

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """Read and check the limits; a value out of range is a :class:`ConfigError`."""
        values: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            value = config[key]
            if name == "inline_reads":
                if value not in (0, 1):
                    raise ConfigError(f"{key} must be 0 or 1, got {value}")
                values[name] = int(value)
                continue
            if not value > 0:
                raise ConfigError(f"{key} must be positive, got {value}")
            values[name] = int(value) if f.type == "int" else float(value)
        if values["max_header_size"] < 256:
            raise ConfigError("max-header-size must be at least 256 bytes")
        return cls(**values)


class Slots:
    """At most ``n`` holders at once (a bounded semaphore), taken with ``with``.

    The free slots are tokens in a :class:`queue.SimpleQueue`, whose get and put run in C under
    the GIL: unlike :class:`threading.BoundedSemaphore` no Python-level lock is held between
    bytecodes, so a thread switched out while taking a slot never makes the others queue behind it.
    """

    __slots__ = ("_free", "size")

    def __init__(self, n: int) -> None:
        self.size = n
        self._free: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(n):
            self._free.put(None)

    def __enter__(self) -> Slots:
        self._free.get()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._free.put(None)

    def free(self) -> int:
        """Slots not taken now."""
        return self._free.qsize()

    def try_enter(self) -> bool:
        """Take a slot if one is free now (then leave with :meth:`__exit__`); never waits."""
        try:
            self._free.get_nowait()
        except queue.Empty:
            return False
        return True


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
    query: str = ""  # the target's query string, without "?"
    reader: BodyReader | None = None  # the body as it arrives, on routes with ``stream`` (else None)
    answered: bool = False  # the answer's head is sent already (a body without framing)
    peer: str = ""  # the client's address ("local" on the Unix socket)
    endpoint: str | None = None  # the host whose own address received it (None: the pool's address)
    decoded: Any = None  # the RPC body already parsed (by the event loop, which hands the call on)

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
    # A body sent piece by piece after ``body`` (never held whole): with ``length`` (the total,
    # ``body`` included) as content-length, else chunked (HTTP/1.1) or up to the close (HTTP/1.0).
    # The server closes the iterator when done, also when the client leaves mid-way.
    stream: Iterable[bytes] | None = None
    length: int | None = None
    # The body as several buffers, sent with few system calls and never joined (``body`` is then
    # empty): a large reply spliced from cached pieces.
    parts: list[bytes] | None = None


Handler = Callable[["ApiServer", Request], Response]

# The usual extra headers of an answer (xapi's no-cache and CORS headers).
DEFAULT_HEADERS = (("cache-control", "no-cache, no-store"), ("Access-Control-Allow-Origin", "*"),
                   ("Access-Control-Allow-Headers", "X-Requested-With"))


def _head_around(status: int, content_type: str, close: bool) -> tuple[bytes, bytes]:
    """An answer's head with the default headers, cut where its content-length goes."""
    before = (f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\ncontent-type: {content_type}\r\n"
              "content-length: ")
    after = f"\r\nconnection: {'close' if close else 'keep-alive'}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in DEFAULT_HEADERS) + "\r\n"
    return before.encode("latin-1"), after.encode("latin-1")


_HEADS: dict[tuple[int, str, bool], tuple[bytes, bytes]] = {}


@dataclass(frozen=True)
class Route:
    """``method`` requests whose path starts with ``prefix`` (or equals it, if ``exact``)."""

    method: str
    prefix: str
    handler: Handler
    exact: bool = False
    body_cap: str = "max_request_size"  # the Limits field bounding its body
    # The handler reads the body itself through ``request.reader`` (chunked bodies accepted).
    stream: bool = False


class RouteTable(list[Route]):
    """A listener's routes, with the answers of :func:`find_route` remembered per method and path
    (up to :data:`ROUTE_CACHE` of them: paths are the client's choice)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        super().__init__(routes)
        self._found: dict[tuple[str, str], Route | None] = {}
        # The event loop's parses of whole heads it may serve itself (a pure function of the
        # head's bytes for this listener), up to HEAD_CACHE of them (then forgotten at once).
        self.heads: dict[bytes, tuple[Any, ...]] = {}

    def find(self, method: str, path: str) -> Route | None:
        key = (method, path)
        try:
            return self._found[key]
        except KeyError:
            pass
        route = find_route(self, method, path)
        if len(self._found) < ROUTE_CACHE:
            self._found[key] = route
        return route


ROUTE_CACHE = 1024
HEAD_CACHE = 256


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


class ClientGone(Exception):
    """A streamed request body stopped: the client left, went quiet too long, or broke the framing."""


class BodyReader:
    """A request body read as it arrives (routes with ``stream``): content-length or chunked, or,
    for a ``PUT`` with neither (``until_close``), everything up to the client's close.

    Each read waits at most ``idle`` seconds for the client (a transfer may take any time while it
    moves); a disconnect, a stall or bad chunk framing raises :class:`ClientGone`.  A body without
    framing is xapi's old protocol (xe's ``HttpPut`` of a pipe, the SDK's ``exportimport.py``): the
    client waits for the answer's head before it sends anything, so ``on_start`` (which sends it) is
    called before the first read.
    """

    def __init__(self, conn: Conn, length: int | None, idle: float, cap: int, until_close: bool = False,
                 on_start: Callable[[], bool] | None = None) -> None:
        self._conn = conn
        self._left = length  # bytes left in the body (content-length) or in the current chunk
        self._chunked = length is None and not until_close
        self._until_close = until_close
        self._on_start = on_start
        self._idle = idle
        self._cap = cap
        self.received = 0
        self.done = length == 0 and not until_close

    def read(self, n: int = 1 << 20) -> bytes:
        """Up to ``n`` bytes of the body (``n`` unless the body ends or the client stops; b"" at the end)."""
        if self.done:
            return b""
        if self._on_start is not None:
            start, self._on_start = self._on_start, None
            if not start():
                raise ClientGone("the client left before the answer's head")
        if self._until_close:
            return self._read_to_close(n)
        try:
            if self._chunked and not self._left:
                if not self._next_chunk():
                    return b""
            assert self._left is not None
            data = self._conn.read_upto(min(n, self._left), self._idle)
        except (Closed, Deadline) as e:
            raise ClientGone("the client stopped sending the body") from e
        except Refused as e:
            raise ClientGone(str(e)) from e
        self._left -= len(data)
        self.received += len(data)
        if self.received > self._cap:
            raise ClientGone(f"request body over {self._cap} bytes")
        if not self._left:
            if self._chunked:
                self._line()  # the CRLF after the chunk's data
            else:
                self.done = True
        return data

    def _read_to_close(self, n: int) -> bytes:
        try:
            data = self._conn.read_upto(n, self._idle)
        except Closed:
            self.done = True  # the close ends the body
            return b""
        except Deadline as e:
            raise ClientGone("the client stopped sending the body") from e
        self.received += len(data)
        if self.received > self._cap:
            raise ClientGone(f"request body over {self._cap} bytes")
        return data

    def _line(self) -> bytes:
        return self._conn.readline(time.monotonic() + self._idle, 4096).rstrip(b"\r\n")

    def _next_chunk(self) -> bool:
        """Read a chunk-size line; at the last chunk read the trailers and return False."""
        size_text = self._line().split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            raise ClientGone("malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            while self._line():  # trailers, up to the empty line
                pass
            self.done = True
            return False
        self._left = size
        return True

    def drain(self, limit: int) -> bool:
        """Read and drop the rest of the body, at most ``limit`` bytes; whether it ended."""
        try:
            while not self.done and limit > 0:
                limit -= len(self.read(min(limit, 1 << 20))) or 1
        except ClientGone:
            return False
        return self.done


# -- connections ---------------------------------------------------------------------------------------

IDLE, READING, BUSY = "idle", "reading", "busy"


class Closed(Exception):
    """The client closed the connection, or it was closed to make room or to stop."""


class Deadline(Exception):
    """A time budget of the current request ran out."""


def _send_some(sock: socket.socket, pending: list[Any], i: int) -> int:
    """One system call sending ``pending[i:]`` (``sendmsg`` of up to IOV_MAX pieces); the bytes sent."""
    return sock.send(pending[i]) if i == len(pending) - 1 else sock.sendmsg(pending[i:i + IOV_MAX])


def _advance(pending: list[Any], i: int, sent: int) -> int:
    """Account ``sent`` bytes from ``pending[i]`` on (a piece half sent keeps its rest); the index
    of the first piece not wholly sent."""
    while sent:
        first = len(pending[i])
        if sent < first:
            pending[i] = memoryview(pending[i])[sent:]
            break
        sent -= first
        i += 1
    return i


class Conn:
    """One client connection, what it is doing and how many requests it has had answered.

    A plain socket (TCP or Unix) is kept non-blocking: each receive or send is tried at once and
    ``poll`` waits only when the kernel has nothing (no timeout to set before each call, no
    ``poll`` before every call).  A TLS socket uses its timeout per call, as the ssl module expects.
    """

    __slots__ = ("sock", "ip", "state", "since", "served", "buf", "plain", "_rpoll", "_wpoll",
                 "fd", "idle_until", "heaped", "home")

    def __init__(self, sock: socket.socket, ip: str) -> None:
        self.sock = sock
        self.ip = ip
        self.state = IDLE
        self.since = time.monotonic()
        self.served = 0
        self.buf = bytearray()
        self.plain = not isinstance(sock, ssl.SSLSocket)
        self._rpoll: Any = None
        self._wpoll: Any = None
        # While parked in the event loop (xapid.reactor): descriptor, deadline, its queued deadline,
        # and (listener, registry, routes).
        self.fd = -1
        self.idle_until = 0.0
        self.heaped = False
        self.home: tuple[Listener, Registry, RouteTable] | None = None
        if self.plain:
            sock.setblocking(False)

    def set(self, state: str) -> None:
        self.state = state
        self.since = time.monotonic()

    def eviction_order(self) -> tuple[bool, bool, float]:
        """Connections that never completed a request go first (idle floods and slow headers look
        like that), then idle kept-alive ones, then half-received requests; the oldest first."""
        return self.served > 0, self.served > 0 and self.state != IDLE, self.since

    def cut(self) -> None:
        """End the connection from any thread: a ``recv`` blocked on it returns at once.

        Done on a duplicate of the descriptor, so a TLS object in use by the owning thread is
        never touched from here.
        """
        try:
            dup = socket.socket(fileno=os.dup(self.sock.fileno()))
        except OSError:
            return
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            dup.close()

    def use_tls(self, sock: ssl.SSLSocket) -> None:
        """From now on the connection is ``sock`` (the TLS layer over the plain socket)."""
        self.sock = sock
        self.plain = False

    # -- waiting on a plain socket ------------------------------------------------------------

    def _readable(self, deadline: float) -> bool:
        """Wait until the plain socket has something to read (data, the end, an error); False if
        ``deadline`` passed first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        poller = self._rpoll
        if poller is None:
            poller = self._rpoll = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(remaining * 1000.0))

    def _writable(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        poller = self._wpoll
        if poller is None:
            poller = self._wpoll = select.poll()
            poller.register(self.sock.fileno(), select.POLLOUT)
        return bool(poller.poll(remaining * 1000.0))

    # -- reading under a deadline (a total budget: each recv waits only for what is left) --------

    def _fill(self, deadline: float) -> None:
        scratch = bytearray(65536)
        got = self._recv_into(memoryview(scratch), deadline)
        self.buf += memoryview(scratch)[:got]

    def wait(self, deadline: float) -> bool:
        """Wait for the first byte of a request; False if the client left or the time ran out."""
        try:
            if not self.buf:
                if self.plain and not self._readable(deadline):  # idle: the request is seldom there yet
                    return False
                self._fill(deadline)
        except (Deadline, Closed):
            return False
        return True

    def readline(self, deadline: float, limit: int) -> bytes:
        """One line with its terminator; :class:`Refused` (431) past ``limit`` bytes."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise Refused(431, "request header line too long")
            start = len(self.buf)
            self._fill(deadline)

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        """Receive into ``view`` (at least one byte) by ``deadline``: :class:`Deadline`, or
        :class:`Closed` at the end of the stream or on an error."""
        if self.plain:
            while True:
                try:
                    got = self.sock.recv_into(view, len(view))
                    break
                except BlockingIOError:
                    if not self._readable(deadline):
                        raise Deadline from None
                except OSError:
                    raise Closed from None
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Deadline
            self.sock.settimeout(remaining)
            try:
                got = self.sock.recv_into(view, len(view))
            except TimeoutError:
                raise Deadline from None
            except (OSError, ssl.SSLError):
                raise Closed from None
        if not got:
            raise Closed
        return got

    def read(self, n: int, deadline: float) -> bytes:
        """Exactly ``n`` bytes (a body: received in place, so a large one is held once, not thrice)."""
        if len(self.buf) >= n:
            data = bytes(memoryview(self.buf)[:n])
            del self.buf[:n]
            return data
        out = bytearray(n)
        have = len(self.buf)
        out[:have] = self.buf
        self.buf.clear()
        view = memoryview(out)
        try:
            while have < n:
                have += self._recv_into(view[have:], deadline)
        finally:
            view.release()
        return out  # type: ignore[return-value]  # a bytearray: every reader of bodies takes one

    def read_upto(self, n: int, idle: float) -> bytes:
        """``n`` bytes, or fewer if the client closes or stays silent ``idle`` seconds after sending some
        (:class:`Closed` / :class:`Deadline` when it sent none).  Each receive waits ``idle`` afresh."""
        if len(self.buf) >= n:
            data = bytes(memoryview(self.buf)[:n])
            del self.buf[:n]
            return data
        out = bytearray(n)
        have = len(self.buf)
        out[:have] = self.buf
        self.buf.clear()
        view = memoryview(out)
        try:
            while have < n:
                have += self._recv_into(view[have:], time.monotonic() + idle)
        except (Closed, Deadline):
            if not have:
                raise
        finally:
            view.release()
        if have < n:
            del out[have:]
        return out  # type: ignore[return-value]  # a bytearray, as read() gives

    def send(self, data: bytes, seconds: float) -> bool:
        """Send everything within ``seconds`` in total; False if the client did not take it."""
        if not self.plain:
            try:
                self.sock.settimeout(seconds)
                self.sock.sendall(data)
            except (OSError, ssl.SSLError):
                return False
            return True
        return self.send_parts([data], seconds)

    def send_parts(self, parts: list[bytes], seconds: float) -> bool:
        """Send ``parts`` one after the other within ``seconds`` in total, with as few system calls
        as the kernel allows (``sendmsg`` of many buffers on a plain socket); False if the client
        did not take it."""
        if not self.plain:
            return self.send(b"".join(parts), seconds)
        sock = self.sock
        deadline = 0.0
        pending: list[Any] = [p for p in parts if p]
        i, n = 0, len(pending)  # pending[i] is the first piece not wholly sent
        while i < n:
            try:
                sent = _send_some(sock, pending, i)
            except BlockingIOError:
                sent = 0
            except OSError:
                return False
            i = _advance(pending, i, sent)
            if i < n:
                if not deadline:
                    deadline = time.monotonic() + seconds
                if not self._writable(deadline):
                    return False
        return True

    def send_now(self, parts: list[bytes]) -> list[Any] | None:
        """Send what the kernel takes now of ``parts`` (a plain socket), never waiting: the pieces
        left (empty: all sent), or None if the connection failed."""
        sock = self.sock
        pending: list[Any] = [p for p in parts if p]
        i, n = 0, len(pending)
        while i < n:
            try:
                sent = _send_some(sock, pending, i)
            except BlockingIOError:
                return pending[i:]
            except OSError:
                return None
            i = _advance(pending, i, sent)
        return []

    def linger(self, seconds: float) -> None:
        """Half-close and discard what the client still sends for a moment, so that it reads our
        last answer rather than a reset (closing with unread bytes makes the kernel send RST)."""
        try:
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while True:
                self.buf.clear()
                self._fill(deadline)
        except (Deadline, Closed, OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Registry:
    """The open connections of one listener, capped overall and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.conns: dict[Conn, None] = {}
        self.by_ip: dict[str, int] = {}
        self.evicted = 0
        self.refused = 0
        self.lock = threading.Lock()

    def admit(self, conn: Conn) -> bool:
        """Register ``conn``, cutting the first non-busy connection over a cap; False if all are busy."""
        with self.lock:
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
        self._remove(victim)
        victim.cut()
        self.evicted += 1
        return True

    def remove(self, conn: Conn) -> None:
        with self.lock:
            self._remove(conn)

    def _remove(self, conn: Conn) -> None:
        if self.conns.pop(conn, 0) is None:
            left = self.by_ip[conn.ip] - 1
            if left:
                self.by_ip[conn.ip] = left
            else:
                del self.by_ip[conn.ip]

    def cut(self, busy_too: bool) -> None:
        """Cut every connection not executing a call (``busy_too``: every connection)."""
        with self.lock:
            for conn in list(self.conns):
                if busy_too or conn.state != BUSY:
                    self._remove(conn)
                    conn.cut()

    def busy(self) -> int:
        with self.lock:
            return sum(1 for c in self.conns if c.state == BUSY)


# -- listeners ------------------------------------------------------------------------------------------


class Listener:
    """A bound socket the server accepts on, and the routes it serves.

    ``endpoint`` is the host whose own address this is (None: the pool's address or the Unix
    socket, served as the master).  A listener :meth:`ApiServer.withdraw` ends is ``closed``.
    """

    local = False
    tls: ssl.SSLContext | None = None
    endpoint: str | None = None

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.registry: Registry | None = None
        self.closed = False
        # Cleared while the host is frozen: nothing is accepted or answered until it is set again.
        self.running = threading.Event()
        self.running.set()

    def routes(self) -> list[Route]:
        from xapid.handlers import routes as handler_routes  # they import this module

        return [
            Route("POST", "/", ApiServer.xmlrpc),
            Route("POST", "/jsonrpc", ApiServer.jsonrpc),
            Route("OPTIONS", "/", ApiServer.options),
            Route("GET", "/", ApiServer.console_get),
            *handler_routes(),  # xapi's HTTP handlers (xapid/handlers)
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

    def routes(self) -> list[Route]:
        # The authenticated form of `xapid fault` (the console's); the Unix socket keeps its own.
        return [*super().routes(), Route("POST", FAULT_PATH, ApiServer.console_fault, exact=True)]


class HostServer(XapiServer):
    """One emulated host's own address (``host.address``): the API as that host's xapi serves it.

    No fault service here: faults go to the pool's address or the Unix socket.
    """

    def __init__(self, sock: socket.socket, host: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(sock, tls)
        self.endpoint = host

    def routes(self) -> list[Route]:
        return Listener.routes(self)


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
        address, dir_fd = unixsock.alias(path)  # a long state dir's path is bound through its folder
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
            if dir_fd is not None:
                os.close(dir_fd)
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


# -- the event loop's calls -------------------------------------------------------------------------------

# The generic implementations (xapid.generic) the event loop may run itself: they read memory only,
# never wait and cost little (get_all: while its class has at most INLINE_ALL objects; the other
# connections wait meanwhile).  get_all_records and the filters can cost much: they stay on
# threads, as do hand-written handlers, whose waits nothing here can see.
INLINE_IMPLS = frozenset({"get_record", "get_by_uuid", "get_all", "getter"})
# The generic writes of one object's field the event loop runs too: their transaction returns at its
# commit, and their answers wait for one disk write at the end of the loop's batch (_release_held).
INLINE_WRITE_IMPLS = frozenset({"setter", "map_add", "map_remove", "set_add", "set_remove"})
INLINE_ALL = 2000
WORKER_IDLE = 10.0  # seconds an idle connection thread waits for another connection to serve
STAY = 0.1  # seconds a connection served on a thread waits there for its next request
DECODED_BODY = 1024  # bytes: XML-RPC bodies up to this size have their parse remembered...
DECODED_CACHE = 1024  # ...this many of them (then forgotten at once)


def _HELD() -> None:  # noqa: N802 - a sentinel, never run
    """What :meth:`ApiServer._inline_request` returns for an answer held for the disk: the
    connection stays parked, and nothing it sent behind is served before the answer goes."""


class NotNow(Exception):
    """An inline call's answer must wait for the disk: a thread runs the call again (it read only)."""


def inline_methods(table: dict[str, Any]) -> dict[str, str | None]:
    """The wire names (canonical, without ``Async.``) the event loop answers itself, each with
    the class whose size bounds its cost (None: a single object's)."""
    out: dict[str, str | None] = {}
    for name, m in table.items():
        impl = m.impl
        if impl is None or m.removed or not m.session or getattr(impl, "__module__", "") != "xapid.generic":
            continue
        kind = impl.__qualname__.split(".", 1)[0]
        if kind in INLINE_IMPLS:
            out[name] = m.cls if kind == "get_all" else None
    return out


def inline_writes(table: dict[str, Any]) -> frozenset[str]:
    """The wire names of the generic field writes (:data:`INLINE_WRITE_IMPLS`) the event loop runs."""
    return frozenset(
        name for name, m in table.items()
        if m.impl is not None and not m.removed and m.session
        and getattr(m.impl, "__module__", "") == "xapid.generic"
        and m.impl.__qualname__.split(".", 1)[0] in INLINE_WRITE_IMPLS
    )


@dataclass
class _Held:
    """An answer of the event loop waiting for the disk: sent once generation ``target`` is durable."""

    target: int
    conn: Any
    response: Any
    failed: Callable[[list[str]], Any]  # the answer instead, if the disk write fails


def durable_now(store: Any) -> bool:
    """Whether :meth:`xapid.store.Store.wait_durable` would return at once (False when unsure:
    the call then goes to a thread, which waits)."""
    try:
        return store._broken is None and store._durable >= store.generation
    except AttributeError:
        return False


@dataclass
class _Rest:
    """The part of an answer the event loop could not send at once, for a thread to finish."""

    parts: list[Any]
    close: bool


# -- the server -------------------------------------------------------------------------------------------


class ApiServer:
    """Accepts on every listener, serves idle connections' plain reads in one event loop and
    everything else on a thread per busy connection; :meth:`call` is the error boundary."""

    def __init__(self, daemon: Daemon, limits: Limits) -> None:
        self.daemon = daemon
        self.limits = limits
        self.listeners: list[Listener] = []
        self.calls = Slots(limits.worker_threads)
        self.logins = Slots(limits.login_threads)
        self.decoders = Slots(DECODERS)
        daemon.events.limit_waiting(limits.max_waiting_calls, limits.max_waiting_calls_per_user)
        self.stopping = False
        self.started = False
        self._listeners_lock = threading.Lock()
        self._accepting: list[threading.Thread] = []
        self._last_warning = 0.0
        self._reactor: Reactor | None = None
        self._inline: dict[str, str | None] = {}
        self._inline_writes: frozenset[str] = frozenset()
        self._held: list[_Held] = []  # the event loop's answers waiting for the disk (_release_held)
        self._scratch = bytearray(65536)  # the event loop's receive buffer
        self._decoded: dict[bytes, tuple[str, tuple[str, ...]]] = {}  # the event loop's (_decode_xml)
        self._jobs: queue.SimpleQueue[tuple[Conn, Any]] = queue.SimpleQueue()
        self._idle_workers = 0
        self._pool_lock = threading.Lock()
        self.threads_started = 0  # connection threads started so far (the loop answers without one)

    # -- life cycle -------------------------------------------------------------------------------

    def serve(self, listener: Listener) -> None:
        """Add a listener (before :meth:`start`)."""
        self.listeners.append(listener)

    def start(self) -> None:
        """Start accepting on every listener."""
        self.started = True
        if self.limits.inline_reads:
            self._inline = inline_methods(self.daemon.dispatcher.table)
            self._inline_writes = inline_writes(self.daemon.dispatcher.table)
            self._reactor = Reactor(self._ready, self._end, after=self._release_held)
            self._reactor.start()
        for listener in self.listeners:
            self._start_accepting(listener)

    def _start_accepting(self, listener: Listener) -> None:
        lim = self.limits
        per_ip = lim.max_connections if listener.local else lim.max_connections_per_ip
        listener.registry = Registry(lim.max_connections, per_ip)
        listener.sock.settimeout(ACCEPT_POLL)
        t = threading.Thread(target=self._accept, args=(listener, RouteTable(listener.routes())),
                             name=f"accept-{len(self._accepting)}", daemon=True)
        self._accepting.append(t)
        t.start()

    def add(self, listener: Listener) -> None:
        """Serve one more listener now (a host's address coming back when the host boots)."""
        with self._listeners_lock:
            if self.stopping:
                listener.close()
                return
            self.listeners.append(listener)
            if self.started:
                self._start_accepting(listener)

    def withdraw(self, listener: Listener) -> None:
        """Stop serving ``listener`` at once, as a machine losing power: its socket is closed (new
        connections are refused) and every connection it holds is cut, busy or not, unanswered."""
        with self._listeners_lock:
            if listener in self.listeners:
                self.listeners.remove(listener)
        listener.closed = True
        listener.running.set()  # a frozen host's waiting threads wake up to find it gone
        try:
            # Stop listening now: a bare close leaves the socket listening while accept() holds it.
            listener.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        if listener.registry is not None:
            listener.registry.cut(busy_too=True)

    def stop(self) -> None:
        """Stop serving, in at most ``shutdown-timeout`` seconds plus about one whatever clients hold.

        Parked calls are answered at once (:meth:`xapid.events.Events.shutdown`), idle and
        half-received connections cut, calls in progress given ``shutdown-timeout`` to answer;
        what is left then is cut unanswered.  Every answer sent while stopping says
        ``connection: close``.
        """
        with self._listeners_lock:
            self.stopping = True
        self.daemon.events.shutdown()
        for listener in self.listeners:
            listener.running.set()
        for t in self._accepting:
            t.join(ACCEPT_POLL + 1.0)
        registries = [lst.registry for lst in self.listeners if lst.registry is not None]
        for reg in registries:
            reg.cut(busy_too=False)
        deadline = time.monotonic() + self.limits.shutdown_timeout
        while any(reg.conns for reg in registries) and time.monotonic() < deadline:
            time.sleep(0.02)
        for reg in registries:
            reg.cut(busy_too=True)
        if self._reactor is not None:
            for conn in self._reactor.close():
                self._end(conn)
        for listener in self.listeners:
            listener.close()
        flush_log()  # the lines of the last calls

    def _accept(self, listener: Listener, routes: list[Route]) -> None:
        registry = listener.registry
        assert registry is not None
        while not self.stopping and not listener.closed:
            if not listener.running.is_set():
                listener.running.wait(ACCEPT_POLL)  # frozen: connections wait in the backlog
                continue
            try:
                sock, peer = listener.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.stopping or listener.closed:
                    return
                log.warning("accept failed", error=str(e))  # out of descriptors, say: try again soon
                time.sleep(ACCEPT_POLL)
                continue
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle/delayed-ACK stall
            conn = Conn(sock, ip)
            if self.stopping or listener.closed or not registry.admit(conn):
                self._warn_limits(registry, ip)
                self._refuse(sock)
                continue
            if self._reactor is not None and listener.tls is None and listener.endpoint is None:
                # Its first request is awaited with the others, from the accept (header-timeout).
                conn.home = (listener, registry, routes)
                conn.fd = sock.fileno()
                conn.idle_until = conn.since + self.limits.header_timeout
                if not self._reactor.park(conn):
                    self._end(conn)
                continue
            with self._pool_lock:
                self.threads_started += 1  # before the start: the thread may answer before this one runs on
            try:
                threading.Thread(target=self._connection, args=(listener, registry, routes, conn),
                                 name=f"conn-{ip}", daemon=True).start()
            except RuntimeError:  # cannot start a thread: refuse like a full server
                with self._pool_lock:
                    self.threads_started -= 1
                registry.remove(conn)
                self._refuse(sock)

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        """503 without waiting for the client (it may not read it: best effort), then close."""
        try:
            sock.setblocking(False)
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 20\r\n"
                      b"connection: close\r\n\r\ntoo many connections")
        except OSError:
            pass
        sock.close()

    def _warn_limits(self, registry: Registry, ip: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:  # at most one line per 10 s under a flood
            self._last_warning = now
            log.warning("connection refused: every connection is busy", client=ip,
                        connections=len(registry.conns), refused=registry.refused, evicted=registry.evicted)

    # -- one connection -------------------------------------------------------------------------

    def _connection(self, listener: Listener, registry: Registry, routes: list[Route], conn: Conn,
                    first: Any = None) -> None:
        """Serve ``conn`` until it ends or, with the event loop, until it waits for its next
        request (it is then parked there).  ``first``: what the event loop began, a request it
        read (with its route) or the rest of an answer (:class:`_Rest`)."""
        lim = self.limits
        parked = False
        try:
            if listener.closed:  # withdrawn while this connection was being admitted
                return
            if conn.home is not None:  # from the event loop: the deadline it was waiting with
                idle_until = conn.idle_until
            else:
                if listener.tls is not None and not self._handshake(listener.tls, conn):
                    return
                idle_until = conn.since + lim.header_timeout  # the first request: counted from the accept (as xapi)
            if isinstance(first, _Rest):
                if not conn.send_parts(first.parts, lim.body_timeout) or first.close:
                    return
                conn.served += 1
                idle_until = time.monotonic() + lim.keepalive_timeout
                first = None
                parked = self._linger_or_park(conn, idle_until)
                if parked:
                    return
            while not self.stopping:
                if first is not None:  # a request the loop already read
                    (request, route), first = first, None
                else:
                    conn.set(IDLE)
                    if not conn.wait(idle_until):
                        break
                    conn.set(READING)
                    try:
                        request, route, length = self._read_head(conn, listener, routes)
                        request.peer = conn.ip
                        if route is not None and route.stream and length == UNTIL_CLOSE:
                            request.reader = BodyReader(conn, None, lim.body_timeout, getattr(lim, route.body_cap),
                                                        until_close=True,
                                                        on_start=lambda r=request: self._early_head(conn, r))
                        elif route is not None and route.stream:
                            self._expect(conn, request, length)
                            request.reader = BodyReader(conn, None if length < 0 else length, lim.body_timeout,
                                                        getattr(lim, route.body_cap))
                        else:
                            request.body = self._read_body(conn, request, length)
                    except Refused as e:
                        self._answer(conn, Response(e.status, str(e).encode(), close=True))
                        conn.linger(LINGER)
                        break
                conn.set(BUSY)
                if self._serve(conn, listener, request, route):
                    break
                idle_until = time.monotonic() + lim.keepalive_timeout
                parked = self._linger_or_park(conn, idle_until)
                if parked:
                    return
        except (Closed, Deadline, ClientGone):
            pass
        except Exception:  # noqa: BLE001 - one connection's failure must not reach anything else
            log.exception("unexpected exception serving a connection")
        finally:
            if not parked:
                registry.remove(conn)
                conn.close()

    def _serve(self, conn: Conn, listener: Listener, request: Request, route: Route | None) -> bool:
        """Run and answer one request read whole (or streamed); True if the connection ends."""
        while not listener.running.is_set():  # a frozen host answers when it thaws
            listener.running.wait(ACCEPT_POLL)
        if listener.closed:
            return True
        if route is None:
            response = Response(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
        else:
            response = route.handler(self, request)
        if request.answered:  # the head went out before the body (BodyReader.on_start)
            self._discard(response)
            return True
        if request.method == "HEAD":
            response.body, response.parts = b"", None
            self._discard(response)
        response.close = response.close or request.close or self.stopping
        if request.reader is not None and not request.reader.done:
            response.close = True  # the unread rest of a streamed body cannot be skipped safely
        if not self._answer(conn, response, request.version) or response.close:
            return True
        conn.served += 1
        return False

    # -- the event loop (xapid.reactor): idle connections, and the calls that cannot block ----------

    def _linger_or_park(self, conn: Conn, idle_until: float) -> bool:
        """After an answer on a thread: keep the connection on it while its client goes on at
        once (up to :data:`STAY`), else give it to the event loop; True if it was parked there
        (the thread must leave it alone), False to go on serving it here."""
        if conn.home is None or conn.buf or self.stopping or self._reactor is None:
            return False
        conn.set(IDLE)
        # A client calling back to back (writes, say) keeps its thread: handing each request over
        # would cost a wake-up of the loop and one of a thread where one wake-up does.
        if conn._readable(min(idle_until, time.monotonic() + STAY)):
            return False
        conn.idle_until = idle_until
        return not self.stopping and self._reactor.park(conn)

    def _end(self, conn: Conn) -> None:
        """Close a connection the event loop held."""
        home = conn.home
        if home is not None:
            home[1].remove(conn)
        conn.close()

    def _submit(self, conn: Conn, first: Any = None) -> None:
        """Serve ``conn`` on a thread: an idle one of the pool, else a new one."""
        job = (conn, first)
        with self._pool_lock:
            if self._idle_workers:
                self._idle_workers -= 1
                self._jobs.put(job)
                return
        with self._pool_lock:
            self.threads_started += 1  # before the start: the thread may answer before this one runs on
        try:
            threading.Thread(target=self._worker, args=(job,), name=f"conn-{conn.ip}", daemon=True).start()
        except RuntimeError:  # cannot start a thread: the connection ends
            with self._pool_lock:
                self.threads_started -= 1
            self._end(conn)

    def _worker(self, job: tuple[Conn, Any]) -> None:
        while True:
            conn, first = job
            home = conn.home
            assert home is not None
            self._connection(home[0], home[1], home[2], conn, first)
            with self._pool_lock:
                self._idle_workers += 1
            try:
                job = self._jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._pool_lock:
                    try:
                        job = self._jobs.get_nowait()  # given to this thread as it timed out
                    except queue.Empty:
                        self._idle_workers -= 1
                        return

    def _ready(self, conn: Conn) -> Callable[[], None] | None:
        """The event loop's callback: ``conn`` has input.  Serve what can be served here; None
        to keep the connection parked, or what takes it elsewhere (a thread, or the close)."""
        try:
            got = conn.sock.recv_into(self._scratch)
        except BlockingIOError:
            return None
        except OSError:
            got = 0
        if not got:
            return lambda: self._end(conn)
        conn.buf += memoryview(self._scratch)[:got]
        while True:
            then = self._inline_request(conn)
            if then is _HELD:
                return None  # parked still; what it sent behind waits for the answer (_release_held)
            if then is not None or not conn.buf:
                return then

    def _decode_xml(self, body: bytes) -> tuple[str, list[Any]]:
        """:func:`decode_xmlrpc`, remembered for small bodies whose parameters are all strings
        (clients repeat their reads: the same session and refs, byte for byte)."""
        known = self._decoded.get(body)
        if known is not None:
            return known[0], list(known[1])
        method, params = decode_xmlrpc(body)
        if len(body) <= DECODED_BODY and all(type(p) is str for p in params):
            if len(self._decoded) >= DECODED_CACHE:
                self._decoded.clear()
            self._decoded[body] = (method, tuple(params))
        return method, params

    def _servable_head(self, head: bytes, listener: Listener, routes: RouteTable) -> tuple[Any, ...] | None:
        """The parse of a whole head (the bytes before its empty line) if the event loop may serve
        its request: a well-formed small XML-RPC or JSON-RPC POST by ``content-length``.  None
        otherwise (a thread reads it again, refusing what must be refused)."""
        breaks = head.count(b"\r\n")
        if (head[0] in (10, 13) or breaks >= MAX_HEADER_LINES or head.count(b"\r") != breaks
                or head.count(b"\n") != breaks or b"\0" in head):
            return None
        try:
            request, route, length = self._parse_head(head.decode("latin-1").split("\r\n"), listener, routes)
        except Refused:
            return None
        if (route is None or route.stream or request.method != "POST" or not 0 <= length < SMALL_BODY
                or "expect" in request.headers):
            return None
        xml = route.handler is ApiServer.xmlrpc
        if not xml and route.handler is not ApiServer.jsonrpc:
            return None
        return (request.method, request.path, request.version, request.headers, request.close, request.query,
                route, length, xml)

    def _inline_request(self, conn: Conn) -> Callable[[], None] | None:
        """Answer the buffered request here if it is whole, small, and a call :data:`INLINE_IMPLS`
        serves; else what hands it to a thread (already read, when it got that far)."""
        listener, _registry, routes = conn.home  # type: ignore[misc]
        lim = self.limits
        if self.stopping or listener.closed or not listener.running.is_set() or listener.endpoint is not None:
            return lambda: self._submit(conn)  # a host's address may wait on its local database
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end <= 0 or end + 4 > lim.max_header_size:
            return lambda: self._submit(conn)
        head = bytes(buf[:end])
        known = routes.heads.get(head)
        if known is None:
            known = self._servable_head(head, listener, routes)
            if known is None:
                return lambda: self._submit(conn)  # the thread's reader answers it (refusals too)
            if len(routes.heads) >= HEAD_CACHE:
                routes.heads.clear()  # a client varying its heads: start again with the current ones
            routes.heads[head] = known
        method, path, version, headers, close, query, route, length, xml = known
        total = end + 4 + length
        if len(buf) < total:
            return lambda: self._submit(conn)  # the body is still coming: read on a thread
        request = Request(method, path, version, headers, bytes(buf[end + 4:total]), close, listener.local, query,
                          peer=conn.ip, endpoint=listener.endpoint)
        del buf[:total]
        first = (request, route)
        try:
            decoded = self._decode_xml(request.body) if xml else decode_jsonrpc(request.body)
        except Exception:  # noqa: BLE001 - the handler parses it again and answers what is wrong
            return lambda: self._submit(conn, first)
        request.decoded = decoded
        name = decoded[0] if xml else decoded.method
        sized = self._inline.get(name, "")
        write = sized == "" and name in self._inline_writes
        if write and not self._store_free():
            return lambda: self._submit(conn, first)  # a long transaction elsewhere: wait on a thread
        if ((not write and (sized == "" or (sized is not None and self.daemon.store.count(sized) > INLINE_ALL)))
                or not self.calls.try_enter()):
            return lambda: self._submit(conn, first)
        conn.set(BUSY)
        try:
            response = (self._xmlrpc_call(request, decoded[0], decoded[1], inline=True, defer=write) if xml
                        else self._jsonrpc_call(request, decoded, inline=True, defer=write))
        except NotNow:
            return lambda: self._submit(conn, first)
        finally:
            self.calls.__exit__()
        response.close = response.close or request.close or self.stopping
        if write and not durable_now(self.daemon.store):
            failed = ((lambda e: Response(200, xml_failure(e), "text/xml")) if xml
                      else (lambda e, c=decoded: Response(200, json_failure(c, e), "application/json")))
            self._held.append(_Held(self.daemon.store.generation, conn, response, failed))
            return _HELD
        return self._answer_inline(conn, response)

    def _store_free(self) -> bool:
        """Whether no other thread holds the store's lock now (then the loop's write will not wait
        long for it; a holder doing slow work must not hold up every parked connection)."""
        lock = self.daemon.store.lock
        if not lock.acquire(blocking=False):
            return False
        lock.release()
        return True

    def _answer_inline(self, conn: Conn, response: Response) -> Callable[[], None] | None:
        """Send an answer of the event loop; None if the connection stays parked, else what takes
        it elsewhere (a thread finishing the send, or the close)."""
        rest = conn.send_now(self._wire(response))
        if rest is None:
            return lambda: self._end(conn)
        if rest:
            return lambda: self._submit(conn, _Rest(rest, response.close))
        if response.close:
            return lambda: self._end(conn)
        conn.served += 1
        conn.set(IDLE)
        conn.idle_until = conn.since + self.limits.keepalive_timeout
        return None

    # -- answers that wait for the disk (the generic field writes the event loop ran) --------------

    def _release_held(self) -> None:
        """After a batch of the event loop: one disk write for every answer the batch held (so
        concurrent writers share it), then send them (their failure instead if the write failed);
        their connections stay parked, unless a request they sent behind is already read (a
        thread serves it) or the answer ends them."""
        if not self._held:
            return
        held, self._held = self._held, []
        error: list[str] | None = None
        try:
            self.daemon.store.wait_durable(max(h.target for h in held))
        except ApiError as e:
            error = e.description
        except Exception as e:  # noqa: BLE001 - the boundary: the held answers get an INTERNAL_ERROR
            log.exception("unexpected exception writing held answers' changes")
            error = ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]
        reactor = self._reactor
        assert reactor is not None
        for h in held:
            conn = h.conn
            response = h.response if error is None else h.failed(error)
            response.close = h.response.close
            then = self._answer_inline(conn, response)  # it stayed parked: no epoll_wait came between
            if then is None and conn.buf:
                then = lambda c=conn: self._submit(c)  # noqa: E731 - a request sent behind it, already read
            if then is not None and reactor.detach(conn):
                then()

    def _handshake(self, tls: ssl.SSLContext, conn: Conn) -> bool:
        """TLS handshake within ``header-timeout`` in total (a trickled handshake does not extend it)."""
        try:
            sock = tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError):
            return False
        conn.use_tls(sock)
        sock.setblocking(False)
        deadline = conn.since + self.limits.header_timeout
        try:
            while True:
                try:
                    sock.do_handshake()
                    return True
                except ssl.SSLWantReadError:
                    wait = ([sock], [])
                except ssl.SSLWantWriteError:
                    wait = ([], [sock])
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(select.select(*wait, [], remaining)[:2]):
                    return False
        except (OSError, ssl.SSLError):
            return False
        finally:
            sock.setblocking(True)

    def _read_head(self, conn: Conn, listener: Listener, routes: list[Route]) -> tuple[Request, Route | None, int]:
        """Read and check request line and headers within ``header-timeout`` (a total budget)."""
        lim = self.limits
        lines = self._whole_head(conn)
        if lines is not None:
            return self._parse_head(lines, listener, routes)
        deadline = time.monotonic() + lim.header_timeout
        lines: list[str] = []
        size = 0
        empty = 0
        try:
            while True:
                raw = conn.readline(deadline, lim.max_header_size)
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
        except Deadline:
            raise Refused(408, f"request headers not received within {lim.header_timeout:g} s") from None
        return self._parse_head(lines, listener, routes)

    def _whole_head(self, conn: Conn) -> list[str] | None:
        """The head's lines when the buffer holds all of it in the plain form (CRLF line ends, no
        bare CR, LF or NUL, no leading empty line, within the size and line caps); None otherwise,
        and :meth:`_read_head` reads it line by line, refusing what must be refused."""
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end <= 0 or end + 4 > self.limits.max_header_size or buf[0] in (10, 13):
            return None
        head = bytes(buf[:end])
        breaks = head.count(b"\r\n")
        if breaks >= MAX_HEADER_LINES or head.count(b"\r") != breaks or head.count(b"\n") != breaks or b"\0" in head:
            return None
        del buf[:end + 4]
        return head.decode("latin-1").split("\r\n")

    def _parse_head(self, lines: list[str], listener: Listener,
                    routes: list[Route]) -> tuple[Request, Route | None, int]:
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _token(parts[0]) or not parts[1]:
            raise Refused(400, "malformed request line")
        method, target, version_text = parts
        version = _VERSIONS.get(version_text)
        if version is None:
            m = _VERSION.match(version_text)
            if not m:
                raise Refused(400, "malformed HTTP version")
            version = (int(m.group(1)), int(m.group(2)))
        if version[0] != 1:
            raise Refused(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers: dict[str, list[str]] = {}
        for i in range(1, len(lines)):
            line = lines[i]
            if line[:1] in (" ", "\t"):
                raise Refused(400, "obsolete line folding in a header")  # RFC 9112 5.2
            name, sep, value = line.partition(":")
            if not sep or not _token(name):
                raise Refused(400, "malformed header line")  # RFC 9112 5.1: no space before the colon
            key = _LOWER.get(name) or name.lower()
            values = headers.get(key)
            if values is None:
                headers[key] = [value.strip(" \t")]
            else:
                values.append(value.strip(" \t"))
        host = headers.get("host")
        if (host is not None and len(host) > 1) or (host is None and version >= (1, 1)):
            raise Refused(400, "an HTTP/1.1 request needs exactly one host header")  # RFC 9112 3.2
        connection = headers.get("connection")
        if connection is None:
            close = version < (1, 1)
        else:
            tokens = {t.strip().lower() for v in connection for t in v.split(",")}
            close = "keep-alive" not in tokens if version < (1, 1) else "close" in tokens
        if "?" in target or "#" in target or "://" in target:
            path = target
            if "://" in target:  # absolute form
                path = "/" + target.split("://", 1)[1].partition("/")[2]
            path, _, query = path.split("#", 1)[0].partition("?")
            path = path or "/"
        else:
            path, query = target, ""
        request = Request(method, path, version, headers, close=close, local=listener.local, query=query,
                          endpoint=listener.endpoint)
        route = routes.find(method, path) if isinstance(routes, RouteTable) else find_route(routes, method, path)
        return request, route, self._framing(request, route)

    def _early_head(self, conn: Conn, request: Request) -> bool:
        """xapi's answer to a PUT without framing, sent before its body is read: 200, ``task-id``,
        then the connection ends with the body (the outcome is in the task)."""
        request.answered = True
        task = parse_qs(request.query).get("task_id", [""])[0]
        head = ("HTTP/1.1 200 OK\r\nconnection: close\r\ncache-control: no-cache, no-store\r\n"
                "content-type: application/octet-stream\r\n"
                + (f"task-id: {task}\r\n" if _TOKEN.match(task.replace(":", "")) else "") + "\r\n")
        return conn.send(head.encode("latin-1"), self.limits.body_timeout)

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
            if route is not None and route.stream:
                return -1  # chunked, read by the handler through request.reader
            raise Refused(411, "chunked request bodies are not accepted: send content-length")
        if cl is None:
            if request.method == "POST":
                raise Refused(411, "content-length required")
            if request.method == "PUT" and route is not None and route.stream:
                return UNTIL_CLOSE  # xapi's handlers read such a body to the close
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

    def _expect(self, conn: Conn, request: Request, length: int) -> None:
        """Answer ``expect: 100-continue`` (417 for any other expectation)."""
        expect = request.header("expect")
        if expect:
            if expect.lower() != "100-continue" or request.version < (1, 1):
                raise Refused(417, f"unsupported expectation {expect[:40]!r}")
            if length and not conn.buf and not conn.send(b"HTTP/1.1 100 Continue\r\n\r\n", self.limits.body_timeout):
                raise Closed

    def _read_body(self, conn: Conn, request: Request, length: int) -> bytes:
        self._expect(conn, request, length)
        if not length:
            return b""
        try:
            return conn.read(length, time.monotonic() + self.limits.body_timeout)
        except Deadline:
            raise Refused(408, f"request body not received within {self.limits.body_timeout:g} s") from None

    @staticmethod
    def _discard(response: Response) -> None:
        """Drop a streamed body unsent, letting its producer clean up."""
        stream, response.stream, response.length = response.stream, None, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    def _answer(self, conn: Conn, response: Response, version: tuple[int, int] = (1, 1)) -> bool:
        """Send ``response`` within ``body-timeout`` (a stream: each piece within it); False if the
        client did not take it."""
        if response.stream is not None:
            return self._answer_stream(conn, response, version)
        data = self._wire(response)
        if len(data) == 1:
            return conn.send(data[0], self.limits.body_timeout)
        return conn.send_parts(data, self.limits.body_timeout)

    @staticmethod
    def _wire(response: Response) -> list[bytes]:
        """The bytes of an answer without a stream: head and body, as one buffer when small."""
        body = response.body
        length = len(body) if response.parts is None else sum(len(p) for p in response.parts)
        if response.headers is None:
            key = (response.status, response.content_type, response.close)
            around = _HEADS.get(key)
            if around is None:
                around = _head_around(*key)
                if len(_HEADS) < 64:
                    _HEADS[key] = around
            head = b"%b%d%b" % (around[0], length, around[1])
        else:
            status = response.status
            lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
                     f"content-type: {response.content_type}", f"content-length: {length}",
                     f"connection: {'close' if response.close else 'keep-alive'}"]
            lines.extend(f"{k}: {v}" for k, v in response.headers)
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if response.parts is not None:
            return [head, *response.parts]
        if len(body) < 65536:  # one segment for the usual small answer: one copy, one send
            return [head + body]
        return [head, body]

    def _answer_stream(self, conn: Conn, response: Response, version: tuple[int, int]) -> bool:
        stream = response.stream
        assert stream is not None
        length = response.length
        chunked = length is None and version >= (1, 1)
        if length is None and not chunked:
            response.close = True  # HTTP/1.0: the body ends with the connection
        head = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
                f"content-type: {response.content_type}",
                "transfer-encoding: chunked" if chunked else f"content-length: {length}" if length is not None
                else "", f"connection: {'close' if response.close else 'keep-alive'}"]
        extra = response.headers if response.headers is not None else [("cache-control", "no-cache, no-store")]
        head.extend(f"{k}: {v}" for k, v in extra)
        timeout = self.limits.body_timeout
        sent = 0
        pieces: Iterator[bytes] = iter(stream)
        try:
            first = ("\r\n".join(h for h in head if h) + "\r\n\r\n").encode("latin-1")
            if response.body:
                first += b"%x\r\n%b\r\n" % (len(response.body), response.body) if chunked else response.body
            if not conn.send(first, timeout):
                return False
            sent = len(response.body)
            for piece in pieces:
                if not piece:
                    continue
                data = b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece
                if not conn.send(data, timeout):
                    return False
                sent += len(piece)
            if chunked:
                return conn.send(b"0\r\n\r\n", timeout)
        except Exception:  # noqa: BLE001 - a producer's failure truncates the answer, nothing more
            log.exception("unexpected exception producing a streamed answer")
            return False
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        return length is None or sent == length

    # -- handlers ---------------------------------------------------------------------------------

    def slot(self, method: str) -> Slots | None:
        """What a call must hold while it runs, by its canonical name (None: parked calls, which
        xapid.events caps)."""
        m = self.daemon.dispatcher.resolve(method)
        name = m.name if m is not None else method
        if name in WAIT_METHODS:
            return None
        if name in LOGIN_METHODS:
            return self.logins
        return self.calls

    @staticmethod
    def bad(detail: str) -> Response:
        """xapi's answer to a body it cannot parse: HTTP 500 with an HTML page, then close."""
        body = ERROR_PAGE.format(detail=detail.replace("&", "&amp;").replace("<", "&lt;")).encode()
        return Response(500, body, "text/html", close=True)

    def decode(self, decoder: Callable[[bytes], Any], body: bytes) -> Any:
        """Parse a body: small ones at once, large ones :data:`DECODERS` at a time."""
        if len(body) < SMALL_BODY:
            return decoder(body)
        with self.decoders:
            return decoder(body)

    def run(self, method: str, work: Callable[[], Any]) -> Any:
        slot = self.slot(method)
        if slot is None:
            return work()
        with slot:
            return work()

    def xmlrpc(self, request: Request) -> Response:
        if request.decoded is not None:
            method, params = request.decoded
        else:
            try:
                method, params = self.decode(decode_xmlrpc, request.body)
            except BadRequest as e:
                return self.bad(str(e))
            except Exception as e:  # noqa: BLE001 - the boundary
                log.exception("unexpected exception parsing a request")
                return self.bad(type(e).__name__)
        return self._xmlrpc_call(request, method, params)

    def _xmlrpc_call(self, request: Request, method: str, params: list[Any], inline: bool = False,
                     defer: bool = False) -> Response:
        def work() -> bytes | list[bytes]:
            reply, error = self.call(method, params, request.local, request.endpoint, inline, defer)
            try:
                if error is None:
                    assert reply is not None
                    if not reply.bare:
                        parts = xml_success_parts(reply.value)
                        if parts is not None:
                            return parts
                    value = self.daemon.encoder.xml(reply.value, reply.type)
                    return xml_bare(value) if reply.bare else xml_success(value)
            except Exception as e:  # noqa: BLE001 - the boundary: an encoding bug is an INTERNAL_ERROR
                log.exception("unexpected exception encoding a result", method=method[:200])
                error = ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]
            return xml_failure(error)

        answer = work() if inline else self.run(method, work)
        if isinstance(answer, list):
            if len(answer) > 3:  # a large reply: sent from its pieces
                return Response(200, b"", "text/xml", parts=answer)
            answer = b"".join(answer)
        return Response(200, answer, "text/xml")

    def jsonrpc(self, request: Request) -> Response:
        if request.decoded is not None:
            call = request.decoded
        else:
            try:
                call = self.decode(decode_jsonrpc, request.body)
            except BadRequest as e:
                return self.bad(str(e))
            except Exception as e:  # noqa: BLE001 - the boundary
                log.exception("unexpected exception parsing a request")
                return self.bad(type(e).__name__)
        return self._jsonrpc_call(request, call)

    def _jsonrpc_call(self, request: Request, call: Any, inline: bool = False, defer: bool = False) -> Response:
        def work() -> bytes:
            reply, error = self.call(call.method, call.params, request.local, request.endpoint, inline, defer)
            try:
                if error is None:
                    assert reply is not None
                    return json_success(call, self.daemon.encoder.json(reply.value, reply.type))
            except Exception as e:  # noqa: BLE001 - the boundary: an encoding bug is an INTERNAL_ERROR
                log.exception("unexpected exception encoding a result", method=call.method[:200])
                error = ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]
            return json_failure(call, error)

        return Response(200, work() if inline else self.run(call.method, work), "application/json")

    def options(self, request: Request) -> Response:
        """CORS preflight (wire.md 1.1)."""
        requested = request.header("access-control-request-headers")
        return Response(200, b"", "text/plain", headers=[
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Headers", f"{requested}, X-Requested-With".lstrip(", ")),
            ("Access-Control-Allow-Methods", "PUT")])

    def console_get(self, request: Request) -> Response:
        """GET: the pool console's pages, files and hardware feed (xapid/console), else 404."""
        return console.serve_get(self.daemon, request)

    def console_fault(self, request: Request) -> Response:
        """``POST /xapid/fault`` over TCP: a pool-admin session's fault (xapid/console)."""
        with self.calls:
            return console.serve_fault(self.daemon, request)

    def fault(self, request: Request) -> Response:
        """``xapid fault`` requests (Unix socket only, see :class:`UnixXapiServer`)."""
        with self.calls:
            answer = self.daemon.faults.handle(request.body)
        return Response(200, json.dumps(answer).encode(), "application/json")

    # -- the call boundary --------------------------------------------------------------------------

    def call(self, method: str, params: list[Any], local: bool = False,
             endpoint: str | None = None, inline: bool = False,
             defer: bool = False) -> tuple[Reply | None, list[str] | None]:
        """Dispatch one call (``endpoint``: the host whose address received it); return (reply, None)
        or (None, ErrorDescription). Logs one line.

        ``inline``: the event loop runs it (a read without side effects); :class:`NotNow`, with
        nothing logged, if its answer would have to wait for the disk: a thread runs it again.
        ``defer``: it returns without waiting for the disk (its transactions too): the caller holds
        the answer back until the store's generation after the call is durable.
        """
        start = time.monotonic()
        session = params[0] if params and isinstance(params[0], str) and params[0].startswith("OpaqueRef:") else None
        store = self.daemon.store
        try:
            try:
                if defer:
                    with store.durability_deferred():
                        reply = self.daemon.dispatcher.dispatch(method, params, local=local, endpoint=endpoint)
                else:
                    reply = self.daemon.dispatcher.dispatch(method, params, local=local, endpoint=endpoint)
            finally:
                if defer:
                    pass  # the caller waits (ApiServer._release_held)
                elif inline and not durable_now(store):
                    raise NotNow
                else:
                    # Whatever the answer shows (even a failure) may have been read from changes other
                    # calls committed but have not yet written: it leaves once they are on disk.
                    store.wait_durable()
            result: tuple[Reply | None, list[str] | None] = (reply, None)
            code = "Success"
        except NotNow:
            raise
        except ApiError as e:
            result = (None, e.description)
            code = e.code
        except Exception as e:  # noqa: BLE001 - the boundary: nothing leaks as a traceback
            log.exception("unexpected exception", method=method[:200])
            result = (None, ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]])
            code = "INTERNAL_ERROR"
        name = method if len(method) < 200 else method[:200] + "..."
        user = self.daemon.sessions.user(session) if session else ""
        duration_ms = round((time.monotonic() - start) * 1000, 2)
        access = access_log()
        if access is not None:
            access.call(name, user, short_ref(session) if session else "", code, duration_ms)
        else:
            log.info("call", method=name, user=user, session=short_ref(session) if session else "", result=code,
                     duration_ms=duration_ms)
        return result

