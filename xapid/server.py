"""HTTP serving: XML-RPC on every POST path but ``/jsonrpc``, JSON-RPC there (wire.md 1).

This is the one boundary where an :class:`~xapid.errors.ApiError` becomes a
``Failure`` envelope, and where any unexpected exception becomes
``INTERNAL_ERROR`` (logged with its traceback, never sent).  Malformed bodies
get xapi's HTTP 500; bodies over the size cap get 413.
"""

from __future__ import annotations

import json
import os
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from xapid import console
from xapid.auth import short_ref
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # A connection idle or stalled this long (no bytes of a request arriving) is closed, so slow
    # clients cannot pin server threads.  Calls that block in the daemon (event.from) are unaffected.
    timeout = 60
    disable_nagle_algorithm = True
    server_version = "xapid"
    sys_version = ""
    server: ApiServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one structured line per call is logged instead

    def _send(self, code: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(code)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        want_close = close or self.headers.get("connection", "").lower() == "close"
        self.send_header("connection", "close" if want_close else "keep-alive")
        self.send_header("cache-control", "no-cache, no-store")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "X-Requested-With")
        self.end_headers()
        self.wfile.write(body)
        if want_close:
            self.close_connection = True

    def _bad(self, detail: str) -> None:
        body = ERROR_PAGE.format(detail=detail.replace("<", "&lt;")).encode()
        self._send(500, body, "text/html", close=True)

    def do_OPTIONS(self) -> None:  # noqa: N802 - stdlib naming
        self.send_response(200)
        requested = self.headers.get("Access-Control-Request-Headers", "")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", f"{requested}, X-Requested-With".lstrip(", "))
        self.send_header("Access-Control-Allow-Methods", "PUT")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if not console.serve_get(self, self.server.daemon):
            self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")

    def do_POST(self) -> None:  # noqa: N802
        cap = self.server.daemon.config["max-request-size"]
        try:
            length = int(self.headers.get("content-length", ""))
        except ValueError:
            self._send(411, b"content-length required", "text/plain", close=True)
            return
        if length < 0 or length > cap:
            self._send(413, b"request body too large", "text/plain", close=True)
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        if self.server.local and self.path == FAULT_PATH:
            self._send(200, json.dumps(self.server.daemon.faults.handle(body)).encode(), "application/json")
        elif console.is_fault_path(self.path):
            console.serve_fault(self, self.server.daemon, body)
        elif self.path.startswith("/jsonrpc"):
            self._jsonrpc(body)
        else:
            self._xmlrpc(body)

    def _xmlrpc(self, body: bytes) -> None:
        try:
            method, params = decode_xmlrpc(body)
        except BadRequest as e:
            self._bad(str(e))
            return
        reply, error = self.server.call(method, params)
        if error is not None:
            out = xml_failure(error)
        else:
            assert reply is not None
            value = self.server.daemon.encoder.xml(reply.value, reply.type)
            out = xml_bare(value) if reply.bare else xml_success(value)
        self._send(200, out, "text/xml")

    def _jsonrpc(self, body: bytes) -> None:
        try:
            call = decode_jsonrpc(body)
        except BadRequest as e:
            self._bad(str(e))
            return
        reply, error = self.server.call(call.method, call.params)
        if error is not None:
            out = json_failure(call, error)
        else:
            assert reply is not None
            out = json_success(call, self.server.daemon.encoder.json(reply.value, reply.type))
        self._send(200, out, "application/json")


class UnixHandler(Handler):
    disable_nagle_algorithm = False  # not a TCP socket


class ApiServer:
    """What the TCP and Unix-socket servers share: the daemon, the call boundary, draining."""

    daemon: Daemon
    local = False

    def _setup(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._inflight = 0
        self._cv = threading.Condition()
        self._slots = threading.BoundedSemaphore(int(daemon.config["worker-threads"]))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve each connection on its own thread, at most ``worker-threads`` at once.

        Beyond that, accepting waits for a free slot (back-pressure) instead of spawning without bound.
        """
        self._slots.acquire()
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._slots.release()

    def call(self, method: str, params: list[Any]) -> tuple[Reply | None, list[str] | None]:
        """Dispatch one call; return (reply, None) or (None, ErrorDescription). Logs one line."""
        start = time.monotonic()
        with self._cv:
            self._inflight += 1
        session = params[0] if params and isinstance(params[0], str) and params[0].startswith("OpaqueRef:") else None
        try:
            reply = self.daemon.dispatcher.dispatch(method, params, local=self.local)
            result: tuple[Reply | None, list[str] | None] = (reply, None)
            code = "Success"
        except ApiError as e:
            result = (None, e.description)
            code = e.code
        except Exception as e:  # noqa: BLE001 - the boundary: nothing leaks as a traceback
            log.exception("unexpected exception", method=method)
            result = (None, ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]])
            code = "INTERNAL_ERROR"
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()
        log.info("call", method=method if len(method) < 200 else method[:200] + "...",
                 user=self.daemon.sessions.user(session) if session else "",
                 session=short_ref(session) if session else "", result=code,
                 duration_ms=round((time.monotonic() - start) * 1000, 2))
        return result

    def drain(self, timeout: float) -> None:
        """Wait for in-flight calls to finish (used at shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._inflight and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())


class XapiServer(ApiServer, ThreadingHTTPServer):
    """HTTP (or HTTPS with ``tls``) on a TCP address."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], daemon: Daemon, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, Handler)
        self._setup(daemon)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)


class UnixXapiServer(ApiServer, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The local socket (xapi's ``/var/lib/xcp/xapi``): same protocol, pre-authenticated root.

    The socket is created owner-only (0600) because whoever can connect is root.
    """

    daemon_threads = True
    local = True

    def __init__(self, path: Path, daemon: Daemon) -> None:
        if path.exists() or path.is_symlink():
            path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), UnixHandler)
        finally:
            os.umask(old)
        self._setup(daemon)
        self.path = path

    def server_close(self) -> None:
        super().server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
