"""Regenerate ``schema/`` from the reference datamodel dumps.

The reference dumps (``shared/reference`` beside the checkout) are facts about
real xapi; this script turns the classes xapid serves into xapid's own schema
format: one JSON file per class under ``schema/classes/`` plus
``schema/enums.json``.  The generated files are committed; the daemon never
reads the reference dumps.

Usage: python tools/gen_schema.py [REFERENCE_DIR]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

CLASSES = [
    "session", "pool", "host", "host_metrics", "host_cpu", "SR", "SM", "PBD",
    "VDI", "VBD", "VM", "VM_metrics", "VM_guest_metrics", "network", "PIF",
    "PIF_metrics", "VIF", "task", "message", "Cluster", "Cluster_host",
    # Served so that every class a client enumerates answers (records xapid creates or none).
    "VBD_metrics", "VIF_metrics", "console", "VM_appliance", "role", "VLAN", "Bond", "tunnel",
    "network_sriov", "PCI", "PGPU", "GPU_group", "VGPU", "VGPU_type", "PUSB", "USB_group", "VUSB",
    "VTPM", "host_crashdump", "host_patch", "pool_patch", "pool_update", "crashdump", "subject",
    "secret", "blob", "Feature", "Certificate", "Repository", "Observer", "DR_task", "SDN_controller",
    "VMPP", "VMSS", "VM_group", "PVS_site", "PVS_server", "PVS_proxy", "PVS_cache_storage",
]

# Classes that real xapi exposes get_all / get_all_records for (wire.md 4.1).
GET_ALL = set(CLASSES) - {"session"}

ROLE_SETS = {
    "_R_POOL_ADMIN": ["pool-admin"],
    "_R_POOL_OP": ["pool-admin", "pool-operator"],
    "_R_VM_POWER_ADMIN": ["pool-admin", "pool-operator", "vm-power-admin"],
    "_R_VM_ADMIN": ["pool-admin", "pool-operator", "vm-power-admin", "vm-admin"],
    "_R_VM_OP": ["pool-admin", "pool-operator", "vm-power-admin", "vm-admin", "vm-operator"],
    "_R_READ_ONLY": ["pool-admin", "pool-operator", "vm-power-admin", "vm-admin",
                     "vm-operator", "read-only"],
    "_R_ALL": ["pool-admin", "pool-operator", "vm-power-admin", "vm-admin",
               "vm-operator", "read-only"],
    "_R_LOCAL_ROOT_ONLY": [],
    "_R_CLIENT_CERT": ["client-cert"],
}

# Design extension ("Multiple Cluster Managers"): enable_ha takes an optional
# third parameter naming the cluster stack; "" lets the daemon choose.
EXTRA_PARAMS = {
    ("pool", "enable_ha"): [{"name": "cluster_stack", "type": "string", "default": ""}],
}

# One-to-many relations: the "many" side is a set field derived from the ref
# field on the other class (xapi keeps both sides consistent the same way).
RELATIONS = {
    ("SR", "PBDs"): "PBD.SR", ("host", "PBDs"): "PBD.host",
    ("SR", "VDIs"): "VDI.SR", ("VDI", "VBDs"): "VBD.VDI", ("VM", "VBDs"): "VBD.VM",
    ("VM", "VIFs"): "VIF.VM", ("network", "VIFs"): "VIF.network",
    ("network", "PIFs"): "PIF.network", ("host", "PIFs"): "PIF.host",
    ("host", "resident_VMs"): "VM.resident_on", ("host", "host_CPUs"): "host_cpu.host",
    ("VM", "snapshots"): "VM.snapshot_of", ("VM", "children"): "VM.parent",
    ("VDI", "snapshots"): "VDI.snapshot_of", ("Cluster", "cluster_hosts"): "Cluster_host.cluster",
    ("VM", "consoles"): "console.VM", ("VM_appliance", "VMs"): "VM.appliance",
    ("VM", "VTPMs"): "VTPM.VM", ("VM", "VGPUs"): "VGPU.VM", ("VM", "VUSBs"): "VUSB.VM",
    ("VM", "crash_dumps"): "crashdump.VM", ("VDI", "crash_dumps"): "crashdump.VDI",
    ("host", "crashdumps"): "host_crashdump.host", ("host", "patches"): "host_patch.host",
    ("host", "PCIs"): "PCI.host", ("host", "PGPUs"): "PGPU.host", ("host", "PUSBs"): "PUSB.host",
    ("PIF", "VLAN_slave_of"): "VLAN.tagged_PIF", ("PIF", "bond_master_of"): "Bond.master",
    ("Bond", "slaves"): "PIF.bond_slave_of", ("PIF", "tunnel_access_PIF_of"): "tunnel.access_PIF",
    ("PIF", "tunnel_transport_PIF_of"): "tunnel.transport_PIF",
    ("PIF", "sriov_physical_PIF_of"): "network_sriov.physical_PIF",
    ("PIF", "sriov_logical_PIF_of"): "network_sriov.logical_PIF",
    ("VMPP", "VMs"): "VM.protection_policy", ("VMSS", "VMs"): "VM.snapshot_schedule",
    ("GPU_group", "PGPUs"): "PGPU.GPU_group", ("GPU_group", "VGPUs"): "VGPU.GPU_group",
    ("PGPU", "resident_VGPUs"): "VGPU.resident_on", ("VGPU_type", "VGPUs"): "VGPU.type",
    ("USB_group", "PUSBs"): "PUSB.USB_group", ("USB_group", "VUSBs"): "VUSB.USB_group",
    ("PVS_site", "servers"): "PVS_server.site", ("PVS_site", "proxies"): "PVS_proxy.site",
    ("PVS_site", "cache_storage"): "PVS_cache_storage.site",
    ("session", "tasks"): "task.session",
}

# Internal-only fields kept as "internal_fields": stored like any field, never on the wire (no getter,
# not in records), present because a published relation is derived from them (task.session) or
# because behaviour needs them (VTPM.contents: the secret holding the TPM state, xapi_vtpm.ml).
INTERNAL_FIELDS = {("task", "session"), ("VTPM", "contents")}

PARAM_DEFAULTS = {
    ("SR", "create", "sm_config"): {},
    ("SR", "introduce", "sm_config"): {},
}

QUALIFIERS = {"RW": "RW", "StaticRO": "SRO", "DynamicRO": "DRO"}

# Defaults that the dumps give as OCaml constants.
CONSTANTS = {
    "Constants.default_ssh_enabled_timeout": 0,
    "Constants.default_console_idle_timeout": 0,
    "Constants.default_usb_speed": -1.0,
    "Int64.zero": 0,
    "Constants.default_token_timeout_s": 20.0,
    "Constants.default_token_timeout_coefficient_s": 1.0,
}


def roles_of(spec: str | None) -> list[str]:
    if not spec or spec == "None":
        return ROLE_SETS["_R_POOL_ADMIN"]
    out: list[str] = []
    for part in spec.split("++"):
        part = part.strip().replace("Datamodel_roles.", "")
        for r in ROLE_SETS.get(part, ["pool-admin"]):
            if r not in out:
                out.append(r)
    return out


def zero(ty: str) -> Any:
    if ty.endswith(" map"):
        return {}
    if ty.endswith(" set"):
        return []
    if ty.endswith(" ref"):
        return "OpaqueRef:NULL"
    return {"string": "", "int": 0, "float": 0.0, "bool": False,
            "datetime": "19700101T00:00:00Z"}.get(ty, "")


def scalar(tok: str) -> Any:
    tok = tok.strip()
    m = re.match(r"V(String|Int|Bool|Float|Enum|Ref|DateTime)\s*(.*)$", tok)
    if not m:
        return tok
    kind, rest = m.group(1), m.group(2).strip()
    if kind == "String":
        return "OpaqueRef:NULL" if rest == "null_ref" else rest  # VString of the null reference
    if kind == "Int":
        return CONSTANTS.get(rest, None) if rest.startswith(("Constants", "Int64")) else int(rest.rstrip("L"))
    if kind == "Bool":
        return rest == "true"
    if kind == "Float":
        return CONSTANTS.get(rest) if rest.startswith("Constants") else float(rest.rstrip("."))
    if kind == "Enum":
        return rest
    if kind == "Ref":
        return "OpaqueRef:NULL"
    if kind == "DateTime":
        return "19700101T00:00:00Z"
    return rest


def default_of(raw: str | None, ty: str) -> tuple[bool, Any]:
    """Return (has_default, value) in xapid's plain-JSON representation."""
    if raw is None:
        return False, None
    raw = raw.strip()
    if raw in ('""', "null_str"):
        return True, ""
    if raw in ("{}", "null_set"):
        return True, zero(ty)
    if raw == "null_ref":
        return True, "OpaqueRef:NULL"
    if raw == "null_int":
        return True, 0
    if raw == "null_bool":
        return True, False
    if not raw.startswith("Some "):
        return True, zero(ty)
    body = raw[5:].strip()
    if body.startswith("VMap"):
        rest = body[4:].strip()
        out: dict[str, Any] = {}
        if rest:
            for pair in rest.split(";"):
                k, v = pair.split(",", 1)
                out[str(scalar(k))] = str(scalar(v))
        return True, out
    if body.startswith("VSet"):
        rest = body[4:].strip()
        if not rest or "Constants" in rest:
            return True, []
        return True, [scalar(x) for x in rest.split(";")]
    value = scalar(body)
    if value is None:
        return True, zero(ty)
    if ty == "float" and isinstance(value, int):
        value = float(value)
    return True, value


def lifecycle_of(states: list[str]) -> str:
    if "Removed" in states:
        return "removed"
    if "Deprecated" in states:
        return "deprecated"
    return "published"


def implicit_roles(xenapi: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for cls in xenapi:
        for m in cls.get("messages", []):
            out[(cls["name"], m["name"])] = list(m.get("roles", []))
    return out


def main() -> None:
    ref = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "reference"
    model = json.loads((ref / "xapi-datamodel.json").read_text())
    xenapi = json.loads((ref / "xenapi.json").read_text())
    roles_2024 = implicit_roles(xenapi)
    explicit_2024 = {
        (c["name"], m["name"]): [p for p in m["params"] if p["name"] != "session_id"]
        for c in xenapi for m in c.get("messages", []) if not m.get("implicit")
    }
    out_dir = Path(__file__).resolve().parents[1] / "schema"
    (out_dir / "classes").mkdir(parents=True, exist_ok=True)
    used_enums: set[str] = set()

    def note_enums(ty: str) -> None:
        for e in re.findall(r"enum ([A-Za-z0-9_]+)", ty):
            used_enums.add(e)

    for name in CLASSES:
        c = model["classes"][name]
        fields = []
        seen: set[str] = set()
        internal = []
        for f in c["fields"]:
            if f["name"] in seen:  # the dumps repeat a few renamed fields
                continue
            if f["internal_only"]:
                if (name, f["name"]) in INTERNAL_FIELDS:
                    internal.append({"name": f["name"], "type": f["type"], "qualifier": QUALIFIERS[f["qualifier"]],
                                     "default": "OpaqueRef:NULL" if f["type"].endswith(" ref") else None})
                continue
            seen.add(f["name"])
            has, value = default_of(f["default"], f["type"])
            entry: dict[str, Any] = {
                "name": f["name"],
                "type": f["type"],
                "qualifier": QUALIFIERS[f["qualifier"]],
            }
            if has:
                entry["default"] = value
            life = lifecycle_of(f["lifecycle"])
            if life != "published":
                entry["lifecycle"] = life
            if (name, f["name"]) in RELATIONS:
                entry["derived_from"] = RELATIONS[(name, f["name"])]
            note_enums(f["type"])
            fields.append(entry)
        messages = []
        for m in c["messages"]:
            if m.get("internal") or m.get("unresolved") or m["name"].startswith("Special."):
                continue
            params = []
            for p in m["params"]:
                pe: dict[str, Any] = {"name": p["name"], "type": p["type"]}
                if p["default"] not in (None, "None"):
                    has, value = default_of(p["default"], p["type"])
                    if has:
                        pe["default"] = value
                note_enums(p["type"])
                params.append(pe)
            older = explicit_2024.get((name, m["name"]), [])
            if len(older) > len(params) and [p["name"] for p in older[: len(params)]] == [p["name"] for p in params]:
                params = []
            if not params and (name, m["name"]) in explicit_2024:
                # Messages built by helper functions in xapi lose their parameters in the
                # 2026 dump; the 2024 documentation dump still lists them.
                for p in explicit_2024[(name, m["name"])]:
                    pe = {"name": p["name"], "type": p["type"]}
                    if (name, m["name"], p["name"]) in PARAM_DEFAULTS:
                        pe["default"] = PARAM_DEFAULTS[(name, m["name"], p["name"])]
                    params.append(pe)
            params.extend(EXTRA_PARAMS.get((name, m["name"]), []))
            entry = {
                "name": m["name"],
                "params": params,
                "result": m["result"] or "void",
                "session": m.get("session", True),
                "async": m.get("async_", False),
                "roles": roles_of(m.get("roles")),
            }
            if m.get("hidden"):
                entry["hidden"] = True
            life = lifecycle_of(m.get("lifecycle", []))
            if life != "published":
                entry["lifecycle"] = life
            note_enums(entry["result"])
            messages.append(entry)
        generic_roles = {}
        for (cls_name, msg), roles in roles_2024.items():
            if cls_name == name and re.match(r"(set_|add_|remove_|create$|destroy$)", msg):
                generic_roles[msg] = roles
        doc = {
            "name": name,
            "persist": c["persist"] != "PersistNothing",
            "get_all": name in GET_ALL,
            "constructor": c["gen_constructor_destructor"] == "true",
            "fields": fields,
            "messages": messages,
            "generic_roles": generic_roles,
        }
        if internal:
            doc["internal_fields"] = internal
        (out_dir / "classes" / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    # event is not a database class: explicit messages only, no record methods (wire.md 6).
    event = next(c for c in xenapi if c["name"] == "event")
    results = {"from": "any", "next": "any", "inject": "string", "get_current_id": "int",
               "register": "void", "unregister": "void"}
    (out_dir / "classes" / "event.json").write_text(json.dumps({
        "name": "event", "persist": False, "get_all": False, "constructor": False, "in_db": False,
        "fields": [],
        "messages": [
            {"name": m["name"],
             "params": [{"name": p["name"], "type": p["type"]} for p in m["params"] if p["name"] != "session_id"],
             "result": results[m["name"]], "session": True, "async": False, "roles": list(m["roles"])}
            for m in event["messages"]
        ],
        "generic_roles": {},
    }, indent=1) + "\n")
    enums = {e: model["enums"][e] for e in sorted(used_enums) if e in model["enums"]}
    # A few enums are empty in the 2026 dump (built by helpers in xapi's source); fill them from
    # the 2024 documentation dump, or from wire.md where neither has them.
    older = {e["name"]: [v["name"] for v in e["values"]] for c in xenapi for e in c.get("enums", [])}
    fallback = {"image_format_type": ["raw", "vhd", "qcow2"], "vm_operations": ["sysprep"]}
    for name, values in enums.items():
        if not values:
            enums[name] = older.get(name, fallback.get(name, []))
    if "sysprep" not in enums.get("vm_operations", ["sysprep"]):
        enums["vm_operations"].append("sysprep")  # wire.md 7.6 lists it at HEAD
    (out_dir / "enums.json").write_text(json.dumps(enums, indent=1) + "\n")
    print(f"wrote {len(CLASSES)} classes and {len(enums)} enums to {out_dir}")


if __name__ == "__main__":
    main()
