"""VM_appliance: a group of VMs started in ``order`` and shut down in reverse (xapi_vm_appliance.ml).

Starting runs :func:`xapid.api.vm.start_vm` for each halted member, lowest ``VM.order`` first, waiting
each VM's ``start_delay``; shutting down takes the highest order first.  The first failure stops the
call and is raised (xapi reports ``VM_APPLIANCE_OPERATION_FAILED``-style partial results the same way).
"""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler
from xapid.api import vm as vm_api
from xapid.errors import ApiError

OPERATIONS = ["start", "clean_shutdown", "hard_shutdown", "shutdown"]


@handler("VM_appliance.create")
def create(call: Call, args: dict[str, Any]) -> str:
    cdef = call.daemon.schema.classes["VM_appliance"]
    values = generic.create_values(call, cdef, args, call.daemon.dispatcher.coerce)
    with call.store.transaction() as tx:
        return tx.create("VM_appliance", {**values, "allowed_operations": list(OPERATIONS)})


def _members(call: Call, appliance: str, reverse: bool) -> list[tuple[str, dict[str, Any]]]:
    if call.store.get("VM_appliance", appliance) is None:
        raise ApiError("HANDLE_INVALID", "VM_appliance", appliance)
    vms = [(vm, rec) for vm in call.store.referrers("VM", "appliance", appliance)
           if (rec := call.store.get("VM", vm)) is not None]
    return sorted(vms, key=lambda item: (int(item[1]["order"]), item[0]), reverse=reverse)


@handler("VM_appliance.start")
def start(call: Call, self: str, paused: bool) -> None:
    for vm, rec in _members(call, self, reverse=False):
        if rec["power_state"] == "Halted":
            vm_api.start_vm(call.daemon, vm, None, paused)


def _shutdown(call: Call, appliance: str, clean: bool | None) -> None:
    for vm, rec in _members(call, appliance, reverse=True):
        if rec["power_state"] == "Halted":
            continue
        if clean if clean is not None else rec["power_state"] == "Running":
            vm_api.clean_shutdown(call, vm)
        else:
            vm_api.hard_shutdown(call, vm)


@handler("VM_appliance.clean_shutdown")
def clean_shutdown(call: Call, self: str) -> None:
    _shutdown(call, self, True)


@handler("VM_appliance.hard_shutdown")
def hard_shutdown(call: Call, self: str) -> None:
    _shutdown(call, self, False)


@handler("VM_appliance.shutdown")
def shutdown(call: Call, self: str) -> None:
    """Clean where a VM runs, hard otherwise."""
    _shutdown(call, self, None)
