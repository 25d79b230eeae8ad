"""The corosync stack: real corosync 3 behind the seven scripts, one node per emulated host.

The design's example (an OCFS2 SR attached: ``pool.enable_ha`` chooses ``corosync``), fencing by
quorum loss through the emulated watchdog, and nothing left behind (namespaces, processes,
``/dev/shm``).  Needs root, ``ip`` and the Debian package ``corosync``; skipped with the reason
otherwise (and failed under XAPID_CI=1, see tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid
from tests.integration.ha.conftest import HaPool, wait_for
from xapid.hw.faults import FaultClient
from xapid.hw.netns import prefix_for

MISSING = ("needs root" if os.geteuid() != 0 else
           "needs the corosync package (apt-get install corosync)" if shutil.which("corosync") is None else
           "needs iproute2 (ip netns)" if shutil.which("ip") is None else None)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"corosync stack: {MISSING}")

# T = 10: a dead node leaves corosync's membership within about 1 s, its watchdog (10 s) fences it,
# the others count it dead 1.5 s after that; then the monitor restarts its VMs.
FAILOVER = 40.0


def corosync_processes(state_dir: Path) -> list[int]:
    """Live processes (corosync or its agent) whose environment names a host folder of ``state_dir``."""
    needle = f"XAPID_HOST_DIR={state_dir}/hosts/".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        if needle in env and stat.rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def leftovers(state_dir: Path, pids: set[int]) -> dict[str, list[str]]:
    """What a pool may never leave behind: namespaces of this state dir, its processes, their /dev/shm."""
    prefix = prefix_for(state_dir)
    shm = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"qb-{p}-") or f"-{p}-" in n for p in pids)]
    netns = sorted(n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                   if n.startswith(prefix))
    return {k: v for k, v in {"netns": netns, "processes": [str(p) for p in corosync_processes(state_dir)],
                              "shm": shm}.items() if v}


class Tracker:
    """Remembers every corosync pid seen, to look for their /dev/shm entries at the end."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.daemons: list[Xapid] = []

    def seen(self, d: Xapid) -> list[int]:
        pids = corosync_processes(d.state_dir)
        self.pids |= set(pids)
        return pids


@pytest.fixture
def tracker(xapid_factory: Any) -> Iterator[Tracker]:
    """Stops every daemon it tracks, then fails the test if anything of its pools is left."""
    t = Tracker()
    yield t
    problems = {}
    for d in t.daemons:
        t.seen(d)
        d.stop()
        left = leftovers(d.state_dir, t.pids)
        if left:
            problems[str(d.state_dir)] = left
    assert not problems, f"left behind after the daemon stopped: {problems}"


PoolFactory = Callable[..., HaPool]


def ocfs2_sr(x: Any) -> str:
    master = x.pool.get_master(x.pool.get_all()[0])
    return str(x.SR.create(master, {}, str(2 * 1024**4), "OCFS2", "", "ocfs2", "user", True, {}))


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
    out = {}
    for line in p.fault.status():
        name, _uuid, fields = line.split(" ", 2)
        out[name] = dict(f.split("=", 1) for f in fields.split())["power"]
    return out


def all_live(p: HaPool) -> bool:
    return all(p.live(n) for n in p.hosts)


def test_ocfs2_heartbeat_sr_chooses_corosync_and_forms_a_quorate_liveset(corosync_pool: PoolFactory,
                                                                            tracker: Tracker) -> None:
    """The design's example: an OCFS2 SR needs corosync; enable_ha runs one real corosync per host."""
    p = corosync_pool()
    assert p.api.pool.get_ha_cluster_stack(p.pool) == "corosync"
    assert p.api.pool.get_ha_enabled(p.pool) is True
    assert all_live(p)
    pids = tracker.seen(p.xapid)
    names = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids)
    assert names.count("corosync") == 3
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
    assert list(e.value.details) == ["INCOMPATIBLE_STATEFILE_SR", "ocfs2"]
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
    time.sleep(0.1)
