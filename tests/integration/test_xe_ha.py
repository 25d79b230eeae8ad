"""``xe`` end to end: the HA commands and fields (ha.md 8) against a daemon running real cluster stacks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_xe_support import REPO, Result, Xe, make, values

INTERNAL = ("The server failed to handle your request, due to an internal error. The given message may give"
            " details useful for debugging the problem.\n")


@pytest.fixture
def xe(xapid: Any, tmp_path: Path) -> Xe:
    return Xe(tmp_path, xapid)


def pool_uuid(xe: Xe) -> str:
    return xe.ok("pool-list", "--minimal").strip()


def nfs_uuid(xe: Xe) -> str:
    return xe.ok("sr-list", "type=nfs", "--minimal").strip()


def test_ha_walk(xe: Xe, api: Any) -> None:
    """Shared SR needing another stack, enable with xhad, plug refused, compute, disable."""
    pool = pool_uuid(xe)
    melio = xe.ok("sr-create", "name-label=Melio", "type=melio", "shared=true", "physical-size=10GiB").strip()
    pbds = xe.ok("pbd-list", f"sr-uuid={melio}", "--minimal").strip().split(",")
    for pbd in pbds:
        xe.ok("pbd-unplug", f"uuid={pbd}")
    assert xe.ok("pool-ha-enable", f"heartbeat-sr-uuids={nfs_uuid(xe)}", "ha-config:timeout=30") == ""
    assert xe.get("pool", pool, "ha-enabled") == "true"
    assert xe.get("pool", pool, "ha-cluster-stack") == "xhad"
    assert xe.get("pool", pool, "ha-configuration", "timeout") == "30"
    statefile = xe.get("pool", pool, "ha-statefiles")
    assert xe.get("vdi", statefile, "sr-uuid") == nfs_uuid(xe)  # shown as the VDI's uuid, not its ref
    host_rec = values(xe.ok("host-list", "name-label=host1", "params=ha-statefiles,ha-network-peers"))[0]
    assert host_rec["ha-statefiles"] == statefile
    assert len(host_rec["ha-network-peers"].split("; ")) == 3
    tolerated = xe.ok("pool-ha-compute-max-host-failures-to-tolerate")
    assert tolerated == f"{api.pool.ha_compute_max_host_failures_to_tolerate()}\n"
    assert xe.fail("pbd-plug", f"uuid={pbds[0]}") == (
        "This operation cannot be performed, because it is incompatible with the currently active HA cluster"
        " stack.\ncluster_stack: melio\n")
    assert xe.get("pbd", pbds[0], "currently-attached") == "false"
    assert xe.fail("pool-ha-enable") == \
        "The operation could not be performed because HA is enabled on the Pool\n"
    assert xe.ok("pool-ha-disable") == ""
    assert xe.get("pool", pool, "ha-enabled") == "false"
    assert xe.fail("pool-ha-disable") == \
        "The operation could not be performed because HA is not enabled on the Pool\n"
    assert xe.ok("pbd-plug", f"uuid={pbds[0]}") == ""


def test_ha_enable_with_cluster_stack(xe: Xe, api: Any) -> None:
    """``cluster-stack=`` selects the stack (the 3-argument pool.enable_ha of the design)."""
    pool = pool_uuid(xe)
    assert xe.fail("pool-ha-enable", "cluster-stack=nosuch") == \
        "The requested cluster stack does not exist.\ncluster_stack: nosuch\n"
    melio = xe.ok("sr-create", "name-label=Melio", "type=melio", "shared=true", "physical-size=10GiB").strip()
    assert xe.ok("pool-ha-enable", f"heartbeat-sr-uuids={melio}", "cluster-stack=melio") == ""
    assert xe.get("pool", pool, "ha-cluster-stack") == "melio"
    assert xe.get("pool", pool, "ha-enabled") == "true"
    assert xe.ok("pool-ha-compute-max-host-failures-to-tolerate").strip().isdigit()
    assert '"method": "pool.enable_ha"' in xe.daemon.log()
    xe.ok("pool-ha-disable")
    assert xe.get("pool", pool, "ha-enabled") == "false"


def test_host_emergency_ha_disable(xe: Xe, api: Any) -> None:
    """Soft, then hard, on the master's own address (xapi_ha.ml emergency_ha_disable).

    The soft call sets the master excluded, so the slaves' livesets lose it and they run the
    master-failure procedure: the pool address then reaches the new master.  The calls go to
    the old master's own address, where its local session stays valid through that transition.
    """
    pool = pool_uuid(xe)
    xe.ok("pool-ha-enable", f"heartbeat-sr-uuids={nfs_uuid(xe)}", "ha-config:timeout=30")
    old_master = xe.ok("pool-param-get", f"uuid={pool}", "param-name=master").strip()
    address = xe.get("host", old_master, "address")

    def on_old_master(*args: str) -> Any:
        return xe.raw("-s", address, "-p", xe.port, "-u", "root", "-pwf", str(xe.pwf), "--nossl", *args)

    assert on_old_master("host-emergency-ha-disable").err == INTERNAL + (
        "message: Failure: This operation is extremely dangerous and may cause data loss. This operation must be"
        " forced (use --force).\n")
    assert on_old_master("host-emergency-ha-disable", "soft=true").err.startswith(INTERNAL)
    assert xe.get("pool", pool, "ha-enabled") == "true"
    assert on_old_master("host-emergency-ha-disable", "--force", "soft=true") == Result(0, "", "")
    deadline = time.monotonic() + 20
    while True:
        # A poll may straddle the transition, which ends every pool session: it just asks again.
        r = xe("pool-param-get", f"uuid={pool}", "param-name=master")
        if r.rc == 0 and r.out.strip() != old_master:
            break
        assert time.monotonic() < deadline, f"the slaves never replaced the excluded master: {r}"
        time.sleep(0.2)
    assert on_old_master("host-emergency-ha-disable", "force=true") == Result(0, "", "")
    assert on_old_master("host-emergency-ha-disable", "force=true", "soft=true") == Result(0, "", "")
    log = xe.daemon.log()
    assert log.count('"method": "host.emergency_ha_disable"') == 3
    assert xe.get("pool", pool, "ha-enabled") == "true"  # the pool database is untouched


def test_ha_fields_settable_through_setters(xe: Xe, api: Any) -> None:
    pool = pool_uuid(xe)
    xe.ok("pool-param-set", f"uuid={pool}", "ha-allow-overcommit=true", "ha-reboot-vm-on-internal-shutdown=false")
    assert xe.get("pool", pool, "ha-allow-overcommit") == "true"
    assert xe.get("pool", pool, "ha-reboot-vm-on-internal-shutdown") == "false"
    assert xe.fail("pool-param-set", f"uuid={pool}", "ha-enabled=true") == "Field 'ha-enabled' is read-only.\n"
    assert xe.fail("pool-param-set", f"uuid={pool}", "ha-cluster-stack=melio") == \
        "Field 'ha-cluster-stack' is read-only.\n"


def test_sm_required_cluster_stack_is_comma_joined(xapid_factory: Any, tmp_path: Path) -> None:
    sm_dir = tmp_path / "sm.d"
    shutil.copytree(REPO / "etc" / "sm.d", sm_dir)
    doc = json.loads((sm_dir / "nfs.json").read_text())
    doc.update(type="twostack", name_label="twostack", required_cluster_stack=["xhad", "melio"])
    (sm_dir / "twostack.json").write_text(json.dumps(doc))
    xe = Xe(tmp_path, xapid_factory(**{"sm-dir": str(sm_dir)}))
    sm = xe.ok("sm-list", "type=twostack", "--minimal").strip()
    assert xe.get("sm", sm, "required-cluster-stack") == "xhad,melio"
    assert values(xe.ok("sm-list", "type=twostack", "params=required-cluster-stack")) == \
        [{"required-cluster-stack": "xhad,melio"}]


def test_ha_compute_hypothetical_max(xe: Xe, api: Any) -> None:
    """Repeated ``vm-uuid=``/``restart-priority=`` pairs are matched in order (ha.md 8)."""
    size = str(50 * 1024**3)
    a, b = (api.VM.get_uuid(make(api, "VM", name_label=name, is_a_template=False, memory_static_max=size,
                                 memory_dynamic_max=size, memory_dynamic_min=size, memory_static_min=size,
                                 VCPUs_max="1", VCPUs_at_startup="1")) for name in ("a", "b"))
    command = "pool-ha-compute-hypothetical-max-host-failures-to-tolerate"
    assert xe.ok(command) == "3\n"
    assert xe.ok(command, f"vm-uuid={a}", "restart-priority=restart") == "2\n"
    assert xe.ok(command, f"vm-uuid={a}", f"vm-uuid={b}", "restart-priority=restart",
                 "restart-priority=restart") == "1\n"
    assert xe.ok(command, f"vm-uuid={a}", "restart-priority=best-effort", f"vm-uuid={b}",
                 "restart-priority=restart") == "2\n"
    assert xe.ok(command, f"vm-uuid={b}", f"vm-uuid={a}", "restart-priority=restart",
                 "restart-priority=") == "2\n"
    assert '"method": "pool.ha_compute_hypothetical_max_host_failures_to_tolerate"' in xe.daemon.log()
    assert xe.fail(command, f"vm-uuid={a}", f"vm-uuid={b}", "restart-priority=restart") == INTERNAL + (
        "message: Failure: Call requires an equal number of vm-uuid and restart-priority arguments\n")
    err = xe.fail(command, f"vm-uuid={a}", "restart-priority=always")
    assert "ha_restart_priority" in err and "always" in err
    assert xe.fail(command, "vm-uuid=nope", "restart-priority=restart") == \
        "The uuid you supplied was invalid.\ntype: VM\nuuid: nope\n"
    assert xe.get("vm", a, "ha-restart-priority") == ""
