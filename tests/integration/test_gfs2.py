"""The gfs2 driver: a shared SR that plugs only in a clustered pool, as real gfs2 does
(xapi_clustering.ml assert_cluster_host_is_enabled_for_matching_sms, called by xapi_sr.ml create
and xapi_pbd.ml plug), and HA on it choosing the cluster's corosync."""

from __future__ import annotations

from typing import Any

import pytest
import XenAPI

from tests.integration.corosync_kit import Tracker, leftovers, management, named, needs_corosync
from tests.integration.ha.conftest import wait_for

TIB = str(1024**4)


def details(exc: pytest.ExceptionInfo[XenAPI.Failure]) -> list[str]:
    return list(exc.value.details)


def test_without_a_cluster_gfs2_is_refused_and_nothing_is_made(shared_api: Any) -> None:
    x = shared_api
    (sm,) = x.SM.get_all_records_where('field "type" = "gfs2"').values()
    assert sm["required_cluster_stack"] == ["corosync"] and "VDI_GENERATE_CONFIG" in sm["features"]
    master = x.pool.get_master(x.pool.get_all()[0])
    srs, pbds = set(x.SR.get_all()), set(x.PBD.get_all())
    with pytest.raises(XenAPI.Failure) as e:
        x.SR.create(master, {"provider": "iscsi", "SCSIid": "36001"}, TIB, "GFS2", "", "gfs2", "user", True, {})
    assert details(e) == ["NO_COMPATIBLE_CLUSTER_HOST", master]
    assert set(x.SR.get_all()) == srs and set(x.PBD.get_all()) == pbds
    # An introduced gfs2 SR cannot be plugged either.
    sr = x.SR.introduce("b8a1b1d4-25c4-4a4b-9a80-3a9d6d0e0f11", "GFS2", "", "gfs2", "user", True, {})
    pbd = x.PBD.create({"host": master, "SR": sr, "device_config": {"SCSIid": "36001"}})
    with pytest.raises(XenAPI.Failure) as e:
        x.PBD.plug(pbd)
    assert details(e) == ["NO_COMPATIBLE_CLUSTER_HOST", master]
    assert x.PBD.get_currently_attached(pbd) is False
    x.PBD.destroy(pbd)
    x.SR.forget(sr)


@needs_corosync
def test_a_clustered_pool_plugs_gfs2_and_ha_on_it_runs_on_the_clusters_corosync(xapid_factory: Any,
                                                                                  tracker: Tracker) -> None:
    d = xapid_factory(hosts=3, **{"fence-reboot-delay": "0"})
    tracker.daemons.append(d)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    for h in x.host.get_all():
        x.PIF.set_disallow_unplug(management(x, h), True)
    cluster = x.Cluster.pool_create(x.PIF.get_network(management(x, master)), "corosync", 1.0, 1.0)
    wait_for(lambda: x.Cluster.get_is_quorate(cluster) and int(x.Cluster.get_live_hosts(cluster)) == 3,
             timeout=40, what="a quorate cluster of three")
    cluster_nodes = set(named(tracker.seen(d), "corosync"))
    sr = x.SR.create(master, {"provider": "iscsi", "SCSIid": "36001"}, TIB, "GFS2", "", "gfs2", "user", True, {})
    assert all(x.PBD.get_currently_attached(p) for p in x.SR.get_PBDs(sr)) and len(x.SR.get_PBDs(sr)) == 3

    x.pool.enable_ha([sr], {"timeout": "10"})
    assert x.pool.get_ha_cluster_stack(pool) == "corosync"
    assert set(named(tracker.seen(d), "corosync")) == cluster_nodes  # HA follows the cluster's own nodes
    x.pool.disable_ha()

    # The stack is in use while gfs2 is attached; a host whose Cluster_host is disabled cannot plug it.
    by_host = {x.Cluster_host.get_host(ch): ch for ch in x.Cluster.get_cluster_hosts(cluster)}
    slave = next(h for h in x.host.get_all() if h != master)
    with pytest.raises(XenAPI.Failure) as e:
        x.Cluster_host.disable(by_host[slave])
    assert details(e) == ["CLUSTER_STACK_IN_USE", "corosync"]
    pbd = next(p for p in x.SR.get_PBDs(sr) if x.PBD.get_host(p) == slave)
    x.PBD.unplug(pbd)
    x.Cluster_host.disable(by_host[slave])
    with pytest.raises(XenAPI.Failure) as e:
        x.PBD.plug(pbd)
    assert details(e) == ["CLUSTERING_DISABLED", by_host[slave]]
    x.Cluster_host.enable(by_host[slave])
    wait_for(lambda: x.Cluster.get_is_quorate(cluster), timeout=40, what="quorate again")
    x.PBD.plug(pbd)

    for p in x.SR.get_PBDs(sr):
        x.PBD.unplug(p)
    x.SR.forget(sr)
    x.Cluster.pool_destroy(cluster)
    assert leftovers(d.state_dir, tracker.pids) == {}
