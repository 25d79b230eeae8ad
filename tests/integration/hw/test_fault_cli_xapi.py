"""``xapid fault xapi-*``: one host's toolstack breaks, heals and restarts (xapid/hw/toolstack.py), as users
run it (a subprocess on the daemon's local socket), with HA off: nothing restarts xapi but the user."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, Xapid


def fault(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "fault", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def xapi_word(xapid: Xapid, name: str) -> tuple[str, str]:
    """(xapi=..., xapi-restarts=...) of ``name`` in ``xapid fault status``."""
    for line in fault(xapid.state_dir, "status").stdout.splitlines():
        if line.startswith(name + " "):
            words = dict(w.split("=", 1) for w in line.split()[2:])
            return words["xapi"], words["xapi-restarts"]
    raise AssertionError(f"{name} not in status")


def address_of(api: Any, name: str) -> str:
    return str(api.host.get_address(api.host.get_by_name_label(name)[0]))


def local_login(xapid: Xapid, api: Any, name: str) -> tuple[xmlrpc.client.ServerProxy, str]:
    """A local session at the host's address with its ptoken (session.slave_local_login, xapi_session.ml)."""
    uuid = api.host.get_uuid(api.host.get_by_name_label(name)[0])
    proxy = xmlrpc.client.ServerProxy(f"http://{address_of(api, name)}:{urlsplit(xapid.url).port}/")
    token = (xapid.state_dir / "hosts" / uuid / "ptoken").read_text().strip()
    answer = proxy.session.slave_local_login(token)
    assert answer["Status"] == "Success", answer
    return proxy, str(answer["Value"])


def refused(xapid: Xapid, address: str) -> bool:
    try:
        socket.create_connection((address, int(urlsplit(xapid.url).port or 0)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_crash_restart_heal_and_persistence_of_one_hosts_xapi(xapid: Xapid, api: Any) -> None:
    address = address_of(api, "host2")
    proxy, session = local_login(xapid, api, "host2")
    assert xapi_word(xapid, "host2") == ("ok", "0")

    crashed = fault(xapid.state_dir, "xapi-crash", "host2")
    assert (crashed.returncode, crashed.stdout) == (0, "host2: xapi ok -> crash\n")
    assert refused(xapid, address)
    assert api.pool.get_all()  # the pool's address is xapid's own: it answers
    restarted = fault(xapid.state_dir, "xapi-restart", "host2")
    assert (restarted.returncode, restarted.stdout) == (0, "host2: xapi crash -> ok\n")
    assert xapi_word(xapid, "host2") == ("ok", "1")
    # The restarted xapi lost its sessions (xapi's session table is not persisted).
    assert proxy.host.ha_xapi_healthcheck(session)["ErrorDescription"][0] == "SESSION_INVALID"
    proxy, session = local_login(xapid, api, "host2")
    assert proxy.host.ha_xapi_healthcheck(session) == {"Status": "Success", "Value": True}

    # Persistent: a restart brings it back broken; only xapi-heal (or a reboot) cures it.
    assert fault(xapid.state_dir, "xapi-fail", "host2", "--persistent").stdout == "host2: xapi ok -> fail+persistent\n"
    assert proxy.host.ha_xapi_healthcheck(session) == {"Status": "Success", "Value": False}
    fault(xapid.state_dir, "xapi-restart", "host2")
    proxy, session = local_login(xapid, api, "host2")
    assert proxy.host.ha_xapi_healthcheck(session) == {"Status": "Success", "Value": False}
    assert xapi_word(xapid, "host2") == ("fail+persistent", "2")
    assert fault(xapid.state_dir, "xapi-heal", "host2").stdout == "host2: xapi fail+persistent -> ok\n"
    assert proxy.host.ha_xapi_healthcheck(session) == {"Status": "Success", "Value": True}

    assert fault(xapid.state_dir, "xapi-crash", "host2", "--persistent").returncode == 0
    fault(xapid.state_dir, "xapi-restart", "host2")
    assert xapi_word(xapid, "host2") == ("crash+persistent", "3")
    assert refused(xapid, address)
    # A power cycle starts a fresh xapi: no fault survives a boot.
    assert fault(xapid.state_dir, "crash", "host2").returncode == 0
    assert fault(xapid.state_dir, "boot", "host2").returncode == 0
    assert xapi_word(xapid, "host2") == ("ok", "3")
    local_login(xapid, api, "host2")


def test_a_frozen_host_that_thaws_keeps_its_crashed_or_hung_xapi(xapid: Xapid, api: Any) -> None:
    address = address_of(api, "host3")
    assert fault(xapid.state_dir, "xapi-crash", "host3").returncode == 0
    fault(xapid.state_dir, "hang", "host3")
    fault(xapid.state_dir, "thaw", "host3")
    assert refused(xapid, address)
    fault(xapid.state_dir, "xapi-heal", "host3")
    local_login(xapid, api, "host3")
    assert fault(xapid.state_dir, "xapi-hang", "host3").returncode == 0
    fault(xapid.state_dir, "hang", "host3")
    fault(xapid.state_dir, "thaw", "host3")
    with socket.create_connection((address, int(urlsplit(xapid.url).port or 0)), timeout=2) as sock:
        sock.settimeout(1.0)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    fault(xapid.state_dir, "xapi-heal", "host3")
    local_login(xapid, api, "host3")


def test_xapi_verb_mistakes_exit_2(xapid: Xapid) -> None:
    none = fault(xapid.state_dir, "xapi-fail")
    assert none.returncode == 2 and "needs at least one HOST" in none.stderr
    wrong = fault(xapid.state_dir, "xapi-heal", "host1", "--persistent")
    assert wrong.returncode == 2 and "--persistent applies to" in wrong.stderr
    fault(xapid.state_dir, "crash", "host3")
    off = fault(xapid.state_dir, "xapi-hang", "host3")
    assert off.returncode == 2 and "host3 is off: its xapi does not run" in off.stderr


def test_restarting_the_masters_xapi_ends_every_pool_session(xapid: Xapid) -> None:
    """xapi's session table lives in the master's memory only (auth.py, xapi_session.ml)."""
    s = xapid.session()
    assert s.xenapi.pool.get_all()
    assert fault(xapid.state_dir, "xapi-restart", "host1").stdout == "host1: xapi ok -> ok\n"
    proxy = xmlrpc.client.ServerProxy(xapid.url)
    assert proxy.pool.get_all(s._session)["ErrorDescription"][0] == "SESSION_INVALID"
    assert xapid.session().xenapi.pool.get_all()  # a new login works at once


def test_host_restart_agent_restarts_that_hosts_xapi_after_answering(xapid: Xapid, api: Any) -> None:
    """xapi_host.ml restart_agent: the call answers, a second later xe-toolstack-restart runs there."""
    _proxy, session = local_login(xapid, api, "host2")
    before = int(xapi_word(xapid, "host2")[1])
    api.host.restart_agent(api.host.get_by_name_label("host2")[0])  # answered first
    deadline = time.monotonic() + 15
    while int(xapi_word(xapid, "host2")[1]) == before:
        assert time.monotonic() < deadline, "host2's xapi did not restart"
        time.sleep(0.1)
    proxy = xmlrpc.client.ServerProxy(f"http://{address_of(api, 'host2')}:{urlsplit(xapid.url).port}/")
    deadline = time.monotonic() + 10
    while True:  # its local session went with the old xapi
        try:
            answer = proxy.host.get_all(session)
            break
        except (ConnectionRefusedError, ConnectionResetError):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert answer["ErrorDescription"][0] == "SESSION_INVALID"
    assert api.pool.get_all()  # the master's sessions are untouched
    fault(xapid.state_dir, "crash", "host3")
    with pytest.raises(Exception, match="HOST_OFFLINE"):
        api.host.restart_agent(api.host.get_by_name_label("host3")[0])


def test_a_daemon_restart_keeps_persistent_xapi_faults_and_cures_transient_ones(xapid: Xapid, api: Any) -> None:
    assert fault(xapid.state_dir, "xapi-crash", "host2", "--persistent").returncode == 0
    assert fault(xapid.state_dir, "xapi-fail", "host3").returncode == 0
    assert xapi_word(xapid, "host3") == ("fail", "0")
    xapid.restart()  # every host's xapi restarts with the daemon (toolstack.py): as xapi-restart does
    api = xapid.session().xenapi
    assert xapi_word(xapid, "host2")[0] == "crash+persistent"
    assert refused(xapid, address_of(api, "host2"))
    assert xapi_word(xapid, "host3")[0] == "ok"
    proxy, session = local_login(xapid, api, "host3")
    assert proxy.host.ha_xapi_healthcheck(session) == {"Status": "Success", "Value": True}
    assert fault(xapid.state_dir, "xapi-heal", "host2").stdout == "host2: xapi crash+persistent -> ok\n"
    local_login(xapid, api, "host2")
