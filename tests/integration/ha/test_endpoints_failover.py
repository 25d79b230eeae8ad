"""Clients following the master through an HA failover, at the hosts' own addresses (issue 11).

The old master goes dark (xapid fault crash); a survivor takes the master lock and becomes master
(xapi_ha.ml on_master_failure, xapi_pool_transition.ml); slaves name it in ``HOST_IS_SLAVE``; no
session survives (the session table is never persisted: datamodel.ml ``PersistNothing``); every
object keeps its ref and uuid.  Only the plain SDK is used, as a client would.
"""

from __future__ import annotations

import time
from typing import Any

import XenAPI

from tests.integration.endpoint_support import (
    CONNECT_ERRORS,
    follow_master,
    host_url,
    login_error,
    refuses,
)
from tests.integration.ha.conftest import HaPool, fist, wait_for

FAILOVER = 40.0  # seconds: T = 10 detection, fencing margin and a start, with room for a loaded machine
CLASSES = ("pool", "host", "VM", "SR", "VDI", "PBD", "VBD", "network", "PIF", "VIF")


def inventory(api: Any) -> dict[str, dict[str, str]]:
    """Every object of the main classes: class -> ref -> uuid."""
    return {cls: {ref: rec["uuid"] for ref, rec in getattr(api, cls).get_all_records().items()} for cls in CLASSES}


def test_master_crash_with_ha_the_address_goes_dark_and_clients_find_the_new_master(ha_pool: HaPool) -> None:
    p = ha_pool
    d = p.xapid
    addr = {name: p.api.host.get_address(ref) for name, ref in p.hosts.items()}
    urls = {name: host_url(d, a) for name, a in addr.items()}
    p.vm("protected", "restart", on="host2")
    before = inventory(p.api)
    old = XenAPI.Session(urls["host1"])
    old.login_with_password("root", d.password)
    crashed = time.monotonic()
    p.fault.crash("host1")
    assert refuses(urls["host1"])
    # A client that only knows the survivors follows HOST_IS_SLAVE until the new master answers.
    s, url = follow_master([urls["host2"], urls["host3"]], d.password, d.url, crashed + FAILOVER)
    took = time.monotonic() - crashed
    try:
        new_master = p.master()
        assert new_master in ("host2", "host3")
        assert url == urls[new_master]
        assert took < FAILOVER
        x = s.xenapi
        assert x.host.get_name_label(x.pool.get_master(x.pool.get_all()[0])) == new_master
        assert x.session.get_this_host(s._session) == p.hosts[new_master]
        after = inventory(x)
        assert after["VM"] == before["VM"] and after["host"] == before["host"] and after["SR"] == before["SR"]
        assert all(set(before[c].items()) <= set(after[c].items()) for c in CLASSES)
        other = "host3" if new_master == "host2" else "host2"
        wait_for(lambda: login_error(urls[other], d.password) == ["HOST_IS_SLAVE", addr[new_master]],
                 timeout=10, what="the other survivor to name the new master")
        # The old master's session did not survive: its xapi is gone and sessions are never replicated.
        proxy = XenAPI.xmlrpclib.ServerProxy(urls[new_master])
        assert proxy.VM.get_all(old._session)["ErrorDescription"] == ["SESSION_INVALID", old._session]
        # The old master boots: it comes back as a slave of the new one.
        p.fault.boot("host1")
        wait_for(lambda: not refuses(urls["host1"]), timeout=10, what="the old master's address")
        wait_for(lambda: login_error(urls["host1"], d.password) == ["HOST_IS_SLAVE", addr[new_master]],
                 timeout=FAILOVER, what="the old master to answer as a slave")
        assert p.master() == new_master
    finally:
        s.xenapi.session.logout()
    print(f"master crash to the new master accepting a login: {took:.1f} s")


class XoStyleClient:
    """The reconnect logic of Xen Orchestra's ``xen-api`` client, with the plain SDK.

    Logs in where it is pointed; on ``HOST_IS_SLAVE`` it switches to the address the error names
    (keeping scheme and port) and logs in again.  It remembers the pool's host addresses; when
    the connection fails it tries them in turn (following ``HOST_IS_SLAVE`` again); on
    ``SESSION_INVALID`` it logs in again.
    """

    def __init__(self, url: str, password: str, port_of: str) -> None:
        self.url = url
        self.password = password
        self.port_of = port_of
        self.known: list[str] = [url]
        self.session: XenAPI.Session | None = None
        self.reconnects = 0

    def connect(self, deadline: float) -> None:
        self.session, self.url = follow_master([self.url, *(u for u in self.known if u != self.url)],
                                               self.password, self.port_of, deadline, originator="xo-style")
        api = self.session.xenapi
        self.known = [host_url_of(self.port_of, rec["address"]) for rec in api.host.get_all_records().values()]

    def call(self, deadline: float, fn: Any) -> Any:
        while True:
            assert self.session is not None
            try:
                return fn(self.session.xenapi)
            except XenAPI.Failure as e:
                if e.details[0] not in ("SESSION_INVALID", "HOST_IS_SLAVE"):
                    raise
            except CONNECT_ERRORS:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the client could not reconnect in time")
            self.reconnects += 1
            self.connect(deadline)


def host_url_of(port_of: str, address: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(port_of)
    return f"{parsed.scheme}://{address}:{parsed.port}/"


def test_xo_style_client_survives_a_master_crash(ha_pool: HaPool) -> None:
    p = ha_pool
    d = p.xapid
    slave_url = host_url(d, p.api.host.get_address(p.hosts["host3"]))
    client = XoStyleClient(slave_url, d.password, d.url)
    client.connect(time.monotonic() + 10)
    assert client.url == host_url(d, "127.0.1.1")  # redirected from the slave to the master
    vms = client.call(time.monotonic() + 5, lambda x: x.VM.get_all_records())
    token = client.call(time.monotonic() + 5, lambda x: x.event_from(["VM"], "", 0.0))["token"]
    assert token
    p.fault.crash("host1")
    deadline = time.monotonic() + FAILOVER
    # Keep working through the failover: the first call fails, the client finds the new master.
    again = client.call(deadline, lambda x: x.VM.get_all_records())
    assert client.reconnects >= 1
    assert client.url in (host_url(d, "127.0.1.2"), host_url(d, "127.0.1.3"))
    assert {r: v["uuid"] for r, v in again.items()} == {r: v["uuid"] for r, v in vms.items()}
    master = client.call(deadline, lambda x: x.host.get_address(x.pool.get_master(x.pool.get_all()[0])))
    assert client.url == host_url(d, master)
    assert client.session is not None
    client.session.xenapi.session.logout()


def test_a_host_in_emergency_mode_answers_only_the_emergency_calls_at_its_address(ha_pool: HaPool) -> None:
    """api_server.ml callback1: a host in emergency mode raises its emergency error to every call
    but the emergency ones (datamodel.ml emergency_calls)."""
    p = ha_pool
    d = p.xapid
    uuid = p.uuid("host3")
    url = host_url(d, p.api.host.get_address(p.hosts["host3"]))
    fist(d, uuid, "ha_start_daemon", "exit 8")  # the statefile is out of reach at every start-up
    p.fault.crash("host3")
    wait_for(lambda: not p.live("host3"), timeout=FAILOVER, what="host3 declared dead")
    p.fault.boot("host3")
    wait_for(lambda: login_error(url, d.password) == ["HA_HOST_CANNOT_ACCESS_STATEFILE"], timeout=FAILOVER,
             what="host3 in emergency mode")
    proxy = XenAPI.xmlrpclib.ServerProxy(url)
    assert proxy.system.listMethods()["ErrorDescription"] == ["HA_HOST_CANNOT_ACCESS_STATEFILE"]
    local = proxy.session.slave_local_login_with_password("root", d.password)["Value"]
    assert proxy.host.is_in_emergency_mode(local) == {"Status": "Success", "Value": True}
    assert proxy.VM.get_all(local)["ErrorDescription"] == ["HA_HOST_CANNOT_ACCESS_STATEFILE"]
    assert proxy.host.emergency_ha_disable(local, False)["Status"] == "Success"
    # The master's address is not in emergency mode.
    assert login_error(host_url(d, p.api.host.get_address(p.hosts["host1"])), d.password) is None
