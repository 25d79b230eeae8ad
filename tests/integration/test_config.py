"""xapi.conf handling at start-up: defaults, relative paths, unknown keys, refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SHIPPED_STACKS, Xapid, kill_heartbeats, write_conf


def serve(conf: Path, state: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``xapid serve`` expecting it to refuse start-up (it must exit by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "xapid.cli.xapid", "serve", "--config", str(conf), "--state-dir", str(state),
         "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "xapi.conf"
    conf.write_text("# comment\ncluster-stack-default = xhad\nthis line has no equals sign\n")
    out = serve(conf, tmp_path / "state")
    assert out.returncode == 2
    assert f"{conf}:3" in out.stderr and "malformed" in out.stderr
    assert not (tmp_path / "state" / "url").exists()


def test_missing_cluster_stack_root_stops_start_up(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "xapi.conf", tmp_path / "no-such-root")
    out = serve(conf, tmp_path / "state")
    assert out.returncode == 2
    assert "cluster-stack-root" in out.stderr and "no-such-root" in out.stderr


def test_unreadable_cluster_stack_root_stops_start_up(tmp_path: Path) -> None:
    root = tmp_path / "root-file"
    root.write_text("not a directory\n")
    out = serve(write_conf(tmp_path / "xapi.conf", root), tmp_path / "state")
    assert out.returncode == 2 and "cluster-stack-root" in out.stderr


def test_relative_paths_and_unknown_keys(tmp_path: Path) -> None:
    """Relative paths resolve against the config file's folder; unknown keys are logged and ignored."""
    etc = tmp_path / "etc"
    shutil.copytree(REPO / "etc" / "sm.d", etc / "sm.d")
    shutil.copytree(SHIPPED_STACKS, tmp_path / "stacks", ignore=shutil.ignore_patterns("__pycache__"))
    (etc / "sm.d" / "ocfs2.json").unlink()
    conf = etc / "xapi.conf"
    conf.write_text("cluster-stack-root = ../stacks\nsm-dir = sm.d\nno-such-key = 1\nlogin-failure-delay = 0.1\n")
    d = Xapid(tmp_path / "state", conf)
    try:
        d.start()
        x = d.session().xenapi
        types = {x.SM.get_type(s) for s in x.SM.get_all()}
        assert "ocfs2" not in types and {"nfs", "melio"} <= types
        x.pool.enable_ha([], {"timeout": "10"})
        x.pool.disable_ha()
        assert "no-such-key" in d.log()
    finally:
        d.stop()
        kill_heartbeats(d.state_dir)


def test_sm_table_follows_the_descriptor_folder(tmp_path: Path) -> None:
    """At start the SM table is made to match sm-dir; refs of kept drivers stay stable."""
    sm = tmp_path / "sm.d"
    shutil.copytree(REPO / "etc" / "sm.d", sm)
    conf = write_conf(tmp_path / "xapi.conf", **{"sm-dir": str(sm)})
    d = Xapid(tmp_path / "state", conf)
    try:
        d.start()
        x = d.session().xenapi
        before = {x.SM.get_type(s): s for s in x.SM.get_all()}
        (sm / "udev.json").unlink()
        d.restart()
        x = d.session().xenapi
        after = {x.SM.get_type(s): s for s in x.SM.get_all()}
        assert "udev" in before and "udev" not in after
        assert after["nfs"] == before["nfs"]
    finally:
        d.stop()


def test_bad_descriptor_stops_start_up(tmp_path: Path) -> None:
    sm = tmp_path / "sm.d"
    shutil.copytree(REPO / "etc" / "sm.d", sm)
    (sm / "broken.json").write_text('{"type": "broken", "required_cluster_stack": "notalist"}')
    out = serve(write_conf(tmp_path / "xapi.conf", **{"sm-dir": str(sm)}), tmp_path / "state")
    assert out.returncode == 2 and "broken.json" in out.stderr


def test_a_file_that_sets_one_key_starts_with_the_shipped_stacks_and_drivers(tmp_path: Path) -> None:
    """Issue 17 finding 8: ``ha-monitor-interval = 1`` alone used to stop start-up with
    ``cluster-stack-root .../scripts/cluster-stack does not exist`` (defaults resolved against the
    user's folder)."""
    conf = tmp_path / "mine" / "xapi.conf"
    conf.parent.mkdir()
    conf.write_text("ha-monitor-interval = 1\n")
    d = Xapid(tmp_path / "state", conf, ["--hosts", "1"])
    try:
        d.start()
        api = d.session().xenapi
        assert "ext" in api.SR.get_supported_types()        # the shipped sm.d
        pool = api.pool.get_all()[0]
        api.pool.enable_ha([], {"timeout": "10"})            # the shipped xhad stack
        assert api.pool.get_ha_cluster_stack(pool) == "xhad" and api.pool.get_ha_enabled(pool)
        api.pool.disable_ha()
    finally:
        d.stop()
        kill_heartbeats(d.state_dir)
