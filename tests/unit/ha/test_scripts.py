"""ClusterStackRunner with hand-written stacks: environment, exit codes, limits, locking."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

if TYPE_CHECKING:
    from conftest import ProcessGroups

from xapid.errors import ApiError
from xapid.ha import scripts
from xapid.ha.scripts import ClusterStackRunner, ScriptError

MakeScript = Callable[..., Path]

HOST = "11111111-2222-4333-8444-555555555555"
OTHER = "66666666-7777-4888-9999-000000000000"


@pytest.fixture
def runner(stack_root: Path) -> ClusterStackRunner:
    return ClusterStackRunner(stack_root, timeout=10.0, start_timeout=10.0)


@pytest.fixture
def conf_path(tmp_path: Path) -> Path:
    """Where the test scripts find XHAD_CONF's folder; the file itself need not exist."""
    folder = tmp_path / "host"
    folder.mkdir()
    return folder / "xhad.conf"


def api_error(call: object, *args: object, **kwargs: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_constants() -> None:
    assert set(scripts.SCRIPTS) == {
        "ha_set_pool_state",
        "ha_start_daemon",
        "ha_stop_daemon",
        "ha_query_liveset",
        "ha_propose_master",
        "ha_disarm_fencing",
        "ha_set_excluded",
    }
    assert sorted(scripts.MTC_CODES) == [*range(20), 127]
    assert scripts.MTC_CODES[14] == "MTC_EXIT_DAEMON_IS_NOT_PRESENT"
    assert scripts.MTC_CODES[127] == "MTC_EXIT_INTERNAL_BUG"


def test_environment_cwd_stdin_and_session(
    runner: ClusterStackRunner, make_script: MakeScript, stack_root: Path, conf_path: Path
) -> None:
    make_script(
        "s",
        "ha_query_liveset",
        """#!/bin/sh
pwd
readlink /proc/$$/fd/0
cut -d' ' -f5,6 /proc/$$/stat
echo "pid $$"
tr '\\0' '\\n' < /proc/$$/environ
""",
    )
    result = runner.run("s", "ha_query_liveset", HOST, conf_path)
    lines = result.stdout.splitlines()
    stack_dir = str((stack_root / "s").resolve())
    pid = lines[3].split()[1]
    assert lines[0] == stack_dir
    assert lines[1] == "/dev/null"
    assert lines[2] == f"{pid} {pid}"  # process group and session led by the script
    env = dict(line.split("=", 1) for line in lines[4:])
    assert env == {
        "PATH": f"{os.environ['PATH']}:{stack_dir}",
        "XHAD_CONF": str(conf_path),
        "XAPI_HOST_UUID": HOST,
        "XAPID_HOST_DIR": str(conf_path.parent),  # marks the host's processes (xapid/hw)
    }


def test_args_and_success_result(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_set_pool_state", '#!/bin/sh\necho "args: $*"\n')
    result = runner.run("s", "ha_set_pool_state", HOST, conf_path, ["init"])
    assert (result.stack, result.script, result.host_uuid, result.args) == (
        "s",
        "ha_set_pool_state",
        HOST,
        ("init",),
    )
    assert (result.exit_code, result.stdout, result.stdout_truncated) == (0, "args: init\n", False)
    assert 0 < result.duration < 10


def test_mtc_exit_code_raises_script_error(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_query_liveset", "#!/bin/sh\necho partial\nexit 14\n")
    error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert isinstance(error, ScriptError)
    assert (error.exit_code, error.symbol, error.stack, error.script, error.host_uuid) == (
        14,
        "MTC_EXIT_DAEMON_IS_NOT_PRESENT",
        "s",
        "ha_query_liveset",
        HOST,
    )
    assert error.code == "INTERNAL_ERROR"
    for word in ("s/ha_query_liveset", HOST, "MTC_EXIT_DAEMON_IS_NOT_PRESENT", "14"):
        assert word in error.params[0]


def test_exit_127_is_a_script_error(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_stop_daemon", "#!/bin/sh\nexit 127\n")
    error = api_error(runner.run, "s", "ha_stop_daemon", HOST, conf_path)
    assert isinstance(error, ScriptError) and error.symbol == "MTC_EXIT_INTERNAL_BUG"


def test_unknown_exit_code_is_internal_error(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_query_liveset", "#!/bin/sh\nexit 42\n")
    error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert not isinstance(error, ScriptError)
    assert error.code == "INTERNAL_ERROR"
    assert error.params == [f"Unrecognised MTC exit code 42 from s/ha_query_liveset on host {HOST}"]


def test_death_by_signal_names_the_signal(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_query_liveset", "#!/bin/sh\nkill -TERM $$\nsleep 5\n")
    error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert not isinstance(error, ScriptError)
    assert error.code == "INTERNAL_ERROR" and "SIGTERM" in error.params[0]


def test_timeout_kills_the_whole_process_group(
    runner: ClusterStackRunner,
    make_script: MakeScript,
    conf_path: Path,
    process_groups: ProcessGroups,
    wait_until: Callable[..., bool],
) -> None:
    folder = conf_path.parent
    make_script(
        "s",
        "ha_query_liveset",
        """#!/bin/sh
d=$(dirname "$XHAD_CONF")
echo $$ > "$d/script.pid"
sleep 100 &
echo $! > "$d/grandchild.pid"
sleep 100
""",
    )
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        try:
            runner.run("s", "ha_query_liveset", HOST, conf_path, timeout=1)
        finally:
            if (folder / "script.pid").exists():
                process_groups.track(int((folder / "script.pid").read_text()))
    assert time.monotonic() - started < 5
    error = caught.value
    assert error.code == "INTERNAL_ERROR" and not isinstance(error, ScriptError)
    for word in ("s/ha_query_liveset", HOST, "1 seconds"):
        assert word in error.params[0]
    pgid = int((folder / "script.pid").read_text())
    grandchild = int((folder / "grandchild.pid").read_text())
    assert wait_until(lambda: not process_groups.members(pgid), 2.0)
    assert grandchild not in process_groups.members(pgid)


def test_default_timeout_depends_on_the_script(
    make_script: MakeScript, stack_root: Path, conf_path: Path
) -> None:
    runner = ClusterStackRunner(stack_root, timeout=0.5, start_timeout=10.0)
    for name in ("ha_start_daemon", "ha_query_liveset"):
        make_script("s", name, "#!/bin/sh\nsleep 1\n")
    assert runner.run("s", "ha_start_daemon", HOST, conf_path).exit_code == 0
    error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert "0.5 seconds" in error.params[0]


def test_detached_grandchild_holding_pipes_does_not_hang(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path, process_groups: ProcessGroups
) -> None:
    make_script("s", "ha_start_daemon", "#!/bin/sh\necho $$\nsleep 100 &\nexit 0\n")
    started = time.monotonic()
    result = runner.run("s", "ha_start_daemon", HOST, conf_path, timeout=5)
    pgid = process_groups.track(int(result.stdout.split()[0]))
    assert time.monotonic() - started < 3
    assert process_groups.members(pgid)  # on success the grandchild is left alone
    process_groups.kill(pgid)


def test_large_stdout_is_capped_and_stderr_drained(
    make_script: MakeScript, stack_root: Path, conf_path: Path
) -> None:
    runner = ClusterStackRunner(stack_root, timeout=20, stdout_cap=1 << 20)
    make_script(
        "s",
        "ha_query_liveset",
        """#!/bin/sh
head -c 3000000 /dev/zero | tr '\\0' e >&2
head -c 5000000 /dev/zero | tr '\\0' x
""",
    )
    with capture_logs() as logs:
        result = runner.run("s", "ha_query_liveset", HOST, conf_path)
    assert result.stdout == "x" * (1 << 20)
    assert result.stdout_truncated
    assert result.duration < 15
    stderr_logs = [entry for entry in logs if entry["event"] == "ha_script_stderr"]
    assert len(stderr_logs) == 1
    assert stderr_logs[0]["log_level"] == "warning"
    assert len(stderr_logs[0]["stderr"]) == scripts.STDERR_CAP
    assert stderr_logs[0]["stderr_dropped"] == 3000000 - scripts.STDERR_CAP


def test_output_is_decoded_with_replacement(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_query_liveset", "#!/bin/sh\nprintf 'a\\377b'\n")
    assert runner.run("s", "ha_query_liveset", HOST, conf_path).stdout == "a\ufffdb"


def test_every_call_is_logged_once(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_set_pool_state", "#!/bin/sh\necho oops >&2\nexit 15\n")
    with capture_logs() as logs, pytest.raises(ScriptError):
        runner.run("s", "ha_set_pool_state", HOST, conf_path, ["init"])
    calls = [entry for entry in logs if entry["event"] == "ha_script"]
    assert len(calls) == 1
    assert calls[0]["log_level"] == "info"
    assert {k: calls[0][k] for k in ("stack", "script", "host", "args", "exit_code")} == {
        "stack": "s",
        "script": "ha_set_pool_state",
        "host": HOST,
        "args": ("init",),
        "exit_code": 15,
    }
    assert calls[0]["duration"] >= 0
    assert [entry["stderr"] for entry in logs if entry["event"] == "ha_script_stderr"] == ["oops\n"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "does not exist"),
        ("no exec bit", "not executable"),
        ("directory", "not a regular file"),
        ("escaping symlink", "outside"),
        ("dangling symlink", "does not exist"),
    ],
)
def test_unusable_scripts_are_refused(
    runner: ClusterStackRunner,
    make_script: MakeScript,
    stack_root: Path,
    tmp_path: Path,
    conf_path: Path,
    setup: str,
    expected: str,
) -> None:
    marker = tmp_path / "ran"
    body = f"#!/bin/sh\ntouch {marker}\n"
    target = stack_root / "s" / "ha_query_liveset"
    make_script("s", "ha_other_helper", body)
    if setup == "no exec bit":
        make_script("s", "ha_query_liveset", body, mode=0o644)
    elif setup == "directory":
        target.mkdir()
    elif setup == "escaping symlink":
        outside = make_script("elsewhere", "script", body, root=tmp_path)
        target.symlink_to(outside)
    elif setup == "dangling symlink":
        target.symlink_to(tmp_path / "nothing")
    with capture_logs() as logs:
        error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert error.code == "INTERNAL_ERROR"
    assert "s/ha_query_liveset" in error.params[0] and expected in error.params[0]
    assert not marker.exists()
    assert [(e["event"], e["exit_code"], e["refused"]) for e in logs] == [
        ("ha_script", None, error.description)
    ]


def test_symlink_inside_the_root_is_followed(
    runner: ClusterStackRunner, make_script: MakeScript, stack_root: Path, conf_path: Path
) -> None:
    real = make_script("base", "ha_query_liveset", "#!/bin/sh\necho shared\n")
    (stack_root / "s").mkdir()
    (stack_root / "s" / "ha_query_liveset").symlink_to(real)
    assert runner.run("s", "ha_query_liveset", HOST, conf_path).stdout == "shared\n"


def test_unknown_script_name_is_refused(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "calldaemon", "#!/bin/sh\n")
    error = api_error(runner.run, "s", "calldaemon", HOST, conf_path)
    assert error.code == "INTERNAL_ERROR"


def test_unexecutable_interpreter_is_internal_error(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    make_script("s", "ha_query_liveset", "#!/nonexistent/interpreter\n")
    error = api_error(runner.run, "s", "ha_query_liveset", HOST, conf_path)
    assert error.code == "INTERNAL_ERROR" and "s/ha_query_liveset" in error.params[0]


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("xhad", True),
        ("melio", True),
        ("a" * 64, True),
        ("with space", True),
        ("x.y", True),
        ("", False),
        ("a" * 65, False),
        ("../x", False),
        ("..", False),
        (".", False),
        (".hidden", False),
        ("a/b", False),
        ("/abs", False),
        ("x\x00y", False),
        ("a\nb", False),
        ("a\x7fb", False),
        ("a..b", False),
    ],
)
def test_valid_stack_name(name: str, valid: bool) -> None:
    assert scripts.valid_stack_name(name) is valid


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "x\x00y", "a" * 65, "", ".."])
def test_invalid_stack_names_never_touch_the_filesystem(
    runner: ClusterStackRunner,
    make_script: MakeScript,
    stack_root: Path,
    tmp_path: Path,
    conf_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    marker = tmp_path / "ran"
    for folder in (tmp_path / "x", stack_root / ".hidden", stack_root / "a" / "b"):
        make_script(folder.name, "ha_query_liveset", f"#!/bin/sh\ntouch {marker}\n", root=folder.parent)
        (folder / "ha_supported_srs").write_text("foo\n")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("filesystem touched for an invalid stack name")

    with monkeypatch.context() as patch:
        for target, attribute in (
            (Path, "resolve"),
            (Path, "stat"),
            (Path, "is_dir"),
            (os, "stat"),
            (os, "access"),
        ):
            patch.setattr(target, attribute, forbidden)
        errors = [
            api_error(runner.stack_dir, name),
            api_error(runner.supported_srs, name),
            api_error(runner.run, name, "ha_query_liveset", HOST, conf_path),
        ]
    assert [(e.code, e.params) for e in errors] == [("UNKNOWN_CLUSTER_STACK", [name])] * 3
    assert not marker.exists()


def test_missing_stack_is_unknown(runner: ClusterStackRunner, stack_root: Path, tmp_path: Path) -> None:
    (stack_root / "plainfile").write_text("")
    (stack_root / "dangling").symlink_to(tmp_path / "nothing")
    for name in ("absent", "plainfile", "dangling"):
        assert api_error(runner.stack_dir, name).description == ["UNKNOWN_CLUSTER_STACK", name]
    (stack_root / "real").mkdir()
    assert runner.stack_dir("real") == (stack_root / "real").resolve()


def test_stack_folder_symlinked_elsewhere_works_as_packages_install_it(
    runner: ClusterStackRunner, make_script: MakeScript, stack_root: Path, tmp_path: Path, conf_path: Path
) -> None:
    """A package ships its stack in its own folder and links it into the root: scripts and
    ha_supported_srs inside that folder (symlinked among themselves too) are used."""
    package = tmp_path / "opt" / "pkg-stack"
    make_script("pkg-stack", "ha_query_liveset", "#!/bin/sh\necho packaged\n", root=tmp_path / "opt")
    (package / "bin").mkdir()
    real = make_script("bin", "start", "#!/bin/sh\necho started\n", root=package)
    (package / "ha_start_daemon").symlink_to(real)
    (package / "types").write_text("pkgsr\n")
    (package / "ha_supported_srs").symlink_to(package / "types")
    (stack_root / "pkg").symlink_to(package)
    assert runner.stack_dir("pkg") == package.resolve()
    assert runner.run("pkg", "ha_query_liveset", HOST, conf_path).stdout == "packaged\n"
    assert runner.run("pkg", "ha_start_daemon", HOST, conf_path).stdout == "started\n"
    assert runner.supported_srs("pkg") == ["pkgsr"]


def test_supported_srs(runner: ClusterStackRunner, stack_root: Path, tmp_path: Path) -> None:
    for name in ("absent", "listed", "spaced", "empty", "dir", "linked", "dangling"):
        (stack_root / name).mkdir()
    (stack_root / "listed" / "ha_supported_srs").write_text("foosr\nbarsr\n")
    (stack_root / "spaced" / "ha_supported_srs").write_text("  a\t b\n\n c ")
    (stack_root / "empty" / "ha_supported_srs").write_text("")
    (stack_root / "dir" / "ha_supported_srs").mkdir()
    (stack_root / "linked" / "ha_supported_srs").symlink_to(stack_root / "listed" / "ha_supported_srs")
    (stack_root / "dangling" / "ha_supported_srs").symlink_to(tmp_path / "nothing")
    assert runner.supported_srs("absent") is None
    assert runner.supported_srs("listed") == ["foosr", "barsr"]
    assert runner.supported_srs("spaced") == ["a", "b", "c"]
    assert runner.supported_srs("empty") == []
    assert runner.supported_srs("dir") is None
    assert runner.supported_srs("linked") == ["foosr", "barsr"]
    assert runner.supported_srs("dangling") is None
    assert api_error(runner.supported_srs, "nope").code == "UNKNOWN_CLUSTER_STACK"


def test_supported_srs_leading_outside_the_root_is_refused_loudly(
    runner: ClusterStackRunner, stack_root: Path, tmp_path: Path
) -> None:
    """ha-gaps bug 4: such a link used to read as "no file", which lifted the restriction."""
    (stack_root / "escape").mkdir()
    (tmp_path / "srs").write_text("stolen\n")
    (stack_root / "escape" / "ha_supported_srs").symlink_to(tmp_path / "srs")
    with capture_logs() as logs:
        error = api_error(runner.supported_srs, "escape")
    assert error.code == "INTERNAL_ERROR"
    message = error.params[0]
    assert str(stack_root / "escape" / "ha_supported_srs") in message and str(tmp_path / "srs") in message
    assert "outside the cluster-stack root" in message
    assert [e["log_level"] for e in logs] == ["error"]


def _overlap_log(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path, hosts: list[str]
) -> list[list[str]]:
    make_script(
        "s",
        "ha_query_liveset",
        """#!/bin/sh
log="$(dirname "$XHAD_CONF")/calls"
echo "start $XAPI_HOST_UUID $(date +%s.%N)" >> "$log"
sleep 0.4
echo "end $XAPI_HOST_UUID $(date +%s.%N)" >> "$log"
""",
    )
    threads = [
        threading.Thread(target=runner.run, args=("s", "ha_query_liveset", h, conf_path)) for h in hosts
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return [line.split() for line in (conf_path.parent / "calls").read_text().splitlines()]


def test_same_host_calls_are_serialised(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    events = _overlap_log(runner, make_script, conf_path, [HOST, HOST, HOST])
    assert [kind for kind, _, _ in events] == ["start", "end"] * 3
    times = [float(t) for _, _, t in events]
    assert times == sorted(times)


def test_different_hosts_run_in_parallel(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    events = _overlap_log(runner, make_script, conf_path, [HOST, OTHER])
    assert [kind for kind, _, _ in events] == ["start", "start", "end", "end"]


def test_query_liveset_and_propose_master_helpers(
    runner: ClusterStackRunner, make_script: MakeScript, conf_path: Path
) -> None:
    doc = (
        f"<ha_liveset_info><status>Online</status><localhost><HostID>{HOST}</HostID></localhost>"
        "</ha_liveset_info>"
    )
    make_script("ok", "ha_query_liveset", f"#!/bin/sh\necho '{doc}'\n")
    assert runner.query_liveset("ok", HOST, conf_path).local_host == HOST
    make_script("junk", "ha_query_liveset", "#!/bin/sh\necho 'not xml <'\n")
    error = api_error(runner.query_liveset, "junk", HOST, conf_path)
    assert error.code == "INTERNAL_ERROR" and not isinstance(error, ScriptError)

    for stack, body, expected in [
        ("yes", "echo 'TRUE  '", True),
        ("no", "echo FALSE", False),
        ("lower", "echo true", False),
        ("lead", "echo ' TRUE'", False),
        ("refused", "echo TRUE; exit 17", False),
    ]:
        make_script(stack, "ha_propose_master", f"#!/bin/sh\n{body}\n")
        assert runner.propose_master(stack, HOST, conf_path) is expected, stack
    make_script("odd", "ha_propose_master", "#!/bin/sh\necho TRUE; exit 42\n")
    assert api_error(runner.propose_master, "odd", HOST, conf_path).code == "INTERNAL_ERROR"


def test_hardware_a_stack_asks_for_reaches_its_environment(
    stack_root: Path, make_script: MakeScript, conf_path: Path
) -> None:
    """A stack listing ``netns`` in ``xapid-hardware`` gets the hook's variables; only a start makes it."""
    asked: list[tuple[str, str, bool]] = []

    def hardware(need: str, host: str, create: bool) -> dict[str, str]:
        asked.append((need, host, create))
        return {"XAPID_NETNS": "ns-of-" + host[:4]} if create else {"XAPID_NETNS_ERROR": "not made yet"}

    runner = ClusterStackRunner(stack_root, timeout=10.0, start_timeout=10.0, hardware=hardware)
    for name in ("ha_start_daemon", "ha_query_liveset"):
        make_script("net", name, "#!/bin/sh\necho \"${XAPID_NETNS:-none} ${XAPID_NETNS_ERROR:-}\"\n")
    make_script("plain", "ha_start_daemon", "#!/bin/sh\necho \"${XAPID_NETNS:-none}\"\n")
    (stack_root / "net" / "xapid-hardware").write_text("netns\n")
    assert runner.needed_hardware("net") == {"netns"} and runner.needed_hardware("plain") == set()
    assert runner.run("net", "ha_start_daemon", HOST, conf_path).stdout.strip() == "ns-of-1111"
    assert runner.run("net", "ha_query_liveset", HOST, conf_path).stdout.strip() == "none not made yet"
    assert runner.run("plain", "ha_start_daemon", HOST, conf_path).stdout.strip() == "none"
    assert asked == [("netns", HOST, True), ("netns", HOST, False)]


def test_a_script_a_killed_daemon_left_running_is_reaped_at_the_next_start(
    make_script: MakeScript, stack_root: Path, conf_path: Path, tmp_path: Path,
    process_groups: ProcessGroups, wait_until: Callable[..., bool],
) -> None:
    """scripts.py reap_orphans: each host's running script is recorded in one marker, rewritten in
    place (no file is created per run), and a later runner kills what that marker names."""
    state = tmp_path / "state"
    make_script("s", "ha_query_liveset", "#!/bin/sh\necho ok\n")
    make_script("s", "ha_start_daemon", '#!/bin/sh\necho $$ > "$(dirname "$XHAD_CONF")/script.pid"\nsleep 100\n')
    first = ClusterStackRunner(stack_root, timeout=30.0, start_timeout=30.0, state_dir=state)
    marker = state / "run" / "scripts" / f"host-{HOST}"
    first.run("s", "ha_query_liveset", HOST, conf_path)
    inode = marker.stat().st_ino
    assert marker.read_text() == ""  # the run ended: nothing recorded, the file kept for the next
    first.run("s", "ha_query_liveset", HOST, conf_path)
    assert marker.stat().st_ino == inode and marker.read_text() == ""

    outcome: list[BaseException] = []

    def run_and_fail() -> None:
        try:
            first.run("s", "ha_start_daemon", HOST, conf_path)
        except BaseException as exc:  # noqa: BLE001 - the assertion below looks at it
            outcome.append(exc)

    worker = threading.Thread(target=run_and_fail)
    worker.start()
    try:
        assert wait_until(lambda: (conf_path.parent / "script.pid").exists(), 5.0)
        pid = int((conf_path.parent / "script.pid").read_text())
        process_groups.track(pid)
        assert marker.read_text().split()[0] == str(pid)
        # A daemon started after a crash of the first, on the same state dir.
        second = ClusterStackRunner(stack_root, timeout=30.0, start_timeout=30.0, state_dir=state)
        assert second.reap_orphans() == [pid]
        assert wait_until(lambda: not process_groups.members(pid), 5.0)
    finally:
        worker.join(10.0)
    assert outcome and isinstance(outcome[0], ApiError) and "SIGKILL" in outcome[0].params[0]
    # Nothing is recorded for a host whose marker is empty.
    assert ClusterStackRunner(stack_root, state_dir=state).reap_orphans() == []
