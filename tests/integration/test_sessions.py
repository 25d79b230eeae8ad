"""Sessions: login forms, failures, the session record, logout, expiry and the check order (wire.md 4.3, 5.1)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import XenAPI

Raw = Callable[..., dict[str, Any]]


def failure(result: dict[str, Any]) -> list[str]:
    assert result["Status"] == "Failure", result
    return list(result["ErrorDescription"])


# -- login ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("1.1",), ("2.21", "my-originator"), ("2.21", "o", "surplus")])
def test_login_accepts_two_three_and_four_args(shared_xapid: Any, extra: tuple[str, ...]) -> None:
    """wire.md 5.1: 2, 3 or 4 args (extras beyond 4 ignored); the SDK sends exactly what it is given."""
    s = XenAPI.Session(shared_xapid.url)
    s.login_with_password("root", shared_xapid.password, *extra)
    ref = s.handle
    assert isinstance(ref, str) and ref.startswith("OpaqueRef:") and ref != "OpaqueRef:NULL"
    rec = s.xenapi.session.get_record(ref)
    assert rec["originator"] == (extra[1] if len(extra) >= 2 else "")
    s.xenapi.session.logout()


def test_login_through_the_xenapi_dispatcher_returns_none_and_keeps_the_ref(shared_xapid: Any) -> None:
    """wire.md 1.4: ``session.xenapi.login_with_password`` returns None; the ref is in ``handle``."""
    s = XenAPI.Session(shared_xapid.url)
    assert s.xenapi.login_with_password("root", shared_xapid.password) is None
    assert s.handle.startswith("OpaqueRef:")
    assert len(s.xenapi.pool.get_all()) == 1
    s.xenapi.logout()


def test_each_login_gets_a_distinct_random_ref(shared_xapid: Any) -> None:
    refs = set()
    for _ in range(3):
        s = shared_xapid.session()
        refs.add(s.handle)
    assert len(refs) == 3


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_bad_credentials_are_authentication_failed_with_user_and_reason(shared_xapid: Any, user: str) -> None:
    """wire.md 4.4: SESSION_AUTHENTICATION_FAILED [username, reason], after a delay (0.2 s in tests)."""
    s = XenAPI.Session(shared_xapid.url)
    start = time.monotonic()
    with pytest.raises(XenAPI.Failure) as e:
        s.login_with_password(user, "wrong-password", "2.21", "pytest")
    assert time.monotonic() - start >= 0.2
    assert e.value.details[0] == "SESSION_AUTHENTICATION_FAILED"
    assert e.value.details[1] == user
    assert len(e.value.details) == 3 and e.value.details[2]


def test_login_param_count_mismatch_reports_the_mandatory_count(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.3 step 5: ``session.login_with_password("root")`` → ["...", "2", "1"]."""
    s = XenAPI.Session(shared_xapid.url)
    assert failure(call_raw(s, "session.login_with_password", "root")) == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH", "session.login_with_password", "2", "1"]
    assert failure(call_raw(s, "session.login_with_password")) == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH", "session.login_with_password", "2", "0"]


# -- the session's own record ------------------------------------------------------------------------------


def test_session_record_fields_for_a_root_password_login(shared_xapid: Any, schema: Any) -> None:
    """wire.md 5.1: the record of a root password login."""
    s = XenAPI.Session(shared_xapid.url)
    s.login_with_password("root", shared_xapid.password, "2.21", "Ansible")
    api, ref = s.xenapi, s.handle
    rec = api.session.get_record(ref)
    assert list(rec) == list(schema.classes["session"].fields)
    pool = api.pool.get_all()[0]
    assert rec["this_host"] == api.pool.get_master(pool)
    assert rec["this_user"] == "OpaqueRef:NULL"
    assert rec["pool"] is False
    assert rec["other_config"] == {}
    assert rec["is_local_superuser"] is True
    assert rec["subject"] == "OpaqueRef:NULL"
    assert rec["auth_user_sid"] == ""
    assert rec["auth_user_name"] == "root"
    assert rec["rbac_permissions"] == []
    assert rec["parent"] == "OpaqueRef:NULL"
    assert rec["originator"] == "Ansible"
    assert rec["client_certificate"] is False
    for stamp in ("last_active", "validation_time"):
        assert rec[stamp].value.endswith("Z") and len(rec[stamp].value) == 18
    assert api.session.get_uuid(ref) == rec["uuid"]
    assert api.session.get_by_uuid(rec["uuid"]) == ref
    s.xenapi.session.logout()


def test_get_this_host_and_this_user_with_own_ref(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 9.2: ansible calls ``session.get_this_host(own_ref)`` → wire params [ref, ref]."""
    s = shared_xapid.session()
    ref = s.handle
    pool = s.xenapi.pool.get_all()[0]
    master = s.xenapi.pool.get_master(pool)
    assert s.xenapi.session.get_this_host(ref) == master
    assert call_raw(s, "session.get_this_host", ref, ref) == {"Status": "Success", "Value": master}
    assert s.xenapi.session.get_this_user(ref) == "OpaqueRef:NULL"
    assert s.xenapi.session.get_is_local_superuser(ref) is True


def test_other_sessions_record_is_readable_and_bad_self_is_handle_invalid(shared_xapid: Any, call_raw: Raw) -> None:
    a, b = shared_xapid.session(), shared_xapid.session()
    assert a.xenapi.session.get_record(b.handle)["uuid"] == b.xenapi.session.get_uuid(b.handle)
    assert failure(call_raw(a, "session.get_record", a.handle, "OpaqueRef:nope")) == [
        "HANDLE_INVALID", "session", "OpaqueRef:nope"]


# -- logout and invalid sessions ----------------------------------------------------------------------


def test_logout_invalidates_the_ref(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.4: a logged-out ref gives SESSION_INVALID [ref]."""
    s = shared_xapid.session()
    ref = s.handle
    assert call_raw(s, "session.logout", ref) == {"Status": "Success", "Value": ""}
    assert failure(call_raw(s, "pool.get_all", ref)) == ["SESSION_INVALID", ref]
    assert failure(call_raw(s, "session.logout", ref)) == ["SESSION_INVALID", ref]


def test_sdk_logout_then_sdk_call_needs_a_new_login(shared_xapid: Any) -> None:
    s = shared_xapid.session()
    s.xenapi.session.logout()
    assert s.handle is None


def test_sdk_relogs_in_transparently_on_session_invalid(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 1.4: only SESSION_INVALID triggers the SDK's re-login, so the daemon must send exactly it."""
    s = shared_xapid.session()
    old = s.handle
    other = shared_xapid.session()
    call_raw(other, "session.logout", old)           # kill s's session behind its back
    assert len(s.xenapi.pool.get_all()) == 1         # the SDK re-logged in and retried
    assert s.handle != old


# -- dispatch order ---------------------------------------------------------------------------------------


def test_param_count_numbers_exclude_the_session_including_minus_one(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.3 step 5 and 4.5."""
    s = shared_xapid.session()
    ref = s.handle
    assert failure(call_raw(s, "VM.get_record", ref)) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record",
                                                          "1", "0"]
    assert failure(call_raw(s, "VM.get_all")) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_all", "0", "-1"]
    assert failure(call_raw(s, "VM.get_all", ref, "x")) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_all",
                                                            "0", "1"]
    assert failure(call_raw(s, "VM_get_record", ref)) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM_get_record",
                                                          "1", "0"]
    # Count is checked before the session.
    assert failure(call_raw(s, "VM.get_record", "bogus")) == ["MESSAGE_PARAMETER_COUNT_MISMATCH",
                                                              "VM.get_record", "1", "0"]


def test_type_error_comes_before_the_session_check(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.3 step 6: bad session and bad argument type → INTERNAL_ERROR, not SESSION_INVALID."""
    s = shared_xapid.session()
    err = failure(call_raw(s, "VM.get_record", "OpaqueRef:bogus", 42))
    assert err == ["INTERNAL_ERROR", '(Failure "Expected string, got \'I(42)\'")']
    assert failure(call_raw(s, "VM.get_record", "OpaqueRef:bogus", "x")) == ["SESSION_INVALID", "OpaqueRef:bogus"]
    assert failure(call_raw(s, "VM.get_record", s.handle, 42))[0] == "INTERNAL_ERROR"


def test_unknown_method_checks_the_session_first(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.3 step 4."""
    s = shared_xapid.session()
    assert failure(call_raw(s, "Foo.bar", "OpaqueRef:bogus", 1, 2)) == ["SESSION_INVALID", "OpaqueRef:bogus"]
    assert failure(call_raw(s, "Foo.bar")) == ["MESSAGE_METHOD_UNKNOWN", "Foo.bar"]
    assert failure(call_raw(s, "Foo.bar", s.handle)) == ["MESSAGE_METHOD_UNKNOWN", "Foo.bar"]


def test_async_of_a_non_async_message_is_fault(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 4.3 step 8: ``["Fault", "No async mode for this operation (rpc: X)"]``, no task created."""
    s = shared_xapid.session()
    tasks_before = set(s.xenapi.task.get_all())
    vm = s.xenapi.VM.get_all()[0]
    assert failure(call_raw(s, "Async.VM.get_record", s.handle, vm)) == [
        "Fault", "No async mode for this operation (rpc: VM.get_record)"]
    assert failure(call_raw(s, "Async.session.logout", s.handle)) == [
        "Fault", "No async mode for this operation (rpc: session.logout)"]
    assert set(s.xenapi.task.get_all()) == tasks_before
    # The session is checked before the async form.
    assert failure(call_raw(s, "Async.VM.get_record", "OpaqueRef:bogus", vm)) == [
        "SESSION_INVALID", "OpaqueRef:bogus"]


def test_removed_getter_answers_message_removed(shared_xapid: Any, call_raw: Raw) -> None:
    """wire.md 2.5/4.3: removed fields stay in records; their getters say MESSAGE_REMOVED []."""
    s = shared_xapid.session()
    host = s.xenapi.host.get_all()[0]
    metrics = s.xenapi.host.get_metrics(host)
    assert "memory_free" in s.xenapi.host_metrics.get_record(metrics)
    assert failure(call_raw(s, "host_metrics.get_memory_free", s.handle, metrics)) == ["MESSAGE_REMOVED"]
    # The other arguments are not even unmarshalled.
    assert failure(call_raw(s, "host_metrics.get_memory_free", s.handle, 42)) == ["MESSAGE_REMOVED"]
    assert failure(call_raw(s, "host_metrics.get_memory_free", "bogus", metrics)) == ["SESSION_INVALID", "bogus"]


# -- users, files and expiry ---------------------------------------------------------------------------------


def test_root_password_file_is_owner_only(shared_xapid: Any) -> None:
    path = shared_xapid.state_dir / "root-password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((shared_xapid.state_dir / "users.json").stat().st_mode) == 0o600
    assert shared_xapid.password and shared_xapid.password not in (shared_xapid.state_dir / "users.json").read_text()


def xapid_passwd(state_dir: Any, user: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(state_dir), *args, user],
        input=password + "\n", text=True, capture_output=True, timeout=60,
    )


def test_passwd_creates_a_user_who_can_log_in_to_the_running_daemon(shared_xapid: Any) -> None:
    done = xapid_passwd(shared_xapid.state_dir, "alice", "s3cret pass")
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    s = XenAPI.Session(shared_xapid.url)
    s.login_with_password("alice", "s3cret pass", "2.21", "pytest")
    assert s.xenapi.session.get_record(s.handle)["auth_user_name"] == "alice"
    assert s.xenapi.session.get_is_local_superuser(s.handle) is False
    # The default role is read-only: reads work, writes are refused.
    pool = s.xenapi.pool.get_all()[0]
    with pytest.raises(XenAPI.Failure) as e:
        s.xenapi.pool.set_name_description(pool, "nope")
    assert e.value.details[0] == "RBAC_PERMISSION_DENIED"
    assert e.value.details[1] == "pool.set_name_description"
    # wire.md 4.3 step 9: for Async calls the RBAC check runs inside the task.
    vm = s.xenapi.VM.get_all()[0]
    task = s.xenapi.Async.VM.start(vm, False, False)
    for _ in range(200):
        if s.xenapi.task.get_status(task) != "pending":
            break
        time.sleep(0.05)
    assert s.xenapi.task.get_status(task) == "failure"
    assert s.xenapi.task.get_error_info(task)[:2] == ["RBAC_PERMISSION_DENIED", "vm.start"]
    with pytest.raises(XenAPI.Failure):
        XenAPI.Session(shared_xapid.url).login_with_password("alice", "wrong")


def test_passwd_changes_a_password_and_refuses_empty_input(shared_xapid: Any) -> None:
    assert xapid_passwd(shared_xapid.state_dir, "bob", "first").returncode == 0
    assert xapid_passwd(shared_xapid.state_dir, "bob", "second", "--role", "pool-admin").returncode == 0
    s = XenAPI.Session(shared_xapid.url)
    s.login_with_password("bob", "second")
    pool = s.xenapi.pool.get_all()[0]
    s.xenapi.pool.set_name_description(pool, s.xenapi.pool.get_name_description(pool))  # pool-admin may write
    with pytest.raises(XenAPI.Failure):
        XenAPI.Session(shared_xapid.url).login_with_password("bob", "first")
    empty = xapid_passwd(shared_xapid.state_dir, "carol", "")
    assert empty.returncode != 0 and "empty" in empty.stderr
    assert xapid_passwd(shared_xapid.state_dir, "dave", "x", "--role", "emperor").returncode != 0
    assert stat.S_IMODE(os.stat(shared_xapid.state_dir / "users.json").st_mode) == 0o600


def test_idle_sessions_expire(xapid_factory: Callable[..., Any], call_raw: Raw) -> None:
    """wire.md 5.1: idle sessions are collected (24 h in xapi, 1 s here); then SESSION_INVALID [ref]."""
    d = xapid_factory(**{"session-idle-timeout": "1"})
    busy, idle = d.session(), d.session()
    busy_ref = busy.handle
    for _ in range(4):                       # activity keeps a session alive past the timeout
        time.sleep(0.3)
        assert busy.xenapi.pool.get_all()
    assert busy.handle == busy_ref
    time.sleep(1.1)
    assert failure(call_raw(idle, "pool.get_all", idle.handle)) == ["SESSION_INVALID", idle.handle]
    # The SDK copes by logging in again.
    old = busy.handle
    assert busy.xenapi.pool.get_all()
    assert busy.handle != old
