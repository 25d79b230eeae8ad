"""Access control of a running daemon: read-only users made by ``xapid passwd --role read-only``,
slower answers to repeated failed logins, logs without secrets, owner-only files even under a
permissive umask, a warning for non-loopback listen addresses, and HTTPS with the SDK.

(tests/unit/hardening/test_access.py proves the session and RBAC rules for every method in
process; tests/integration/test_sessions.py covers passwd basics and idle expiry.)
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import XenAPI

from tests.conftest import REPO, Xapid, kill_heartbeats, write_conf
from tests.integration.hardening.conftest import address, clean_log

FAILURE_DELAY = 0.3
RO_PASSWORD = "ro-Secret-7fd0c2"
WRONG_PASSWORD = "wrong-Secret-91ab3e"


def xapid_cli(*args: str, stdin: str = "", umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xapid.cli.xapid", *args], input=stdin, text=True, capture_output=True, timeout=60,
        cwd=REPO, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xapid]:
    """Started under umask 000: every private file must still come out owner-only."""
    tmp = tmp_path_factory.mktemp("access")
    d = Xapid(tmp / "state", write_conf(tmp / "state.conf", **{"login-failure-delay": str(FAILURE_DELAY)}),
              ["--hosts", "3"])
    old = os.umask(0)
    try:
        d.start()
    finally:
        os.umask(old)
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


@pytest.fixture(scope="module")
def read_only(daemon: Xapid) -> str:
    done = xapid_cli("passwd", "--state-dir", str(daemon.state_dir), "--role", "read-only", "auditor",
                     stdin=RO_PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert RO_PASSWORD not in done.stdout + done.stderr
    return "auditor"


def denied(fn: Callable[..., Any], *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return list(e.value.details)


def test_private_files_are_owner_only_even_under_umask_0(daemon: Xapid, read_only: str) -> None:
    state = daemon.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("users.json", "root-password"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    sock = state / "xapi.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    # passwd on a fresh state dir creates it private too.
    fresh = state.parent / "fresh-state"
    done = xapid_cli("passwd", "--state-dir", str(fresh), "someone", stdin="pw\n", umask=0)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "users.json").stat().st_mode) == 0o600


def test_read_only_user_reads_but_every_write_is_denied_with_the_permission(daemon: Xapid, read_only: str) -> None:
    s = XenAPI.Session(daemon.url)
    s.login_with_password(read_only, RO_PASSWORD, "2.21", "pytest")
    x = s.xenapi
    pool = x.pool.get_all()[0]
    vm = x.VM.get_all()[0]
    pbd = x.PBD.get_all()[0]
    sr = x.pool.get_default_SR(pool)
    host = x.host.get_all()[0]
    assert x.pool.get_all_records()[pool]["name_label"] == "xapid pool"  # reads work
    assert x.VM.get_all_records_where("true")
    before = x.pool.get_record(pool)
    writes: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
        ("pool.set_name_label", x.pool.set_name_label, (pool, "mine now")),
        ("pool.enable_ha", x.pool.enable_ha, ([], {})),
        ("pool.disable_ha", x.pool.disable_ha, ()),
        ("pbd.plug", x.PBD.plug, (pbd,)),
        ("pbd.unplug", x.PBD.unplug, (pbd,)),
        ("vm.create", x.VM.create, ({},)),
        ("vm.destroy", x.VM.destroy, (vm,)),
        ("vm.add_to_other_config", x.VM.add_to_other_config, (vm, "k", "v")),
        ("sr.create", x.SR.create, (host, {}, "0", "x", "", "ext", "", False, {})),
        ("sr.forget", x.SR.forget, (sr,)),
        ("vdi.create", x.VDI.create, ({},)),
        ("host.emergency_ha_disable", x.host.emergency_ha_disable, (False,)),
    ]
    for permission, fn, args in writes:
        details = denied(fn, *args)
        assert details[:2] == ["RBAC_PERMISSION_DENIED", permission], details
        assert details[2].startswith("No permission in user session. (Roles with this permission: pool-admin")
    assert x.pool.get_record(pool) == before  # nothing changed
    x.session.logout()


def test_repeated_failed_logins_get_slower(daemon: Xapid, read_only: str) -> None:
    def attempt(password: str) -> float:
        start = time.monotonic()
        try:
            XenAPI.Session(daemon.url).login_with_password(read_only, password, "2.21", "pytest")
        except XenAPI.Failure as e:
            assert e.details == ["SESSION_AUTHENTICATION_FAILED", read_only, "Authentication failure"]
        return time.monotonic() - start

    # Lower bounds only (a loaded machine makes calls slower, never faster): the n-th failure in a
    # row waits at least n delays; without the escalation the third would wait one delay plus a hash.
    times = [attempt(WRONG_PASSWORD) for _ in range(3)]
    for n, seconds in enumerate(times, 1):
        assert seconds >= n * FAILURE_DELAY, times
    assert attempt(RO_PASSWORD) < FAILURE_DELAY * 10  # the right password is not held back
    # (tests/unit/hardening/test_secrets.py checks the exact delays and the reset after a success)


def test_passwords_and_session_refs_never_reach_the_log(daemon: Xapid, read_only: str) -> None:
    refs = []
    for user, password in (("root", daemon.password), (read_only, RO_PASSWORD)):
        s = XenAPI.Session(daemon.url)
        s.login_with_password(user, password, "2.21", "pytest")
        refs.append(s._session)
        s.xenapi.pool.get_all()
        s.xenapi.session.get_record(s._session)
        try:
            s.xenapi.VM.get_record(s._session)  # a session ref as an ordinary (bad) argument
        except XenAPI.Failure:
            pass
        s.xenapi.session.logout()
    with pytest.raises(XenAPI.Failure):
        XenAPI.Session(daemon.url).login_with_password("root", WRONG_PASSWORD)
    requests.post(daemon.url, timeout=10, data=(  # a password in a malformed request
        f"<methodCall><methodName>session.login_with_password</methodName><params><param><value>root</value>"
        f"</param><param><value>{WRONG_PASSWORD}</value></param>").encode())
    log = daemon.log()
    assert '"session.login_with_password"' in log and "OpaqueRef:" in log  # calls are logged ...
    for secret in (daemon.password, RO_PASSWORD, WRONG_PASSWORD, *refs):
        assert secret not in log, f"{secret[:12]}... leaked into the log"
    for ref in refs:
        assert ref[: len("OpaqueRef:") + 8] + "..." in log  # ... with shortened refs only
    clean_log(daemon)


def test_a_host_name_listen_address_is_warned_about(daemon: Xapid, tmp_path: Path) -> None:
    assert "not a loopback address" not in daemon.log() and "non-loopback" not in daemon.log()
    d = Xapid(tmp_path / "state", daemon.config, ["--hosts", "1", "--listen", "localhost:0", "--unix", ""])
    try:
        d.start()
        assert "not a loopback address" in d.log()
        assert address(d.url)[0] == "127.0.0.1"
    finally:
        d.stop()


def test_tls_with_the_sdk_over_https(daemon: Xapid, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                          capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    d = Xapid(tmp_path / "state", daemon.config,
              ["--hosts", "1", "--unix", "", "--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        d.start()
        assert d.url.startswith("https://127.0.0.1:")
        s = XenAPI.Session(d.url, ignore_ssl=True)
        s.login_with_password("root", d.password, "2.21", "pytest")
        assert s.xenapi.pool.get_all()
        s.xenapi.session.logout()
        # The certificate served is ours, and plain HTTP gets no XenAPI answer on that port.
        host, port = address(d.url)
        served = ssl.get_server_certificate((host, port))
        assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        # host.get_server_certificate answers that certificate, without the key (xapi's certificates.ml).
        s2 = XenAPI.Session(d.url, ignore_ssl=True)
        s2.login_with_password("root", d.password)
        answered = s2.xenapi.host.get_server_certificate(s2.xenapi.host.get_all()[0])
        s2.xenapi.session.logout()
        assert "PRIVATE KEY" not in answered
        assert ssl.PEM_cert_to_DER_cert(answered) == ssl.PEM_cert_to_DER_cert(cert.read_text())
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(f"http://{host}:{port}/", data=b"<methodCall/>", timeout=5)
        # A verifying client refuses the self-signed certificate.
        with pytest.raises(ssl.SSLError):
            XenAPI.Session(d.url).login_with_password("root", d.password)
    finally:
        d.stop()
