"""allowed_operations for VM, VBD, VIF and VDI: the one place that knows their state machines.

Each ``*_errors`` function maps every operation of a class to the error that refuses it now (None:
allowed), following xapi: ``xapi_vm_lifecycle.ml`` (``check_operation_error``), ``xapi_vbd_helpers.ml``,
``xapi_vif_helpers.ml`` and ``xapi_vdi.ml`` (``valid_operations`` / ``check_operation_error``).  The
``strict`` flag is xapi's: the advisory ``allowed_operations`` list is computed strictly (an HVM guest
without PV drivers does not advertise ``clean_shutdown``), a call is checked leniently.

:func:`install` hooks :func:`refresh` into the store's commit path: every transaction that touches a
VM, VBD, VIF, VDI or guest-metrics record gets the ``allowed_operations`` of those objects (and of
the objects that depend on them) recomputed before it commits, so the lists are always current and
travel in the same events as the change that moved them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.store import Record, Store, Transaction

Errors = dict[str, ApiError | None]

# -- VM (xapi_vm_lifecycle.ml) -------------------------------------------------------------------------

ALL_STATES = ("Halted", "Paused", "Suspended", "Running")

# Operations never advertised in allowed_operations (ignored_ops).
VM_IGNORED = frozenset({
    "create_template", "power_state_reset", "csvm", "get_boot_record", "send_sysrq", "send_trigger",
    "query_services", "shutdown", "call_plugin", "changing_memory_live", "awaiting_memory_live",
    "changing_memory_limits", "changing_shadow_memory_live", "changing_VCPUs", "assert_operation_valid",
    "data_source_op", "update_allowed_operations", "import", "reverting",
})

_RUNNING_ONLY = frozenset({
    "awaiting_memory_live", "call_plugin", "clean_reboot", "clean_shutdown", "changing_memory_live",
    "changing_shadow_memory_live", "changing_VCPUs_live", "data_source_op", "pause", "pool_migrate",
    "send_sysrq", "send_trigger", "snapshot_with_quiesce", "sysprep", "suspend",
})
_HALTED_ONLY = frozenset({"changing_shadow_memory", "changing_NVRAM", "make_into_template", "provision", "start",
                          "start_on", "create_vtpm"})
_ANY_STATE = frozenset({"assert_operation_valid", "metadata_export", "power_state_reset", "revert", "reverting",
                        "snapshot", "update_allowed_operations", "query_services"})
_TEMPLATE_OK = frozenset({"changing_dynamic_range", "changing_static_range", "changing_memory_limits",
                          "changing_shadow_memory", "changing_VCPUs", "changing_NVRAM", "clone", "copy", "export",
                          "metadata_export", "provision"})
_SNAPSHOT_OK = frozenset({"revert", "clone", "copy", "export", "destroy", "hard_shutdown", "metadata_export"})
_CONTROL_DOMAIN_OK = frozenset({"data_source_op", "changing_memory_live", "awaiting_memory_live", "metadata_export",
                                "changing_dynamic_range", "changing_memory_limits", "changing_static_range", "start",
                                "start_on", "changing_VCPUs", "destroy"})
_SUSPEND_LIKE = frozenset({"suspend", "checkpoint", "pool_migrate", "migrate_send"})


def allowed_power_states(rec: Record, op: str) -> tuple[str, ...]:
    """The power states ``op`` may start from (``allowed_power_states``)."""
    if op == "import":
        return ()
    if op in ("changing_VCPUs", "changing_static_range", "changing_memory_limits"):
        return ("Halted", "Running") if rec["is_control_domain"] else ("Halted",)
    if op in _HALTED_ONLY:
        return ("Halted",)
    if op == "unpause":
        return ("Paused",)
    if op in ("csvm", "resume", "resume_on"):
        return ("Suspended",)
    if op in _RUNNING_ONLY:
        return ("Running",)
    if op == "changing_dynamic_range":
        return ("Halted", "Running")
    if op in ("clone", "copy"):
        return ("Halted", "Suspended") if rec.get("is_a_snapshot") else ("Halted",)
    if op in ("create_template", "destroy", "export"):
        return ("Halted", "Suspended")
    if op == "hard_reboot":
        return ("Paused", "Running")
    if op in ("checkpoint", "get_boot_record", "shutdown", "hard_shutdown"):
        return ("Paused", "Suspended", "Running")
    if op == "migrate_send":
        return ("Halted", "Suspended", "Running")
    return ALL_STATES


def _concurrently_ok(op: str, current: list[str]) -> bool:
    """``is_allowed_concurrently``: may ``op`` start while ``current`` run?"""
    for group in (("clone", "copy", "export"), ("snapshot", "checkpoint"), ("get_boot_record",)):
        if op in group and all(o in group for o in current):
            return True
    if op == "hard_shutdown":
        return op not in current
    if op == "hard_reboot":
        return not any(o in ("hard_shutdown", "hard_reboot") for o in current)
    pairs = ((["snapshot_with_quiesce"], "snapshot"), (["migrate_send"], "metadata_export"),
             (["migrate_send"], "clean_shutdown"), (["migrate_send"], "clean_reboot"))
    return any(state == current and op == transition for state, transition in pairs)


def _true(value: str | None) -> bool:
    return value is not None and (value == "1" or value.lower() == "true")


def has_pv_drivers(gm: Record | None) -> bool:
    """The guest reports PV drivers (``Xapi_pv_driver_version.has_pv_drivers``)."""
    return bool(gm) and (bool(gm.get("PV_drivers_detected")) or "major" in (gm.get("PV_drivers_version") or {}))


def _vm_context(tx: Transaction, ref: str, rec: Record) -> dict[str, Any]:
    metrics = tx.read("VM_metrics", rec["metrics"]) if rec["metrics"] != NULL_REF else None
    gm = tx.read("VM_guest_metrics", rec["guest_metrics"]) if rec["guest_metrics"] != NULL_REF else None
    reset_vdis = []
    for vbd in tx.referrers("VBD", "VM", ref):
        vbd_rec = tx.read("VBD", vbd)
        if vbd_rec is None or vbd_rec["VDI"] == NULL_REF:
            continue
        vdi = tx.read("VDI", vbd_rec["VDI"])
        if vdi is not None:
            reset_vdis.append((vdi["on_boot"] == "reset", _true(vdi["sm_config"].get("caching"))))
    def exists(cls: str, value: str) -> bool:
        return value != NULL_REF and tx.read(cls, value) is not None

    return {
        "metrics": metrics, "gm": gm, "vdis": reset_vdis,
        "appliance": exists("VM_appliance", rec["appliance"]),
        "vmpp": exists("VMPP", rec["protection_policy"]),
        "vmss": exists("VMSS", rec["snapshot_schedule"]),
        "vgpus": tx.referrers("VGPU", "VM", ref), "vusbs": tx.referrers("VUSB", "VM", ref),
        "vtpms": tx.referrers("VTPM", "VM", ref),
    }


def vm_error(rec: Record, ref: str, op: str, ctx: dict[str, Any], strict: bool) -> ApiError | None:
    """The first error that refuses ``op`` on the VM now (``check_operation_error``), or None."""
    blocked = rec["blocked_operations"].get(op)
    if blocked is not None:
        return ApiError("OPERATION_BLOCKED", ref, blocked)
    state = rec["power_state"]
    expected = allowed_power_states(rec, op)
    if state not in expected:
        return ApiError("VM_BAD_POWER_STATE", ref, ", ".join(s.lower() for s in expected), state.lower())
    current = rec["current_operations"]
    if current and not _concurrently_ok(op, list(current.values())):
        if len(current) == 1:
            ((op_ref, cur),) = current.items()
            return ApiError("OTHER_OPERATION_IN_PROGRESS", "VM", ref, cur, op_ref)
        return ApiError("OTHER_OPERATION_IN_PROGRESS", "VM", ref, "{" + ",".join(current.values()) + "}",
                        "{" + ",".join(current) + "}")
    template, snapshot = rec["is_a_template"], rec["is_a_snapshot"]
    if template and not snapshot:
        default = rec["is_default_template"] or _true(rec["other_config"].get("default_template"))
        if not (op in _TEMPLATE_OK or (op in ("destroy", "migrate_send") and not default)):
            return ApiError("VM_IS_TEMPLATE", ref, op)
    if snapshot and op not in _SNAPSHOT_OK:
        return ApiError("VM_IS_SNAPSHOT", ref, op)
    if op == "provision" and not template:
        return ApiError("ONLY_PROVISION_TEMPLATE")
    if op == "revert" and not snapshot:
        return ApiError("ONLY_REVERT_SNAPSHOT")
    platform = rec["platform"]
    nested = _true(platform.get("nested-virt"))
    if op in _SUSPEND_LIKE and strict and (_true(platform.get("nomigrate")) or nested):
        return ApiError("VM_IS_IMMOBILE", ref)
    if op == "changing_dynamic_range" and nested and strict:
        return ApiError("VM_IS_USING_NESTED_VIRT", ref)
    if rec["is_control_domain"]:
        if op in ("changing_VCPUs", "destroy") and rec["domid"] == 0:
            return ApiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on dom0")
        if op not in _CONTROL_DOMAIN_OK:
            return ApiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain")
    error = _feature_error(rec, ref, op, ctx, strict)
    if error is not None:
        return error
    if op == "snapshot_with_quiesce":
        return ApiError("VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", ref)
    if op in ("checkpoint", "snapshot", "suspend") and any(reset for reset, _c in ctx["vdis"]):
        return ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    if op == "pool_migrate" and any(reset and caching for reset, caching in ctx["vdis"]):
        return ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    if op in _SUSPEND_LIKE and rec["attached_PCIs"]:
        return ApiError("VM_HAS_PCI_ATTACHED", ref)
    if ctx["vgpus"] and op in _SUSPEND_LIKE and not (op == "migrate_send" and state == "Halted") \
            and not (op == "checkpoint" and state == "Suspended"):
        return ApiError("VM_HAS_VGPU", ref)
    if ctx["vusbs"] and op in ("suspend", "snapshot", "checkpoint", "migrate_send", "pool_migrate"):
        return ApiError("VM_HAS_VUSBS", ref)
    if op == "make_into_template":
        if ctx["appliance"]:
            return ApiError("VM_IS_PART_OF_AN_APPLIANCE", ref, rec["appliance"])
        if ctx["vmpp"]:
            return ApiError("VM_ASSIGNED_TO_PROTECTION_POLICY", ref, rec["protection_policy"])
        if ctx["vmss"]:
            return ApiError("VM_ASSIGNED_TO_SNAPSHOT_SCHEDULE", ref, rec["snapshot_schedule"])
    if op == "query_services" and not _true(rec["other_config"].get("is_system_domain")):
        return ApiError("NOT_SYSTEM_DOMAIN", ref)
    if op == "create_vtpm" and ctx["vtpms"]:
        return ApiError("VTPM_MAX_AMOUNT_REACHED", len(ctx["vtpms"]))
    return None


def _feature_error(rec: Record, ref: str, op: str, ctx: dict[str, Any], strict: bool) -> ApiError | None:
    """``check_op_for_feature``: HVM guests need their PV drivers' features for guest-assisted operations."""
    live = rec["power_state"] in ("Running", "Paused")
    metrics, gm = ctx["metrics"], ctx["gm"]
    booted_pv = metrics is not None and metrics["current_domain_type"] in ("pv", "pv_in_pvh", "pvh")
    implicit = not live or booted_pv or has_pv_drivers(gm)
    other = (gm or {}).get("other") or {}

    def lacks(feature: str) -> bool:
        return other.get(feature) != "1"

    if op in _SUSPEND_LIKE and live:
        reason = other.get("data-cant-suspend-reason")
        if reason is not None:
            return ApiError("VM_NON_SUSPENDABLE", ref, reason)
        if not implicit and strict and lacks("feature-suspend"):
            return ApiError("VM_LACKS_FEATURE", ref)
        return None
    if implicit:
        return None
    if op == "clean_shutdown" and strict and lacks("feature-shutdown") and lacks("feature-poweroff"):
        return ApiError("VM_LACKS_FEATURE", ref)
    if op == "clean_reboot" and strict and lacks("feature-shutdown") and lacks("feature-reboot"):
        return ApiError("VM_LACKS_FEATURE", ref)
    if op == "changing_VCPUs_live" and lacks("feature-vcpu-hotplug"):
        return ApiError("VM_LACKS_FEATURE", ref)
    return None


_ALLOWED_CACHE: dict[tuple[Any, ...], list[str]] = {}


def _signature(rec: Record, ctx: dict[str, Any]) -> tuple[Any, ...]:
    """Everything :func:`vm_error` looks at when deciding whether an operation is allowed (refs aside)."""
    other, platform, gm = rec["other_config"], rec["platform"], ctx["gm"]
    metrics = ctx["metrics"]
    features = frozenset((k, v) for k, v in ((gm or {}).get("other") or {}).items()
                         if k.startswith("feature-") or k == "data-cant-suspend-reason")
    return (rec["power_state"], tuple(sorted(rec["current_operations"].values())),
            tuple(sorted(rec["blocked_operations"])),
            rec["is_a_template"], rec["is_a_snapshot"], rec["is_default_template"], other.get("default_template"),
            other.get("is_system_domain"), platform.get("nomigrate"), platform.get("nested-virt"),
            rec["is_control_domain"], rec["domid"] == 0, bool(rec["attached_PCIs"]),
            metrics["current_domain_type"] if metrics else None, has_pv_drivers(gm), features,
            any(r for r, _c in ctx["vdis"]), any(r and c for r, c in ctx["vdis"]), bool(ctx["vgpus"]),
            bool(ctx["vusbs"]), len(ctx["vtpms"]), ctx["appliance"], ctx["vmpp"], ctx["vmss"])


def vm_allowed(tx: Transaction, ref: str, rec: Record, operations: Iterable[str]) -> list[str]:
    ctx = _vm_context(tx, ref, rec)
    key = _signature(rec, ctx)
    cached = _ALLOWED_CACHE.get(key)
    if cached is None:
        cached = [op for op in operations if op not in VM_IGNORED and vm_error(rec, ref, op, ctx, True) is None]
        cached.reverse()  # xapi folds the operation list into its result
        if len(_ALLOWED_CACHE) > 4096:
            _ALLOWED_CACHE.clear()
        _ALLOWED_CACHE[key] = cached
    return list(cached)


def assert_vm(tx: Transaction, ref: str, op: str) -> Record:
    """Raise what xapi's ``assert_operation_valid`` raises for ``op`` on the VM; return its record."""
    rec = tx.get("VM", ref)
    error = vm_error(rec, ref, op, _vm_context(tx, ref, rec), False)
    if error is not None:
        raise error
    return rec


# -- VBD (xapi_vbd_helpers.ml) ---------------------------------------------------------------------------

VBD_OPERATIONS = ("attach", "eject", "insert", "plug", "unplug", "unplug_force", "pause", "unpause")


def _domain_type(rec: Record, metrics: Record | None) -> str:
    """``Helpers.domain_type``: the running domain's type, else the VM's (HVM boot policy decides)."""
    if metrics is not None and rec["power_state"] != "Halted" and metrics["current_domain_type"] != "unspecified":
        return str(metrics["current_domain_type"])
    if rec["domain_type"] != "unspecified":
        return str(rec["domain_type"])
    return "hvm" if rec["HVM_boot_policy"] else "pv"


def _driver_error(gm: Record | None, vm: str, field: str, what: str) -> ApiError | None:
    """Hotplug on an HVM guest needs drivers that claim it (``can_use_hotplug_*``) or PV drivers."""
    if gm is not None:
        claim = gm.get(field, "unspecified")
        if claim == "yes":
            return None
        if claim == "no":
            return ApiError("OPERATION_NOT_ALLOWED", f"VM states it does not support {what} hotplug.")
        if gm.get("PV_drivers_detected"):
            return None
    return None if has_pv_drivers(gm) else ApiError("VM_MISSING_PV_DRIVERS", vm)


def vbd_errors(tx: Transaction, ref: str, rec: Record, sharing_checks: bool = False) -> Errors:
    table: Errors = dict.fromkeys(VBD_OPERATIONS)

    def refuse(error: ApiError, ops: Iterable[str]) -> None:
        for op in ops:
            if table[op] is None:
                table[op] = error

    vm = rec["VM"]
    vm_rec = tx.read("VM", vm)
    if vm_rec is None:
        return table
    current = sorted(rec["current_operations"].items(), key=lambda item: item[1])
    parallel = ("pause", "unpause")
    if current:
        op_ref, op = current[0]
        refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "VBD", ref, op, op_ref),
               [o for o in VBD_OPERATIONS if o not in parallel])
        other = next(((r, o) for r, o in current if o not in parallel), None)
        if other is not None:
            refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "VBD", ref, other[1], other[0]), ["pause"])
        other = next(((r, o) for r, o in current if o not in ("attach", *parallel)), None)
        if other is not None:
            refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "VBD", ref, other[1], other[0]), ["unpause"])
    if not rec["unpluggable"]:
        refuse(ApiError("VBD_NOT_UNPLUGGABLE", ref), ["unplug", "unplug_force"])
    if rec["type"] != "CD":
        refuse(ApiError("VBD_NOT_REMOVABLE_MEDIA", ref), ["insert", "eject"])
    if rec["empty"]:
        refuse(ApiError("VBD_IS_EMPTY", ref), ["eject"])
    else:
        refuse(ApiError("VBD_NOT_EMPTY", ref), ["insert"])
    state = vm_rec["power_state"]
    if state == "Running":
        if rec["currently_attached"]:
            refuse(ApiError("DEVICE_ALREADY_ATTACHED", ref), ["plug"])
        else:
            refuse(ApiError("DEVICE_ALREADY_DETACHED", ref), ["unplug", "unplug_force"])
    else:
        bad = ["plug", "unplug", "unplug_force"] + ([] if state == "Paused" else ["pause", "unpause"])
        refuse(ApiError("VM_BAD_POWER_STATE", vm, "running", state.lower()), bad)
    for op in vm_rec["current_operations"].values():
        if op in ("clean_shutdown", "hard_shutdown", "suspend", "pause"):
            refuse(ApiError("OPERATION_NOT_ALLOWED", f"Current operation on VM:{vm} is {op}"), ["plug", "unplug"])
    metrics = tx.read("VM_metrics", vm_rec["metrics"]) if vm_rec["metrics"] != NULL_REF else None
    if state == "Running" and _domain_type(vm_rec, metrics) == "hvm":
        gm = tx.read("VM_guest_metrics", vm_rec["guest_metrics"]) if vm_rec["guest_metrics"] != NULL_REF else None
        error = _driver_error(gm, vm, "can_use_hotplug_vbd", "VBD")
        if error is not None:
            refuse(error, ["plug", "unplug", "unplug_force"])
        if rec["type"] == "CD":
            refuse(ApiError("OPERATION_NOT_ALLOWED",
                            "HVM CDROMs cannot be hotplugged/unplugged, only inserted or ejected"),
                   ["plug", "unplug", "unplug_force"])
    if rec["type"] == "CD" and state == "Suspended":
        refuse(ApiError("VM_BAD_POWER_STATE", vm, "halted, running", "suspended"), ["insert", "eject"])
    vdi = tx.read("VDI", rec["VDI"]) if not rec["empty"] and rec["VDI"] != NULL_REF else None
    if vdi is not None:
        if not vdi["managed"]:
            refuse(ApiError("VDI_NOT_MANAGED", ref), VBD_OPERATIONS)
        busy = next(((r, o) for r, o in vdi["current_operations"].items() if o not in ("mirror", "copy")), None)
        if busy is not None:
            refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "VDI", rec["VDI"], busy[1], busy[0]),
                   ["attach", "plug", "insert"])
        if not rec["currently_attached"] and sharing_checks:
            _sharing_errors(tx, ref, rec, vdi, vm_rec, refuse)
    return table


def _sharing_errors(tx: Transaction, ref: str, rec: Record, vdi: Record, vm_rec: Record, refuse: Any) -> None:
    others = []
    for vbd in tx.referrers("VBD", "VDI", rec["VDI"]):
        other = tx.read("VBD", vbd)
        if vbd == ref or other is None:
            continue
        owner = tx.read("VM", other["VM"])
        if owner is None or owner["power_state"] == "Suspended" or _true(owner["other_config"].get("is_system_domain")):
            continue
        if other["currently_attached"] or other["current_operations"]:
            others.append(other)
    someone_rw = any(o["mode"] == "RW" for o in others)
    need_write = rec["mode"] == "RW"
    system = _true(vm_rec["other_config"].get("is_system_domain"))
    if not vdi["sharable"] and not system and (someone_rw or (need_write and others)):
        refuse(ApiError("VDI_IN_USE", rec["VDI"]), ["attach", "insert", "plug"])
    if need_write and vdi["read_only"]:
        refuse(ApiError("VDI_READONLY", rec["VDI"]), ["attach", "insert", "plug"])


def assert_vbd(tx: Transaction, ref: str, op: str) -> Record:
    rec = tx.get("VBD", ref)
    error = vbd_errors(tx, ref, rec, sharing_checks=True)[op]
    if error is not None:
        raise error
    return rec


# -- VIF (xapi_vif_helpers.ml) ---------------------------------------------------------------------------

VIF_OPERATIONS = ("attach", "plug", "unplug")


def vif_errors(tx: Transaction, ref: str, rec: Record) -> Errors:
    table: Errors = dict.fromkeys(VIF_OPERATIONS)

    def refuse(error: ApiError, ops: Iterable[str]) -> None:
        for op in ops:
            if table[op] is None:
                table[op] = error

    vm = rec["VM"]
    vm_rec = tx.read("VM", vm)
    if vm_rec is None:
        return table
    current = rec["current_operations"]
    if current:
        refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "VIF", ref, "{" + "; ".join(current.values()) + "}",
                        "{" + "; ".join(current) + "}"), VIF_OPERATIONS)
    if vm_rec["is_control_domain"] and vm_rec["domid"] == 0:
        refuse(ApiError("OPERATION_NOT_ALLOWED", "Control domain does not support hotplug"), ["plug"])
    state = vm_rec["power_state"]
    if state == "Running":
        if rec["currently_attached"]:
            refuse(ApiError("DEVICE_ALREADY_ATTACHED", ref), ["plug"])
        else:
            refuse(ApiError("DEVICE_ALREADY_DETACHED", ref), ["unplug"])
    else:
        refuse(ApiError("VM_BAD_POWER_STATE", vm, "running", state.lower()), ["plug", "unplug"])
    for op in vm_rec["current_operations"].values():
        if op in ("clean_shutdown", "hard_shutdown", "suspend", "pause"):
            refuse(ApiError("OPERATION_NOT_ALLOWED", f"Current operation on VM:{vm} is {op}"), ["plug", "unplug"])
    metrics = tx.read("VM_metrics", vm_rec["metrics"]) if vm_rec["metrics"] != NULL_REF else None
    if state == "Running" and _domain_type(vm_rec, metrics) == "hvm":
        gm = tx.read("VM_guest_metrics", vm_rec["guest_metrics"]) if vm_rec["guest_metrics"] != NULL_REF else None
        error = _driver_error(gm, vm, "can_use_hotplug_vif", "VIF")
        if error is not None:
            refuse(error, ["plug", "unplug"])
    return table


def assert_vif(tx: Transaction, ref: str, op: str) -> Record:
    rec = tx.get("VIF", ref)
    error = vif_errors(tx, ref, rec)[op]
    if error is not None:
        raise error
    return rec


# -- VDI (xapi_vdi.ml) -----------------------------------------------------------------------------------

VDI_OPERATIONS = ("clone", "copy", "resize", "resize_online", "snapshot", "mirror", "destroy", "forget", "update",
                  "force_unlock", "generate_config", "enable_cbt", "disable_cbt", "data_destroy",
                  "list_changed_blocks", "set_on_boot", "blocked", "revert_to", "revert_from")
# Operations xapid's VDIs never advertise (no mirroring or reset-on-boot support in its drivers).
_VDI_UNOFFERED = frozenset({"mirror", "set_on_boot", "blocked", "force_unlock", "revert_to", "revert_from",
                            "generate_config"})
# xapi_vdi.ml check_operation_error: what a cbt_metadata VDI (data destroyed) and a CBT-enabled one may do.
_CBT_METADATA_OK = frozenset({"blocked", "data_destroy", "destroy", "list_changed_blocks", "force_unlock", "forget",
                              "generate_config", "update"})
_CBT_ENABLED_REFUSED = frozenset({"mirror", "set_on_boot"})
_SM_FEATURE = {"snapshot": "VDI_SNAPSHOT", "destroy": "VDI_DELETE", "resize": "VDI_RESIZE", "update": "VDI_UPDATE",
               "resize_online": "VDI_RESIZE_ONLINE", "generate_config": "VDI_GENERATE_CONFIG", "clone": "VDI_CLONE",
               "revert_to": "VDI_CLONE", "revert_from": "VDI_CLONE", "mirror": "VDI_MIRROR",
               "enable_cbt": "VDI_CONFIG_CBT", "disable_cbt": "VDI_CONFIG_CBT",
               "data_destroy": "VDI_CONFIG_CBT", "list_changed_blocks": "VDI_CONFIG_CBT",
               "set_on_boot": "VDI_RESET_ON_BOOT"}
_LIVE_OK = frozenset({"snapshot", "resize_online", "blocked", "clone", "revert_to", "mirror", "enable_cbt",
                      "disable_cbt", "data_destroy"})


def sm_features(tx: Transaction, sr_type: str) -> set[str]:
    for _ref, sm in tx.items("SM"):
        if sm["type"] == sr_type:
            return set(sm["features"]) | set(sm["capabilities"])
    return set()


def vdi_error(tx: Transaction, ref: str, rec: Record, op: str) -> ApiError | None:
    """``check_operation_error`` for one VDI operation."""
    busy = next(((r, o) for r, o in rec["current_operations"].items() if o != "copy"), None)
    if busy is not None and not (op == "destroy" and busy[1] == "mirror"):
        return ApiError("OTHER_OPERATION_IN_PROGRESS", "VDI", ref, busy[1], busy[0])
    sr = rec["SR"]
    sr_rec = tx.read("SR", sr)
    if sr_rec is None:
        return ApiError("HANDLE_INVALID", "SR", sr)
    if op == "resize" and not any((p := tx.read("PBD", pbd)) is not None and p["currently_attached"]
                                  for pbd in tx.referrers("PBD", "SR", sr)):
        return ApiError("SR_NO_PBDS", sr)
    active = []
    for vbd in tx.referrers("VBD", "VDI", ref):
        vbd_rec = tx.read("VBD", vbd)
        if vbd_rec is not None and vbd_rec["currently_attached"]:
            active.append(vbd_rec)
    if op in _LIVE_OK:
        blocked = False
    elif op == "copy":
        blocked = any(v["mode"] == "RW" for v in active)
    else:
        blocked = bool(active)
    if blocked:
        return ApiError("VDI_IN_USE", ref, op)
    feature = _SM_FEATURE.get(op)
    if feature is not None and feature not in sm_features(tx, sr_rec["type"]):
        return ApiError("SR_OPERATION_NOT_SUPPORTED", sr)
    if op not in _CBT_METADATA_OK and rec["type"] == "cbt_metadata":
        return ApiError("VDI_INCOMPATIBLE_TYPE", ref, "cbt_metadata")
    if op in _CBT_ENABLED_REFUSED and rec["cbt_enabled"]:
        return ApiError("VDI_CBT_ENABLED", ref)
    if op == "data_destroy":
        if not rec["is_a_snapshot"]:
            return ApiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {ref}")
        if not rec["cbt_enabled"]:
            return ApiError("VDI_NO_CBT_METADATA", ref)
    if op in ("enable_cbt", "disable_cbt"):
        if rec["is_a_snapshot"]:
            return ApiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {ref}")
        if rec["type"] not in ("user", "system"):
            return ApiError("VDI_INCOMPATIBLE_TYPE", ref, rec["type"])
        if rec["on_boot"] == "reset":
            return ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    pool = tx.read("pool", tx.store.refs("pool")[0]) if tx.store.refs("pool") else None
    ha = bool(pool and pool["ha_enabled"])
    ha_vdi = rec["type"] in ("ha_statefile", "redo_log")
    if op in ("destroy", "revert_from", "forget", "resize", "resize_online", "data_destroy") and ha and ha_vdi:
        return ApiError("HA_IS_ENABLED")
    if op in ("destroy", "revert_from", "data_destroy") and sr_rec["type"] == "udev":
        return ApiError("VDI_IS_A_PHYSICAL_DEVICE", ref)
    if op in ("destroy", "revert_from", "forget", "data_destroy") and rec["type"] == "rrd":
        return ApiError("VDI_HAS_RRDS", ref)
    if op == "snapshot" and rec["sharable"]:
        return ApiError("VDI_IS_SHARABLE", ref)
    if op in ("snapshot", "copy") and rec["on_boot"] == "reset":
        return ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    if op == "snapshot" and "copy" in rec["current_operations"].values():
        return ApiError("OPERATION_NOT_ALLOWED", "Snapshot operation not allowed during copy.")
    if op == "copy" and ha_vdi:
        return ApiError("OPERATION_NOT_ALLOWED", "VDI containing HA statefile or redo log cannot be copied "
                                                 "(check the VDI's allowed operations).")
    if op == "revert_to" and not rec["is_a_snapshot"]:
        return ApiError("ONLY_REVERT_SNAPSHOT")
    return None


def vdi_allowed(tx: Transaction, ref: str, rec: Record) -> list[str]:
    return [op for op in VDI_OPERATIONS if op not in _VDI_UNOFFERED and vdi_error(tx, ref, rec, op) is None]


def assert_vdi(tx: Transaction, ref: str, op: str) -> Record:
    rec = tx.get("VDI", ref)
    error = vdi_error(tx, ref, rec, op)
    if error is not None:
        raise error
    return rec


# -- SR (xapi_sr_operations.ml) ----------------------------------------------------------------------------

SR_OPERATIONS = ("scan", "destroy", "forget", "plug", "unplug", "update", "vdi_create", "vdi_introduce",
                 "vdi_destroy", "vdi_resize", "vdi_clone", "vdi_snapshot", "vdi_mirror", "vdi_enable_cbt",
                 "vdi_disable_cbt", "vdi_data_destroy", "vdi_list_changed_blocks", "vdi_set_on_boot",
                 "vdi_blocked", "vdi_copy", "vdi_force_unlock", "vdi_forget", "vdi_generate_config",
                 "vdi_resize_online", "vdi_update", "vdi_revert", "pbd_create", "pbd_destroy")
_SR_SM_FEATURE = {"vdi_create": "VDI_CREATE", "vdi_destroy": "VDI_DELETE", "vdi_resize": "VDI_RESIZE",
                  "vdi_introduce": "VDI_INTRODUCE", "vdi_mirror": "VDI_MIRROR", "vdi_enable_cbt": "VDI_CONFIGURE_CBT",
                  "vdi_disable_cbt": "VDI_CONFIGURE_CBT", "vdi_data_destroy": "VDI_CONFIGURE_CBT",
                  "vdi_list_changed_blocks": "VDI_CONFIGURE_CBT", "vdi_set_on_boot": "VDI_RESET_ON_BOOT",
                  "update": "SR_UPDATE", "vdi_revert": "VDI_REVERT", "vdi_snapshot": "VDI_SNAPSHOT"}
# Never advertised: removed from the datamodel (vdi_resize_online) or internal.
_SR_UNOFFERED = frozenset({"vdi_resize_online", "vdi_blocked", "vdi_force_unlock"})


def sr_errors(tx: Transaction, ref: str, rec: Record) -> Errors:
    """``valid_operations`` of an SR: what its driver supports, no destroy/forget while attached,
    no destroy without PBDs or with managed VDIs, one non-parallel operation at a time."""
    table: Errors = dict.fromkeys(SR_OPERATIONS)

    def refuse(error: ApiError, ops: Iterable[str]) -> None:
        for op in ops:
            if table[op] is None:
                table[op] = error

    features = sm_features(tx, rec["type"])
    refuse(ApiError("SR_OPERATION_NOT_SUPPORTED", ref),
           [op for op, feature in _SR_SM_FEATURE.items() if feature not in features])
    pbds = [p for pbd in tx.referrers("PBD", "SR", ref) if (p := tx.read("PBD", pbd)) is not None]
    if any(p["currently_attached"] for p in pbds):
        refuse(ApiError("SR_HAS_PBD", ref), ["destroy", "forget"])
    if not pbds:
        refuse(ApiError("SR_NO_PBDS", ref), ["destroy"])
    if any((v := tx.read("VDI", vdi)) is not None and v["managed"] and v["type"] != "rrd"
           for vdi in tx.referrers("VDI", "SR", ref)):
        refuse(ApiError("SR_NOT_EMPTY"), ["destroy"])
    current = sorted(rec["current_operations"].items(), key=lambda item: item[1])
    if current:
        op_ref, op = current[0]
        refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "SR", ref, op, op_ref),
               [o for o in SR_OPERATIONS if o != "plug"])
        other = next(((r, o) for r, o in current if o != "plug"), None)
        if other is not None:
            refuse(ApiError("OTHER_OPERATION_IN_PROGRESS", "SR", ref, other[1], other[0]), ["plug"])
    return table


def sr_allowed(tx: Transaction, ref: str, rec: Record) -> list[str]:
    return [op for op, e in sr_errors(tx, ref, rec).items() if e is None and op not in _SR_UNOFFERED]


# -- keeping the lists current -------------------------------------------------------------------------------


def _set(tx: Transaction, cls: str, ref: str, allowed: list[str]) -> None:
    current = tx.read(cls, ref)
    if current is not None and current["allowed_operations"] != allowed:
        tx.update(cls, ref, allowed_operations=allowed)


def refresh(tx: Transaction) -> None:
    """Recompute the allowed operations of what ``tx`` touched and what depends on it (pre-commit hook)."""
    # Writers of a VM's metrics or guest metrics touch the VM too (tx.get), so these four suffice.
    touched = tx.touched(("VM", "VBD", "VIF", "VDI", "SR", "PBD"))
    vms: set[str] = set(touched.get("VM", ()))
    vbds: set[str] = set(touched.get("VBD", ()))
    vifs: set[str] = set(touched.get("VIF", ()))
    vdis: set[str] = set(touched.get("VDI", ()))
    for vbd in list(vbds):
        rec = tx.read("VBD", vbd)
        if rec is not None:
            vms.add(rec["VM"])
            if rec["VDI"] != NULL_REF:
                vdis.add(rec["VDI"])
    for vm in vms:
        vbds.update(tx.referrers("VBD", "VM", vm))
        vifs.update(tx.referrers("VIF", "VM", vm))
    srs: set[str] = set(touched.get("SR", ()))
    for cls in ("PBD", "VDI"):
        for ref in touched.get(cls, ()):
            rec = tx.read(cls, ref)
            if rec is not None and rec["SR"] != NULL_REF:
                srs.add(rec["SR"])
    for vdi in list(vdis):
        vbds.update(tx.referrers("VBD", "VDI", vdi))
    ops = tx.schema.enums["vm_operations"]
    for vm in vms:
        rec = tx.read("VM", vm)
        if rec is not None:
            _set(tx, "VM", vm, vm_allowed(tx, vm, rec, ops))
            # xapi_vm_lifecycle.ml vtpm_update_allowed_operations: destroy while the VM is halted.
            for vtpm in tx.referrers("VTPM", "VM", vm):
                _set(tx, "VTPM", vtpm, ["destroy"] if rec["power_state"] == "Halted" else [])
    for vbd in vbds:
        rec = tx.read("VBD", vbd)
        if rec is not None:
            _set(tx, "VBD", vbd, [op for op, e in vbd_errors(tx, vbd, rec).items() if e is None])
    for vif in vifs:
        rec = tx.read("VIF", vif)
        if rec is not None:
            _set(tx, "VIF", vif, [op for op, e in vif_errors(tx, vif, rec).items() if e is None])
    for vdi in vdis:
        rec = tx.read("VDI", vdi)
        if rec is not None:
            _set(tx, "VDI", vdi, vdi_allowed(tx, vdi, rec))
    for sr in srs:
        rec = tx.read("SR", sr)
        if rec is not None:
            _set(tx, "SR", sr, sr_allowed(tx, sr, rec))


def sr_allowed_committed(store: Store, ref: str, rec: Record) -> list[str]:
    """An SR's list as its committed state gives it (start-up: lists written by older xapids are replaced)."""
    with store.transaction() as tx:
        return sr_allowed(tx, ref, rec)


def install(store: Store) -> None:
    """Keep allowed_operations current on every commit of ``store``, and fill them in where a store
    written by an older xapid (or the benchmark's bulk path) left them empty.

    Tasks live in memory only, so at start no operation can still be running: ``current_operations``
    left by a daemon killed in the middle of a copy or migration are cleared (xapi cancels them at
    start-up the same way), and the objects get their lists back.
    """
    if refresh not in store.pre_commit:
        store.pre_commit.append(refresh)
    busy = [(cls, ref) for cls in ("VM", "VBD", "VIF", "VDI") for ref, rec in store.items(cls)
            if rec["current_operations"]]
    if busy:
        with store.transaction() as tx:
            for cls, ref in busy:
                tx.update(cls, ref, current_operations={})
    stale = [(cls, ref) for cls in ("VM", "VBD", "VIF", "VDI") for ref, rec in store.items(cls)
             if not rec["allowed_operations"]]
    stale += [("SR", ref) for ref, rec in store.items("SR")
              if rec["allowed_operations"] != sr_allowed_committed(store, ref, rec)]
    for start in range(0, len(stale), 5000):
        with store.transaction() as tx:
            for cls, ref in stale[start:start + 5000]:
                tx.find(cls, ref)
