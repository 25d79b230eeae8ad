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


class Tasks:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def create(self, label: str, description: str, session: str | None) -> str:
        with self.daemon.store.transaction() as tx:
            return tx.create("task", {
                "name_label": label, "name_description": description, "created": now_iso(),
                "status": "pending", "resident_on": self.daemon.master_ref(), "progress": 0.0,
                "type": "<none/>", "backtrace": "()",
            })

    def start(self, call: Call, method: Method, values: list[Any], label: str) -> str:
        """Create the task for an async call and start running it; return the task ref."""
        task = self.create(label, "", call.session)
        call.task = task
        t = threading.Thread(target=self._run, args=(call, method, values, task), daemon=True,
                             name=f"task-{label}")
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
            self._finish(task, "failure", "", e.description)
        except Exception as e:  # noqa: BLE001 - a task must always end
            log.exception("task failed", method=method.name)
            self._finish(task, "failure", "", ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"])
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _finish(self, task: str, status: str, result: str, error: list[str]) -> None:
        with self.daemon.store.transaction() as tx:
            if tx.find("task", task) is None:
                return
            tx.update("task", task, status=status, result=result, error_info=error, progress=1.0,
                      finished=now_iso())

    def wait_all(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
