"""task: client-created tasks and the explicit setters of task fields."""

from __future__ import annotations

from xapid.api import Call, handler
from xapid.errors import ApiError


@handler("task.create")
def create(call: Call, label: str, description: str) -> str:
    return call.daemon.tasks.create(label, description, call.session)


@handler("task.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        tx.delete("task", self)


@handler("task.cancel")
def cancel(call: Call, task: str) -> None:
    rec = call.store.get("task", task)
    if rec is None:
        raise ApiError("HANDLE_INVALID", "task", task)
    raise ApiError("OPERATION_NOT_ALLOWED", "task cannot be cancelled")

