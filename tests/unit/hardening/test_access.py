"""Access control over every served method, in process (wire.md 4.3 steps 4-9).

* every method but the login family needs a valid session: a bogus, logged-out or expired
  one gets SESSION_INVALID (after the arity and type checks, which come first);
* a read-only session gets RBAC_PERMISSION_DENIED [lowercased method name, message] on every
  write and nothing changes; every read is allowed;
* the command line defaults to listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.hardening.support import SESSIONLESS, UNSAFE, dummy, in_process_daemon
from xapid.cli import xapid as cli
from xapid.daemon import Daemon
from xapid.dispatch import Method
from xapid.errors import ApiError

BOGUS = "OpaqueRef:00000000-dead-beef-0000-000000000000"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("access"))
    yield d
    d.stop()


def served(daemon: Daemon) -> list[Method]:
    table = daemon.dispatcher.table
    return [table[n] for n in daemon.dispatcher.list_methods()]


def args_for(daemon: Daemon, m: Method) -> list[Any]:
    return [dummy(daemon.schema, p.type) for p in m.params]


def refusal(daemon: Daemon, name: str, params: list[Any]) -> list[str] | None:
    try:
        daemon.dispatcher.dispatch(name, params)
    except ApiError as e:
        return e.description
    return None


def test_every_method_but_login_needs_a_session(daemon: Daemon) -> None:
    methods = served(daemon)
    assert len(methods) > 500
    checked = 0
    for m in methods:
        if not m.session:
            assert m.name in SESSIONLESS
            continue
        before = daemon.store.generation
        for name in (m.name, "Async." + m.name):
            # Correct arity and types: the session check is what refuses.
            assert refusal(daemon, name, [BOGUS, *args_for(daemon, m)]) == ["SESSION_INVALID", BOGUS], name
            # Missing arguments: the count check comes first (wire.md 4.3 step 5).
            if m.mandatory > 0:
                got = refusal(daemon, name, [BOGUS])
                assert got is not None and got[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH", (name, got)
        assert daemon.store.generation == before
        checked += 1
    assert checked > 500
    # An unknown name with a session parameter checks that session first (wire.md 4.3 step 4).
    assert refusal(daemon, "Foo.bar", [BOGUS]) == ["SESSION_INVALID", BOGUS]
    assert refusal(daemon, "system.listMethods", []) is None


def test_logged_out_and_expired_sessions_are_invalid_everywhere(daemon: Daemon) -> None:
    gone = daemon.sessions.login("root", "", "access", local=True)
    daemon.dispatcher.dispatch("session.logout", [gone])
    idle = daemon.sessions.login("root", "", "access", local=True)
    assert refusal(daemon, "pool.get_all", [idle]) is None
    old = daemon.sessions.idle_timeout
    daemon.sessions.idle_timeout = 0.05
    try:
        time.sleep(0.1)
        assert refusal(daemon, "pool.get_all", [idle]) == ["SESSION_INVALID", idle]  # expired: gone for good
    finally:
        daemon.sessions.idle_timeout = old
    for m in served(daemon):
        if m.session:
            for ref in (gone, idle):
                assert refusal(daemon, m.name, [ref, *args_for(daemon, m)]) == ["SESSION_INVALID", ref], m.name


WRITES_THAT_MUST_BE_DENIED = [
    "VM.set_name_label", "VM.add_to_other_config", "VM.remove_from_other_config", "VM.create", "VM.destroy",
    "VM.start", "VM.hard_shutdown", "SR.create", "SR.destroy", "SR.forget", "SR.introduce", "PBD.plug",
    "PBD.unplug", "PBD.create", "VDI.create", "VDI.destroy", "pool.enable_ha", "pool.disable_ha",
    "pool.set_ha_host_failures_to_tolerate", "host.emergency_ha_disable", "pool.set_name_label",
    "VM.set_ha_restart_priority", "network.set_name_label",
]
READS_THAT_MUST_WORK = [
    "pool.get_all", "pool.get_all_records", "VM.get_all_records_where", "host.get_record", "SR.get_by_uuid",
    "VM.get_name_label", "pool.get_ha_enabled", "session.get_record", "event.from", "system.listMethods",
]


def test_read_only_role_is_denied_every_write_and_allowed_every_read(daemon: Daemon) -> None:
    daemon.users.set_password("auditor", "audit-pw-123", "read-only")
    ro = daemon.sessions.login("auditor", "audit-pw-123", "access")
    denied: set[str] = set()
    allowed: set[str] = set()
    for m in served(daemon):
        if not m.session:
            continue
        before = daemon.store.generation
        if m.removed:  # answered after the session check, before RBAC (wire.md 4.3)
            assert refusal(daemon, m.name, [ro, *args_for(daemon, m)]) == ["MESSAGE_REMOVED"]
        elif "read-only" not in m.roles:
            got = refusal(daemon, m.name, [ro, *args_for(daemon, m)])
            assert got is not None and got[:2] == ["RBAC_PERMISSION_DENIED", m.name.lower()], (m.name, got)
            assert got[2].startswith("No permission in user session. (Roles with this permission: "), got
            assert ("pool-admin" in got[2]) == bool(m.roles), got  # roles-less messages are root-only
            assert daemon.store.generation == before, f"{m.name} was denied but changed the store"
            denied.add(m.name)
        elif m.name not in UNSAFE:
            got = refusal(daemon, m.name, [ro, *args_for(daemon, m)])
            # The role may call it; a task that is not its own needs task.destroy/any (xapi_task.ml).
            assert got is None or got[0] != "RBAC_PERMISSION_DENIED" or got[1] == "task.destroy/any", (m.name, got)
            allowed.add(m.name)
    assert set(WRITES_THAT_MUST_BE_DENIED) <= denied, set(WRITES_THAT_MUST_BE_DENIED) - denied
    assert set(READS_THAT_MUST_WORK) - {"system.listMethods"} <= allowed
    # What a read-only user may call at all: reads, its own tasks, events and session (as xapi's roles).
    own = ("event.", "task.", "session.")
    # ha_compute_hypothetical_... is read-only in xapi's datamodel too (ha.md 5.2), VM.assert_agile also.
    also = ("message.get", "pool.ha_compute_hypothetical_max_host_failures_to_tolerate", "VM.assert_agile",
            "host.is_in_emergency_mode", "VM.assert_can_boot_here", "VM.assert_operation_valid",
            "VM.compute_memory_overhead", "VM.maximise_memory", "VM.wait_memory_target_live",
            "host.compute_free_memory", "host.compute_memory_overhead",
            "host.query_data_source", "VM.query_data_source",  # statistics: _R_READ_ONLY in xapi too
            "host.list_timezones")  # _R_READ_ONLY in xapi's datamodel
    odd = sorted(n for n in allowed if not (n.split(".", 1)[1].startswith("get_") or n.startswith(own) or n in also))
    assert odd == [], odd
    # The root session of the same daemon is not affected.
    root = daemon.sessions.login("root", "", "access", local=True)
    pool = daemon.store.refs("pool")[0]
    daemon.dispatcher.dispatch("pool.set_name_label", [root, pool, "still writable"])
    assert daemon.store.get("pool", pool)["name_label"] == "still writable"


def test_the_default_listen_address_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "serve", lambda args: seen.append(args) or 0)
    assert cli.main(["serve"]) == 0
    assert seen[0].listen == ("127.0.0.1", 8080)
    assert seen[0].tls_cert is None
