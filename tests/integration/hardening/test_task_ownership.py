"""Issue 17 finding 2: a user changes only its own tasks unless it holds ``task.destroy/any``.

The attack: a read-only session cancelled root's running ``Async.pool.enable_ha`` (and could destroy or
rewrite any task).  xapi (``ocaml/xapi/xapi_task.ml``) calls ``TaskHelper.assert_op_valid`` first in
every task call that changes something: the task's session must belong to the caller's user
(``auth_user_sid``; xapid compares the user name), or the caller needs the extra permission
``task.destroy/any`` (``datamodel.ml`` ``extra_permissions``: ``_R_POOL_OP``, so pool-admin and
pool-operator), else ``RBAC_PERMISSION_DENIED ["task.destroy/any", "No permission in user session.
(Roles with this permission: ...)"]`` (``rbac.ml``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import XenAPI

from tests.conftest import SHIPPED_STACKS, Xapid, kill_heartbeats, write_conf
from tests.integration.hardening.conftest import add_user

DENIED = ["RBAC_PERMISSION_DENIED", "task.destroy/any",
          "No permission in user session. (Roles with this permission: pool-admin, pool-operator)"]
SLOW_START = """#!/bin/sh
sleep 3
exec "{xhad}/ha_start_daemon" "$@"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    tmp = tmp_path_factory.mktemp("tasks")
    root = tmp / "cluster-stack"
    shutil.copytree(SHIPPED_STACKS, root, ignore=shutil.ignore_patterns("__pycache__"))
    slow = root / "slow"
    shutil.copytree(root / "xhad", slow)  # xhad, except that starting the heartbeat takes 3 s
    (slow / "ha_start_daemon").write_text(SLOW_START.format(xhad=root / "xhad"))
    d = Xapid(tmp / "state", write_conf(tmp / "state.conf", root), ["--hosts", "2"])
    d.start()
    add_user(d, "auditor", "read-only")
    add_user(d, "operator", "pool-operator")
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


def denial(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def login(daemon: Xapid, user: str) -> Any:
    return daemon.session(user, f"{user}-pw" if user != "root" else None).xenapi


def test_a_read_only_user_cannot_cancel_or_rewrite_roots_running_enable_ha(daemon: Xapid) -> None:
    root = daemon.session().xenapi
    ro = login(daemon, "auditor")
    pool = root.pool.get_all()[0]
    task = root.Async.pool.enable_ha([], {"timeout": "10"}, "slow")
    try:
        assert root.task.get_status(task) == "pending"
        for call, args in [("cancel", ()), ("destroy", ()), ("set_status", ("failure",)),
                           ("set_progress", ("0.99",)), ("set_result", ("<value>forged</value>",)),
                           ("set_error_info", (["FORGED"],))]:
            assert denial(getattr(ro.task, call), task, *args) == DENIED, call
        # The other_config calls need pool-operator in the first place (the method's own roles).
        for call, args in [("set_other_config", ({"k": "v"},)), ("add_to_other_config", ("k", "v")),
                           ("remove_from_other_config", ("k",))]:
            assert denial(getattr(ro.task, call), task, *args)[:2] == ["RBAC_PERMISSION_DENIED", f"task.{call}"]
        rec = root.task.get_record(task)
        assert rec["other_config"] == {} and rec["result"] == "" and rec["error_info"] == []
        deadline = time.monotonic() + 60
        while root.task.get_status(task) == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert root.task.get_status(task) == "success", root.task.get_error_info(task)
        assert root.pool.get_ha_enabled(pool) is True
    finally:
        while root.task.get_status(task) == "pending":
            time.sleep(0.2)
        if root.pool.get_ha_enabled(pool):
            root.pool.disable_ha()
        root.task.destroy(task)


def test_own_tasks_are_the_users_whatever_session_made_them(daemon: Xapid) -> None:
    first, second = login(daemon, "auditor"), login(daemon, "auditor")
    task = first.task.create("mine", "")
    second.task.set_progress(task, "0.5")
    second.task.set_result(task, "<value>42</value>")
    assert first.task.get_record(task)["result"] == "<value>42</value>"
    second.task.cancel(task)
    assert first.task.get_status(task) == "cancelled"
    second.task.destroy(task)
    assert task not in first.task.get_all()


def test_pool_operators_and_admins_may_touch_any_task_others_may_not(daemon: Xapid) -> None:
    root, ro, op = daemon.session().xenapi, login(daemon, "auditor"), login(daemon, "operator")
    roots = root.task.create("root's", "")
    op.task.cancel(roots)                       # pool-operator holds task.destroy/any
    op.task.add_to_other_config(roots, "k", "v")
    assert root.task.get_other_config(roots) == {"k": "v"}
    op.task.destroy(roots)
    auditors = ro.task.create("auditor's", "")
    op.task.set_status(auditors, "success")
    assert ro.task.get_status(auditors) == "success"
    root.task.destroy(auditors)                 # pool-admin too
    # A task the caller cannot own (a bogus ref) is refused by permission first, as in xapi.
    assert denial(ro.task.destroy, "OpaqueRef:bogus") == DENIED
    assert denial(root.task.destroy, "OpaqueRef:bogus") == ["HANDLE_INVALID", "task", "OpaqueRef:bogus"]


def test_a_task_whose_session_is_gone_is_nobodys_own(daemon: Xapid) -> None:
    """xapi looks the owner up through the task's session: once it is gone, only task.destroy/any helps."""
    s = daemon.session("auditor", "auditor-pw")
    task = s.xenapi.task.create("orphan", "")
    s.xenapi.session.logout()
    ro = login(daemon, "auditor")
    assert denial(ro.task.destroy, task) == DENIED
    daemon.session().xenapi.task.destroy(task)
