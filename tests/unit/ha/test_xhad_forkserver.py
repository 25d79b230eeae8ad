"""The xhad fork server (xapid-forkserver): scripts and heartbeats forked, never a different outcome.

A runner with a state dir starts the stack's fork server at the first script run; the scripts hand
their runs to it.  Forked processes must be indistinguishable from executed ones where xapid and the
tests look (command line, environment, exit status, output), die with their client, and the server
must never outlive its starter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.unit.ha.support import code, servers_under
from xapid.errors import ApiError
from xapid.hw.processes import processes_of

if TYPE_CHECKING:
    from conftest import EnginePool, ProcessGroups

MakePool = Callable[..., "EnginePool"]
XHAD = Path(__file__).resolve().parents[3] / "scripts" / "cluster-stack" / "xhad"




def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def enabled(make_pool: MakePool, hosts: int = 2) -> EnginePool:
    pool = make_pool("xhad", hosts, forkserver=True)
    assert code(pool, pool.hosts[0], "ha_set_pool_state", "init") == 0
    with ThreadPoolExecutor(hosts) as executor:
        assert list(executor.map(lambda h: code(pool, h, "ha_start_daemon"), pool.hosts)) == [0] * hosts
    return pool


def test_heartbeats_are_forked_and_look_executed(make_pool: MakePool) -> None:
    pool = enabled(make_pool)
    assert len(servers_under(pool.state)) == 1
    for host in pool.hosts:
        pid = pool.pid(host)
        assert pid is not None
        assert "forked by the fork server" in (pool.hostdir(host) / "xhad.log").read_text()
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--heartbeat" in parts and os.fsencode(str(pool.conf(host))) in parts
        # The emulated hardware finds a host's processes by their environment (fencing kills them).
        assert pid in processes_of(pool.hostdir(host))
        assert pool.runner.query_liveset("xhad", host, pool.conf(host)).status == "Online"
    assert sorted(pool.running_heartbeats()) == sorted(pool.pid(h) for h in pool.hosts)


def test_close_stops_the_server_and_leaves_the_heartbeats(make_pool: MakePool,
                                                          wait_until: Callable[..., bool]) -> None:
    pool = enabled(make_pool)
    [server] = servers_under(pool.state)
    beating = pool.running_heartbeats()
    pool.runner.close()
    assert wait_until(lambda: not servers_under(pool.state), 5.0)
    assert not (pool.state / "xapid" / "run" / "forkservers" / "xhad.server").exists()
    assert not Path(f"/proc/{server}").exists() or not Path(f"/proc/{server}/cmdline").read_bytes()
    assert sorted(pool.running_heartbeats()) == sorted(beating)
    # Without the server the scripts run in-process, with the same results.
    for host in pool.hosts:
        assert code(pool, host, "ha_stop_daemon") == 0
    assert wait_until(lambda: not pool.running_heartbeats(), 5.0)
    assert not servers_under(pool.state)


def test_exit_codes_output_and_stderr_pass_through(make_pool: MakePool) -> None:
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    assert code(pool, host, "ha_set_pool_state", "bogus") == 1
    assert code(pool, host, "ha_query_liveset") == 14  # no daemon
    fist = pool.hostdir(host) / "fist"
    fist.mkdir()
    (fist / "ha_propose_master").write_text("exit 13\n")
    assert code(pool, host, "ha_propose_master") == 13
    (fist / "ha_query_liveset").write_text("garbage\n")
    result = pool.run(host, "ha_query_liveset")
    assert result.stdout.startswith("<<< this is not a liveset")
    assert servers_under(pool.state)


def test_a_timed_out_run_dies_with_its_client(make_pool: MakePool, wait_until: Callable[..., bool]) -> None:
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0  # the server runs from here on
    fist = pool.hostdir(host) / "fist"
    fist.mkdir()
    (fist / "ha_query_liveset").write_text("sleep 30\n")
    pool.runner.timeout = 1.0
    [server] = servers_under(pool.state)
    seen: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 0.9
        while time.monotonic() < deadline and not seen:
            # The worker (a child of the server) shows the client's environment.
            seen.extend(p for p in processes_of(pool.hostdir(host)) if parent(p) == server)
            time.sleep(0.02)

    with ThreadPoolExecutor(1) as executor:
        watcher = executor.submit(watch)
        started = time.monotonic()
        with pytest.raises(ApiError, match="timed out"):
            pool.run(host, "ha_query_liveset")
        watcher.result()
    assert time.monotonic() - started < 5.0
    assert seen, "the worker carries the host's XAPID_HOST_DIR"
    assert wait_until(lambda: not processes_of(pool.hostdir(host)), 3.0)
    assert servers_under(pool.state)  # the server itself carries on


# A "shim" that asks as the shipped ones do (xhad_engine.py, "fork server"): its waiter keeps the
# answer pipe on fd 9, sends the request and stops; the answer lands in $OUT.
ASKER = (
    'a=$( { exec 9>&1 && read -r w _ </proc/self/stat && '
    'echo "xhad-fork-3 $$ $w ha_query_liveset 0" 1<>"$REQ" && kill -STOP "$w"; } ) 2>/dev/null; '
    'echo "$a" > "$OUT"; sleep 30'
)


def test_the_server_ignores_malformed_requests_and_refuses_what_it_cannot_reproduce(
    make_pool: MakePool, tmp_path: Path, wait_until: Callable[..., bool]
) -> None:
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    folder = pool.state / "xapid" / "run" / "forkservers" / "xhad.server"
    requests = os.open(folder / "requests", os.O_WRONLY | os.O_NONBLOCK)
    left, right = socket.socketpair()
    # A live process named as the waiter of a request that is not its shell's: left alone.
    bystander = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    askers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        os.write(requests, b"hello\nxhad-fork-3 1 2 rm_rf 0\nxhad-fork-3 x 1 ha_query_liveset 0\n"
                           b"xhad-fork-2 1 ha_query_liveset 0\n")
        os.write(requests, b"xhad-fork-3 %d %d ha_query_liveset 0\n" % (os.getpid(), bystander.pid))
        # Not a shim of the script it names ($0 is another name); and one whose standard output is
        # a socket (/proc cannot open one anew): both are refused, through their answer pipes.
        cases = (("stranger", "other_script", subprocess.DEVNULL), ("socketed", "ha_query_liveset", right))
        for name, script, out in cases:
            env = {"PATH": os.environ.get("PATH", ""), "REQ": str(folder / "requests"), "OUT": str(tmp_path / name)}
            askers[name] = subprocess.Popen(["sh", "-c", ASKER, script], stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        for name in askers:
            answer = tmp_path / name
            assert wait_until(lambda answer=answer: answer.exists() and answer.read_text() == "refused\n", 5.0), name
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        for proc in (*askers.values(), bystander):
            try:
                if proc is bystander:
                    proc.kill()
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        left.close()
        right.close()
        os.close(requests)
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["pid", "requests"]


def test_the_server_goes_when_its_starter_dies(tmp_path: Path, process_groups: ProcessGroups,
                                               wait_until: Callable[..., bool]) -> None:
    sock = tmp_path / "s.sock"
    starter = subprocess.Popen(
        ["sh", "-c", f'"{XHAD / "xapid-forkserver"}" "{sock}" & wait'],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        env={"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
    )
    process_groups.track(starter.pid)
    assert starter.stdout is not None
    assert starter.stdout.readline() == b"ready\n"
    [server] = servers_under(tmp_path)
    os.kill(starter.pid, signal.SIGKILL)
    starter.wait()
    assert wait_until(lambda: not servers_under(tmp_path), 5.0), f"fork server {server} outlived its starter"
    assert not sock.exists()


@pytest.mark.parametrize("chunks", [1, 4])
def test_an_oversized_request_runs_in_process(make_pool: MakePool, chunks: int) -> None:
    """A request the server cannot take whole runs in the script: an environment too large for a
    worker to show (refused), or too large to send at all."""
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    sock_path = pool.state / "xapid" / "run" / "forkservers" / "xhad.server"
    assert sock_path.exists()
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "XHAD_CONF": str(pool.conf(host)), "XAPI_HOST_UUID": host, "XAPID_FORKSERVER": str(sock_path)}
    env.update({f"BIG{i}": "x" * 100_000 for i in range(chunks)})  # one string may not pass 128 KiB
    done = subprocess.run([str(XHAD / "ha_set_pool_state"), "invalid"], env=env, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert pool.global_block()["pool_state"] == "invalid"


def shim_env(pool: EnginePool, host: str) -> dict[str, str]:
    """What the adapter gives a script run of ``host`` with the fork server (xapid/ha/scripts.py)."""
    return {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            "XHAD_CONF": str(pool.conf(host)), "XAPI_HOST_UUID": host, "XAPID_HOST_DIR": str(pool.hostdir(host)),
            "XAPID_FORKSERVER": str(pool.state / "xapid" / "run" / "forkservers" / "xhad.server")}


@pytest.mark.parametrize("mode", ["ab", "wb"])
def test_output_into_a_file_lands_after_what_the_caller_wrote(make_pool: MakePool, tmp_path: Path, mode: str) -> None:
    """Appended to, the file is the worker's; written at an offset, the server refuses (a new
    description would write at 0) and the shim runs the script itself: the same bytes either way."""
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    (pool.hostdir(host) / "fist").mkdir()
    (pool.hostdir(host) / "fist" / "ha_query_liveset").write_text("garbage\n")
    out = tmp_path / "out"
    with open(out, mode) as handle:
        handle.write(b"before\n")
        handle.flush()
        done = subprocess.run([str(XHAD / "ha_query_liveset")], env=shim_env(pool, host), cwd=XHAD,
                              stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.PIPE, timeout=30)
        handle.write(b"after\n")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"before\n<<< this is not a liveset &&& \x7f TRUE\nafter\n"
    assert servers_under(pool.state)


def test_a_worker_killed_by_a_signal_kills_its_shim_with_it(make_pool: MakePool,
                                                            wait_until: Callable[..., bool]) -> None:
    pool = make_pool("xhad", 1, forkserver=True)
    host = pool.hosts[0]
    assert code(pool, host, "ha_set_pool_state", "init") == 0
    (pool.hostdir(host) / "fist").mkdir()
    (pool.hostdir(host) / "fist" / "ha_query_liveset").write_text("sleep 30\n")
    [server] = servers_under(pool.state)
    shim = subprocess.Popen([str(XHAD / "ha_query_liveset")], env=shim_env(pool, host), cwd=XHAD,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        workers: list[int] = []
        assert wait_until(lambda: workers.extend(
            p for p in processes_of(pool.hostdir(host)) if parent(p) == server) or workers, 5.0)
        os.kill(workers[0], signal.SIGTERM)
        assert shim.wait(timeout=10) == -signal.SIGTERM
    finally:
        shim.kill()
        shim.wait()
    assert sorted(p.name for p in (pool.state / "xapid" / "run" / "forkservers" / "xhad.server").iterdir()) == [
        "pid", "requests"]
