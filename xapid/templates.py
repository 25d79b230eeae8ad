"""The default VM templates a pool ships, as XCP-ng 8.3 / XenServer 8 name and shape them.

Each is a halted VM record with ``is_a_template`` and ``is_default_template`` true and the
install-time keys of xapi's templates in ``other_config``: ``disks`` (the provision XML that
``VM.provision`` turns into VDIs and VBDs), ``install-methods``, ``linux_template`` for Linux
guests, ``default_template``, plus ``recommendations`` XML.  :func:`ensure` creates those missing
from a store (by name), so pools seeded by an older xapid get them at start; a template the user
deleted on purpose comes back, as xapi's start-up re-creates its default templates.
"""

from __future__ import annotations

import copy
from typing import Any

from xapid.schema import NULL_REF
from xapid.store import Store, Transaction

GIB = 1024**3
MIB = 1024**2

OTHER_INSTALL_MEDIA = "Other install media"


def provision_xml(*disks: tuple[int, int]) -> str:
    """xapi's ``disks`` key: one ``<disk>`` per (device, size); ``sr=""`` means the pool's default SR."""
    body = "".join(f'<disk device="{device}" size="{size}" sr="" bootable="{str(device == 0).lower()}" '
                   f'type="system"/>' for device, size in disks)
    return f"<provision>{body}</provision>"


def recommendations(memory_max: int, vcpus_max: int, vifs: int = 7) -> str:
    return ("<restrictions>"
            f'<restriction field="memory-static-max" max="{memory_max}"/>'
            f'<restriction field="vcpus-max" max="{vcpus_max}"/>'
            '<restriction property="number-of-vbds" max="255"/>'
            f'<restriction property="number-of-vifs" max="{vifs}"/>'
            '<restriction field="has-vendor-device" value="false"/>'
            "</restrictions>")


_HVM_PLATFORM = {"device-model": "qemu-upstream-compat", "nx": "true", "acpi": "1", "apic": "true", "pae": "true",
                 "hpet": "true", "viridian": "false", "secureboot": "false"}


def _template(name: str, description: str, memory: tuple[int, int], vcpus: int, disk: int,
              other: dict[str, str], platform: dict[str, str] | None = None, firmware: str = "bios",
              reco: tuple[int, int] = (128 * GIB, 32)) -> dict[str, Any]:
    low, high = memory
    return {
        "name_label": name, "name_description": description, "is_a_template": True, "is_default_template": True,
        "user_version": 1, "memory_static_min": low, "memory_dynamic_min": high, "memory_dynamic_max": high,
        "memory_static_max": high, "memory_target": high, "VCPUs_max": vcpus, "VCPUs_at_startup": vcpus,
        "actions_after_shutdown": "destroy", "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cdn", "firmware": firmware},
        "platform": {**_HVM_PLATFORM, **(platform or {})}, "domain_type": "hvm",
        "other_config": {"default_template": "true", "disks": provision_xml((0, disk)), **other},
        "recommendations": recommendations(*reco), "affinity": NULL_REF,
    }


_LINUX = {"linux_template": "true", "install-methods": "cdrom,nfs,http,ftp"}
_WINDOWS = {"install-methods": "cdrom"}
_WIN_PLATFORM = {"viridian": "true", "viridian_time_ref_count": "true", "viridian_reference_tsc": "true",
                 "viridian_apic_assist": "true", "viridian_crash_ctl": "true", "viridian_stimer": "true",
                 "device_id": "0002"}

DEFAULT_TEMPLATES: list[dict[str, Any]] = [
    _template(OTHER_INSTALL_MEDIA, "Template which allows VM installation from install media",
              (256 * MIB, 2 * GIB), 1, 32 * GIB, {"install-methods": "cdrom"}),
    _template("Debian Bookworm 12", "To install Debian Bookworm 12 from a CD or network", (512 * MIB, 2 * GIB),
              1, 10 * GIB, {**_LINUX, "install-distro": "debianlike", "install-repository": "cdrom"},
              reco=(1024 * GIB, 64)),
    _template("Debian Bullseye 11", "To install Debian Bullseye 11 from a CD or network", (512 * MIB, 2 * GIB),
              1, 10 * GIB, {**_LINUX, "install-distro": "debianlike"}, reco=(1024 * GIB, 64)),
    _template("Ubuntu Jammy Jellyfish 22.04", "To install Ubuntu Jammy Jellyfish 22.04 from a CD or network",
              (512 * MIB, 2 * GIB), 1, 10 * GIB, {**_LINUX, "install-distro": "debianlike"}, reco=(1024 * GIB, 64)),
    _template("Rocky Linux 9", "To install Rocky Linux 9 from a CD or network", (1 * GIB, 2 * GIB), 1, 10 * GIB,
              {**_LINUX, "install-distro": "rhlike"}, reco=(1024 * GIB, 64)),
    _template("AlmaLinux 9", "To install AlmaLinux 9 from a CD or network", (1 * GIB, 2 * GIB), 1, 10 * GIB,
              {**_LINUX, "install-distro": "rhlike"}, reco=(1024 * GIB, 64)),
    _template("Windows Server 2022 (64-bit)", "Clones of this template will automatically provision their "
              "storage when first booted and then reconfigure themselves with the optimal settings for "
              "Windows Server 2022 (64-bit).", (2 * GIB, 2 * GIB), 2, 32 * GIB, _WINDOWS, _WIN_PLATFORM,
              reco=(1536 * GIB, 64)),
    _template("Windows 10 (64-bit)", "Clones of this template will automatically provision their storage when "
              "first booted and then reconfigure themselves with the optimal settings for Windows 10 (64-bit).",
              (2 * GIB, 2 * GIB), 2, 32 * GIB, _WINDOWS, _WIN_PLATFORM, reco=(1536 * GIB, 64)),
    _template("Windows 11", "Clones of this template will automatically provision their storage when first "
              "booted and then reconfigure themselves with the optimal settings for Windows 11.",
              (4 * GIB, 4 * GIB), 2, 64 * GIB, _WINDOWS, {**_WIN_PLATFORM, "secureboot": "auto"},
              firmware="uefi", reco=(2048 * GIB, 64)),
]


def create_template(tx: Transaction, values: dict[str, Any]) -> str:
    """One template VM with its metrics object (as ``VM.create`` makes them)."""
    metrics = tx.create("VM_metrics", {"memory_actual": values["memory_dynamic_max"],
                                       "VCPUs_number": values["VCPUs_at_startup"]})
    return tx.create("VM", {**copy.deepcopy(values), "metrics": metrics, "power_state": "Halted", "domid": -1,
                            "resident_on": NULL_REF})


def ensure(store: Store) -> int:
    """Create every default template the store lacks (matched by name among templates); return how many."""
    have = {rec["name_label"] for _ref, rec in store.items("VM") if rec["is_a_template"]}
    missing = [t for t in DEFAULT_TEMPLATES if t["name_label"] not in have]
    if missing:
        with store.transaction() as tx:
            for values in missing:
                create_template(tx, values)
    return len(missing)


def guest_os(other_config: dict[str, str], platform: dict[str, str]) -> str | None:
    """``linux`` or ``windows`` for a VM made from such a template (its guest agent runs), else None."""
    if other_config.get("linux_template") == "true":
        return "linux"
    if platform.get("viridian") == "true" and "Windows" in other_config.get("base_template_name", ""):
        return "windows"
    return None
