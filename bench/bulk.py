"""The harness's bulk path: add VMs to a stopped daemon's state dir, offline and untimed.

Run as ``python -m bench.bulk --state-dir D (--vms N | --objects N)`` (in a process of its own,
so the memory of the loaded store goes back to the system when it exits).  It opens the store
the daemon left (``xapid.store.Store``), adds halted VMs, each with its ``VM_metrics`` as
``VM.create`` makes them, in transactions of :data:`CHUNK` VMs, until the store holds N VM
records (``--vms``) or N persisted objects (``--objects``), closes it, and prints one JSON line:
``{"vms": ..., "objects": ..., "added": ..., "seconds": ..., "sample": [refs of new VMs]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from xapid import operations
from xapid import schema as schema_mod
from xapid.schema import NULL_REF
from xapid.store import Store, new_ref
from xapid.timeutil import now_iso

CHUNK = 10_000
VM_MEMORY = 1024**3


def persisted_objects(store: Store) -> int:
    """Objects of every persisted class (sessions, tasks and messages live in memory only)."""
    return sum(len(store.refs(name)) for name, cdef in store.schema.classes.items() if cdef.persist)


def vm_values(index: int, metrics: str) -> dict[str, Any]:
    """A halted VM as ``VM.create`` leaves it (schema defaults for everything else)."""
    return {
        "name_label": f"bench-vm-{index}",
        "name_description": "created by the xapid benchmark's bulk path",
        "user_version": 1,
        "memory_static_max": VM_MEMORY,
        "memory_dynamic_max": VM_MEMORY,
        "memory_dynamic_min": VM_MEMORY,
        "memory_static_min": VM_MEMORY,
        "memory_target": VM_MEMORY,
        "VCPUs_max": 1,
        "VCPUs_at_startup": 1,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "domain_type": "hvm",
        "other_config": {"bench": "true"},
        "metrics": metrics,
        "power_state": "Halted",
        "domid": -1,
        "resident_on": NULL_REF,
    }


def add_vms(state_dir: Path, vms: int | None = None, objects: int | None = None,
            sample: int = 1000) -> dict[str, Any]:
    """Add VMs until the store holds ``vms`` VM records or ``objects`` persisted objects."""
    if (vms is None) == (objects is None):
        raise ValueError("give exactly one of vms and objects")
    started = time.perf_counter()
    store = Store(schema_mod.load(), state_dir / "xapid.db")
    operations.install(store)  # the VMs get their allowed_operations as VM.create gives them
    try:
        if not store.refs("pool"):
            raise RuntimeError(f"{state_dir}: no seeded pool (start the daemon on it once first)")
        have_vms = len(store.refs("VM"))
        have_objects = persisted_objects(store)
        if vms is not None:
            todo = max(0, vms - have_vms)
        else:
            assert objects is not None
            todo = max(0, math.ceil((objects - have_objects) / 2))  # a VM and its VM_metrics
        stride = max(1, todo // sample) if sample else 0
        picked: list[str] = []
        stamp = now_iso()
        done = 0
        while done < todo:
            with store.transaction() as tx:
                for _ in range(min(CHUNK, todo - done)):
                    metrics = tx.create("VM_metrics", {"memory_actual": VM_MEMORY, "VCPUs_number": 1,
                                                       "install_time": stamp, "last_updated": stamp})
                    ref = tx.create("VM", vm_values(have_vms + done, metrics), ref=new_ref())
                    if stride and done % stride == 0 and len(picked) < sample:
                        picked.append(ref)
                    done += 1
        store.close()
        # Wait for the kernel to write the new rows back, so that their writeback does not slow the
        # fsyncs of the durable writes measured next.
        os.sync()
        return {
            "vms": len(store.refs("VM")),
            "objects": persisted_objects(store),
            "added": todo,
            "seconds": round(time.perf_counter() - started, 3),
            "sample": picked,
        }
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--vms", type=int, help="VM records the store must hold")
    target.add_argument("--objects", type=int, help="persisted objects the store must hold")
    parser.add_argument("--sample", type=int, default=1000, help="refs of new VMs to report")
    args = parser.parse_args(argv)
    out = add_vms(args.state_dir, vms=args.vms, objects=args.objects, sample=args.sample)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
