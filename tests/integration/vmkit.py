"""What the VM-surface tests do the way clients do it: deploy from a template, add disks, CDs and NICs.

Every helper talks to the daemon through the official SDK only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import XenAPI

NULL = "OpaqueRef:NULL"
GIB = 1024**3
MIB = 1024**2


def failure(fn: Callable[..., Any], *args: Any) -> list[str]:
    """The ErrorDescription of a call that must fail."""
    try:
        fn(*args)
    except XenAPI.Failure as e:
        return list(e.details)
    raise AssertionError(f"{fn} succeeded")


def template(api: Any, name: str) -> str:
    refs = [r for r in api.VM.get_by_name_label(name) if api.VM.get_is_a_template(r)]
    assert refs, f"no template {name}"
    return refs[0]


def default_sr(api: Any) -> str:
    return api.pool.get_default_SR(api.pool.get_all()[0])


def install(api: Any, template_name: str, name: str, sr: str | None = None) -> str:
    """xenserver_guest's deploy: clone the template, point its provision XML at an SR, provision."""
    vm = api.VM.clone(template(api, template_name), name)
    sr_uuid = api.SR.get_uuid(sr or default_sr(api))
    other = api.VM.get_other_config(vm)
    if "disks" in other:
        other["disks"] = other["disks"].replace('sr=""', f'sr="{sr_uuid}"')
        api.VM.set_other_config(vm, other)
    api.VM.provision(vm)
    return vm


def new_vdi(api: Any, sr: str, size: int, name: str = "disk", vdi_type: str = "user") -> str:
    return api.VDI.create({"name_label": name, "name_description": "", "SR": sr, "virtual_size": str(size),
                           "type": vdi_type, "sharable": False, "read_only": False, "other_config": {},
                           "xenstore_data": {}, "sm_config": {}, "tags": []})


def new_vbd(api: Any, vm: str, vdi: str = NULL, userdevice: str = "autodetect", vbd_type: str = "Disk",
            mode: str = "RW", empty: bool = False, **extra: Any) -> str:
    args = {"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": False, "mode": mode, "type": vbd_type,
            "unpluggable": True, "empty": empty, "other_config": {}, "qos_algorithm_type": "",
            "qos_algorithm_params": {}}
    args.update(extra)
    return api.VBD.create(args)


def new_cd(api: Any, vm: str, userdevice: str = "3") -> str:
    return new_vbd(api, vm, NULL, userdevice, "CD", "RO", True)


def new_vif(api: Any, vm: str, device: str = "0", mac: str = "", network: str | None = None) -> str:
    net = network or api.network.get_all()[0]
    return api.VIF.create({"device": device, "network": net, "VM": vm, "MAC": mac, "MTU": "1500",
                           "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
                           "locking_mode": "network_default", "ipv4_allowed": [], "ipv6_allowed": []})


def ops(api: Any, cls: str, ref: str) -> set[str]:
    return set(getattr(api, cls).get_allowed_operations(ref))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_for_ip(api: Any, vm: str, timeout: float = 10.0) -> str:
    """As "wait for the IP" scripts do: poll VM.guest_metrics.networks for ``0/ip``."""
    def ip() -> str:
        gm = api.VM.get_guest_metrics(vm)
        if gm == NULL:
            return ""
        return str(api.VM_guest_metrics.get_networks(gm).get("0/ip", ""))

    return str(wait_for(ip, timeout, "the guest's IP"))


def vdi_file(state_dir: Path, api: Any, vdi: str) -> Path:
    """The sparse file backing ``vdi`` in the daemon's state dir."""
    sr = api.VDI.get_SR(vdi)
    return state_dir / "sr" / api.SR.get_uuid(sr) / f"{api.VDI.get_location(vdi)}.img"


def disks_of(api: Any, vm: str) -> list[str]:
    return [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm) if api.VBD.get_type(b) == "Disk"]
