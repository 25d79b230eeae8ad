"""task: client-created tasks and every call that changes one, each behind xapi's ownership check.

``ocaml/xapi/xapi_task.ml`` calls ``TaskHelper.assert_op_valid`` first in ``destroy``, ``cancel``, the
``set_*`` calls and the ``other_config`` calls: a session may change only tasks of its own user
unless it holds ``task.destroy/any`` (:meth:`xapid.tasks.Tasks.assert_op_valid`).
"""

from __future__ import annotations

from typing import Any

from xapid import generic
from xapid.api import Call, handler


def _owned(call: Call, task: str) -> None:
    call.daemon.tasks.assert_op_valid(call.session, task)


def _set(call: Call, task: str, **values: Any) -> None:
    _owned(call, task)
    with call.store.transaction() as tx:
        tx.update("task", task, **values)


@handler("task.create")
def create(call: Call, label: str, description: str) -> str:
    return call.daemon.tasks.create(label, description, call.session)


@handler("task.destroy")
def destroy(call: Call, self: str) -> None:
    _owned(call, self)
    call.daemon.tasks.destroy(self)


@handler("task.cancel")
def cancel(call: Call, task: str) -> None:
    _owned(call, task)
    call.daemon.tasks.cancel(task)


@handler("task.set_status")
def set_status(call: Call, self: str, value: str) -> None:
    _set(call, self, status=value)
    call.daemon.tasks.status_set(self, value)


@handler("task.set_progress")
def set_progress(call: Call, self: str, value: float) -> None:
    _set(call, self, progress=value)


@handler("task.set_result")
def set_result(call: Call, self: str, value: str) -> None:
    _set(call, self, result=value)


@handler("task.set_error_info")
def set_error_info(call: Call, self: str, value: list[str]) -> None:
    _set(call, self, error_info=value)


@handler("task.set_other_config")
def set_other_config(call: Call, self: str, value: dict[str, str]) -> None:
    _set(call, self, other_config=value)


@handler("task.add_to_other_config")
def add_to_other_config(call: Call, self: str, key: str, value: str) -> None:
    _owned(call, self)
    cdef = call.daemon.schema.classes["task"]
    generic.map_add(cdef, cdef.fields["other_config"])(call, self, key, value)


@handler("task.remove_from_other_config")
def remove_from_other_config(call: Call, self: str, key: str) -> None:
    _owned(call, self)
    cdef = call.daemon.schema.classes["task"]
    generic.map_remove(cdef, cdef.fields["other_config"])(call, self, key)
