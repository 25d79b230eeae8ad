"""Secrets stay secret: escalating delays for failed logins, tracebacks without local variables."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator

import pytest
import structlog

from tests.unit.hardening.support import in_process_daemon
from xapid import auth
from xapid.daemon import Daemon
from xapid.errors import ApiError
from xapid.logging import configure


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("secrets"), **{"login-failure-delay": "5"})
    yield d
    d.stop()


def test_failed_logins_wait_longer_each_time_until_a_success(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(auth.time, "sleep", waits.append)
    daemon.users.set_password("mallory", "right-password", "read-only")

    def fail(user: str = "mallory") -> None:
        with pytest.raises(ApiError) as e:
            daemon.sessions.login(user, "wrong", "test")
        assert e.value.description == ["SESSION_AUTHENTICATION_FAILED", user, "Authentication failure"]

    for _ in range(6):
        fail()
    assert waits == [5.0, 10.0, 15.0, 20.0, 20.0, 20.0]  # xapi's 5 s, growing, capped
    fail("someone-else")                                  # counted per user name
    assert waits[-1] == 5.0
    daemon.sessions.login("mallory", "right-password", "test")
    assert waits[-1] == 5.0  # a success does not wait ...
    fail()
    assert waits[-1] == 5.0  # ... and resets the count


def test_logged_tracebacks_carry_no_local_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traceback with locals would print passwords and session refs held by the frames."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    try:
        configure("info")
        log = structlog.get_logger("test")

        def login(password: str, session: str) -> None:
            raise ValueError("boom")

        try:
            login("hunter2-password", "OpaqueRef:11111111-2222-3333-4444-555555555555")
        except ValueError:
            log.exception("unexpected exception")
    finally:
        structlog.reset_defaults()
    line = out.getvalue().strip().splitlines()[-1]
    doc = json.loads(line)
    assert doc["event"] == "unexpected exception" and doc["exception"][0]["exc_type"] == "ValueError"
    assert "hunter2" not in line and "OpaqueRef:1111" not in line
    assert all("locals" not in frame for frame in doc["exception"][0]["frames"])
