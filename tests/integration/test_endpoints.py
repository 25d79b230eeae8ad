"""Every host answers at its own address (issue 11), HA off: slaves, planned and emergency transitions.

Real behaviour followed: xapi_session.ml (login on a slave), session_check.ml (a master session on
a slave), api_server.ml and datamodel.ml (emergency calls), xapi_pool.ml and
xapi_pool_transition.ml (designate_new_master, emergency_transition_to_master, recover_slaves:
every xapi restarts, no session survives), xapi_cli.ml and cli_frontend.ml (xe on a slave).
"""

from __future__ import annotations

import http.client
import socket
import time
import xmlrpc.client
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.endpoint_support import addresses, follow_master, host_url, login_error, refuses
from tests.integration.test_xe_support import Xe
from xapid.hw.faults import FaultClient


def names(api: Any) -> dict[str, str]:
    return {api.host.get_name_label(h): h for h in api.host.get_all()}


def test_a_slave_answers_host_is_slave_to_every_login_arity_and_a_follower_logs_in(xapid: Xapid, api: Any) -> None:
    addr = addresses(api)
    assert addr == {"host1": "127.0.1.1", "host2": "127.0.1.2", "host3": "127.0.1.3"}
    slave = host_url(xapid, addr["host2"])
    for extra in ((), ("2.21",), ("2.21", "pytest")):
        assert login_error(slave, xapid.password, *extra) == ["HOST_IS_SLAVE", "127.0.1.1"]
    # A wrong password on a slave: still HOST_IS_SLAVE (a slave never checks the password).
    assert login_error(slave, "wrong") == ["HOST_IS_SLAVE", "127.0.1.1"]
    s, url = follow_master([slave], xapid.password, xapid.url, time.monotonic() + 10)
    try:
        assert url == host_url(xapid, "127.0.1.1")
        assert s.xenapi.session.get_this_host(s._session) == names(api)["host1"]
        assert sorted(s.xenapi.VM.get_all()) == sorted(api.VM.get_all())
    finally:
        s.xenapi.session.logout()


def test_a_master_session_on_a_slave_is_host_is_slave_and_an_unknown_one_invalid(xapid: Xapid, api: Any) -> None:
    master = XenAPI.Session(host_url(xapid, "127.0.1.1"))
    master.login_with_password("root", xapid.password)
    slave = xmlrpc.client.ServerProxy(host_url(xapid, "127.0.1.3"))
    try:
        assert slave.VM.get_all(master._session)["ErrorDescription"] == ["HOST_IS_SLAVE", "127.0.1.1"]
        assert slave.no_such.call(master._session)["ErrorDescription"] == ["HOST_IS_SLAVE", "127.0.1.1"]
        assert slave.VM.get_all("OpaqueRef:nope")["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:nope"]
        # Parameter counts are checked before the session (xapi's dispatch order).
        assert slave.VM.get_all(master._session, "x")["ErrorDescription"][0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
        assert slave.system.listMethods()  # no session: answered
    finally:
        master.xenapi.session.logout()


def test_local_sessions_work_on_their_own_host_only_and_serve_the_emergency_calls(xapid: Xapid, api: Any) -> None:
    hosts = names(api)
    slave = xmlrpc.client.ServerProxy(host_url(xapid, "127.0.1.2"))
    other = xmlrpc.client.ServerProxy(host_url(xapid, "127.0.1.3"))
    assert slave.session.slave_local_login_with_password("root", "wrong")["ErrorDescription"][0] == \
        "SESSION_AUTHENTICATION_FAILED"
    local = slave.session.slave_local_login_with_password("root", xapid.password)["Value"]
    assert slave.host.is_in_emergency_mode(local) == {"Status": "Success", "Value": False}
    assert slave.session.get_this_host(local, local)["Value"] == hosts["host2"]
    assert slave.host.emergency_ha_disable(local, True) == {"Status": "Success", "Value": ""}
    # Known to host2's xapi only: another host and the pool's address do not know it.
    assert other.VM.get_all(local)["ErrorDescription"] == ["SESSION_INVALID", local]
    assert xmlrpc.client.ServerProxy(xapid.url).VM.get_all(local)["ErrorDescription"] == ["SESSION_INVALID", local]
    assert slave.session.local_logout(local)["Status"] == "Success"
    assert slave.host.is_in_emergency_mode(local)["ErrorDescription"] == ["SESSION_INVALID", local]


def test_designate_new_master_swaps_the_endpoints_and_ends_every_session(xapid: Xapid, api: Any) -> None:
    hosts = names(api)
    pool = api.pool.get_all()[0]
    before = {ref: rec["uuid"] for ref, rec in api.VM.get_all_records().items()}
    m1 = host_url(xapid, "127.0.1.1")
    m2 = host_url(xapid, "127.0.1.2")
    old = XenAPI.Session(m1)
    old.login_with_password("root", xapid.password)
    old_ref = old._session
    task = old.xenapi.task.create("client-task", "a task a client polls")
    before_vm = next(ref for ref, rec in old.xenapi.VM.get_all_records().items() if rec["is_a_template"])
    async_task = old.xenapi.Async.VM.clone(before_vm, "clone-in-flight")
    old.xenapi.pool.designate_new_master(hosts["host2"])
    assert api.pool.get_master(pool) == hosts["host2"]  # the pool's address follows (after a re-login)
    assert login_error(m1, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.2"]
    assert login_error(m2, xapid.password) is None
    assert login_error(host_url(xapid, "127.0.1.3"), xapid.password) == ["HOST_IS_SLAVE", "127.0.1.2"]
    # No session survives a transition (sessions are never persisted; every xapi restarted).
    proxy = xmlrpc.client.ServerProxy(m2)
    assert proxy.VM.get_all(old_ref)["ErrorDescription"] == ["SESSION_INVALID", old_ref]
    s = XenAPI.Session(m2)
    s.login_with_password("root", xapid.password)
    try:
        x = s.xenapi
        # (The clone in flight at the transition finishes: only its task is lost.)
        assert {ref: rec["uuid"] for ref, rec in x.VM.get_all_records().items()
                if rec["name_label"] != "clone-in-flight"} == before
        assert x.session.get_this_host(s._session) == hosts["host2"]
        # Nor does a task (PersistNothing): the new master's database has none.
        assert x.task.get_all() == []
        for gone in (task, async_task):
            with pytest.raises(XenAPI.Failure) as e:
                x.task.get_status(gone)
            assert e.value.details == ["HANDLE_INVALID", "task", gone]
        transitions = [m for m in x.message.get_all_records().values() if m["name"] == "POOL_MASTER_TRANSITION"]
        assert [(m["obj_uuid"], m["cls"], m["priority"]) for m in transitions] == \
            [(x.host.get_uuid(hosts["host2"]), "Host", "4")]
        x.pool.designate_new_master(hosts["host2"])  # already the master: nothing happens
        assert x.pool.get_master(pool) == hosts["host2"]
    finally:
        s.xenapi.session.logout()


def test_designate_new_master_refuses_an_offline_host(xapid: Xapid, api: Any) -> None:
    hosts = names(api)
    FaultClient(xapid.state_dir).crash("host3")
    with pytest.raises(XenAPI.Failure) as e:
        api.pool.designate_new_master(hosts["host3"])
    assert e.value.details == ["HOST_OFFLINE", hosts["host3"]]
    with pytest.raises(XenAPI.Failure) as e:
        api.pool.designate_new_master(hosts["host2"])  # a peer is down: the two-phase commit fails
    assert e.value.details == ["HOST_OFFLINE", hosts["host3"]]
    assert api.pool.get_master(api.pool.get_all()[0]) == hosts["host1"]


def test_a_crashed_host_refuses_connections_drops_open_ones_and_comes_back_on_boot(xapid: Xapid, api: Any) -> None:
    fault = FaultClient(xapid.state_dir)
    url = host_url(xapid, "127.0.1.3")
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
    conn.request("GET", "/console")
    conn.getresponse().read()  # an established, kept-alive connection
    fault.crash("host3")
    assert refuses(url)
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/console")
        conn.getresponse().read()
    conn.close()
    fault.boot("host3")
    deadline = time.monotonic() + 10
    while refuses(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert login_error(url, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.1"]


def test_a_hung_host_answers_nothing_until_it_thaws(xapid: Xapid, api: Any) -> None:
    fault = FaultClient(xapid.state_dir)
    url = host_url(xapid, "127.0.1.2")
    fault.hang("host2")
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=2.0) as sock:
        sock.sendall(b"GET /console HTTP/1.1\r\nhost: x\r\n\r\n")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        fault.thaw("host2")
        sock.settimeout(5.0)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_the_master_crashing_ends_its_sessions_the_pool_address_still_serves(xapid: Xapid, api: Any) -> None:
    s = XenAPI.Session(xapid.url)
    s.login_with_password("root", xapid.password)
    FaultClient(xapid.state_dir).crash("host1")
    assert refuses(host_url(xapid, "127.0.1.1"))
    proxy = xmlrpc.client.ServerProxy(xapid.url)
    assert proxy.VM.get_all(s._session)["ErrorDescription"] == ["SESSION_INVALID", s._session]
    # Slaves still name the master they know (no HA: nobody elects another one).
    assert login_error(host_url(xapid, "127.0.1.2"), xapid.password) == ["HOST_IS_SLAVE", "127.0.1.1"]
    assert login_error(xapid.url, xapid.password) is None


def test_emergency_transition_to_master_then_recover_slaves(xapid: Xapid, api: Any) -> None:
    hosts = names(api)
    FaultClient(xapid.state_dir).crash("host1")
    slave = xmlrpc.client.ServerProxy(host_url(xapid, "127.0.1.2"))
    local = slave.session.slave_local_login_with_password("root", xapid.password)["Value"]
    assert slave.pool.emergency_transition_to_master(local) == {"Status": "Success", "Value": ""}
    assert slave.host.is_in_emergency_mode(local)["ErrorDescription"] == ["SESSION_INVALID", local]  # restarted
    assert login_error(host_url(xapid, "127.0.1.2"), xapid.password) is None
    # host3 was not told: it still names the old master until the new one recovers it.
    h3 = host_url(xapid, "127.0.1.3")
    assert login_error(h3, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.1"]
    s = XenAPI.Session(host_url(xapid, "127.0.1.2"))
    s.login_with_password("root", xapid.password)
    try:
        assert s.xenapi.pool.recover_slaves() == [hosts["host3"]]
        assert login_error(h3, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.2"]
        assert [m["obj_uuid"] for m in s.xenapi.message.get_all_records().values()
                if m["name"] == "POOL_MASTER_TRANSITION"] == [s.xenapi.host.get_uuid(hosts["host2"])]
    finally:
        s.xenapi.session.logout()
    # emergency_reset_master points one slave elsewhere; only an address is accepted.
    p3 = xmlrpc.client.ServerProxy(h3)
    local3 = p3.session.slave_local_login_with_password("root", xapid.password)["Value"]
    assert p3.pool.emergency_reset_master(local3, "no-such-name")["ErrorDescription"][0] == "INTERNAL_ERROR"
    assert p3.pool.emergency_reset_master(local3, "127.0.1.1")["Status"] == "Success"
    assert login_error(h3, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.1"]
    # The old master boots: a slave of the new master.
    FaultClient(xapid.state_dir).boot("host1")
    h1 = host_url(xapid, "127.0.1.1")
    deadline = time.monotonic() + 10
    while refuses(h1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert login_error(h1, xapid.password) == ["HOST_IS_SLAVE", "127.0.1.2"]


def test_xe_against_a_slave_prints_host_is_slave_and_runs_the_local_commands(xapid: Xapid, tmp_path: Path) -> None:
    xe = Xe(tmp_path, xapid)
    base = ("-p", xe.port, "-u", "root", "-pwf", str(xe.pwf), "--nossl")
    r = xe.raw("-s", "127.0.1.2", *base, "vm-list")
    assert (r.rc, r.out) == (1, "")
    assert r.err == ("You cannot make regular API calls directly on a supporter. Please pass API calls via the"
                     " coordinator host.\nMaster IP address: 127.0.1.1\n")
    # xe's Neverforward commands log in locally, so they work on a slave.
    r = xe.raw("-s", "127.0.1.2", *base, "host-is-in-emergency-mode")
    assert (r.rc, r.out, r.err) == (0, "false\n", "")
    r = xe.raw("-s", "127.0.1.1", *base, "pool-emergency-transition-to-master")
    assert (r.rc, r.out) == (0, "Host agent is already master. Use '--force' to execute the operation anyway.\n")
    r = xe.raw("-s", "127.0.1.1", *base, "pool-designate-new-master",
               f"host-uuid={xe.ok('host-list', 'name-label=host3', '--minimal').strip()}")
    assert (r.rc, r.err) == (0, "")
    r = xe.raw("-s", "127.0.1.1", *base, "host-list")
    assert r.rc == 1 and r.err.endswith("Master IP address: 127.0.1.3\n")
    assert xe.raw("-s", "127.0.1.3", *base, "host-list", "--minimal").rc == 0
