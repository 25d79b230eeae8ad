"""Other clients: JSON-RPC parity with XML-RPC, the local socket, async calls and their tasks."""

from __future__ import annotations

import os
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
import requests
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import fist, running_heartbeats, wait_for


def jsonrpc(url: str, method: str, params: list[Any], v2: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"method": method, "params": params, "id": 7}
    if v2:
        body["jsonrpc"] = "2.0"
    r = requests.post(url + "jsonrpc", json=body, timeout=30)
    assert r.headers["content-type"] == "application/json"
    return r.json()


def as_xml_view(v: Any) -> Any:
    """JSON-RPC sends ints as numbers where XML-RPC sends untyped strings (wire.md 2.3)."""
    if isinstance(v, bool) or not isinstance(v, (int, dict, list)):
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, dict):
        return {k: as_xml_view(x) for k, x in v.items()}
    return [as_xml_view(x) for x in v]


def xml_call(url: str, method: str, params: list[Any]) -> Any:
    proxy = xmlrpc.client.ServerProxy(url)
    return getattr(proxy, method)(*params)


@pytest.mark.parametrize("method,args", [
    ("pool.get_all", []),
    ("host.get_API_version_major", ["$host"]),
    ("VM.get_record", ["OpaqueRef:NULL"]),
    ("VM.get_by_uuid", ["nope"]),
    ("VM.get_record", []),
    ("Foo.bar", []),
    ("SR.get_all_records_where", ['field "type" = "nfs"']),
])
def test_json_and_xml_agree(xapid: Xapid, api: Any, method: str, args: list[Any]) -> None:
    s = xapid.session()
    ref = s._session
    host = api.host.get_all()[0]
    args = [host if a == "$host" else a for a in args]
    xml = xml_call(xapid.url, method, [ref, *args])
    v1 = jsonrpc(xapid.url, method, [ref, *args], v2=False)
    v2 = jsonrpc(xapid.url, method, [ref, *args], v2=True)
    if xml["Status"] == "Success":
        assert v1["error"] is None and v2["id"] == 7
        assert as_xml_view(v1["result"]) == xml["Value"] == as_xml_view(v2["result"])
        if method == "host.get_API_version_major":
            assert isinstance(v1["result"], int)
    else:
        assert v1["result"] is None and v1["error"] == xml["ErrorDescription"]
        assert [v2["error"]["message"], *v2["error"]["data"]] == xml["ErrorDescription"]
        assert v2["error"]["code"] == 1


def test_sdk_over_the_unix_socket_is_preauthenticated(xapid: Xapid) -> None:
    sock = xapid.state_dir / "xapi.sock"
    assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
    # The SDK turns every "_" of the host part into "/", so reach the socket by a path without "_".
    link = Path(f"/tmp/xapidsock{os.getpid()}{time.monotonic_ns()}")
    link.symlink_to(sock)
    try:
        s = XenAPI.Session("http://" + str(link).replace("/", "_") + "/", transport=XenAPI.UDSTransport())
        s.xenapi.login_with_password("", "")  # as ansible's xenserver_facts does (wire.md 9.2)
        assert s.xenapi.session.get_is_local_superuser(s._session) is True
        assert len(s.xenapi.host.get_all()) == 3
        s.xenapi.session.logout()
    finally:
        link.unlink()


def test_tcp_login_still_needs_a_password(xapid: Xapid) -> None:
    s = XenAPI.Session(xapid.url)
    with pytest.raises(XenAPI.Failure) as e:
        s.xenapi.login_with_password("", "")
    assert e.value.details[0] == "SESSION_AUTHENTICATION_FAILED"


def wait_task(api: Any, task: str) -> dict[str, Any]:
    wait_for(lambda: api.task.get_status(task) != "pending", what="task to finish")
    return api.task.get_record(task)


def test_async_success_and_failure(api: Any) -> None:
    vm = [v for v in api.VM.get_all() if not api.VM.get_is_control_domain(v)]
    sr = api.pool.get_default_SR(api.pool.get_all()[0])
    task = api.Async.VDI.create({"SR": sr, "virtual_size": "1048576", "type": "user", "sharable": False,
                                 "read_only": False, "other_config": {}, "name_label": "async",
                                 "name_description": ""})
    rec = wait_task(api, task)
    assert rec["status"] == "success" and rec["progress"] == 1.0
    assert rec["name_label"] == "Async.VDI.create" and rec["error_info"] == []
    vdi = rec["result"].removeprefix("<value>").removesuffix("</value>")
    assert api.VDI.get_name_label(vdi) == "async"
    assert rec["finished"].value.endswith("Z")
    task = api.Async.VDI.destroy("OpaqueRef:nope")
    rec = wait_task(api, task)
    assert rec["status"] == "failure" and rec["error_info"] == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    api.task.destroy(task)
    assert vm == [v for v in api.VM.get_all() if not api.VM.get_is_control_domain(v)]


def test_client_task_cancel(api: Any) -> None:
    task = api.task.create("upload", "client-owned")
    assert api.task.get_allowed_operations(task) == ["cancel"]
    api.task.cancel(task)
    rec = api.task.get_record(task)
    assert rec["status"] == "cancelled" and rec["error_info"] == ["TASK_CANCELLED", task]
    with pytest.raises(XenAPI.Failure) as e:
        api.task.cancel(task)
    assert e.value.details[0] == "OPERATION_NOT_ALLOWED"


def test_async_enable_ha_reports_progress_and_can_be_cancelled(xapid: Xapid, api: Any) -> None:
    pool = api.pool.get_all()[0]
    hosts = [api.host.get_uuid(h) for h in api.host.get_all()]
    task = api.Async.pool.enable_ha([], {"timeout": "10"})
    rec = wait_task(api, task)
    assert rec["status"] == "success" and api.pool.get_ha_enabled(pool) is True
    api.pool.disable_ha()
    # Slow the per-host stage down, then cancel: HA is rolled back and the task ends cancelled.
    fist(xapid, hosts[0], "ha_set_pool_state", "sleep 1.5")
    task = api.Async.pool.enable_ha([], {"timeout": "10"})
    seen_progress: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        s = xapid.session().xenapi
        while not stop.is_set():
            seen_progress.append(float(s.task.get_progress(task)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.5)
    api.task.cancel(task)
    rec = wait_task(api, task)
    stop.set()
    sampler.join()
    assert rec["status"] == "cancelled" and rec["error_info"] == ["TASK_CANCELLED", task]
    assert api.pool.get_ha_enabled(pool) is False
    assert running_heartbeats(xapid) == []


def test_async_enable_ha_progress_steps(xapid: Xapid, api: Any) -> None:
    hosts = [api.host.get_uuid(h) for h in api.host.get_all()]
    fist(xapid, hosts[1], "ha_start_daemon", "sleep 1")
    task = api.Async.pool.enable_ha([], {"timeout": "10"})
    progress = wait_for(lambda: float(api.task.get_progress(task)) or None, what="progress")
    assert 0 < progress < 1
    assert wait_task(api, task)["progress"] == 1.0
    api.pool.disable_ha()
