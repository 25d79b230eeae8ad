"""VM: creation with its metrics object, the power-state machine, memory accounting and HA guards.

Memory follows what runs (``memory_check.ml``): a host offers ``memory_total - memory_overhead``;
``host_metrics.memory_free`` is what is left after every resident VM (dom0 included) got its
share, ``dynamic_max`` when that fits, ballooned toward ``dynamic_min`` when it does not
(:func:`xapid.ha.planner.balloon`); ``VM_metrics.memory_actual`` of a running VM is its share.
Starting needs the VM's ``dynamic_min`` (``static_max`` for PVH) free at maximum compression.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from xapid import generic, operations
from xapid.api import Call, handler
from xapid.api import vtpm as vtpm_api
from xapid.api.vdi import account, create_vdi, file_of, remove_vdi
from xapid.errors import ApiError
from xapid.ha import planner
from xapid.ha.planning import RESTART_PRIORITIES, host_record, vm_record
from xapid.hw.guest import remove_metrics
from xapid.hw.metrics import data_source_record, invalid_data_source, missing_data_source
from xapid.schema import NULL_REF
from xapid.store import Transaction, new_uuid
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.daemon import Daemon

__all__ = ["RESTART_PRIORITIES", "reset_vm_to_halted", "start_vm"]


def _vm(tx: Transaction, vm: str, operation: str) -> dict[str, Any]:
    """The VM's record, after xapi's ``assert_operation_valid`` for ``operation`` (xapi_vm_lifecycle.ml)."""
    return operations.assert_vm(tx, vm, operation)


def _ha_enabled(daemon: Daemon) -> bool:
    pool = daemon.store.get("pool", daemon.pool_ref())
    return bool(pool and pool["ha_enabled"])


# -- memory ----------------------------------------------------------------------------------------


def _residents(tx: Transaction, host: str, *changed: str) -> list[tuple[str, dict[str, Any]]]:
    """VMs resident on ``host`` as ``tx`` sees them (committed index, corrected for ``changed``)."""
    refs = set(tx.store.referrers("VM", "resident_on", host))
    for vm in changed:
        rec = tx.read("VM", vm)
        if rec is not None and rec["resident_on"] == host:
            refs.add(vm)
        else:
            refs.discard(vm)
    out = []
    for ref in sorted(refs):
        rec = tx.read("VM", ref)
        if rec is not None and rec["resident_on"] == host:
            out.append((ref, rec))
    return out


def _host(tx: Transaction, host: str) -> planner.Host:
    rec = tx.get("host", host)
    return host_record(host, rec, tx.read("host_metrics", rec["metrics"]))


def free_for_start(tx: Transaction, host: str, vm: str) -> int:
    """Free memory of ``host`` at maximum compression, ``vm`` itself not counted.

    Only residents count: xapid starts a VM inside one transaction, so no VM is ever left
    ``scheduled_to_be_resident_on`` a host between calls.
    """
    residents = [vm_record(r, rec) for r, rec in _residents(tx, host) if r != vm]
    return planner.host_free(_host(tx, host), residents, planner.DYNAMIC_MIN)


def account_host(tx: Transaction, host: str, *changed: str) -> None:
    """Recompute ``host_metrics.memory_free`` and the residents' ``memory_actual`` of ``host``."""
    if tx.read("host", host) is None:
        return
    residents = _residents(tx, host, *changed)
    targets, free = planner.balloon(_host(tx, host), [vm_record(r, rec) for r, rec in residents])
    metrics_ref = tx.get("host", host)["metrics"]
    metrics = tx.read("host_metrics", metrics_ref)
    if metrics is not None and metrics["memory_free"] != free:
        tx.update("host_metrics", metrics_ref, memory_free=free, last_updated=now_iso())
    for ref, rec in residents:
        m = tx.read("VM_metrics", rec["metrics"])
        if m is not None and m["memory_actual"] != targets[ref]:
            tx.update("VM_metrics", rec["metrics"], memory_actual=targets[ref])


# -- power-state changes shared with HA --------------------------------------------------------------


def _can_run_on(tx: Transaction, host: str) -> ApiError | None:
    h = tx.get("host", host)
    metrics = tx.read("host_metrics", h["metrics"])
    if not (metrics and metrics["live"]):
        return ApiError("HOST_OFFLINE", host)
    if not h["enabled"]:
        return ApiError("HOST_DISABLED", host)
    return None


def devices_error(tx: Transaction, vm: str, host: str) -> ApiError | None:
    """``assert_can_see_SRs``/``assert_can_see_networks``: every disk's SR attached on ``host`` and every
    NIC's network present there (a network without PIFs is internal and present everywhere)."""
    for vbd in tx.referrers("VBD", "VM", vm):
        vbd_rec = tx.read("VBD", vbd)
        if vbd_rec is None or vbd_rec["empty"] or vbd_rec["VDI"] == NULL_REF:
            continue
        vdi = tx.read("VDI", vbd_rec["VDI"])
        if vdi is None:
            continue
        if not any((p := tx.read("PBD", pbd)) is not None and p["host"] == host and p["currently_attached"]
                   for pbd in tx.referrers("PBD", "SR", vdi["SR"])):
            return ApiError("VM_REQUIRES_SR", vm, vdi["SR"])
    for vif in tx.referrers("VIF", "VM", vm):
        network = (tx.read("VIF", vif) or {}).get("network", NULL_REF)
        pifs = [p for pif in tx.referrers("PIF", "network", network) if (p := tx.read("PIF", pif)) is not None]
        if pifs and not any(p["host"] == host and p["currently_attached"] for p in pifs):
            return ApiError("VM_REQUIRES_NETWORK", vm, network)
    return None


def _memory_error(tx: Transaction, vm: str, rec: dict[str, Any], host: str) -> ApiError | None:
    needed = vm_record(vm, rec).start_memory()
    available = free_for_start(tx, host, vm)
    return ApiError("HOST_NOT_ENOUGH_FREE_MEMORY", needed, available) if available < needed else None


def _choose_host(daemon: Daemon, tx: Transaction, vm: str, rec: dict[str, Any]) -> str:
    """The affinity host if the VM fits there, else the master, else the first host it fits on."""
    candidates = [rec["affinity"]] if rec["affinity"] != NULL_REF else []
    candidates += [daemon.master_ref(), *tx.refs("host")]
    for host in dict.fromkeys(candidates):
        if tx.read("host", host) is None:
            continue
        if _can_run_on(tx, host) is None and devices_error(tx, vm, host) is None \
                and _memory_error(tx, vm, rec, host) is None:
            return host
    raise ApiError("NO_HOSTS_AVAILABLE")


def domain_type(rec: dict[str, Any]) -> str:
    """The type of domain the VM boots as (``unspecified``: HVM if it has an HVM boot policy)."""
    if rec["domain_type"] != "unspecified":
        return str(rec["domain_type"])
    return "hvm" if rec["HVM_boot_policy"] else "pv"


def device_name(userdevice: str) -> str:
    """The device a VBD gets when attached: ``xvda`` for userdevice 0 (as xenopsd names it)."""
    n = int(userdevice) if userdevice.isdigit() else disk_number(userdevice)
    if n is None:
        return userdevice
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return f"xvd{letters}"


def disk_number(device: str) -> int | None:
    """The disk index a device name or number designates (``Device_number.of_string``), or None."""
    if device.isdigit():
        return int(device)
    for prefix in ("xvd", "hd", "sd"):
        if device.startswith(prefix):
            letters = device[len(prefix):].rstrip("0123456789")
            if letters and letters.isalpha() and letters.islower():
                n = 0
                for ch in letters:
                    n = n * 26 + (ord(ch) - ord("a") + 1)
                return n - 1
    return None


def attach_devices(tx: Transaction, vm: str) -> None:
    """A starting (or resuming) domain attaches its VBDs (``device`` from ``userdevice``) and VIFs."""
    for vbd in tx.referrers("VBD", "VM", vm):
        rec = tx.get("VBD", vbd)
        rec.update(currently_attached=True, device=device_name(str(rec["userdevice"])))
    for vif in tx.referrers("VIF", "VM", vm):
        tx.update("VIF", vif, currently_attached=True)


def console_location(tx: Transaction, host: str, console_uuid: str) -> str:
    """Where a console is served: the host's address, as xapi's ``https://<address>/console?uuid=``."""
    address = (tx.read("host", host) or {}).get("address", "127.0.0.1")
    return f"https://{address}/console?uuid={console_uuid}"


def open_console(tx: Transaction, vm: str, rec: dict[str, Any], host: str) -> None:
    """One console per running domain: RFB for HVM guests, a text console for PV ones."""
    consoles = tx.referrers("console", "VM", vm)
    if consoles:
        for console in consoles:
            c = tx.get("console", console)
            c["location"] = console_location(tx, host, c["uuid"])
        return
    uuid = new_uuid()
    tx.create("console", {"uuid": uuid, "VM": vm, "protocol": "rfb" if domain_type(rec) == "hvm" else "vt100",
                          "location": console_location(tx, host, uuid), "other_config": {}})


def close_consoles(tx: Transaction, vm: str) -> None:
    for console in tx.referrers("console", "VM", vm):
        tx.delete("console", console)


def _run_on(tx: Transaction, vm: str, rec: dict[str, Any], host: str, daemon: Daemon | None = None) -> None:
    domid = max([r["domid"] for _ref, r in tx.items("VM")] + [0]) + 1
    rec.update(power_state="Running", resident_on=host, domid=domid, scheduled_to_be_resident_on=NULL_REF)
    if rec["ha_restart_priority"] == "restart":
        rec["ha_always_run"] = True
    metrics = tx.find("VM_metrics", rec["metrics"])
    if metrics is not None:
        metrics.update(start_time=now_iso(), last_updated=now_iso(), state=["running"],
                       current_domain_type=domain_type(rec), hvm=domain_type(rec) == "hvm",
                       VCPUs_number=int(rec["VCPUs_at_startup"]))
    attach_devices(tx, vm)
    remove_metrics(tx, vm, rec)
    open_console(tx, vm, rec, host)
    account_host(tx, host, vm)
    if daemon is not None:
        daemon.guests.booted(vm, rec)


def start_vm(daemon: Daemon, vm_ref: str, host_ref: str | None, paused: bool = False, force: bool = False) -> str:
    """``VM.start`` (``host_ref`` None: the host is chosen) or ``VM.start_on``; returns the host.

    Raises what the handlers raise: VM_IS_TEMPLATE, VM_BAD_POWER_STATE, HANDLE_INVALID,
    HOST_OFFLINE / HOST_DISABLED / VM_REQUIRES_SR / VM_REQUIRES_NETWORK / HOST_NOT_ENOUGH_FREE_MEMORY
    (``start_on``; ``start`` only picks hosts that pass them), NO_HOSTS_AVAILABLE
    (``start``), HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN.  ``force`` skips no check here (xapi's
    flag only overrides CPU-compatibility checks xapid does not model).  After the start the
    HA planning status is brought up to date, then the call sleeps ``VM.start_delay`` seconds,
    as xapi's VM.start does (``Xapi_vm_helpers.start_delay``), outside any transaction.
    """
    with daemon.store.transaction() as tx:
        rec = _vm(tx, vm_ref, "start" if host_ref is None else "start_on")
        if host_ref is None:
            host = _choose_host(daemon, tx, vm_ref, rec)
        else:
            host = host_ref
            error = _can_run_on(tx, host) or devices_error(tx, vm_ref, host) or _memory_error(tx, vm_ref, rec, host)
            if error is not None:
                raise error
        daemon.ha.planning.assert_vm_start_preserves_plan(vm_ref, host)
        _run_on(tx, vm_ref, rec, host, daemon)
        if paused:
            rec["power_state"] = "Paused"
        delay = max(0, int(rec["start_delay"]))
    if _ha_enabled(daemon):
        daemon.ha.planning.update_pool_status()
    if delay:
        time.sleep(delay)
    return host


def _to_halted(tx: Transaction, vm: str, rec: dict[str, Any]) -> str:
    """Halted with no domain: devices detached, residency cleared, the host's memory given back."""
    host = str(rec["resident_on"])
    rec.update(power_state="Halted", resident_on=NULL_REF, scheduled_to_be_resident_on=NULL_REF, domid=-1)
    for vbd in tx.store.referrers("VBD", "VM", vm):
        if tx.read("VBD", vbd) is not None:
            tx.update("VBD", vbd, currently_attached=False)
    for vif in tx.store.referrers("VIF", "VM", vm):
        if tx.read("VIF", vif) is not None:
            tx.update("VIF", vif, currently_attached=False)
    metrics = tx.find("VM_metrics", rec["metrics"])
    if metrics is not None:
        metrics.update(state=[], last_updated=now_iso())
    remove_metrics(tx, vm, rec)
    close_consoles(tx, vm)
    if host != NULL_REF:
        account_host(tx, host, vm)
    return host


def reset_vm_to_halted(tx: Transaction, vm_ref: str) -> str:
    """Force ``vm_ref`` to Halted as xapi's ``force_state_reset`` does; returns the host it was on.

    For VMs of dead hosts and ``VM.power_state_reset``: ``ha_always_run`` is kept, so a
    protected VM stays protected (and HA restarts it).  The caller recomputes planning status
    (``daemon.ha.planning.update_pool_status()``) after its transaction.
    """
    return _to_halted(tx, vm_ref, tx.get("VM", vm_ref))


def _halt(tx: Transaction, vm: str, rec: dict[str, Any]) -> None:
    """A clean or hard shutdown: as a reset, and the VM stops being protected (xapi_vm.ml)."""
    rec["ha_always_run"] = False
    _to_halted(tx, vm, rec)


# -- handlers --------------------------------------------------------------------------------------


@handler("VM.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VM"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    if values.get("ha_restart_priority", "") not in RESTART_PRIORITIES:
        raise ApiError("INVALID_VALUE", "ha_restart_priority", values["ha_restart_priority"])
    with call.store.transaction() as tx:
        generic.check_refs(tx, cdef.fields, values)
        metrics = tx.create("VM_metrics", {"memory_actual": values.get("memory_dynamic_max", 0),
                                           "VCPUs_number": values.get("VCPUs_at_startup", 0),
                                           "install_time": now_iso(), "last_updated": now_iso()})
        values.update(metrics=metrics, power_state="Halted", domid=-1, resident_on=NULL_REF)
        values["other_config"] = dict(values.get("other_config", {}))
        values["other_config"].setdefault("mac_seed", new_uuid())  # xapi_vm.ml create: VIF MACs derive from it
        return tx.create("VM", values)


@handler("VM.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        remove_vm(tx, self, _vm(tx, self, "destroy"))


def remove_vm(tx: Transaction, vm: str, rec: dict[str, Any]) -> None:
    """Delete ``vm`` with its devices, metrics and consoles; its children are rebased (xapi_vm.ml destroy)."""
    for child in tx.referrers("VM", "parent", vm):
        tx.update("VM", child, parent=rec["parent"])
    for vbd in tx.referrers("VBD", "VM", vm):
        tx.delete("VBD", vbd)
    for vif in tx.referrers("VIF", "VM", vm):
        tx.delete("VIF", vif)
    vtpm_api.remove_all(tx, vm)
    if tx.read("VM_metrics", rec["metrics"]) is not None:
        tx.delete("VM_metrics", rec["metrics"])
    remove_metrics(tx, vm, rec)
    close_consoles(tx, vm)
    tx.delete("VM", vm)


@handler("VM.start")
def start(call: Call, vm: str, start_paused: bool, force: bool) -> None:
    start_vm(call.daemon, vm, None, start_paused, force)


@handler("VM.start_on")
def start_on(call: Call, vm: str, host: str, start_paused: bool, force: bool) -> None:
    start_vm(call.daemon, vm, host, start_paused, force)


def _shutdown(call: Call, vm: str, operation: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, operation)
        _halt(tx, vm, rec)
        suspend_vdi = rec["suspend_VDI"]
        rec["suspend_VDI"] = NULL_REF
        files = _drop_suspend_image(tx, suspend_vdi)
    if files is not None:
        call.daemon.disks.remove_vdi(*files)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


@handler("VM.clean_shutdown", "VM.shutdown")
def clean_shutdown(call: Call, vm: str) -> None:
    _shutdown(call, vm, "clean_shutdown")


@handler("VM.hard_shutdown")
def hard_shutdown(call: Call, vm: str) -> None:
    _shutdown(call, vm, "hard_shutdown")


def _reboot(call: Call, vm: str, operation: str) -> None:
    # xapi reserves no memory for a reboot (message_forwarding.ml, CA-31903); the shares are redone.
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, operation)
        _run_on(tx, vm, rec, rec["resident_on"], call.daemon)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


@handler("VM.clean_reboot")
def clean_reboot(call: Call, vm: str) -> None:
    _reboot(call, vm, "clean_reboot")


@handler("VM.hard_reboot")
def hard_reboot(call: Call, vm: str) -> None:
    _reboot(call, vm, "hard_reboot")


@handler("VM.pause")
def pause(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "pause")
        rec["power_state"] = "Paused"


@handler("VM.unpause")
def unpause(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "unpause")
        rec["power_state"] = "Running"


@handler("VM.set_ha_restart_priority")
def set_ha_restart_priority(call: Call, self: str, value: str) -> None:
    """xapi_vm.ml: protecting a VM that is not halted must keep the plan; only a Running VM's
    ``ha_always_run`` follows the priority.  Planning status is then recomputed if HA is on."""
    if value not in RESTART_PRIORITIES:
        raise ApiError("INVALID_VALUE", "ha_restart_priority", value)
    with call.store.transaction() as tx:
        rec = tx.get("VM", self)
        if rec["ha_restart_priority"] != "restart" and value == "restart" and rec["power_state"] != "Halted":
            call.daemon.ha.planning.assert_new_vm_preserves_plan(self)
        rec["ha_restart_priority"] = value
        if rec["power_state"] == "Running":
            rec["ha_always_run"] = value == "restart"
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


@handler("VM.set_ha_always_run")
def set_ha_always_run(call: Call, self: str, value: bool) -> None:
    """Deprecated since boston: true means priority ``restart``, false the empty priority (xapi_vm.ml)."""
    set_ha_restart_priority(call, self, "restart" if value else "")


@handler("VM.assert_agile")
def assert_agile(call: Call, self: str) -> None:
    error = call.daemon.ha.planning.agility_error(self)
    if error is not None:
        raise ApiError(*error)


@handler("VM.power_state_reset")
def power_state_reset(call: Call, vm: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VM", vm)
        if rec["is_control_domain"]:
            raise ApiError("CANNOT_RESET_CONTROL_DOMAIN", vm)
        _to_halted(tx, vm, rec)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


# -- suspend and resume (xapi_vm.ml, xapi_xenops.ml) ---------------------------------------------------------

SUSPEND_HEADER = 4096


def suspend_sr(tx: Transaction, vm: str, rec: dict[str, Any]) -> str:
    """Where the memory image goes (``Helpers.choose_suspend_sr``): the VM's ``suspend_SR``, the pool's
    ``suspend_image_SR``, the host's ``suspend_image_sr``, else ``VM_NO_SUSPEND_SR``."""
    pool = tx.read("pool", tx.refs("pool")[0]) or {}
    host = tx.read("host", rec["resident_on"]) if rec["resident_on"] != NULL_REF else None
    candidates = (rec["suspend_SR"], pool.get("suspend_image_SR", NULL_REF),
                  (host or {}).get("suspend_image_sr", NULL_REF))
    for sr in candidates:
        if sr != NULL_REF and tx.read("SR", sr) is not None:
            return str(sr)
    raise ApiError("VM_NO_SUSPEND_SR", vm)


def write_memory_image(daemon: Daemon, tx: Transaction, vm: str, rec: dict[str, Any], sr: str, label: str) -> str:
    """A ``suspend`` VDI on ``sr`` as big as the VM's memory, holding a small image header (a real file)."""
    size = int(rec["memory_static_max"]) + SUSPEND_HEADER
    ref = create_vdi(daemon.disks, tx, {"SR": sr, "virtual_size": size, "type": "suspend", "name_label": label,
                                        "name_description": label, "other_config": {"vm": rec["uuid"]}})
    vdi = tx.get("VDI", ref)
    sr_uuid = tx.get("SR", sr)["uuid"]
    header = f"xapid memory image of VM {rec['uuid']} domid {rec['domid']} at {now_iso()}\n".encode()
    try:
        daemon.disks.write_at(sr_uuid, file_of(vdi), 0, header.ljust(SUSPEND_HEADER, b"\0"))
    except OSError as e:
        raise ApiError("VM_CHECKPOINT_SUSPEND_FAILED", vm) from e
    vdi["physical_utilisation"] = daemon.disks.allocated(sr_uuid, file_of(vdi))
    account(tx, sr)
    return ref


def _drop_suspend_image(tx: Transaction, vdi: str) -> tuple[str, str] | None:
    """Delete the suspend VDI record inside ``tx``; return its file for removal after the commit."""
    if vdi == NULL_REF or tx.read("VDI", vdi) is None:
        return None
    return remove_vdi(tx, vdi)


@handler("VM.suspend")
def suspend(call: Call, vm: str) -> None:
    """Running -> Suspended: the memory image is written to a new suspend VDI, the host's memory is
    given back and the VM stops being HA-protected (``ha_always_run`` false, as xapi)."""
    with call.store.transaction() as tx:
        rec = _vm(tx, vm, "suspend")
        sr = suspend_sr(tx, vm, rec)
        image = write_memory_image(call.daemon, tx, vm, rec, sr, "Suspend image")
        host = str(rec["resident_on"])
        rec.update(power_state="Suspended", suspend_VDI=image, resident_on=NULL_REF, domid=-1,
                   scheduled_to_be_resident_on=NULL_REF, ha_always_run=False)
        close_consoles(tx, vm)
        metrics = tx.find("VM_metrics", rec["metrics"])
        if metrics is not None:
            metrics.update(state=[], last_updated=now_iso())
        account_host(tx, host, vm)
    if _ha_enabled(call.daemon):
        call.daemon.ha.planning.update_pool_status()


def resume_vm(daemon: Daemon, vm: str, host_ref: str | None, paused: bool) -> str:
    """Suspended -> Running on ``host_ref`` (None: chosen as for a start) with the same memory accounting
    and HA plan guard as :func:`start_vm`; the suspend VDI is destroyed.  Returns the host."""
    with daemon.store.transaction() as tx:
        rec = _vm(tx, vm, "resume" if host_ref is None else "resume_on")
        if host_ref is None:
            host = _choose_host(daemon, tx, vm, rec)
        else:
            host = host_ref
            error = _can_run_on(tx, host) or devices_error(tx, vm, host) or _memory_error(tx, vm, rec, host)
            if error is not None:
                raise error
        daemon.ha.planning.assert_vm_start_preserves_plan(vm, host)
        image = rec["suspend_VDI"]
        _run_on(tx, vm, rec, host, daemon)
        if paused:
            rec["power_state"] = "Paused"
        rec["suspend_VDI"] = NULL_REF
        files = _drop_suspend_image(tx, image)
    if files is not None:
        daemon.disks.remove_vdi(*files)
    if _ha_enabled(daemon):
        daemon.ha.planning.update_pool_status()
    return host


@handler("VM.resume")
def resume(call: Call, vm: str, start_paused: bool, force: bool) -> None:
    resume_vm(call.daemon, vm, None, start_paused)


@handler("VM.resume_on")
def resume_on(call: Call, vm: str, host: str, start_paused: bool, force: bool) -> None:
    if call.store.get("host", host) is None:
        raise ApiError("HANDLE_INVALID", "host", host)
    resume_vm(call.daemon, vm, host, start_paused)


# -- performance data sources (xapi_vm.ml, message_forwarding.ml VM.*data_source*) ---------------------------
# Answered from the emulated metrics (xapid/hw/metrics.py), the same numbers /rrd_updates serves.


def _vm_metrics(call: Call, vm: str, must_run: bool) -> tuple[str, list[Any]] | None:
    """(uuid, sources) of a running VM; None for a halted one (or VM_BAD_POWER_STATE if ``must_run``)."""
    rec = call.store.get("VM", vm)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "VM", vm)
    if rec["power_state"] not in ("Running", "Paused"):
        if must_run:
            raise ApiError("VM_BAD_POWER_STATE", vm, "running", rec["power_state"].lower())
        return None
    host = call.store.get("host", rec["resident_on"])
    if host is not None and not call.daemon.hw.is_running(host["uuid"]):
        raise ApiError("HOST_OFFLINE", rec["resident_on"])  # the VM's statistics live on its host
    return call.daemon.metrics.vm_sources(vm)


@handler("VM.get_data_sources")
def get_data_sources(call: Call, self: str) -> list[dict[str, object]]:
    found = _vm_metrics(call, self, must_run=False)
    if found is None:
        return []  # query_possible_vm_dss: no RRD, no sources
    uuid, sources = found
    return [data_source_record(ds, on) for ds, on in call.daemon.metrics.possible(uuid, sources)]


@handler("VM.record_data_source")
def record_data_source(call: Call, self: str, data_source: str) -> None:
    found = _vm_metrics(call, self, must_run=False)
    if found is None or not call.daemon.metrics.record(found[0], data_source, found[1]):
        raise ApiError("INTERNAL_ERROR", missing_data_source(data_source))


@handler("VM.query_data_source")
def query_data_source(call: Call, self: str, data_source: str) -> float:
    _vm_metrics(call, self, must_run=True)
    rrd = call.daemon.metrics.vm_rrd(self)
    assert rrd is not None
    try:
        return rrd.latest(data_source)
    except KeyError:
        raise ApiError("INTERNAL_ERROR", invalid_data_source(data_source)) from None


@handler("VM.forget_data_source_archives")
def forget_data_source_archives(call: Call, self: str, data_source: str) -> None:
    found = _vm_metrics(call, self, must_run=False)
    if found is not None:
        call.daemon.metrics.forget(found[0], data_source, found[1])
