"""Async calls and task objects: ownership, cancellation and garbage collection (wire.md 5.3, 5.4).

An ``Async.<Class>.<msg>`` call runs inside a ``task``: the task is created before the call returns
its ref, the work runs on a thread, and its outcome lands in ``status``, ``result`` (an XML-RPC value
fragment, as xapi) or ``error_info``.  Tasks are memory-only.

Each task records the session that created it (the internal field ``task.session``, from which
``session.tasks`` is derived, so creating a task costs the same however many a session already has).
As in xapi's ``TaskHelper.assert_op_valid``, only a session of the same user, or one holding the
``task.destroy/any`` permission (pool-admin, pool-operator), may cancel, destroy or set the fields of
a task.

Garbage collection follows xapi's ``Db_gc_util.timeout_tasks``: at most ``task-limit-per-user``
finished tasks are kept per user (the oldest destroyed at once; xapi counts 200 over all users, xapid
per user so that nobody can push out another user's results), finished tasks go after
``completed_task_timeout`` seconds, and pending ones whose progress stood still for a whole pass after
``pending_task_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import structlog

from xapid.errors import ApiError
from xapid.schema import NULL_REF
from xapid.timeutil import now_iso

if TYPE_CHECKING:
    from xapid.api import Call
    from xapid.daemon import Daemon
    from xapid.dispatch import Method

log = structlog.get_logger("xapid.tasks")

# Async calls that look for cancellation between their steps.
CANCELLABLE = frozenset({"pool.enable_ha"})
COMPLETED = frozenset({"success", "failure", "cancelled"})
# xapi's extra permission (datamodel.ml extra_permissions) and the roles that hold it (_R_POOL_OP).
ANY_PERMISSION = "task.destroy/any"
ANY_ROLES = ("pool-admin", "pool-operator")


class Tasks:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        config = daemon.config
        self.limit = int(config["task-limit-per-user"])
        self.completed_timeout = float(config["completed_task_timeout"])
        self.pending_timeout = float(config["pending_task_timeout"])
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._cancel_requested: set[str] = set()
        # Per task: the user of the creating session ("" without one) and when it was created.
        self._meta: dict[str, tuple[str, float]] = {}
        # Per user: finished tasks, oldest first, with the (monotonic) time they finished.
        self._finished: dict[str, OrderedDict[str, float]] = {}
        self._probation: dict[str, float] = {}  # old pending task -> its progress at the previous pass

    # -- creation and ownership ------------------------------------------------------------------------

    def create(self, label: str, description: str, session: str | None, cancellable: bool = True) -> str:
        """A pending task owned by ``session``; ``cancellable`` ones list ``cancel`` in their allowed operations."""
        owner = session if session and self.store.exists("session", session) else NULL_REF
        with self.store.transaction() as tx:
            task = tx.create("task", {
                "name_label": label, "name_description": description, "created": now_iso(),
                "status": "pending", "resident_on": self.daemon.master_ref(), "progress": 0.0,
                "type": "<none/>", "backtrace": "()", "allowed_operations": ["cancel"] if cancellable else [],
                "session": owner,
            })
        with self._lock:
            self._meta[task] = (self.daemon.sessions.user(owner) if owner != NULL_REF else "", time.monotonic())
        return task

    def assert_op_valid(self, session: str | None, task: str) -> None:
        """xapi's ``TaskHelper.assert_op_valid``: the caller's user created ``task``, or may touch any task.

        Own means the task's session still exists and belongs to the caller's user (a missing task or
        session is not own).  Otherwise ``RBAC_PERMISSION_DENIED ["task.destroy/any", message]``.
        """
        if session is None:  # internal calls (garbage collection)
            return
        sessions = self.daemon.sessions
        rec = self.store.get("task", task)
        creator = self.store.get("session", rec["session"]) if rec is not None else None
        caller = self.store.get("session", session)
        if creator is not None and caller is not None and creator["auth_user_name"] == caller["auth_user_name"]:
            return
        if sessions.role(session) in ANY_ROLES or (caller is not None and caller["is_local_superuser"]):
            return
        raise ApiError("RBAC_PERMISSION_DENIED", ANY_PERMISSION,
                       f"No permission in user session. (Roles with this permission: {', '.join(ANY_ROLES)})")

    def session_busy(self, session: str) -> bool:
        """Whether a task created by ``session`` is still pending (such a session is not reaped to make room)."""
        for task in self.store.referrers("task", "session", session):
            rec = self.store.get("task", task)
            if rec is not None and rec["status"] == "pending":
                return True
        return False

    # -- progress, cancellation, the running call --------------------------------------------------------

    def progress(self, task: str | None, value: float) -> None:
        """Report progress of a running async call (a no-op for synchronous calls)."""
        if task is None:
            return
        with self.store.transaction() as tx:
            rec = tx.find("task", task)
            if rec is not None and rec["status"] == "pending":
                rec["progress"] = round(min(max(value, 0.0), 1.0), 4)

    def cancel(self, task: str) -> None:
        """``task.cancel``: a client-owned task ends at once; a running call stops at its next check."""
        ended = False
        with self.store.transaction() as tx:
            rec = tx.get("task", task)
            if rec["status"] != "pending" or "cancel" not in rec["allowed_operations"]:
                raise ApiError("OPERATION_NOT_ALLOWED", "The task cannot be cancelled")
            with self._lock:
                running = any(t.name == f"task:{task}" for t in self._threads)
                self._cancel_requested.add(task)
            if not running:
                rec.update(status="cancelled", progress=1.0, finished=now_iso(), allowed_operations=[],
                           error_info=["TASK_CANCELLED", task])
                ended = True
        if ended:
            self._finished_now(task)

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
        with self.store.transaction() as tx:
            if tx.find("task", task) is None:
                return
            tx.update("task", task, status=status, result=result, error_info=error, progress=1.0,
                      finished=now_iso(), allowed_operations=[])
        self._finished_now(task)

    def finish(self, task: str, status: str, result: str = "", error: list[str] | None = None) -> bool:
        """End a still pending ``task`` (an HTTP handler's forwarded task) with ``status``; whether it did.

        A task already completed (cancelled, say) or destroyed is left as it is.
        """
        with self.store.transaction() as tx:
            rec = tx.find("task", task)
            if rec is None or rec["status"] != "pending":
                return False
            tx.update("task", task, status=status, result=result, error_info=list(error or []), progress=1.0,
                      finished=now_iso(), allowed_operations=[])
        self._finished_now(task)
        return True

    def cancelling(self, task: str) -> bool:
        """Whether the client asked to cancel ``task`` (or it already ended cancelled)."""
        if task in self._cancel_requested:
            return True
        rec = self.store.get("task", task)
        return rec is not None and rec["status"] == "cancelled"

    def status_set(self, task: str, status: str) -> None:
        """Bookkeeping after ``task.set_status``: a completed status counts as finished, pending does not."""
        if status in COMPLETED:
            self._finished_now(task)
        else:
            with self._lock:
                user = self._meta.get(task, ("", 0.0))[0]
                self._finished.get(user, OrderedDict()).pop(task, None)

    # -- destruction and garbage collection ---------------------------------------------------------------

    def _finished_now(self, task: str) -> None:
        """Count ``task`` among its user's finished tasks; destroy that user's oldest beyond the limit."""
        with self._lock:
            if task not in self._meta:
                self._meta[task] = ("", time.monotonic())
            user = self._meta[task][0]
            done = self._finished.setdefault(user, OrderedDict())
            done.pop(task, None)
            done[task] = time.monotonic()
            excess = [done.popitem(last=False)[0] for _ in range(len(done) - self.limit)]
        if excess:
            self._destroy(excess, "finished tasks beyond the per-user limit")

    def forget(self, task: str) -> None:
        """Drop the bookkeeping of a destroyed task."""
        with self._lock:
            meta = self._meta.pop(task, None)
            if meta is not None:
                done = self._finished.get(meta[0])
                if done is not None:
                    done.pop(task, None)
                    if not done:
                        del self._finished[meta[0]]
            self._probation.pop(task, None)
            self._cancel_requested.discard(task)

    def destroy(self, task: str) -> None:
        """``task.destroy``: the object goes at once (``HANDLE_INVALID`` if it does not exist)."""
        with self.store.transaction() as tx:
            tx.delete("task", task)
        self.forget(task)

    def _destroy(self, tasks: list[str], why: str) -> None:
        gone = []
        with self.store.transaction() as tx:
            for task in tasks:
                if tx.find("task", task) is not None:
                    tx.delete("task", task)
                    gone.append(task)
        for task in tasks:
            self.forget(task)
        if gone:
            log.info("garbage-collected tasks", count=len(gone), reason=why)

    def drop_all(self, why: str) -> int:
        """Destroy every task: a new master's xapi starts with none (the task class is not persisted).

        A call still running for a dropped task carries on; its progress and result go nowhere.
        Returns how many tasks went.
        """
        tasks = self.store.refs("task")
        self._destroy(tasks, why)
        return len(tasks)

    def collect(self, now: float | None = None) -> None:
        """One garbage-collection pass: finished tasks past ``completed_task_timeout``, hung pending ones.

        A pending task older than ``pending_task_timeout`` goes once its progress has not moved since
        the previous pass (xapi's probation).
        """
        now = time.monotonic() if now is None else now
        old_finished: list[str] = []
        with self._lock:
            for done in self._finished.values():
                for task, finished in done.items():
                    if now - finished <= self.completed_timeout:
                        break
                    old_finished.append(task)
            pending_old = [t for t, (_user, created) in self._meta.items() if now - created > self.pending_timeout]
        hung = []
        probation: dict[str, float] = {}
        for task in pending_old:
            rec = self.store.get("task", task)
            if rec is None or rec["status"] != "pending":
                continue
            before = self._probation.get(task)
            if before is not None and rec["progress"] <= before:
                hung.append(task)
            else:
                probation[task] = rec["progress"]
        with self._lock:
            self._probation = probation
        if old_finished:
            self._destroy(old_finished, "finished longer than completed_task_timeout ago")
        if hung:
            log.warning("garbage-collected pending tasks that made no progress", count=len(hung))
            self._destroy(hung, "pending longer than pending_task_timeout")

    def wait_all(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
