"""xapi.conf parsing: defaults, relative paths, and start-up refusals that name the file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xapid import config
from xapid.config import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "xapi.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "# nothing\n\n"))
    for key, (kind, default, _doc) in config.DEFAULTS.items():
        if kind != "path":
            assert cfg[key] == default, key
    assert cfg["login-failure-delay"] == 5.0 and cfg["session-idle-timeout"] == 86400.0


def test_path_defaults_mean_the_shipped_data_whatever_file_is_given(tmp_path: Path) -> None:
    """Issue 17 finding 8: a file elsewhere that sets only another key keeps the shipped folders."""
    shipped = config.load()
    elsewhere = config.load(write(tmp_path, "ha-monitor-interval = 1\n"))
    etc = config.shipped_etc()
    assert etc is not None
    for key in ("cluster-stack-root", "sm-dir"):
        assert elsewhere[key] == shipped[key], key
    assert elsewhere["cluster-stack-root"] == (etc / "../scripts/cluster-stack").resolve()
    assert elsewhere["sm-dir"] == (etc / "sm.d").resolve()
    assert elsewhere["ha-monitor-interval"] == 1.0
    config.validate_runtime(elsewhere)


def test_values_comments_and_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "max-request-size = 1000   # bytes\nsm-dir = drivers\n"
                           "login-failure-delay=0.5\ncluster-stack-root = /abs/stacks\n")
    cfg = config.load(path)
    assert cfg["max-request-size"] == 1000
    assert cfg["login-failure-delay"] == 0.5
    assert cfg["sm-dir"] == (tmp_path / "etc" / "drivers").resolve()     # relative to the config file
    assert cfg["cluster-stack-root"] == Path("/abs/stacks")


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "no-such-key = 1\nmax-request-size = 7\n"))
    assert cfg["max-request-size"] == 7 and cfg.get("no-such-key") is None


@pytest.mark.parametrize(("text", "line", "words"), [
    ("max-request-size = 10\nthis line is wrong\n", 2, "malformed"),
    ("\n\n = 5\n", 3, "empty key"),
    ("max-request-size = lots\n", 1, "expected a number"),
    ("# ok\nlogin-failure-delay = soon\n", 2, "expected a number"),
])
def test_bad_lines_name_the_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert f"{path}:{line}" in str(e.value) and words in str(e.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "absent.conf")


def test_runtime_checks_need_the_cluster_stack_root_and_sm_dir(tmp_path: Path) -> None:
    (tmp_path / "etc" / "sm.d").mkdir(parents=True)
    (tmp_path / "stacks").mkdir()
    ok = config.load(write(tmp_path, f"cluster-stack-root = {tmp_path / 'stacks'}\n"))
    config.validate_runtime(ok)
    missing = config.load(write(tmp_path, f"cluster-stack-root = {tmp_path / 'nope'}\n"))
    with pytest.raises(ConfigError, match="cluster-stack-root"):
        config.validate_runtime(missing)
    no_sm = config.load(write(tmp_path, f"cluster-stack-root = {tmp_path / 'stacks'}\nsm-dir = gone\n"))
    with pytest.raises(ConfigError, match="sm-dir"):
        config.validate_runtime(no_sm)


def test_serve_refuses_a_bad_config_with_exit_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, "max-request-size = 10\nbroken\n")
    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "serve", "--config", str(path),
                           "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{path}:2" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("line", ["gc-interval = 0", "session-limit = 0", "message_limit = -1"])
def test_collection_settings_have_a_floor(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        config.load(write(tmp_path, line + "\n"))
