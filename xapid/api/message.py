"""message: alerts for the administrator (memory-only, as xapi keeps them outside the database).

At most ``message_limit`` messages exist (xapi's ``Xapi_message.gc``, default 10,000): creating one
beyond that destroys the oldest (:class:`xapid.collector.Collector`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xapid.api import Call, handler
from xapid.errors import ApiError
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.store import Store

# The class an obj_uuid must belong to, per message ``cls`` (the enum is capitalised).
OBJECT_CLASS = {"VM": "VM", "Host": "host", "SR": "SR", "Pool": "pool", "VDI": "VDI"}


@handler("message.create")
def create(call: Call, name: str, priority: int, cls: str, obj_uuid: str, body: str) -> str:
    target = OBJECT_CLASS.get(cls)
    if target is not None and call.store.by_uuid(target, obj_uuid) is None:
        raise ApiError("UUID_INVALID", target, obj_uuid)
    ref = create_message(call.store, name, priority, cls, obj_uuid, body)
    call.daemon.collector.trim_messages()  # at most message_limit at any time (the oldest go)
    return ref


@handler("message.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        tx.delete("message", self)


@handler("message.destroy_many")
def destroy_many(call: Call, messages: list[str]) -> None:
    with call.store.transaction() as tx:
        for m in messages:
            tx.delete("message", m)


@handler("message.destroy_all")
def destroy_all(call: Call, filters: dict[str, str]) -> None:
    """Destroy every message whose fields equal the filters given (``cls``, ``obj_uuid``, ``name``, ...)."""
    with call.store.transaction() as tx:
        for ref, rec in tx.items("message"):
            if all(str(rec.get(k)) == v for k, v in filters.items()):
                tx.delete("message", ref)


def _since(call: Call, since: str, keep: Any = None) -> dict[str, dict[str, Any]]:
    return {ref: call.store.render("message", ref, rec) for ref, rec in call.store.items("message")
            if rec["timestamp"] > since and (keep is None or keep(rec))}


@handler("message.get_since")
def get_since(call: Call, since: str) -> dict[str, dict[str, Any]]:
    return _since(call, since)


@handler("message.get")
def get(call: Call, cls: str, obj_uuid: str, since: str) -> dict[str, dict[str, Any]]:
    return _since(call, since, lambda rec: rec["cls"] == cls and rec["obj_uuid"] == obj_uuid)


def create_message(store: Store, name: str, priority: int, cls: str, obj_uuid: str, body: str = "") -> str:
    """Create one alert as xapi's ``Xapi_alert.add`` does (the one place daemon code creates messages)."""
    with store.transaction() as tx:
        return tx.create("message", {"name": name, "priority": priority, "cls": cls, "obj_uuid": obj_uuid,
                                     "timestamp": now_iso(), "body": body})
