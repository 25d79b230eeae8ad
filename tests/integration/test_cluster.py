"""Clustered pools (xapi_cluster.ml, xapi_cluster_host.ml, xapi_clustering.ml) over real corosync.

Cluster and Cluster_host fields are corosync's own answer; HA in a clustered pool adopts the
cluster's corosync.  Each test leaves nothing behind (the ``tracker`` fixture checks).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import XenAPI

from tests.integration.corosync_kit import (
    MISSING,
    Tracker,
    leftovers,
    management,
    named,
    namespaces,
    needs_corosync,
    ocfs2_sr,
    power,
)
from tests.integration.ha.conftest import vm_record, wait_for
from xapid.hw.faults import FaultClient

DETECT = 40.0


def details(exc: pytest.ExceptionInfo[XenAPI.Failure]) -> list[str]:
    return list(exc.value.details)


def cluster_state(x: Any, cluster: str) -> tuple[bool, int, int, int]:
    rec = x.Cluster.get_record(cluster)
    return rec["is_quorate"], int(rec["quorum"]), int(rec["live_hosts"]), int(rec["expected_hosts"])


@needs_corosync
def test_pool_create_is_quorate_follows_a_crash_and_pool_destroy_leaves_nothing(xapid_factory: Any,
                                                                                  tracker: Tracker) -> None:
    d = xapid_factory(hosts=3, **{"fence-reboot-delay": "0"})
    tracker.daemons.append(d)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    pif = management(x, master)
    network = x.PIF.get_network(pif)
    # xapi's checks, before anything runs: nothing is made.
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.pool_create(network, "xhad", 1.0, 1.0)
    assert details(e) == ["INVALID_CLUSTER_STACK", "xhad"]
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.pool_create(network, "corosync", 0.5, 1.0)
    assert details(e) == ["INVALID_VALUE", "token_timeout", "0.5"]
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.pool_create(network, "corosync", 1.0, 0.5)
    assert details(e) == ["INVALID_VALUE", "token_timeout_coefficient", "0.5"]
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.pool_create(network, "corosync", 1.0, 1.0)
    assert details(e) == ["PIF_ALLOWS_UNPLUG", pif]
    assert x.Cluster.get_all() == [] and namespaces(d.state_dir) == []

    x.PIF.set_disallow_unplug(pif, True)
    cluster = x.Cluster.pool_create(network, "corosync", 1.0, 1.0)
    rec = x.Cluster.get_record(cluster)
    assert rec["cluster_stack"] == "corosync" and float(rec["token_timeout"]) == 1.0
    assert len(rec["cluster_hosts"]) == 3
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 3, 3), timeout=DETECT, what="a quorate 3-node cluster")
    assert all(x.Cluster_host.get_live(ch) and x.Cluster_host.get_enabled(ch) for ch in rec["cluster_hosts"])
    assert len(named(tracker.seen(d), "corosync")) == 3
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.create(pif, "corosync", True, 1.0, 1.0)
    assert details(e)[0] == "INTERNAL_ERROR"
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.destroy(cluster)
    assert details(e) == ["CLUSTER_DOES_NOT_HAVE_ONE_NODE", "3"]

    # corosync itself notices a crashed host: live_hosts and Cluster_host.live follow.
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    fault = FaultClient(d.state_dir)
    fault.crash("host3")
    victim = next(ch for ch in rec["cluster_hosts"] if x.Cluster_host.get_host(ch) == hosts["host3"])
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 2, 3), timeout=DETECT, what="two live nodes")
    assert x.Cluster_host.get_live(victim) is False
    fault.boot("host3")
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 3, 3), timeout=DETECT, what="host3 back in the cluster")
    # A partition isolating the master: its own node says it lost quorum (the fields are the master's view).
    fault.partition(["host1"], ["host2", "host3"])
    wait_for(lambda: cluster_state(x, cluster) == (False, 2, 1, 3), timeout=DETECT, what="the master inquorate")
    fault.heal()
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 3, 3), timeout=DETECT, what="quorate again after heal")

    x.Cluster.pool_destroy(cluster)
    assert x.Cluster.get_all() == [] and x.Cluster_host.get_all() == []
    assert leftovers(d.state_dir, tracker.pids) == {}


@needs_corosync
def test_pool_create_then_ha_adopts_the_clusters_corosync(xapid_factory: Any, tracker: Tracker) -> None:
    """HA on a clustered pool chooses corosync and follows the cluster's nodes; disabling HA keeps them."""
    d = xapid_factory(hosts=3, **{"fence-reboot-delay": "0"})
    tracker.daemons.append(d)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    for h in x.host.get_all():
        x.PIF.set_disallow_unplug(management(x, h), True)
    network = x.PIF.get_network(management(x, x.pool.get_master(pool)))
    cluster = x.Cluster.pool_create(network, "corosync", 1.0, 1.0)
    wait_for(lambda: cluster_state(x, cluster)[2] == 3, timeout=DETECT, what="three live nodes")
    cluster_nodes = set(named(tracker.seen(d), "corosync"))
    sr = ocfs2_sr(x)
    x.pool.enable_ha([sr], {"timeout": "10"})
    assert x.pool.get_ha_cluster_stack(pool) == "corosync"
    # No second corosync: each host's HA agent follows the cluster's own node.
    assert set(named(tracker.seen(d), "corosync")) == cluster_nodes
    for h in x.host.get_all():
        log = (d.state_dir / "hosts" / x.host.get_uuid(h) / "corosync" / "agent.log").read_text()
        assert "adopting the clustered pool's corosync" in log
    # Fencing still works: a crashed slave's protected VM restarts on a survivor.
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    vm = x.VM.create(vm_record("protected", 1))
    x.VM.set_ha_restart_priority(vm, "restart")
    x.VM.start_on(vm, hosts["host2"], False, False)
    FaultClient(d.state_dir).crash("host2")
    wait_for(lambda: x.VM.get_power_state(vm) == "Running" and x.VM.get_resident_on(vm) != hosts["host2"],
             timeout=DETECT, what="the protected VM to restart")
    assert power(FaultClient(d.state_dir))["host2"] == "off"
    x.pool.disable_ha()
    # The cluster outlives HA: the survivors' nodes still run and it stays quorate.
    survivors = set(named(tracker.seen(d), "corosync"))
    assert len(survivors) == 2 and survivors < cluster_nodes
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 2, 3), timeout=DETECT, what="the cluster of two")
    # An attached OCFS2 SR needs the cluster stack.
    master_ch = next(ch for ch in x.Cluster.get_cluster_hosts(cluster)
                     if x.Cluster_host.get_host(ch) == x.pool.get_master(pool))
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster_host.disable(master_ch)
    assert details(e) == ["CLUSTER_STACK_IN_USE", "corosync"]
    for pbd in x.SR.get_PBDs(sr):
        if x.PBD.get_currently_attached(pbd):
            x.PBD.unplug(pbd)
    x.SR.forget(sr)
    FaultClient(d.state_dir).boot("host2")
    x.Cluster.pool_destroy(cluster)
    assert leftovers(d.state_dir, tracker.pids) == {}


def test_without_corosync_ha_and_pool_create_fail_clearly(xapid_factory: Any, tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No corosync on PATH: ha_start_daemon exits 16 (MTC_EXIT_INVALID_ENVIRONMENT), pool_create names it."""
    if os.geteuid() != 0:
        pytest.skip(f"real corosync: {MISSING}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ip = shutil.which("ip")
    assert ip is not None
    (bin_dir / "ip").symlink_to(ip)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    if any(os.path.exists(f"{p}/corosync") for p in ("/usr/bin", "/bin")):
        pytest.skip("corosync is installed in /usr/bin: cannot hide it")
    d = xapid_factory(hosts=3)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    sr = ocfs2_sr(x)
    with pytest.raises(XenAPI.Failure) as e:
        x.pool.enable_ha([sr], {"timeout": "10"})
    assert details(e)[0] == "INTERNAL_ERROR" and "MTC_EXIT_INVALID_ENVIRONMENT" in details(e)[1]
    assert "needs corosync (package corosync)" in d.log()
    assert x.pool.get_ha_enabled(pool) is False
    pif = management(x, x.pool.get_master(pool))
    x.PIF.set_disallow_unplug(pif, True)
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster.pool_create(x.PIF.get_network(pif), "corosync", 1.0, 1.0)
    assert details(e)[0] == "INTERNAL_ERROR" and "needs corosync (package corosync)" in details(e)[1]
    assert x.Cluster.get_all() == [] and x.Cluster_host.get_all() == []
    assert namespaces(d.state_dir) == []


@needs_corosync
def test_host_destroy_forgets_the_dead_member_and_the_survivors_expect_one_vote_less(xapid_factory: Any,
                                                                                   tracker: Tracker) -> None:
    """host.destroy declares the member permanently dead (xapi_hooks.ml host_pre_declare_dead ->
    Cluster_host.forget, xapi_cluster_host.ml forget): the survivors' nodelist drops it."""
    d = xapid_factory(hosts=3, **{"fence-reboot-delay": "0"})
    tracker.daemons.append(d)
    x = d.session().xenapi
    pif = management(x, x.pool.get_master(x.pool.get_all()[0]))
    x.PIF.set_disallow_unplug(pif, True)
    cluster = x.Cluster.pool_create(x.PIF.get_network(pif), "corosync", 1.0, 1.0)
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 3, 3), timeout=DETECT, what="a quorate 3-node cluster")
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    FaultClient(d.state_dir).crash("host3")
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 2, 3), timeout=DETECT, what="two live nodes of three")
    x.host.destroy(hosts["host3"])
    assert len(x.Cluster.get_cluster_hosts(cluster)) == 2
    assert x.Cluster.get_pending_forget(cluster) == []
    wait_for(lambda: cluster_state(x, cluster) == (True, 2, 2, 2), timeout=DETECT, what="two nodes expected")
    x.Cluster.pool_destroy(cluster)
    assert leftovers(d.state_dir, tracker.pids) == {}
