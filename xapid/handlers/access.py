"""Authentication, RBAC and task reporting shared by every HTTP handler, as xapi's ``xapi_http.ml``.

A handler is a function ``(access: Access) -> Response`` wrapped by :func:`route`, which makes the
:class:`~xapid.server.Route` and runs, before the handler, what xapi's ``assert_credentials_ok`` and
``with_context`` do:

* **Credentials** (``lookup_param_of_req``: a ``Cookie`` value first, then the query):
  ``session_id`` (a live session, used as it is); else HTTP basic auth, a login as
  ``session.login_with_password`` whose session is logged out after the request; on the Unix
  socket, a pre-authenticated local root session (also logged out after).  None of these, a bad
  session or a failed login: ``401 Unauthorised`` with ``WWW-Authenticate: Basic realm="<action>"``
  and xapi's HTML body (``Http_svr.response_unauthorised``).  An authorization header of another
  scheme: 500, as xapi's ``Failure "Unknown authorization header"``.
* **RBAC**: the session's role must hold ``http/<action>`` (the roles of ``Datamodel.http_actions``,
  :data:`ACTIONS`), else ``403 Forbidden`` with xapi's body (``response_forbidden``).
* **Tasks**: with ``task_id`` the request reports through that existing task (xapi's forwarded
  task): :meth:`Access.progress` moves its ``progress``, and when the handler is done the task ends
  ``success`` (with :meth:`Access.result`, if set) or ``failure`` with the error's ``error_info``.
  A refused request fails it too: ``SESSION_AUTHENTICATION_FAILED []`` for a 401,
  ``RBAC_PERMISSION_DENIED [http/<action>, message]`` for a 403.
* **Errors**: an :class:`~xapid.errors.ApiError` escaping the handler fails the task and answers
  xapi's HTTP 500 page (``Http_svr``'s generic error); any other exception is logged and becomes
  ``INTERNAL_ERROR`` the same way.  Nothing leaks as a traceback.

A streamed answer (``Response.stream``) is part of the request: the task ends and the temporary
session is logged out only when the stream is exhausted, fails, or the client goes away (then the
task fails with ``INTERNAL_ERROR ["client disconnected"]``).  A streamed request body
(``route(..., stream=True)``) is read through ``access.request.reader``; when the client stops
sending, its ``read`` raises :class:`~xapid.server.ClientGone`, which fails the task and ends the
connection.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import structlog

from xapid.api import Call
from xapid.auth import short_ref
from xapid.errors import ApiError
from xapid.handlers.locality import Redirect
from xapid.server import ERROR_PAGE, ClientGone, Request, Response, Route

if TYPE_CHECKING:
    from xapid.daemon import Daemon
    from xapid.schema import Type
    from xapid.server import ApiServer

log = structlog.get_logger("xapid.handlers")

# Roles of Datamodel_roles (highest first) and xapi's role sets for HTTP actions.
_ORDER = ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator", "read-only")


def roles_gte(role: str) -> tuple[str, ...]:
    """The roles at least as strong as ``role`` (``Datamodel_roles.roles_gte``)."""
    return _ORDER[: _ORDER.index(role) + 1]


R_POOL_ADMIN = roles_gte("pool-admin")
R_POOL_OP = roles_gte("pool-operator")
R_VM_POWER_ADMIN = roles_gte("vm-power-admin")
R_VM_ADMIN = roles_gte("vm-admin")
R_VM_OP = roles_gte("vm-operator")
R_READ_ONLY = roles_gte("read-only")

# action name -> (HTTP method, URI, roles): ocaml/idl/datamodel.ml ``http_actions`` (the ones xapid serves).
ACTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "get_rrd_updates": ("GET", "/rrd_updates", R_READ_ONLY),
    "get_host_rrd": ("GET", "/host_rrd", R_READ_ONLY),
    "get_host_rrds": ("GET", "/host_rrds", R_READ_ONLY),
    "get_vm_rrd": ("GET", "/vm_rrd", R_READ_ONLY),
    "get_vm_rrds": ("GET", "/vm_rrds", R_READ_ONLY),
    "get_sr_rrd": ("GET", "/sr_rrd", R_READ_ONLY),
    "put_import": ("PUT", "/import", R_VM_ADMIN),
    "put_import_metadata": ("PUT", "/import_metadata", R_VM_ADMIN),
    "put_import_raw_vdi": ("PUT", "/import_raw_vdi", R_VM_ADMIN),
    "get_export": ("GET", "/export", R_VM_ADMIN),
    "get_export_metadata": ("GET", "/export_metadata", R_VM_ADMIN),
    "get_export_raw_vdi": ("GET", "/export_raw_vdi", R_VM_ADMIN),
}

PERMISSION_PREFIX = "http/"  # Datamodel.rbac_http_permission_prefix
ORIGINATOR = "xapid-http"
UNAUTHORISED_BODY = (b"<html><body><h1>HTTP 401 unauthorised</h1>Please check your credentials and retry."
                     b"</body></html>")
FORBIDDEN_BODY = (b"<html><body><h1>HTTP 403 forbidden</h1>Access to the requested resource is forbidden."
                  b"</body></html>")
_ERROR_HEADERS = [("cache-control", "no-cache, no-store")]


# -- xapi's refusals -------------------------------------------------------------------------------


def unauthorised(realm: str) -> Response:
    """xapi's 401 (``Http_svr.response_unauthorised``): HTML, a basic-auth challenge, then close."""
    return Response(401, UNAUTHORISED_BODY, "text/html", close=True,
                    headers=[*_ERROR_HEADERS, ("WWW-Authenticate", f'Basic realm="{realm}"')])


def forbidden() -> Response:
    """xapi's 403 (``Http_svr.response_forbidden``)."""
    return Response(403, FORBIDDEN_BODY, "text/html", close=True, headers=list(_ERROR_HEADERS))


def internal_error(detail: str) -> Response:
    """xapi's 500 page (``Http_svr.response_internal_error``), for errors escaping a handler."""
    text = detail.replace("&", "&amp;").replace("<", "&lt;")
    return Response(500, ERROR_PAGE.format(detail=text).encode(), "text/html", close=True,
                    headers=list(_ERROR_HEADERS))


def bad_request(detail: str = "") -> Response:
    """xapi's 400 (``Http_svr.response_badrequest``)."""
    body = b"<html><body><h1>HTTP 400 bad request</h1>The HTTP request was malformed. Please correct and retry."
    if detail:
        body += b"<p>" + detail.replace("&", "&amp;").replace("<", "&lt;").encode() + b"</p>"
    return Response(400, body + b"</body></html>", "text/html", close=True, headers=list(_ERROR_HEADERS))


def not_found(detail: str = "") -> Response:
    """xapi's 404 (``Http_svr.response_missing``)."""
    return Response(404, (detail or "<html><body><h1>404 Not Found</h1></body></html>").encode(), "text/html",
                    headers=list(_ERROR_HEADERS))


class Refusal(Exception):
    """Raised by a handler (or :func:`authenticate`) to answer ``response`` and fail the task with ``error``."""

    def __init__(self, response: Response, error: list[str] | None = None) -> None:
        super().__init__(response.status)
        self.response = response
        self.error = error


# -- parameters ---------------------------------------------------------------------------------------


def cookies(request: Request) -> dict[str, str]:
    """The request's cookies (every ``Cookie`` header; the first value of a name wins)."""
    out: dict[str, str] = {}
    for header in request.headers.get("cookie", ()):
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in out:
                out[name] = value.strip()
    return out


def parameters(request: Request) -> dict[str, str]:
    """The request's parameters as xapi's ``lookup_param_of_req`` sees them: cookie first, then query."""
    params = {k: v[0] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
    params.update(cookies(request))
    return params


# -- the access object -----------------------------------------------------------------------------------


@dataclass
class Access:
    """An authenticated, authorised handler request: who asks, through which task, with which parameters."""

    daemon: Daemon
    server: ApiServer
    request: Request
    action: str
    session: str
    role: str
    user: str
    params: dict[str, str]
    task: str | None = None  # the existing task named by ``task_id`` (None: none was given)
    temporary: bool = False  # the session was made for this request and is logged out after it
    _result: str = field(default="", repr=False)

    def param(self, name: str, default: str | None = None) -> str | None:
        """A parameter (cookie, then query string), or ``default``."""
        return self.params.get(name, default)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query argument as xapi reads one (``true``/``false``, also ``1``/``yes``/``on``)."""
        value = self.params.get(name)
        if value is None:
            return default
        return value.strip().lower() in ("true", "1", "yes", "on")

    def call(self, method: str = "") -> Call:
        """A :class:`~xapid.api.Call` for API behaviour run on behalf of this request."""
        return Call(self.daemon, method or PERMISSION_PREFIX + self.action, self.session, task=self.task,
                    local=self.request.local, endpoint=getattr(self.request, "endpoint", None))

    def progress(self, fraction: float) -> None:
        """Move the task's ``progress`` (0..1; a no-op without ``task_id``)."""
        if self.task is not None:
            self.daemon.tasks.progress(self.task, fraction)

    def check_cancelled(self) -> None:
        """Raise ``TASK_CANCELLED [task]`` once the client cancelled the task (call between steps)."""
        if self.task is not None and self.daemon.tasks.cancelling(self.task):
            raise ApiError("TASK_CANCELLED", self.task)

    def result(self, value: Any, ty: Type) -> None:
        """The task's ``result`` when it succeeds (encoded as xapi does: an XML-RPC value fragment)."""
        self._result = self.daemon.encoder.xml(value, ty)

    # -- ending -----------------------------------------------------------------------------------------

    def succeed(self) -> None:
        if self.task is not None:
            self.daemon.tasks.finish(self.task, "success", self._result)

    def fail(self, error: list[str]) -> None:
        if self.task is not None:
            status = "cancelled" if error[:1] == ["TASK_CANCELLED"] else "failure"
            self.daemon.tasks.finish(self.task, status, "", [str(e) for e in error])

    def release(self) -> None:
        """Log out the session made for this request (xapi's ``must_logout``)."""
        if self.temporary:
            self.temporary = False
            try:
                self.daemon.sessions.logout(self.session)
            except Exception:  # noqa: BLE001 - logging out must not mask the answer
                log.exception("logging out a handler session failed")


def _fail_task(daemon: Daemon, task: str | None, error: list[str]) -> None:
    if task is not None and daemon.store.exists("task", task):
        daemon.tasks.finish(task, "failure", "", error)


def authenticate(server: ApiServer, request: Request, action: str) -> Access:
    """Check credentials and RBAC for ``action`` as xapi does; raise :class:`Refusal` with its answer."""
    daemon = server.daemon
    params = parameters(request)
    task = params.get("task_id") or None
    if task is not None and not daemon.store.exists("task", task):
        task = None  # xapi would fail to forward to it; nothing to report through
    roles = ACTIONS[action][2]
    ref = params.get("session_id")
    temporary = False
    if ref:
        try:
            daemon.sessions.check(ref)
        except ApiError:
            _fail_task(daemon, task, ["SESSION_AUTHENTICATION_FAILED"])
            raise Refusal(unauthorised(action)) from None
    elif request.local:
        ref = daemon.sessions.login("root", "", ORIGINATOR, local=True)
        temporary = True
    else:
        auth = request.header("authorization")
        scheme, _, blob = auth.partition(" ")
        if not auth:
            _fail_task(daemon, task, ["SESSION_AUTHENTICATION_FAILED"])
            raise Refusal(unauthorised(action))
        if scheme.lower() != "basic":
            error = ["INTERNAL_ERROR", f"Unknown authorization header: {auth[:40]}"]
            _fail_task(daemon, task, error)
            raise Refusal(internal_error(f"Failure(\"Unknown authorization header: {auth[:40]}\")"), error)
        try:
            uname, _, pwd = base64.b64decode(blob.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            _fail_task(daemon, task, ["SESSION_AUTHENTICATION_FAILED"])
            raise Refusal(unauthorised(action)) from None
        try:
            with server.logins:
                ref = daemon.sessions.login(uname, pwd, ORIGINATOR)
        except ApiError:
            _fail_task(daemon, task, ["SESSION_AUTHENTICATION_FAILED"])
            raise Refusal(unauthorised(action)) from None
        temporary = True
    role = daemon.sessions.role(ref)
    record = daemon.store.get("session", ref)
    superuser = bool(record and record["is_local_superuser"])
    if role not in roles and not superuser:
        permission = PERMISSION_PREFIX + action
        message = f"No permission in user session. (Roles with this permission: {', '.join(roles)})"
        _fail_task(daemon, task, ["RBAC_PERMISSION_DENIED", permission, message])
        log.info("handler refused", action=action, user=daemon.sessions.user(ref), role=role,
                 session=short_ref(ref))
        if temporary:
            daemon.sessions.logout(ref)
        raise Refusal(forbidden())
    return Access(daemon, server, request, action, ref, role, daemon.sessions.user(ref), params, task, temporary)


Body = Callable[[Access], Response]


def _error_of(e: BaseException) -> list[str]:
    if isinstance(e, ApiError):
        return list(e.description)
    if isinstance(e, ClientGone):
        return ["INTERNAL_ERROR", f"client disconnected: {e}"]
    return ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"[:500]]


def _finishing(access: Access, stream: Iterable[bytes]) -> Iterator[bytes]:
    """Wrap a streamed body so the task ends and the session goes when the stream does."""
    error: list[str] = ["INTERNAL_ERROR", "client disconnected"]  # closed before the end
    try:
        yield from stream
        error = []
    except Exception as e:
        error = _error_of(e)
        raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if error:
            access.fail(error)
        else:
            access.succeed()
        access.release()


def serve(server: ApiServer, request: Request, action: str, body: Body) -> Response:
    """Run ``body`` for ``request`` behind xapi's checks for ``action`` (see the module docstring)."""
    try:
        access = authenticate(server, request, action)
    except Refusal as r:
        return r.response
    try:
        response = body(access)
    except Redirect as r:
        # The task stays pending for the host the client goes to.  The body (already invited by
        # "100 Continue") is read and dropped, so the client reads the 302 rather than a reset.
        if request.reader is not None and not request.reader.drain(server.limits.max_upload_size):
            r.response.close = True
        access.release()
        return r.response
    except Refusal as r:
        access.fail(r.error or ["INTERNAL_ERROR", f"HTTP {r.response.status}"])
        access.release()
        return r.response
    except ClientGone as e:
        access.fail(_error_of(e))
        access.release()
        raise
    except ApiError as e:
        log.info("handler failed", action=action, code=e.code, user=access.user)
        access.fail(e.description)
        access.release()
        return internal_error(f"Server_error({e.code}, [ {'; '.join(e.params)} ])")
    except Exception as e:  # noqa: BLE001 - the boundary of a handler
        log.exception("unexpected exception in an HTTP handler", action=action)
        access.fail(_error_of(e))
        access.release()
        return internal_error(type(e).__name__)
    if response.stream is not None:
        response.stream = _finishing(access, response.stream)
        return response
    if response.status < 400:
        access.succeed()
    else:
        access.fail(["INTERNAL_ERROR", f"HTTP {response.status}"])
    access.release()
    return response


def route(action: str, body: Body, *, exact: bool = True, stream: bool = False,
          body_cap: str = "max_request_size") -> Route:
    """The :class:`~xapid.server.Route` serving xapi's HTTP action ``action`` (method and URI from
    :data:`ACTIONS`) with ``body`` behind :func:`serve`."""
    method, uri, _roles = ACTIONS[action]

    def handler(server: ApiServer, request: Request) -> Response:
        return serve(server, request, action, body)

    handler.__name__ = f"http_{action}"
    handler.__qualname__ = handler.__name__
    return Route(method, uri, handler, exact=exact, body_cap=body_cap, stream=stream)
