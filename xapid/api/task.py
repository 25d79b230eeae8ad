"""task: client-created tasks and the explicit setters of task fields."""

from __future__ import annotations

from xapid.api import Call, handler


@handler("task.create")
def create(call: Call, label: str, description: str) -> str:
    return call.daemon.tasks.create(label, description, call.session)


@handler("task.destroy")
def destroy(call: Call, self: str) -> None:
    with call.store.transaction() as tx:
        tx.delete("task", self)
        for ref, rec in tx.items("session"):
            if self in rec["tasks"]:
                tx.get("session", ref)["tasks"].remove(self)


@handler("task.cancel")
def cancel(call: Call, task: str) -> None:
    call.daemon.tasks.cancel(task)

