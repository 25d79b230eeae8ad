"""xhad's xapi watchdog through the real daemon (xha daemon/xapi_mon.c, xapi scripts/xapi-health-check,
xapi_host.ml ha_xapi_healthcheck): every XapiHealthCheckInterval each host's heartbeat process checks
its own host's xapi at the host's own address; a failure restarts that xapi; one that stays
unhealthy makes the host self-fence through its watchdog."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import XenAPI

from tests.integration.ha.conftest import HaPool, HaPoolFactory, host_dir, wait_for
from xapid.hw.faults import FaultError

# Small values: a check every second, 2 s to answer, one restart within 5 s (T = 10: HeartbeatInterval
# 2 s, so a host whose restarts are used up fences 4 s later).
FAST = {"ha_xapi_healthcheck_interval": "1", "ha_xapi_healthcheck_timeout": "2",
        "ha_xapi_restart_attempts": "1", "ha_xapi_restart_timeout": "5"}


def status(p: HaPool) -> dict[str, dict[str, str]]:
    """``xapid fault status`` by host name: its key=value words."""
    out = {}
    for line in p.fault.status():
        name, _uuid, *words = line.split()
        out[name] = dict(w.split("=", 1) for w in words)
    return out


def restarts(p: HaPool, name: str) -> int:
    return int(status(p)[name]["xapi-restarts"])


class HostXapi:
    """Plain XML-RPC to one host's own address, logged in the way xhad's check logs in (its ptoken)."""

    def __init__(self, p: HaPool, name: str) -> None:
        address = p.api.host.get_address(p.hosts[name])
        self.proxy = xmlrpc.client.ServerProxy(f"http://{address}:{port(p)}/")
        token = (host_dir(p.xapid, p.uuid(name)) / "ptoken").read_text().strip()
        self.session = self.value(self.proxy.session.slave_local_login(token))

    @staticmethod
    def value(answer: Any) -> Any:
        if answer["Status"] != "Success":
            raise XenAPI.Failure(answer["ErrorDescription"])
        return answer["Value"]

    def healthcheck(self) -> bool:
        return bool(self.value(self.proxy.host.ha_xapi_healthcheck(self.session)))


def host_session(p: HaPool, name: str) -> HostXapi:
    return HostXapi(p, name)


def port(p: HaPool) -> int:
    return int(urlsplit(p.xapid.url).port or 0)


def liveset_xapi(p: HaPool, name: str) -> dict[str, int]:
    """The Xapi_healthcheck figures of the host's own ``ha_query_liveset``, run as xapi runs it."""
    folder = host_dir(p.xapid, p.uuid(name))
    stack = Path(p.api.pool.get_ha_cluster_stack(p.pool))
    match = re.search(r"^cluster-stack-root = (.*)$", p.xapid.config.read_text(), re.M)
    assert match is not None
    root = Path(match.group(1))
    out = subprocess.run([str(root / stack / "ha_query_liveset")], capture_output=True, timeout=30, check=True,
                         env={"PATH": "/usr/bin:/bin", "XHAD_CONF": str(folder / "xhad.conf"),
                              "XAPI_HOST_UUID": p.uuid(name)}).stdout.decode()
    return {k: int(v) for k, v in _FIGURE.findall(out)}


_FIGURE = re.compile(r"<(Xapi_healthcheck_latency(?:_min|_max)?)>(-?\d+)<")


def heartbeat_log(p: HaPool, name: str) -> str:
    path = host_dir(p.xapid, p.uuid(name)) / "xhad.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def fast_pool(ha_pool_factory: HaPoolFactory) -> HaPool:
    return ha_pool_factory(**FAST)


@pytest.fixture
def calm_pool(ha_pool_factory: HaPoolFactory) -> HaPool:
    """xhad's watchdog checks every 30 s: it does not step in (restart the xapi) while a test breaks
    and heals one by hand, however loaded the machine."""
    return ha_pool_factory(**{**FAST, "ha_xapi_healthcheck_interval": "30", "ha_xapi_healthcheck_timeout": "10",
                              "ha_xapi_restart_timeout": "60"})


def test_healthy_pool_checks_every_host_and_never_restarts_xapi(fast_pool: HaPool) -> None:
    p = fast_pool
    # Each host's own check runs (and logs in at its own address): wait for a few rounds.
    wait_for(lambda: all(heartbeat_log(p, n).count("xapi monitor started") == 1 for n in p.hosts),
             what="every xapi monitor started")
    time.sleep(3.5)
    for name, words in status(p).items():
        assert words["xapi"] == "ok" and words["xapi-restarts"] == "0", (name, words)
        assert words["power"] == "on"
        assert "Xapimon" not in heartbeat_log(p, name)  # no failure, no restart
        # Each host's own liveset shows its checks' latencies (ms; -1 before the first healthy check).
        figures = liveset_xapi(p, name)
        assert 0 <= figures["Xapi_healthcheck_latency_min"] <= figures["Xapi_healthcheck_latency"] \
            <= figures["Xapi_healthcheck_latency_max"] < 2000, (name, figures)
    assert p.messages("HA_HOST_FAILED") == []


@pytest.mark.parametrize("fault", ["xapi-fail", "xapi-hang", "xapi-crash"])
def test_a_transient_xapi_failure_is_healed_by_one_restart_without_fencing(fast_pool: HaPool, fault: str) -> None:
    p = fast_pool
    vm = p.vm("web", "restart", on="host2")
    before = host_session(p, "host2")
    assert before.healthcheck() is True
    started = time.monotonic()
    p.fault.request(fault, ["host2"])
    wait_for(lambda: restarts(p, "host2") == 1, timeout=15, what="host2's xapi restarted")
    healed = time.monotonic() - started
    assert status(p)["host2"]["xapi"] == "ok"
    assert healed < 2 + 2 + 1.5  # interval + check timeout + restart, with slack
    # The restart ended the sessions host2's xapi held; a new one works and the check passes again.
    with pytest.raises(XenAPI.Failure) as failure:
        before.healthcheck()
    assert failure.value.details[0] == "SESSION_INVALID"
    assert host_session(p, "host2").healthcheck() is True
    time.sleep(5)  # past the time a failed restart would need to fence (2 x HeartbeatInterval)
    words = status(p)["host2"]
    assert words["power"] == "on" and words["live"] == "true" and words["xapi-restarts"] == "1"
    assert p.where(vm) == ("Running", "host2")
    assert p.messages("HA_HOST_FAILED") == []
    assert "Xapimon: Xapi restarted." in heartbeat_log(p, "host2")


def test_a_persistent_xapi_failure_fences_the_host_and_its_protected_vms_restart_elsewhere(
        ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(**{**FAST, "fence-reboot-delay": "0"})
    vm = p.vm("db", "restart", on="host2")
    started = time.monotonic()
    p.fault.xapi_fail("host2", persistent=True)
    wait_for(lambda: status(p)["host2"]["power"] == "fenced", timeout=30, what="host2 fenced")
    fenced = time.monotonic() - started
    # One restart (it did not cure a persistent fault), a second failed check, 2 x t1, the fence.
    assert restarts(p, "host2") == 1
    assert 0.5 + 1 + 4 <= fenced < 20  # restart, an interval, 2 x HeartbeatInterval
    log = heartbeat_log(p, "host2")
    assert "Xapimon: Xapi restarted." in log and "Xapimon: Xapi failed.  Self Fence." in log
    wait_for(lambda: not p.live("host2"), timeout=15, what="host2 not live")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] in ("host1", "host3"), timeout=20,
             what="the protected VM restarted on a surviving host")
    assert [m["obj_uuid"] for m in p.messages("HA_HOST_FAILED")] == [p.uuid("host2")]


def test_the_masters_persistent_xapi_failure_fences_it_and_a_slave_takes_over(
        ha_pool_factory: HaPoolFactory) -> None:
    """xapi_mon.c makes no exception for the master: its xhad restarts its xapi, then self-fences; the
    slaves see the master gone from their livesets and one of them becomes master (xapi_ha.ml
    on_master_failure), then restarts the old master's protected VMs."""
    p = ha_pool_factory(**{**FAST, "fence-reboot-delay": "0"})
    assert p.master() == "host1"
    vm = p.vm("app", "restart", on="host1")
    p.fault.xapi_fail("host1", persistent=True)
    wait_for(lambda: status(p)["host1"]["power"] == "fenced", timeout=30, what="the master fenced")
    assert restarts(p, "host1") == 1

    def new_master() -> str | None:
        try:
            s = p.xapid.session()
        except (XenAPI.Failure, OSError):
            return None
        x = s.xenapi
        name = x.host.get_name_label(x.pool.get_master(x.pool.get_all()[0]))
        return name if name != "host1" else None

    master = wait_for(new_master, timeout=30, what="a new master")
    assert master in ("host2", "host3")
    x = p.xapid.session().xenapi
    records = x.message.get_all_records().values()
    assert any(m["name"] == "POOL_MASTER_TRANSITION" for m in records)
    survivors = {p.hosts["host2"], p.hosts["host3"]}

    def restarted() -> bool:
        rec = x.VM.get_record(vm)  # one read: the VM may be reset between two
        return bool(rec["power_state"] == "Running" and rec["resident_on"] in survivors)

    wait_for(restarted, timeout=30, what="the old master's protected VM restarted")


def test_fault_verbs_and_a_hung_xapi_at_the_hosts_address(calm_pool: HaPool) -> None:
    """xapi-hang: the host's address accepts and answers nothing; the pool's address still answers;
    xapi-heal brings it back before xhad's restart (persistent: a restart would not help)."""
    p = calm_pool
    assert p.fault.xapi_hang("host3", persistent=True) == ["host3: xapi ok -> hang+persistent"]
    address = p.api.host.get_address(p.hosts["host3"])
    with socket.create_connection((address, port(p)), timeout=2) as sock:
        sock.settimeout(1.5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert p.api.pool.get_all()  # the pool's address answers
    assert p.fault.xapi_heal("host3") == ["host3: xapi hang+persistent -> ok"]
    assert host_session(p, "host3").healthcheck() is True
    with pytest.raises(FaultError, match="persistent"):
        p.fault.request("xapi-restart", ["host3"], persistent=True)
    with pytest.raises(FaultError, match="unknown host"):
        p.fault.xapi_fail("nosuchhost")


def test_host_ha_xapi_healthcheck_reports_a_failed_xapi(calm_pool: HaPool) -> None:
    """xapi_host.ml: ``not (Xapi_fist.fail_healthcheck ())``; xapi-fail stands for that fist point."""
    p = calm_pool
    s = host_session(p, "host3")
    p.fault.xapi_fail("host3", persistent=True)
    assert s.healthcheck() is False
    p.fault.xapi_heal("host3")
    assert s.healthcheck() is True
    with pytest.raises(XenAPI.Failure) as failure:
        s.value(s.proxy.session.slave_local_login("not the pool secret"))
    assert failure.value.details[0] == "SESSION_AUTHENTICATION_FAILED"
