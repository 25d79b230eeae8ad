"""Who fences and who survives (ha.md 4.9 survival rules; xha daemon/sm.c), seen through the pool.

Hosts are broken with ``xapid fault``; the emulated watchdog fences the hosts the shipped xhad
emulation condemns.  Fenced hosts stay off here (``fence-reboot-delay = 0``) so the end state can
be checked; tests/integration/ha/test_lifecycle.py covers the reboot and rejoin.
"""

from __future__ import annotations

from tests.integration.ha.conftest import HaPool, HaPoolFactory, wait_for

DETECT = 45.0  # T = 10: the losers fence within about T, the winners drop them a watchdog timeout later


def power(p: HaPool) -> dict[str, str]:
    """host name -> power state, from ``xapid fault status``."""
    out = {}
    for line in p.fault.status():
        name, _uuid, fields = line.split(" ", 2)
        out[name] = dict(f.split("=", 1) for f in fields.split())["power"]
    return out


def test_hung_host_is_fenced_by_its_watchdog_and_never_returns_with_its_vms(ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(**{"fence-reboot-delay": "0"})
    vm = p.vm("on-hung", "restart", on="host3")
    p.fault.hang("host3")
    wait_for(lambda: power(p)["host3"] == "fenced", timeout=DETECT, what="the hung host to be fenced")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] != "host3", timeout=DETECT,
             what="its protected VM to run elsewhere")
    assert not p.live("host3")
    assert p.fault.thaw("host3") == ["host3: fenced -> fenced"]  # too late: the watchdog reset it
    assert p.where(vm)[1] in ("host1", "host2")


def test_partition_one_against_two_fences_the_single_host(ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(**{"fence-reboot-delay": "0"})
    vm = p.vm("lonely", "restart", on="host3")
    p.fault.partition(["host3"], ["host1", "host2"])
    wait_for(lambda: power(p)["host3"] == "fenced", timeout=DETECT, what="the minority host to fence")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] != "host3", timeout=DETECT,
             what="the restart on the majority")
    assert power(p)["host1"] == power(p)["host2"] == "on"
    assert p.master() == "host1"
    assert [m["obj_uuid"] for m in p.messages("HA_HOST_FAILED")] == [p.uuid("host3")]


def test_partition_two_against_two_keeps_the_side_with_the_lowest_index(ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(hosts=4, **{"fence-reboot-delay": "0"})
    low = p.vm("low", "restart", on="host2")
    high = p.vm("high", "restart", on="host4")
    p.fault.partition(["host3", "host4"], ["host1", "host2"])
    wait_for(lambda: power(p)["host3"] == power(p)["host4"] == "fenced", timeout=DETECT,
             what="the side without the lowest index to fence")
    wait_for(lambda: p.where(high)[0] == "Running" and p.where(high)[1] in ("host1", "host2"), timeout=DETECT,
             what="the restart on the winning side")
    assert power(p)["host1"] == power(p)["host2"] == "on"
    assert p.where(low) == ("Running", "host2")
    assert p.master() == "host1"


def test_partition_isolating_the_master_elects_a_new_one(ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(hosts=4, **{"fence-reboot-delay": "0"})
    vm = p.vm("on-master", "restart", on="host1")
    p.fault.partition(["host1"], ["host2", "host3", "host4"])
    wait_for(lambda: p.master() != "host1", timeout=DETECT, what="a new master on the majority side")
    wait_for(lambda: power(p)["host1"] == "fenced", timeout=DETECT, what="the isolated master to fence")
    wait_for(lambda: p.where(vm)[0] == "Running" and p.where(vm)[1] != "host1", timeout=DETECT,
             what="the old master's VM to restart")
    assert [m["obj_uuid"] for m in p.messages("POOL_MASTER_TRANSITION")] == [p.uuid(p.master())]


def test_statefile_loss_of_one_host_fences_it(ha_pool_factory: HaPoolFactory) -> None:
    p = ha_pool_factory(**{"fence-reboot-delay": "0"})
    p.fault.statefile_loss("host2")
    wait_for(lambda: power(p)["host2"] == "fenced", timeout=DETECT, what="the host without statefile to fence")
    wait_for(lambda: not p.live("host2"), timeout=DETECT, what="the pool to see it dead")
    assert power(p)["host1"] == power(p)["host3"] == "on"
    assert p.messages("HA_STATEFILE_LOST") == []


def test_statefile_loss_of_every_host_survives_by_rule_2_and_restores(ha_pool: HaPool) -> None:
    p = ha_pool
    x = p.api
    statefiles = x.pool.get_ha_statefiles(p.pool)
    p.fault.statefile_loss("all")
    wait_for(lambda: len(p.messages("HA_STATEFILE_LOST")) == 1, timeout=DETECT, what="HA_STATEFILE_LOST")
    lost = p.messages("HA_STATEFILE_LOST")[0]
    assert (lost["obj_uuid"], lost["cls"], int(lost["priority"])) == (p.uuid(p.master()), "Host", 2)
    wait_for(lambda: all(x.host.get_ha_statefiles(h) == [] for h in p.hosts.values()), timeout=DETECT,
             what="host.ha_statefiles to empty")
    assert set(power(p).values()) == {"on"}
    assert all(p.live(name) for name in p.hosts)
    assert x.pool.get_ha_enabled(p.pool)
    p.fault.statefile_restore("all")
    wait_for(lambda: all(x.host.get_ha_statefiles(h) == statefiles for h in p.hosts.values()), timeout=DETECT,
             what="host.ha_statefiles back")
    assert len(p.messages("HA_STATEFILE_LOST")) == 1  # edge-triggered
    assert set(power(p).values()) == {"on"}
