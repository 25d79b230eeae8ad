"""The corosync stack: real corosync 3 behind the seven scripts, one node per emulated host.

The design's example (an OCFS2 SR attached: ``pool.enable_ha`` chooses ``corosync``), fencing by
quorum loss through the emulated watchdog, and nothing left behind (namespaces, processes,
``/dev/shm``).  Needs root, ``ip`` and the Debian package ``corosync``; skipped with the reason
otherwise (and failed under XAPID_CI=1, see tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import XenAPI

from tests.integration.corosync_kit import (
    Tracker,
    corosync_processes,
    leftovers,
    named,
    needs_corosync,
    ocfs2_sr,
)
from tests.integration.corosync_kit import power as fault_power
from tests.integration.ha.conftest import HaPool, wait_for
from xapid.hw.faults import FaultClient

pytestmark = needs_corosync

# T = 10: a dead node leaves corosync's membership within about 1 s, its watchdog (5 s) fences it,
# the others count it dead 1.5 s after that; then the monitor restarts its VMs.
FAILOVER = 40.0
PoolFactory = Callable[..., HaPool]


@pytest.fixture
def corosync_pool(xapid_factory: Any, tracker: Tracker) -> PoolFactory:
    """``corosync_pool(hosts=3)``: HA on with the corosync stack (OCFS2 heartbeat SR), T = 10."""

    def make(hosts: int = 3, enable: bool = True, **conf: str) -> HaPool:
        conf.setdefault("fence-reboot-delay", "0")
        d = xapid_factory(hosts=hosts, **conf)
        tracker.daemons.append(d)
        x = d.session().xenapi
        pool = x.pool.get_all()[0]
        if enable:
            sr = ocfs2_sr(x)
            x.pool.enable_ha([sr], {"timeout": "10"})
        names = {x.host.get_name_label(h): h for h in x.host.get_all()}
        return HaPool(d, x, pool, names, FaultClient(d.state_dir))

    return make


def power(p: HaPool) -> dict[str, str]:
    return fault_power(p.fault)


def all_live(p: HaPool) -> bool:
    return all(p.live(n) for n in p.hosts)


def test_ocfs2_heartbeat_sr_chooses_corosync_and_forms_a_quorate_liveset(corosync_pool: PoolFactory,
                                                                            tracker: Tracker) -> None:
    """The design's example: an OCFS2 SR needs corosync; enable_ha runs one real corosync per host."""
    p = corosync_pool()
    assert p.api.pool.get_ha_cluster_stack(p.pool) == "corosync"
    assert p.api.pool.get_ha_enabled(p.pool) is True
    assert all_live(p)
    assert len(named(tracker.seen(p.xapid), "corosync")) == 3
    # Each corosync sees all three members and quorum, by its own account.
    for uuid in (p.uuid(n) for n in p.hosts):
        log = (p.xapid.state_dir / "hosts" / uuid / "corosync" / "agent.log").read_text()
        assert "membership [1, 2, 3] quorate=True" in log
    p.api.pool.disable_ha()
    assert leftovers(p.xapid.state_dir, tracker.pids) == {}


def test_nfs_heartbeat_sr_is_refused_when_corosync_is_required(corosync_pool: PoolFactory) -> None:
    p = corosync_pool(enable=False)
    x = p.api
    ocfs2_sr(x)
    with pytest.raises(XenAPI.Failure) as e:
        x.pool.enable_ha([x.pool.get_default_SR(p.pool)], {"timeout": "10"})
    assert list(e.value.details) == ["INCOMPATIBLE_STATEFILE_SR", "ocfs2,gfs2"]
    assert x.pool.get_ha_enabled(p.pool) is False


def test_crash_partition_heal_boot_and_master_crash(corosync_pool: PoolFactory, tracker: Tracker) -> None:
    """One 3-host pool through a slave crash, a 1 | 2 partition, heal and boot, and a master crash."""
    p = corosync_pool()
    x = p.api
    # A crashed slave: not live, its protected VM restarts elsewhere.
    vm = p.vm("crashed", "restart", on="host3")
    p.fault.crash("host3")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] != "host3", timeout=FAILOVER,
             what="the crashed host's VM to run elsewhere")
    assert not p.live("host3")
    p.fault.boot("host3")
    wait_for(lambda: all_live(p), timeout=FAILOVER, what="host3 to rejoin after boot")
    # Partition 1 | 2: the single host loses quorum and is fenced by its watchdog.
    lonely = p.vm("lonely", "restart", on="host2")
    p.fault.partition(["host2"], ["host1", "host3"])
    wait_for(lambda: power(p)["host2"] == "fenced", timeout=FAILOVER, what="the minority host to be fenced")
    wait_for(lambda: p.where(lonely)[0] == "Running" and p.where(lonely)[1] in ("host1", "host3"),
             timeout=FAILOVER, what="the minority's VM to restart on the majority")
    assert power(p)["host1"] == power(p)["host3"] == "on"
    assert p.master() == "host1"
    # Heal and boot: all three quorate again.
    p.fault.heal()
    p.fault.boot("host2")
    wait_for(lambda: all_live(p), timeout=FAILOVER, what="all three live after heal and boot")
    # A crash of the master: a new master on the quorate pair.
    on_master = p.vm("on-master", "restart", on="host1")
    p.fault.crash("host1")
    wait_for(lambda: p.master() != "host1", timeout=FAILOVER, what="a new master")
    wait_for(lambda: p.where(on_master)[0] == "Running" and p.where(on_master)[1] != "host1", timeout=FAILOVER,
             what="the old master's VM to restart")
    assert x.pool.get_ha_enabled(p.pool) is True
    tracker.seen(p.xapid)


def test_five_hosts_partitioned_two_against_three(corosync_pool: PoolFactory) -> None:
    p = corosync_pool(hosts=5)
    vms = {n: p.vm(f"on-{n}", "restart", on=n, memory_gib=1) for n in ("host1", "host4", "host5")}
    p.fault.partition(["host4", "host5"], ["host1", "host2", "host3"])
    wait_for(lambda: power(p)["host4"] == power(p)["host5"] == "fenced", timeout=FAILOVER,
             what="the two-host minority to be fenced")
    for name in ("host4", "host5"):
        wait_for(lambda n=name: p.where(vms[n])[0] == "Running" and p.where(vms[n])[1] in ("host1", "host2", "host3"),
                 timeout=FAILOVER, what=f"the VM of {name} to restart on the majority")
    assert [power(p)[n] for n in ("host1", "host2", "host3")] == ["on"] * 3
    assert p.where(vms["host1"]) == ("Running", "host1")
    assert p.master() == "host1"


def test_disable_leaves_no_corosync_namespace_or_shm(corosync_pool: PoolFactory, tracker: Tracker) -> None:
    p = corosync_pool()
    tracker.seen(p.xapid)
    assert leftovers(p.xapid.state_dir, set())["netns"]
    p.api.pool.disable_ha()
    assert leftovers(p.xapid.state_dir, tracker.pids) == {}


def test_daemon_killed_then_restarted_reclaims_everything(corosync_pool: PoolFactory, tracker: Tracker) -> None:
    """A SIGKILLed daemon leaves corosync running; the next start reclaims it, the stop removes all."""
    p = corosync_pool()
    before = tracker.seen(p.xapid)
    p.xapid.kill()
    assert set(corosync_processes(p.xapid.state_dir)) == set(before)  # orphans of the killed daemon
    p.xapid.start()
    x = p.xapid.session().xenapi
    wait_for(lambda: x.pool.get_ha_enabled(p.pool) and all(
        x.host_metrics.get_live(x.host.get_metrics(h)) for h in x.host.get_all()), timeout=FAILOVER,
        what="the pool to come back with HA")
    now = tracker.seen(p.xapid)
    assert not set(before) & set(now)  # the old nodes were reclaimed, new ones started
