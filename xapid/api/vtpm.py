"""VTPM: a VM's virtual TPM, its state kept in a secret (xapi_vtpm.ml, message_forwarding.ml VTPM).

A VTPM belongs to one halted VM (``VM_BAD_POWER_STATE`` otherwise, ``VTPM_MAX_AMOUNT_REACHED``
for a second one: the VM operation ``create_vtpm``), and the pool must have the ``restrict_vtpm``
feature (:mod:`xapid.features`).  Its contents live in a ``secret`` named by the internal field
``contents``: ``get_contents`` reads it, ``set_contents`` swaps in a new secret (base64 text only).
Copies of a VM copy its VTPMs; a unique one (``is_unique``) starts empty in the copy, as the TPM
specification wants.  Destroying the VM destroys them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from xapid import features, operations
from xapid.api import Call, handler
from xapid.errors import ApiError, internal
from xapid.schema import NULL_REF
from xapid.store import Transaction

# xapi_vm_lifecycle.ml vtpm_update_allowed_operations: destroy only while the VM is halted.
DESTROY_STATES = ("Halted", "Suspended")


def _secret(tx: Transaction, value: str) -> str:
    return tx.create("secret", {"value": value, "other_config": {}})


def introduce(tx: Transaction, vm: str, is_unique: bool, contents: str, is_protected: bool = False) -> str:
    """A new VTPM of ``vm`` holding ``contents`` (no checks: creation, copies and imports call this)."""
    return tx.create("VTPM", {"VM": vm, "is_unique": is_unique, "is_protected": is_protected,
                              "persistence_backend": "xapi", "backend": NULL_REF,
                              "contents": _secret(tx, contents)})


def contents_of(tx: Transaction, vtpm: dict[str, Any]) -> str:
    secret = tx.read("secret", vtpm["contents"])
    return str(secret["value"]) if secret is not None else ""


def copy_all(tx: Transaction, src_vm: str, new_vm: str) -> None:
    """``Xapi_vtpm.copy`` for every VTPM of ``src_vm``: a unique one's contents are not copied."""
    for ref in tx.referrers("VTPM", "VM", src_vm):
        rec = tx.read("VTPM", ref)
        if rec is None:
            continue
        contents = "" if rec["is_unique"] else contents_of(tx, rec)
        introduce(tx, new_vm, rec["is_unique"], contents)


def remove_all(tx: Transaction, vm: str) -> None:
    """Delete every VTPM of ``vm`` with its secret (xapi_vm.ml destroy)."""
    for ref in tx.referrers("VTPM", "VM", vm):
        _remove(tx, ref)


def _remove(tx: Transaction, ref: str) -> None:
    rec = tx.get("VTPM", ref)
    if tx.read("secret", rec["contents"]) is not None:
        tx.delete("secret", rec["contents"])
    tx.delete("VTPM", ref)


@handler("VTPM.create")
def create(call: Call, vM: str, is_unique: bool) -> str:  # noqa: N803 - the wire name of the parameter
    """A new, empty VTPM for a halted VM that has none."""
    with call.store.transaction() as tx:
        operations.assert_vm(tx, vM, "create_vtpm")
        features.assert_available(tx, call.daemon.pool_ref(), "restrict_vtpm")
        return introduce(tx, vM, is_unique, "")


@handler("VTPM.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        rec = tx.get("VTPM", self)
        vm = tx.get("VM", rec["VM"])  # taken for writing: its create_vtpm comes back
        if vm["power_state"] not in DESTROY_STATES:
            raise ApiError("VM_BAD_POWER_STATE", rec["VM"], ";".join(s.lower() for s in DESTROY_STATES),
                           vm["power_state"].lower())
        _remove(tx, self)


@handler("VTPM.get_contents")
def get_contents(call: Call, self: str) -> str:
    with call.store.transaction() as tx:
        return contents_of(tx, tx.get("VTPM", self))


@handler("VTPM.set_contents")
def set_contents(call: Call, self: str, contents: str) -> None:
    """Replace the contents, which must be base64 text (else ``INTERNAL_ERROR``, nothing changed)."""
    try:
        base64.b64decode(contents.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise internal(f"VTPM contents are not base64: {e}") from None
    with call.store.transaction() as tx:
        rec = tx.get("VTPM", self)
        old = rec["contents"]
        rec["contents"] = _secret(tx, contents)
        if tx.read("secret", old) is not None:
            tx.delete("secret", old)
