"""role: the RBAC roles as records (Datamodel_roles / xapi_role.ml), created at start if missing.

Each of the six roles is a ``role`` record; its permissions are the messages whose allowed roles
include it (the datamodel's RBAC table), named as xapi names them (lower-case ``class.message``).
xapid keeps no permission records of its own, so ``subroles`` and ``get_permissions`` are empty.
"""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.schema import Schema
from xapid.store import Store

ROLES = {
    "pool-admin": "The Pool Administrator role has full access to all features and settings, including accessing "
                  "Dom0 and managing subjects, roles and external authentication",
    "pool-operator": "The Pool Operator role manages host- and pool-wide resources, including setting up storage, "
                     "creating resource pools and managing patches, high availability (HA) and workload balancing "
                     "(WLB)",
    "vm-power-admin": "The VM Power Administrator role has full access to VM and template management and can choose "
                      "where to start VMs and use the dynamic memory control and VM snapshot features",
    "vm-admin": "The VM Administrator role can manage VMs and templates",
    "vm-operator": "The VM Operator role can use VMs and interact with VM consoles",
    "read-only": "The Read-Only role can log in with basic read-only access",
}


def ensure(store: Store) -> None:
    """Create the role records the store lacks (by name)."""
    have = {rec["name_label"] for _r, rec in store.items("role")}
    missing = [name for name in ROLES if name not in have]
    if missing:
        with store.transaction() as tx:
            for name in missing:
                tx.create("role", {"name_label": name, "name_description": ROLES[name], "subroles": [],
                                   "is_internal": False})


_CACHE: dict[int, dict[str, tuple[str, ...]]] = {}


def _permissions(schema: Schema) -> dict[str, tuple[str, ...]]:
    cached = _CACHE.get(id(schema))
    if cached is not None:
        return cached
    out: dict[str, list[str]] = {name: [] for name in ROLES}
    for cdef in schema.classes.values():
        for msg in cdef.messages.values():
            for role in msg.roles:
                if role in out:
                    out[role].append(f"{cdef.name}.{msg.name}".lower())
    _CACHE[id(schema)] = {role: tuple(sorted(perms)) for role, perms in out.items()}
    return _CACHE[id(schema)]


def _role(call: Call, ref: str) -> str:
    rec = call.store.get("role", ref)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "role", ref)
    return str(rec["name_label"])


@handler("role.get_permissions")
def get_permissions(call: Call, self: str) -> list[str]:
    _role(call, self)
    return []


@handler("role.get_permissions_name_label")
def get_permissions_name_label(call: Call, self: str) -> list[str]:
    return list(_permissions(call.daemon.schema).get(_role(call, self), ()))


@handler("role.get_by_permission")
def get_by_permission(call: Call, permission: str) -> list[str]:
    _role(call, permission)
    return []


@handler("role.get_by_permission_name_label")
def get_by_permission_name_label(call: Call, label: str) -> list[str]:
    perms = _permissions(call.daemon.schema)
    wanted = label.lower()
    return [ref for ref, rec in call.store.items("role") if wanted in perms.get(rec["name_label"], ())]
