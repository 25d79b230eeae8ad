"""Where a VM can run and moving it inside the pool (xapi_vm_helpers.ml ``assert_can_boot_here``,
``get_possible_hosts``; xapi_vm_migrate.ml ``pool_migrate``, ``migrate_send``, ``assert_can_migrate``).

A migration keeps the VM running: its residency moves, both hosts' memory is recomputed with the
same accounting as a start (:func:`xapid.api.vm.account_host`), the destination passes the HA plan
guard of a start, and the planning status is brought up to date afterwards when HA is on.
"""

from __future__ import annotations

from typing import Any

from xapid import operations
from xapid.api import Call, handler
from xapid.api import vdi as vdi_api
from xapid.api.vm import _ha_enabled, account_host, devices_error, free_for_start, open_console
from xapid.api.vm_copy import vm_operation
from xapid.errors import ApiError
from xapid.ha.planning import vm_record
from xapid.schema import NULL_REF
from xapid.store import Transaction
from xapid.timeutil import now_iso


def boot_error(tx: Transaction, vm: str, host: str, memory: bool = True) -> ApiError | None:
    """The first reason ``vm`` cannot run on ``host`` (``assert_can_boot_here``), or None."""
    rec = tx.get("VM", vm)
    h = tx.get("host", host)
    metrics = tx.read("host_metrics", h["metrics"])
    if not (metrics and metrics["live"]):
        return ApiError("HOST_NOT_LIVE")
    if rec["is_control_domain"] and rec["affinity"] not in (NULL_REF, host):
        return ApiError("OPERATION_NOT_ALLOWED", "Cannot boot a control domain on a host different from its affinity")
    local = rec["power_state"] == "Running" and rec["resident_on"] == host
    if not rec["is_control_domain"] and not local and not h["enabled"]:
        return ApiError("HOST_DISABLED", host)
    error = devices_error(tx, vm, host)
    if error is not None:
        return error
    if memory and not local:
        needed = vm_record(vm, rec).start_memory()
        available = free_for_start(tx, host, vm)
        if available < needed:
            return ApiError("HOST_NOT_ENOUGH_FREE_MEMORY", needed, available)
    pcpus = int((h["cpu_info"] or {}).get("cpu_count", "0") or 0)
    if pcpus and int(rec["VCPUs_max"]) > pcpus and rec["platform"].get("vcpu-unrestricted") != "true":
        return ApiError("HOST_NOT_ENOUGH_PCPUS", rec["VCPUs_max"], pcpus)
    return None


@handler("VM.assert_can_boot_here")
def assert_can_boot_here(call: Call, self: str, host: str) -> None:
    with call.store.transaction() as tx:
        error = boot_error(tx, self, host)
    if error is not None:
        raise error


@handler("VM.get_possible_hosts")
def get_possible_hosts(call: Call, vm: str) -> list[str]:
    with call.store.transaction() as tx:
        tx.get("VM", vm)
        return [h for h in tx.refs("host") if boot_error(tx, vm, h) is None]


def _move(tx: Transaction, vm: str, rec: dict[str, Any], host: str) -> None:
    source = rec["resident_on"]
    domid = max([r["domid"] for _ref, r in tx.items("VM")] + [0]) + 1
    rec.update(resident_on=host, scheduled_to_be_resident_on=NULL_REF, domid=domid)
    metrics = tx.find("VM_metrics", rec["metrics"])
    if metrics is not None:
        metrics["last_updated"] = now_iso()
    if source != NULL_REF:
        account_host(tx, source, vm)
    account_host(tx, host, vm)
    open_console(tx, vm, rec, host)


def migrate_vm(call: Call, vm: str, host: str, op: str) -> None:
    """Move a running VM to ``host`` after ``op``'s checks, the boot checks and the HA plan guard."""
    if call.store.get("host", host) is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    with vm_operation(call, vm, op):
        with call.store.transaction() as tx:
            rec = tx.get("VM", vm)
            error = boot_error(tx, vm, host)
            if error is not None:
                raise error
            if rec["resident_on"] != host:
                call.daemon.ha.planning.assert_vm_start_preserves_plan(vm, host)
            _move(tx, vm, rec, host)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


@handler("VM.pool_migrate")
def pool_migrate(call: Call, vm: str, host: str, options: dict[str, str]) -> None:
    network = options.get("network")
    if network is not None and call.store.get("network", network) is None:
        raise ApiError("HANDLE_INVALID", "network", network)
    migrate_vm(call, vm, host, "pool_migrate")


# -- migrate_send within the pool ----------------------------------------------------------------------------


@handler("host.migrate_receive")
def migrate_receive(call: Call, host: str, network: str, options: dict[str, str]) -> dict[str, str]:
    """The destination map ``VM.migrate_send`` takes (xapi_host.ml ``migrate_receive``)."""
    rec = call.store.get("host", host)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    if network != NULL_REF and call.store.get("network", network) is None:
        raise ApiError("HANDLE_INVALID", "network", network)
    master = call.store.get("host", call.daemon.master_ref()) or rec
    session = call.session or ""
    return {"host": host, "session_id": session, "SM": f"http://{rec['address']}/services/SM?session_id={session}",
            "xenops": f"http://{rec['address']}/services/xenops?session_id={session}",
            "master": f"http://{master['address']}/"}


def _destination(call: Call, dest: dict[str, str]) -> str:
    host = dest.get("host", "")
    if call.store.get("host", host) is None:
        # Another pool's host: xapid emulates one pool, so there is nothing to reach.
        raise ApiError("VM_MIGRATE_CONTACT_REMOTE_SERVICE_FAILED")
    return host


def _check_maps(call: Call, vdi_map: dict[str, str], vif_map: dict[str, str]) -> None:
    for vdi, sr in vdi_map.items():
        if call.store.get("VDI", vdi) is None:
            raise ApiError("HANDLE_INVALID", "VDI", vdi)
        if call.store.get("SR", sr) is None:
            raise ApiError("HANDLE_INVALID", "SR", sr)
    for vif, network in vif_map.items():
        if call.store.get("VIF", vif) is None:
            raise ApiError("HANDLE_INVALID", "VIF", vif)
        if call.store.get("network", network) is None:
            raise ApiError("HANDLE_INVALID", "network", network)


@handler("VM.assert_can_migrate")
def assert_can_migrate(call: Call, vm: str, dest: dict[str, str], live: bool, vdi_map: dict[str, str],
                       vif_map: dict[str, str], options: dict[str, str], vgpu_map: dict[str, str]) -> None:
    host = _destination(call, dest)
    _check_maps(call, vdi_map, vif_map)
    with call.store.transaction() as tx:
        rec = operations.assert_vm(tx, vm, "migrate_send")
        if rec["power_state"] == "Running":
            moved = [v for v in vdi_map if (tx.read("VDI", v) or {}).get("SR") != vdi_map[v]]
            error = boot_error(tx, vm, host) if not moved else None
            if error is not None:
                raise error


@handler("VM.migrate_send")
def migrate_send(call: Call, vm: str, dest: dict[str, str], live: bool, vdi_map: dict[str, str],
                 vif_map: dict[str, str], options: dict[str, str], vgpu_map: dict[str, str],
                 vdi_format_map: dict[str, str]) -> str:
    """Inside the pool: disks named in ``vdi_map`` move to their new SR (copied, then the old VDI goes),
    VIFs to the networks of ``vif_map``, and a running VM to the destination host.  Returns the VM."""
    host = _destination(call, dest)
    _check_maps(call, vdi_map, vif_map)
    with vm_operation(call, vm, "migrate_send") as src:
        moves = []
        for vbd in call.store.referrers("VBD", "VM", vm):
            rec = call.store.get("VBD", vbd)
            if rec is None or rec["empty"] or rec["VDI"] not in vdi_map:
                continue
            vdi = call.store.get("VDI", rec["VDI"])
            if vdi is not None and vdi["SR"] != vdi_map[rec["VDI"]]:
                moves.append((vbd, rec["VDI"], vdi_api.duplicate(call, rec["VDI"], "copy", vdi_map[rec["VDI"]])))
        old_files = []
        with call.store.transaction() as tx:
            for vbd, old, new in moves:
                tx.update("VBD", vbd, VDI=new)
                new_rec = tx.get("VDI", new)
                new_rec.update(name_label=tx.get("VDI", old)["name_label"])
                old_files.append(vdi_api.remove_vdi(tx, old))
            for vif, network in vif_map.items():
                if tx.get("VIF", vif)["VM"] == vm:
                    tx.update("VIF", vif, network=network)
            rec = tx.get("VM", vm)
            if src["power_state"] == "Running":
                error = boot_error(tx, vm, host)
                if error is not None:
                    raise error
                if rec["resident_on"] != host:
                    call.daemon.ha.planning.assert_vm_start_preserves_plan(vm, host)
                _move(tx, vm, rec, host)
    for files in old_files:
        call.daemon.disks.remove_vdi(*files)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()
    return vm
