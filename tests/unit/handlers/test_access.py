"""The HTTP handlers' access layer against a real in-process daemon: xapi_http.ml's checks and answers."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from tests.unit.hardening.support import in_process_daemon
from xapid.daemon import Daemon
from xapid.errors import ApiError
from xapid.handlers import access
from xapid.handlers.access import Access, Refusal, not_found, parameters, roles_gte, serve
from xapid.schema import Type
from xapid.server import ApiServer, Limits, Request, Response


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("handlers"))
    d.users.set_password("reader", "pw", "read-only")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def server(daemon: Daemon) -> ApiServer:
    return ApiServer(daemon, Limits.from_config(daemon.config))  # never started: only its semaphores are used


def request(query: str = "", local: bool = False, **headers: str) -> Request:
    return Request("GET", "/x", (1, 1), {k.replace("_", "-"): [v] for k, v in headers.items()}, local=local,
                   query=query)


def login(daemon: Daemon, user: str = "root") -> str:
    return daemon.sessions.login(user, daemon.state_dir.joinpath("root-password").read_text().strip()
                                 if user == "root" else "pw", "test")


def ok(a: Access) -> Response:
    return Response(200, a.user.encode())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_role_sets_are_datamodel_roles() -> None:
    assert roles_gte("vm-admin") == ("pool-admin", "pool-operator", "vm-power-admin", "vm-admin")
    assert access.ACTIONS["put_import_raw_vdi"][2] == access.R_VM_ADMIN
    assert access.ACTIONS["get_rrd_updates"][2] == access.R_READ_ONLY


def test_cookie_values_win_over_the_query_as_lookup_param_of_req() -> None:
    r = request("session_id=q&task_id=t&x=1", cookie="session_id=c; other=2")
    assert parameters(r) == {"session_id": "c", "task_id": "t", "x": "1", "other": "2"}


def test_missing_or_bad_credentials_get_xapis_401(daemon: Daemon, server: ApiServer) -> None:
    for r in (request(), request("session_id=OpaqueRef:nope"), request(authorization=basic("root", "wrong")),
              request(authorization="Basic !!!")):
        answer = serve(server, r, "get_rrd_updates", ok)
        assert answer.status == 401 and answer.close
        assert answer.body == (b"<html><body><h1>HTTP 401 unauthorised</h1>Please check your credentials and "
                               b"retry.</body></html>")
        assert ("WWW-Authenticate", 'Basic realm="get_rrd_updates"') in (answer.headers or [])
    other = serve(server, request(authorization="Bearer abc"), "get_rrd_updates", ok)
    assert other.status == 500 and b"Unknown authorization header" in other.body


def test_session_cookie_basic_auth_and_local_socket_are_accepted(daemon: Daemon, server: ApiServer) -> None:
    ref = login(daemon)
    assert serve(server, request(f"session_id={ref}"), "get_rrd_updates", ok).body == b"root"
    assert serve(server, request(cookie=f"session_id={ref}"), "get_rrd_updates", ok).status == 200
    before = daemon.sessions.count()
    password = daemon.state_dir.joinpath("root-password").read_text().strip()
    assert serve(server, request(authorization=basic("root", password)), "get_rrd_updates", ok).body == b"root"
    assert serve(server, request(local=True), "get_rrd_updates", ok).status == 200
    assert daemon.sessions.count() == before  # the sessions made for the requests were logged out
    assert daemon.store.exists("session", ref)  # a session passed in stays


def test_rbac_of_the_action_403_and_the_task_fails(daemon: Daemon, server: ApiServer) -> None:
    reader = login(daemon, "reader")
    assert serve(server, request(f"session_id={reader}"), "get_rrd_updates", ok).status == 200
    task = daemon.tasks.create("import", "", reader)
    answer = serve(server, request(f"session_id={reader}&task_id={task}"), "put_import_raw_vdi", ok)
    assert answer.status == 403 and answer.body.startswith(b"<html><body><h1>HTTP 403 forbidden</h1>")
    rec = daemon.store.get("task", task)
    assert rec is not None and rec["status"] == "failure"
    assert rec["error_info"][:2] == ["RBAC_PERMISSION_DENIED", "http/put_import_raw_vdi"]
    before = daemon.sessions.count()
    refused = serve(server, request(authorization=basic("reader", "pw")), "get_export", ok)
    assert refused.status == 403 and daemon.sessions.count() == before


def test_a_bad_session_fails_the_named_task(daemon: Daemon, server: ApiServer) -> None:
    task = daemon.tasks.create("t", "", login(daemon))
    assert serve(server, request(f"session_id=OpaqueRef:bad&task_id={task}"), "get_rrd_updates", ok).status == 401
    rec = daemon.store.get("task", task)
    assert rec is not None and (rec["status"], rec["error_info"]) == ("failure", ["SESSION_AUTHENTICATION_FAILED"])


def test_the_task_reports_progress_result_and_errors(daemon: Daemon, server: ApiServer) -> None:
    ref = login(daemon)
    seen: list[float] = []

    def work(a: Access) -> Response:
        a.progress(0.5)
        rec = daemon.store.get("task", a.task or "")
        seen.append(rec["progress"] if rec else -1)
        a.result(["OpaqueRef:x"], Type("set", elem=Type("ref", name="VM")))
        return Response(200)

    task = daemon.tasks.create("t", "", ref)
    assert serve(server, request(f"session_id={ref}&task_id={task}"), "put_import", work).status == 200
    rec = daemon.store.get("task", task)
    assert seen == [0.5] and rec is not None and rec["status"] == "success" and rec["progress"] == 1.0
    assert "OpaqueRef:x" in rec["result"]

    def broken(a: Access) -> Response:
        raise ApiError("VDI_IN_USE", "OpaqueRef:v", "destroy")

    task = daemon.tasks.create("t", "", ref)
    answer = serve(server, request(f"session_id={ref}&task_id={task}"), "put_import", broken)
    assert answer.status == 500 and b"VDI_IN_USE" in answer.body and b"Traceback" not in answer.body
    rec = daemon.store.get("task", task)
    assert rec is not None and rec["error_info"] == ["VDI_IN_USE", "OpaqueRef:v", "destroy"]

    def refused(a: Access) -> Response:
        raise Refusal(not_found(), ["HANDLE_INVALID", "VDI", "x"])

    task = daemon.tasks.create("t", "", ref)
    assert serve(server, request(f"session_id={ref}&task_id={task}"), "put_import", refused).status == 404
    rec = daemon.store.get("task", task)
    assert rec is not None and rec["error_info"] == ["HANDLE_INVALID", "VDI", "x"]

    def crash(a: Access) -> Response:
        raise ZeroDivisionError

    answer = serve(server, request(f"session_id={ref}"), "put_import", crash)
    assert answer.status == 500 and b"ZeroDivisionError" in answer.body


def test_a_streamed_answer_ends_the_task_when_the_stream_ends(daemon: Daemon, server: ApiServer) -> None:
    password = daemon.state_dir.joinpath("root-password").read_text().strip()
    ref = login(daemon)

    def stream(a: Access) -> Response:
        return Response(200, stream=iter([b"a", b"b"]), length=2)

    task = daemon.tasks.create("t", "", ref)
    before = daemon.sessions.count()
    answer = serve(server, request(f"task_id={task}", authorization=basic("root", password)), "get_export", stream)
    assert daemon.store.get("task", task)["status"] == "pending"  # type: ignore[index]
    assert daemon.sessions.count() == before + 1  # the request's session lives as long as the stream
    assert answer.stream is not None and b"".join(answer.stream) == b"ab"
    assert daemon.store.get("task", task)["status"] == "success"  # type: ignore[index]
    assert daemon.sessions.count() == before

    task = daemon.tasks.create("t", "", ref)
    answer = serve(server, request(f"session_id={ref}&task_id={task}"), "get_export", stream)
    assert answer.stream is not None
    pieces = iter(answer.stream)
    next(pieces)
    pieces.close()  # type: ignore[attr-defined]  # what the server does when the client leaves
    rec = daemon.store.get("task", task)
    assert rec is not None and rec["status"] == "failure" and rec["error_info"][1] == "client disconnected"
