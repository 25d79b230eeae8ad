"""Async calls: each ``Async.<Class>.<msg>`` runs inside a ``task`` object (wire.md 5.3, 5.4).

The task is created before the call returns its ref; the work then runs on a
thread, and its outcome lands in the task's ``status``, ``result`` (an
XML-RPC value fragment, as xapi) or ``error_info``.  Tasks are memory-only and
stay until ``task.destroy``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog

from xapid.errors import ApiError
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.api import Call
    from xapid.daemon import Daemon
    from xapid.dispatch import Method

log = structlog.get_logger("xapid.tasks")

# Async calls that look for cancellation between their steps.
CANCELLABLE = frozenset({"pool.enable_ha"})


class Tasks:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._cancel_requested: set[str] = set()

    def create(self, label: str, description: str, session: str | None, cancellable: bool = True) -> str:
        """A pending task; ``cancellable`` ones list ``cancel`` in their allowed operations."""
        with self.daemon.store.transaction() as tx:
            task = tx.create("task", {
                "name_label": label, "name_description": description, "created": now_iso(),
                "status": "pending", "resident_on": self.daemon.master_ref(), "progress": 0.0,
                "type": "<none/>", "backtrace": "()", "allowed_operations": ["cancel"] if cancellable else [],
            })
            owner = tx.find("session", session) if session else None
            if owner is not None:  # session.tasks: the tasks created using that session (wire.md 5.1)
                owner["tasks"].append(task)
            return task

    def progress(self, task: str | None, value: float) -> None:
        """Report progress of a running async call (a no-op for synchronous calls)."""
        if task is None:
            return
        with self.daemon.store.transaction() as tx:
            rec = tx.find("task", task)
            if rec is not None and rec["status"] == "pending":
                rec["progress"] = round(min(max(value, 0.0), 1.0), 4)

    def cancel(self, task: str) -> None:
        """``task.cancel``: a client-owned task ends at once; a running call stops at its next check."""
        with self.daemon.store.transaction() as tx:
            rec = tx.get("task", task)
            if rec["status"] != "pending" or "cancel" not in rec["allowed_operations"]:
                raise ApiError("OPERATION_NOT_ALLOWED", "The task cannot be cancelled")
            with self._lock:
                running = any(t.name == f"task:{task}" for t in self._threads)
                self._cancel_requested.add(task)
            if not running:
                rec.update(status="cancelled", progress=1.0, finished=now_iso(), allowed_operations=[],
                           error_info=["TASK_CANCELLED", task])

    def check_cancelled(self, task: str | None) -> None:
        """Raise ``TASK_CANCELLED [task]`` if the client asked to cancel this call's task."""
        if task is not None and task in self._cancel_requested:
            raise ApiError("TASK_CANCELLED", task)

    def start(self, call: Call, method: Method, values: list[Any], label: str) -> str:
        """Create the task for an async call and start running it; return the task ref."""
        task = self.create(label, "", call.session, cancellable=method.name in CANCELLABLE)
        call.task = task
        t = threading.Thread(target=self._run, args=(call, method, values, task), daemon=True,
                             name=f"task:{task}")
        with self._lock:
            self._threads.add(t)
        t.start()
        return task

    def _run(self, call: Call, method: Method, values: list[Any], task: str) -> None:
        try:
            value = self.daemon.dispatcher.run(call, method, values)
            result = self.daemon.encoder.xml(value, method.result)
            self._finish(task, "success", result, [])
        except ApiError as e:
            status = "cancelled" if e.code == "TASK_CANCELLED" else "failure"
            self._finish(task, status, "", e.description)
        except Exception as e:  # noqa: BLE001 - a task must always end
            log.exception("task failed", method=method.name)
            self._finish(task, "failure", "", ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"])
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._cancel_requested.discard(task)

    def _finish(self, task: str, status: str, result: str, error: list[str]) -> None:
        with self.daemon.store.transaction() as tx:
            if tx.find("task", task) is None:
                return
            tx.update("task", task, status=status, result=result, error_info=error, progress=1.0,
                      finished=now_iso(), allowed_operations=[])

    def wait_all(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
