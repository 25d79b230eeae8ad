"""The guest agent of emulated VMs: what xe-guest-utilities / the Windows PV tools report.

A VM built from a Linux or Windows template (:func:`xapid.templates.guest_os`) "boots" an OS: a
``guest-agent-delay`` after its domain starts, the agent writes ``VM_guest_metrics`` (OS version,
PV drivers up to date, the features xapi's allowed operations look for, one IPv4 address per VIF
in 127.0.2.0/24 so that a client trying the address never leaves the machine, memory) and links it
from the VM.  Other VMs (``Other install media`` and hand-made ones) have no agent, as on xapi.
A halt removes the metrics; a new domain (reboot, resume) reports afresh.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

import structlog

from xapid import templates
from xapid.schema import NULL_REF
from xapid.store import Transaction
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.hw.guest")

FEATURES = {"feature-shutdown": "1", "feature-poweroff": "1", "feature-reboot": "1", "feature-suspend": "1",
            "feature-vcpu-hotplug": "1", "feature-balloon": "1", "has-vendor-device": "0",
            "platform-feature-multiprocessor-suspend": "1"}
OS_VERSION = {
    "linux": {"name": "Debian GNU/Linux 12 (bookworm)", "distro": "debian", "major": "12", "minor": "5",
              "uname": "6.1.0-21-amd64"},
    "windows": {"name": "Microsoft Windows Server 2022 Standard|C:\\Windows|\\Device\\Harddisk0\\Partition2",
                "distro": "windows", "major": "10", "minor": "0", "spmajor": "0", "spminor": "0"},
}
DRIVERS = {"linux": {"major": "8", "minor": "4", "micro": "0", "build": "1"},
           "windows": {"major": "9", "minor": "4", "micro": "0", "build": "116"}}


def guest_address(mac: str) -> str:
    """The IPv4 address the agent reports for a VIF: 127.0.2.1..254, fixed by its MAC."""
    return f"127.0.2.{int(hashlib.sha256(mac.encode()).hexdigest(), 16) % 254 + 1}"


def remove_metrics(tx: Transaction, vm: str, rec: dict[str, Any]) -> None:
    """Forget the VM's guest metrics (inside ``tx``; ``rec`` is the VM's record in it)."""
    gm = rec["guest_metrics"]
    if gm != NULL_REF:
        if tx.read("VM_guest_metrics", gm) is not None:
            tx.delete("VM_guest_metrics", gm)
        rec["guest_metrics"] = NULL_REF


class GuestAgents:
    """One timer per booting guest; stopped with the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.lock = threading.Lock()
        self.timers: dict[str, threading.Timer] = {}
        self.stopped = False

    def booted(self, vm: str, rec: dict[str, Any]) -> None:
        """The VM's domain ``rec["domid"]`` started: its agent (if it has one) reports after the delay."""
        if templates.guest_os(rec["other_config"], rec["platform"]) is None:
            return
        delay = float(self.daemon.config.get("guest-agent-delay", 5.0))
        timer = threading.Timer(delay, self._report, (vm, int(rec["domid"])))
        timer.daemon = True
        with self.lock:
            if self.stopped:
                return
            old = self.timers.pop(vm, None)
            if old is not None:
                old.cancel()
            self.timers[vm] = timer
        timer.start()

    def _report(self, vm: str, domid: int) -> None:
        with self.lock:
            if self.stopped:
                return
            self.timers.pop(vm, None)
        try:
            with self.daemon.store.transaction() as tx:
                rec = tx.find("VM", vm)
                if rec is None or rec["power_state"] not in ("Running", "Paused") or int(rec["domid"]) != domid:
                    return
                kind = templates.guest_os(rec["other_config"], rec["platform"])
                if kind is None:
                    return
                remove_metrics(tx, vm, rec)
                networks: dict[str, str] = {}
                for vif in tx.referrers("VIF", "VM", vm):
                    vif_rec = tx.read("VIF", vif)
                    if vif_rec is not None and vif_rec["currently_attached"]:
                        address = guest_address(str(vif_rec["MAC"]))
                        networks[f"{vif_rec['device']}/ip"] = address
                        networks[f"{vif_rec['device']}/ipv4/0"] = address
                total = int(rec["memory_dynamic_max"]) // 1024
                rec["guest_metrics"] = tx.create("VM_guest_metrics", {
                    "os_version": dict(OS_VERSION[kind]), "PV_drivers_version": dict(DRIVERS[kind]),
                    "PV_drivers_up_to_date": True, "PV_drivers_detected": True, "networks": networks,
                    "memory": {"total": str(total), "free": str(total // 2)}, "other": dict(FEATURES),
                    "live": True, "last_updated": now_iso(), "can_use_hotplug_vbd": "yes",
                    "can_use_hotplug_vif": "yes", "disks": {},
                })
        except Exception:  # noqa: BLE001 - a background report must never take the daemon down
            log.exception("guest agent report failed", vm=vm)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            timers = list(self.timers.values())
            self.timers.clear()
        for timer in timers:
            timer.cancel()
