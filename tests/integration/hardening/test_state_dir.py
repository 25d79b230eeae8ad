"""Issue 17 finding 1: the state dir is trusted only if nobody else can change it, and nothing in it is
reached through a symbolic link.

The attacks: an unprivileged user pre-creates the state dir (the daemon, running as root, then writes
the root password wherever their symlinked ``root-password`` points, or reads a ``users.json`` they
wrote); links planted inside a state dir that was once open (``root-password``, ``users.json``, an SR
folder, a host folder) make the daemon write or trust files outside it.  Each test starts the real
daemon and checks that it refuses (exit 2, nothing written) or does not follow the link.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests.conftest import REPO, Xapid, kill_heartbeats, write_conf
from xapid.auth import hash_password

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a folder's owner needs root")


def start_refused(tmp_path: Path, state: Path) -> str:
    """Start a daemon on ``state``; it must exit with 2 before serving. Returns its log."""
    d = Xapid(state, write_conf(tmp_path / "refused.conf"), ["--hosts", "1"])
    d.log_path = tmp_path / "refused.log"
    try:
        with pytest.raises(RuntimeError, match="exited with 2"):
            d.start(timeout=20)
    finally:
        d.stop()
    text = d.log()
    assert "Traceback" not in text
    return text


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@needs_root
def test_a_state_dir_owned_by_another_user_is_refused_and_left_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / "root-password").symlink_to(victim)
    os.chown(state, NOBODY, NOBODY)
    log = start_refused(tmp_path, state)
    assert f"belongs to uid {NOBODY}" in log
    assert victim.read_text() == "precious\n"
    assert entries(state) == ["root-password"] and (state / "root-password").is_symlink()


def test_a_state_dir_writable_by_others_is_refused_and_left_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    log = start_refused(tmp_path, state)
    assert "writable by group or others" in log and "chmod 700" in log
    assert entries(state) == [] and stat.S_IMODE(state.stat().st_mode) == 0o777


def test_a_state_dir_inside_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    """Whoever can write the parent can rename the state dir away and put their own in its place."""
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # no sticky bit (a sticky /tmp is fine)
    log = start_refused(tmp_path, open_parent / "state")
    assert f"{open_parent} is writable by group or others" in log
    assert entries(open_parent) == ["state.log"]  # the test's own log of the daemon


@needs_root
def test_a_symlink_to_the_state_dir_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real-state"
    target.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    log = start_refused(tmp_path, link)
    assert f"belongs to uid {NOBODY}" in log and entries(target) == []


def test_a_planted_root_password_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (state / "root-password").symlink_to(victim)
    d = Xapid(state, write_conf(tmp_path / "s.conf"), ["--hosts", "1"])
    try:
        d.start()
        assert victim.read_text() == "precious\n"
        assert not (state / "root-password").is_symlink()
        assert stat.S_IMODE((state / "root-password").stat().st_mode) == 0o600
        d.session().xenapi.session.logout()  # the password written is the one that works
    finally:
        d.stop()


@pytest.fixture
def running(tmp_path: Path) -> Any:
    d = Xapid(tmp_path / "state", write_conf(tmp_path / "run.conf"), ["--hosts", "2"])
    d.start()
    yield d
    d.stop()
    kill_heartbeats(d.state_dir)


def pool_admin_table(name: str, password: str) -> str:
    return json.dumps({"users": {name: {"role": "pool-admin", "password": hash_password(password)}}})


def test_a_users_json_replaced_by_a_symlink_grants_nothing(running: Xapid, tmp_path: Path) -> None:
    forged = tmp_path / "forged-users.json"
    forged.write_text(pool_admin_table("mallory", "mallory-pw"))
    forged.chmod(0o600)
    users = running.state_dir / "users.json"
    users.unlink()
    users.symlink_to(forged)
    with pytest.raises(XenAPI.Failure) as e:
        running.session("mallory", "mallory-pw")
    assert e.value.details[0] == "SESSION_AUTHENTICATION_FAILED"
    running.session().xenapi.session.logout()  # the table read before stays in force
    assert "user table not reloaded" in running.log() and "symbolic link" in running.log()


@needs_root
def test_a_users_json_owned_by_another_user_grants_nothing(running: Xapid) -> None:
    users = running.state_dir / "users.json"
    doc = json.loads(users.read_text())
    doc["users"].update(json.loads(pool_admin_table("mallory", "mallory-pw"))["users"])
    users.write_text(json.dumps(doc))
    os.chown(users, NOBODY, NOBODY)
    with pytest.raises(XenAPI.Failure) as e:
        running.session("mallory", "mallory-pw")
    assert e.value.details[0] == "SESSION_AUTHENTICATION_FAILED"


def test_a_symlinked_sr_folder_gets_no_vdi_file(running: Xapid, tmp_path: Path) -> None:
    api = running.session().xenapi
    sr = api.SR.create(api.host.get_all()[0], {}, "0", "target", "", "ext", "user", False, {})
    folder = running.state_dir / "sr" / api.SR.get_uuid(sr)
    outside = tmp_path / "outside"
    outside.mkdir()
    folder.rmdir()
    folder.symlink_to(outside)
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.create({"SR": sr, "virtual_size": "4096", "type": "user", "sharable": False,
                        "read_only": False, "other_config": {}, "name_label": "d"})
    assert e.value.details[0] == "SR_BACKEND_FAILURE" and "symbolic link" in e.value.details[3], e.value.details
    assert entries(outside) == []
    assert not api.VDI.get_by_name_label("d")  # the failed call left no record


def test_a_symlinked_host_folder_gets_no_xhad_conf(running: Xapid, tmp_path: Path) -> None:
    api = running.session().xenapi
    host_uuid = api.host.get_uuid(api.host.get_all()[1])
    outside = tmp_path / "outside-host"
    outside.mkdir()
    folder = running.state_dir / "hosts" / host_uuid
    shutil.rmtree(folder, ignore_errors=True)  # the emulated host's folder, made at start
    folder.symlink_to(outside)
    with pytest.raises(XenAPI.Failure):
        api.pool.enable_ha([], {"timeout": "10"})
    assert entries(outside) == []
    assert api.pool.get_ha_enabled(api.pool.get_all()[0]) is False


def test_passwd_refuses_an_untrusted_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o757)
    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(state), "eve"],
                          input="pw\n", text=True, capture_output=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "writable by group or others" in done.stderr
    assert entries(state) == []


def test_a_symlink_planted_while_stopped_stops_the_next_start(tmp_path: Path) -> None:
    d = Xapid(tmp_path / "state", write_conf(tmp_path / "s.conf"), ["--hosts", "1"])
    d.start()
    d.stop()
    outside = tmp_path / "outside"
    shutil.move(d.state_dir / "sr", outside)
    (d.state_dir / "sr").symlink_to(outside)
    before = sorted(p.name for p in outside.rglob("*"))
    with pytest.raises(RuntimeError, match="exited with 2"):
        d.start(timeout=20)
    d.stop()
    assert "symbolic link" in d.log() and "Traceback" not in d.log()
    assert sorted(p.name for p in outside.rglob("*")) == before
