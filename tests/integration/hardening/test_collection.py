"""Issue 17 finding 4 against a running daemon: finished tasks, messages and sessions are collected.

The attack: tasks and messages were never collected (xapi keeps 200 finished tasks and 10,000
messages: ``xapi_globs.ml`` ``max_tasks``, ``message_limit``), sessions were never capped (xapi: 500 per
originator and per user name, ``max_sessions_per_originator``), and an abandoned idle session stayed in
memory until someone used it.  Limits are small here so that each test takes seconds; the slow variant
runs at the findings' scale with the default limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import Xapid, kill_heartbeats, write_conf
from tests.integration.hardening.conftest import add_user

Raw = Callable[..., dict[str, Any]]


def started(tmp: Path, name: str, **conf: str) -> Xapid:
    d = Xapid(tmp / name, write_conf(tmp / f"{name}.conf", **conf), ["--hosts", "1"])
    d.start()
    return d


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    d = started(tmp_path_factory.mktemp("limits"), "state", **{
        "task-limit-per-user": "5", "message_limit": "20", "session-limit": "5"})
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


@pytest.fixture(scope="module")
def timers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    d = started(tmp_path_factory.mktemp("timers"), "state", **{
        "gc-interval": "0.2", "session-idle-timeout": "1.5", "completed_task_timeout": "1"})
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


def test_only_the_newest_finished_tasks_of_a_user_are_kept(limits: Xapid) -> None:
    api = limits.session().xenapi
    pending = api.task.create("pending", "")
    done = []
    for i in range(9):
        t = api.task.create(f"done-{i}", "")
        api.task.set_status(t, "success")
        done.append(t)
    failed = api.Async.VM.destroy("OpaqueRef:gone")  # an async task that fails (HANDLE_INVALID)
    deadline = time.monotonic() + 10
    while api.task.get_status(failed) == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = set(api.task.get_all())
    assert alive >= {pending, failed, *done[5:]}
    assert not alive & set(done[:5])  # with `failed`, the 5 newest finished ones


def test_a_flood_of_finished_tasks_does_not_push_out_another_users(limits: Xapid) -> None:
    add_user(limits, "flooder", "read-only")
    root = limits.session().xenapi
    keep = root.task.create("root's result", "")
    root.task.set_status(keep, "success")
    ro = limits.session("flooder", "flooder-pw").xenapi
    for i in range(12):
        t = ro.task.create(f"flood-{i}", "")
        ro.task.set_status(t, "failure")
    assert keep in root.task.get_all()


def test_messages_beyond_the_limit_go_oldest_first(limits: Xapid) -> None:
    api = limits.session().xenapi
    pool = api.pool.get_uuid(api.pool.get_all()[0])
    made = [api.message.create(f"m{i}", "3", "Pool", pool, "") for i in range(30)]
    alive = set(api.message.get_all())
    assert len(alive) == 20 and set(made[10:]) <= alive and not alive & set(made[:10])


def test_sessions_per_originator_are_capped_the_least_recently_used_go(limits: Xapid, call_raw: Raw) -> None:
    others = limits.session()  # originator "pytest": another group
    sessions = []

    def login() -> None:
        s = XenAPI.Session(limits.url)
        s.login_with_password("root", limits.password, "2.21", "flood")
        sessions.append(s)

    for _ in range(5):
        login()
    call_raw(sessions[0], "pool.get_all", sessions[0].handle)  # the oldest, but used last: kept
    for _ in range(3):
        login()
    invalid = [i for i, s in enumerate(sessions)
               if call_raw(s, "pool.get_all", s.handle)["Status"] == "Failure"]
    assert invalid == [1, 2, 3]
    assert call_raw(others, "pool.get_all", others.handle)["Status"] == "Success"


def test_an_abandoned_idle_session_is_destroyed_without_being_used(timers: Xapid) -> None:
    watcher = timers.session().xenapi
    abandoned = XenAPI.Session(timers.url)
    abandoned.login_with_password("root", timers.password, "2.21", "abandoned")
    assert watcher.session.get_originator(abandoned.handle) == "abandoned"
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        try:
            watcher.session.get_record(abandoned.handle)
        except XenAPI.Failure as e:
            assert e.details[:2] == ["HANDLE_INVALID", "session"]
            return
        time.sleep(0.3)  # the watcher stays active, so only the abandoned one is idle
    pytest.fail("the idle session was never collected")


def test_finished_tasks_time_out(timers: Xapid) -> None:
    api = timers.session().xenapi
    done, pending = api.task.create("done", ""), api.task.create("pending", "")
    api.task.set_status(done, "success")
    deadline = time.monotonic() + 8
    while done in api.task.get_all() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done not in api.task.get_all() and pending in api.task.get_all()


@pytest.mark.slow
def test_the_findings_scale_with_default_limits(tmp_path: Path, call_raw: Raw) -> None:
    """22,000 tasks in one session, 10,500 messages, 520 sessions of one originator: the default
    limits hold and task.create does not slow down."""
    d = started(tmp_path, "scale")
    try:
        api = d.session().xenapi
        pool = api.pool.get_uuid(api.pool.get_all()[0])

        def create_tasks(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                api.task.create("bulk", "")
            return (time.perf_counter() - start) / n

        early = create_tasks(1000)
        create_tasks(20_000)
        late = create_tasks(1000)
        assert late < 1.5 * early, (early, late)
        for t in api.task.get_all()[:300]:
            api.task.set_status(t, "success")
        assert sum(1 for r in api.task.get_all_records().values() if r["status"] == "success") == 200
        for i in range(10_500):
            api.message.create(f"m{i}", "3", "Pool", pool, "")
        assert len(api.message.get_all()) == 10_000
        first = XenAPI.Session(d.url)
        first.login_with_password("root", d.password, "2.21", "flood")
        for _ in range(520):
            XenAPI.Session(d.url).login_with_password("root", d.password, "2.21", "flood")
        assert call_raw(first, "pool.get_all", first.handle)["ErrorDescription"] == [
            "SESSION_INVALID", first.handle]  # the least recently used of 521
    finally:
        d.stop()
        kill_heartbeats(d.state_dir)
