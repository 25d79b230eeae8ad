"""Issue 17 finding 3 (login side), in process: how much work one failed login costs.

One scrypt computation per attempt whatever the name (an unknown one used to cost two: 65 ms against
33 ms, a probe for user names), every computation on the fixed hashing pool (at most
``auth.HASH_WORKERS`` 16 MiB work areas at once), and a failure table that keeps neither the names nor
more than ``MAX_FAILURE_COUNTERS`` of them.  tests/integration/hardening/test_login_work.py measures the
same against a running daemon (RSS, timing).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.hardening.support import in_process_daemon
from xapid import auth
from xapid.daemon import Daemon
from xapid.errors import ApiError


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("login"), **{"login-failure-delay": "0"})
    d.users.set_password("alice", "alice-pw", "read-only")
    yield d
    d.stop()


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The thread of every scrypt computation from now on."""
    calls: list[str] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(auth.hashlib, "scrypt", counting)
    return calls


def fail(daemon: Daemon, name: str) -> None:
    with pytest.raises(ApiError) as e:
        daemon.sessions.login(name, "wrong", "test")
    assert e.value.code == "SESSION_AUTHENTICATION_FAILED"


@pytest.mark.parametrize("name", ["alice", "root", "nobody-by-this-name", ""])
def test_one_hash_per_failed_attempt_known_or_unknown(daemon: Daemon, scrypt_calls: list[str], name: str) -> None:
    fail(daemon, name)
    assert len(scrypt_calls) == 1


def test_a_successful_login_costs_one_hash_too(daemon: Daemon, scrypt_calls: list[str]) -> None:
    daemon.sessions.logout(daemon.sessions.login("alice", "alice-pw", "test"))
    assert len(scrypt_calls) == 1


def test_parallel_attempts_hash_on_the_fixed_pool_only(daemon: Daemon, scrypt_calls: list[str]) -> None:
    threads = [threading.Thread(target=fail, args=(daemon, f"ghost{i}")) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(scrypt_calls) == 24
    assert set(scrypt_calls) <= {f"scrypt_{i}" for i in range(auth.HASH_WORKERS)}, set(scrypt_calls)


def test_failure_counters_hold_digests_in_a_bounded_table() -> None:
    counters = auth.FailureCounters(limit=100)
    for i in range(1000):
        counters.failed(f"{i}-" + "x" * 100_000)
    assert len(counters) == 100
    assert all(len(key) == 16 for key in counters._counts)
    assert sum(len(k) for k in counters._counts) == 1600  # not 100 names of 100 kB
    # A name still counts up while it is among the recent ones, and a success resets it.
    assert [counters.failed("mallory") for _ in range(3)] == [1, 2, 3]
    counters.reset("mallory")
    assert counters.failed("mallory") == 1


def test_the_daemons_failure_table_stays_bounded(daemon: Daemon) -> None:
    for i in range(auth.MAX_FAILURE_COUNTERS + 50):
        daemon.sessions.failures.failed(f"name-{i}")
    assert len(daemon.sessions.failures) == auth.MAX_FAILURE_COUNTERS
