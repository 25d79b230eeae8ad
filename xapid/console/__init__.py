"""The pool console: a single-page app served by xapid itself, and its two endpoints.

``server.py`` routes GET requests and the TCP form of ``POST /xapid/fault`` to this module;
everything else about the console lives here and in ``static/``:

- ``GET /``: a small page linking to the console.
- ``GET /console`` (and ``/console/``): the page; ``GET /console/static/<file>``: its scripts,
  styles and icon, shipped in the wheel (no build step, nothing fetched from elsewhere).
- ``GET /console/api/hardware``: the emulated hardware (per-host power, last stop reason,
  network group, statefile access, armed) and a log of power changes and faults, as a
  long-poll (:class:`~xapid.console.feed.HardwareFeed`).  Read-only, any valid session.
- ``POST /xapid/fault`` over TCP: the authenticated form of ``xapid fault`` (pool-admin only),
  carried out by the same :class:`~xapid.hw.faults.FaultService` as the Unix-socket form.

Both endpoints take the session ref in the ``X-Session-Id`` header (or, as xapi's HTTP
handlers do, a ``session_id`` query parameter; the console never puts it in a URL).
Every console response carries a strict Content-Security-Policy: only this origin's own
scripts, styles, images and connections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import structlog

from xapid.auth import short_ref
from xapid.errors import ApiError

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.server import Request, Response

log = structlog.get_logger("xapid.console")

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
HARDWARE_PATH = "/console/api/hardware"
SESSION_HEADER = "X-Session-Id"


def static_files() -> dict[str, Path]:
    """URL path -> file for everything under ``static/`` with a known content type (nothing else is served)."""
    files: dict[str, Path] = {}
    for path in sorted(STATIC.rglob("*")):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            files["/console/static/" + path.relative_to(STATIC).as_posix()] = path
    return files


PAGES = {"/": "root.html", "/console": "index.html", "/console/": "index.html"}


def respond(code: int, body: bytes, content_type: str) -> Response:
    """One complete response with the console's security headers."""
    from xapid.server import Response  # server.py imports this module: resolve at call time

    return Response(code, body, content_type, headers=[("cache-control", "no-cache"), *SECURITY_HEADERS])


def respond_json(code: int, doc: Any) -> Response:
    return respond(code, json.dumps(doc, separators=(",", ":")).encode(), "application/json")


def session_of(request: Request, query: dict[str, list[str]]) -> str:
    """The session ref a request carries (header first, then ``session_id``); "" when none."""
    return request.header(SESSION_HEADER.lower(), "") or (query.get("session_id") or [""])[0]


def check_session(daemon: Daemon, ref: str) -> str:
    """The session's role, after the same check every XenAPI call makes; ApiError SESSION_INVALID."""
    daemon.sessions.check(ref)
    return daemon.sessions.role(ref)


def serve_get(daemon: Daemon, request: Request) -> Response:
    """Answer a GET: a console page, its static files, the hardware feed, or 404."""
    if request.path in PAGES:
        return respond(200, (STATIC / PAGES[request.path]).read_bytes(), CONTENT_TYPES[".html"])
    if request.path == HARDWARE_PATH:
        return _hardware(daemon, request, parse_qs(request.query))
    path = static_files().get(request.path)
    if path is None:
        return respond(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
    return respond(200, path.read_bytes(), CONTENT_TYPES[path.suffix])


def _hardware(daemon: Daemon, request: Request, query: dict[str, list[str]]) -> Response:
    ref = session_of(request, query)
    try:
        role = check_session(daemon, ref)
    except ApiError as e:
        return respond_json(401, {"ok": False, "code": e.code, "error": " ".join(e.description)})
    try:
        timeout = float((query.get("timeout") or ["0"])[0])
    except ValueError:
        timeout = -1.0
    if not 0 <= timeout <= 3600:  # also refuses nan
        return respond_json(400, {"ok": False, "code": "INVALID_VALUE", "error": "timeout must be 0..3600 seconds"})
    doc = daemon.console.wait((query.get("since") or [""])[0], timeout)
    doc.update(ok=True, user=daemon.sessions.user(ref), role=role)
    return respond_json(200, doc)


def serve_fault(daemon: Daemon, request: Request) -> Response:
    """``POST /xapid/fault`` over TCP: a pool-admin session's fault, carried out as ``xapid fault`` does.

    401 for a missing or invalid session, 403 for any other role; the answer is always the
    JSON ``{"ok", "lines" | "error"}`` of the Unix-socket form.
    """
    ref = session_of(request, parse_qs(request.query))
    try:
        role = check_session(daemon, ref)
    except ApiError as e:
        return respond_json(401, {"ok": False, "code": e.code, "error": " ".join(e.description)})
    user = daemon.sessions.user(ref)
    if role != "pool-admin":
        log.warning("fault refused", user=user, role=role, session=short_ref(ref))
        return respond_json(403, {"ok": False, "code": "RBAC_PERMISSION_DENIED",
                                  "error": f"the {role} role cannot cause faults (pool-admin only)"})
    body = request.body
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return respond_json(200, {"ok": False, "error": f"malformed request: {e}"})
    if isinstance(doc, dict):
        doc["origin"] = f"http:{user}"
        body = json.dumps(doc).encode()
    answer = daemon.faults.handle(body)
    verb = doc.get("verb") if isinstance(doc, dict) else None
    log.info("fault", user=user, session=short_ref(ref), verb=verb, ok=answer.get("ok"))
    return respond_json(200, answer)
