"""The demo pool written on first start into an empty state dir.

One pool (master = host 1), N hosts on loopback addresses 127.0.1.N, each
with its metrics, control domain, management PIF on a pool-wide network and
a local ``ext`` SR; one shared 1 TiB ``nfs`` SR attached everywhere and set as
the pool's default SR.  Records get every published field: schema defaults
for anything not set here.
"""

from __future__ import annotations

import platform
import uuid as uuidlib

from xapid import __version__, features
from xapid.storage import Disks
from xapid.store import Store, Transaction
from xapid.timeutil import now_iso

API_VERSION = (2, 21)
HOST_MEMORY = 64 * 1024**3
DOM0_MEMORY = 4 * 1024**3
TIB = 1024**4
LOCAL_SR_SIZE = 500 * 1024**3


def software_version(hostname: str) -> dict[str, str]:
    return {
        "product_version": "8.3.0", "product_version_text": "8.3", "product_version_text_short": "8.3",
        "platform_name": "XCP", "platform_version": "3.4.0", "product_brand": "XCP-ng",
        "build_number": "xapid", "hostname": hostname, "date": "2026-11-24", "xapi": "25.33",
        "xapi_build": __version__, "xen": "4.17.5", "linux": platform.release() or "6.1.0",
        "xencenter_min": "2.21", "xencenter_max": "2.21", "network_backend": "openvswitch",
        "db_schema": "5.810", "xapid": __version__,
    }


def _sr(tx: Transaction, disks: Disks, label: str, sr_type: str, size: int, shared: bool,
        description: str, content_type: str = "user") -> str:
    ref = tx.create("SR", {
        "name_label": label, "name_description": description, "type": sr_type, "content_type": content_type,
        "shared": shared, "physical_size": size, "physical_utilisation": 0, "virtual_allocation": 0,
        "allowed_operations": ["scan", "destroy", "forget", "plug", "unplug", "update", "vdi_create",
                               "vdi_destroy", "vdi_introduce", "pbd_create", "pbd_destroy"],
    })
    rec = tx.get("SR", ref)
    disks.make_sr_dir(rec["uuid"])
    return ref


def seed(store: Store, disks: Disks, hosts: int) -> None:
    """Create the demo pool; the caller checks the store is empty."""
    stamp = now_iso()
    with store.transaction() as tx:
        network = tx.create("network", {
            "name_label": "Pool-wide network associated with eth0", "name_description": "",
            "bridge": "xenbr0", "MTU": 1500, "managed": True, "other_config": {"automatic": "true"},
        })
        host_refs: list[str] = []
        for i in range(1, hosts + 1):
            hostname = f"host{i}"
            metrics = tx.create("host_metrics", {
                "memory_total": HOST_MEMORY, "memory_free": HOST_MEMORY - DOM0_MEMORY, "live": True,
                "last_updated": stamp,
            })
            host = tx.create("host", {
                "name_label": hostname, "name_description": "Default install",
                "API_version_major": API_VERSION[0], "API_version_minor": API_VERSION[1],
                "API_version_vendor": "XenSource", "enabled": True, "software_version": software_version(hostname),
                "capabilities": ["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_64"],
                "cpu_configuration": {}, "sched_policy": "credit", "supported_bootloaders": ["pygrub", "eliloader"],
                "hostname": hostname, "address": f"127.0.1.{i}", "metrics": metrics,
                "license_params": features.licensed(), "edition": "xcp-ng", "memory_overhead": 0,
                "cpu_info": {"cpu_count": "8", "socket_count": "1", "vendor": "GenuineIntel", "speed": "2400.000",
                             "modelname": "xapid virtual CPU"},
                "other_config": {"agent_start_time": "0.", "boot_time": "0."},
                "bios_strings": {"system-manufacturer": "xapid"}, "iscsi_iqn": f"iqn.2026-11.org.xapid:{i}",
                "ssh_enabled": True, "ssh_enabled_timeout": 0, "console_idle_timeout": 0, "ssh_auto_mode": False,
            })
            host_refs.append(host)
            dom0_metrics = tx.create("VM_metrics", {"memory_actual": DOM0_MEMORY, "VCPUs_number": 4,
                                                    "state": ["running"], "start_time": stamp,
                                                    "install_time": stamp, "last_updated": stamp})
            dom0 = tx.create("VM", {
                "name_label": f"Control domain on host: {hostname}",
                "name_description": "The domain which manages physical devices and manages other domains",
                "power_state": "Running", "is_control_domain": True, "resident_on": host, "domid": 0,
                "memory_static_max": DOM0_MEMORY, "memory_dynamic_max": DOM0_MEMORY,
                "memory_dynamic_min": DOM0_MEMORY, "memory_static_min": DOM0_MEMORY, "memory_target": DOM0_MEMORY,
                "VCPUs_max": 4, "VCPUs_at_startup": 4, "metrics": dom0_metrics, "domain_type": "pv",
                "actions_after_shutdown": "destroy", "actions_after_reboot": "restart",
                "actions_after_crash": "restart", "user_version": 1,
            })
            tx.update("host", host, control_domain=dom0)
            pif_metrics = tx.create("PIF_metrics", {"carrier": True, "speed": 1000, "duplex": True,
                                                    "last_updated": stamp})
            mac = "02:" + ":".join(f"{b:02x}" for b in uuidlib.uuid4().bytes[:5])
            tx.create("PIF", {
                "device": "eth0", "network": network, "host": host, "MAC": mac, "MTU": 1500, "VLAN": -1,
                "metrics": pif_metrics, "physical": True, "currently_attached": True, "management": True,
                "ip_configuration_mode": "Static", "IP": f"127.0.1.{i}", "netmask": "255.0.0.0",
                "gateway": "", "DNS": "", "primary_address_type": "IPv4", "managed": True,
                "capabilities": [], "properties": {"gro": "on"},
            })
            local = _sr(tx, disks, f"Local storage on {hostname}", "ext", LOCAL_SR_SIZE, False,
                        "Local ext storage")
            tx.create("PBD", {"host": host, "SR": local, "device_config": {"device": "/dev/sda3"},
                              "currently_attached": True})
        nfs = _sr(tx, disks, "Shared NFS storage", "nfs", TIB, True, "NFS SR [127.0.0.1:/srv/xapid]")
        for host in host_refs:
            tx.create("PBD", {"host": host, "SR": nfs,
                              "device_config": {"server": "127.0.0.1", "serverpath": "/srv/xapid"},
                              "currently_attached": True})
        tx.create("pool", {
            "name_label": "xapid pool", "name_description": "", "master": host_refs[0], "default_SR": nfs,
            "suspend_image_SR": nfs, "crash_dump_SR": nfs, "ha_cluster_stack": "xhad",
            "other_config": {"memory-ratio-hvm": "0.25", "memory-ratio-pv": "0.25"},
            "cpu_info": {"cpu_count": str(8 * hosts), "socket_count": str(hosts), "vendor": "GenuineIntel"},
            "restrictions": features.licensed(),
            "allowed_operations": ["ha_enable", "cluster_create", "designate_new_master"],
        })
