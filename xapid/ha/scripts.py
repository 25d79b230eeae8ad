"""The one place where xapid runs cluster-stack scripts (ha.md 2).

A cluster stack is a directory ``<root>/<stack>`` holding the seven ``ha_*`` scripts.  xapi
runs them with nothing but ``PATH`` in the environment, one at a time per host, and maps
their exit status through the MTC table of ha.md 2.3.  xapid follows that contract and adds
what xapi lacks: ``XHAD_CONF`` and ``XAPI_HOST_UUID`` (several emulated hosts share one
machine), a timeout per call that kills the script's whole process group, and caps on the
captured output.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from xapid.errors import ApiError, internal
from xapid.ha import liveset

log = structlog.get_logger("xapid.ha.scripts")

SCRIPTS: tuple[str, ...] = (
    "ha_set_pool_state",
    "ha_start_daemon",
    "ha_stop_daemon",
    "ha_query_liveset",
    "ha_propose_master",
    "ha_disarm_fencing",
    "ha_set_excluded",
)

MTC_CODES: dict[int, str] = {
    0: "MTC_EXIT_SUCCESS",
    1: "MTC_EXIT_INVALID_PARAMETER",
    2: "MTC_EXIT_SYSTEM_ERROR",
    3: "MTC_EXIT_TRANSIENT_SYSTEM_ERROR",
    4: "MTC_EXIT_WATCHDOG_ERROR",
    5: "MTC_EXIT_IMPROPER_LICENSE",
    6: "MTC_EXIT_CAN_NOT_READ_CONFIG_FILE",
    7: "MTC_EXIT_INVALID_CONFIG_FILE",
    8: "MTC_EXIT_CAN_NOT_ACCESS_STATEFILE",
    9: "MTC_EXIT_INVALID_STATE_FILE",
    10: "MTC_EXIT_GENERATION_UUID_MISMATCH",
    11: "MTC_EXIT_INVALID_POOL_STATE",
    12: "MTC_EXIT_BOOTJOIN_TIMEOUT",
    13: "MTC_EXIT_CAN_NOT_JOIN_EXISTING_LIVESET",
    14: "MTC_EXIT_DAEMON_IS_NOT_PRESENT",
    15: "MTC_EXIT_DAEMON_IS_PRESENT",
    16: "MTC_EXIT_INVALID_ENVIRONMENT",
    17: "MTC_EXIT_INVALID_LOCALHOST_STATE",
    18: "MTC_EXIT_BOOT_BLOCKED_BY_EXCLUDED",
    19: "MTC_EXIT_SET_EXCLUDED",
    127: "MTC_EXIT_INTERNAL_BUG",
}

MAX_STACK_NAME = 64
STDERR_CAP = 64 * 1024
# How long to keep reading after the script itself exited: a detached grandchild may hold
# the pipes open forever, and its output is not the script's answer.
EXIT_GRACE = 0.5
_SUPPORTED_SRS_CAP = 64 * 1024
_READ_CHUNK = 65536
# A stack may ship this executable: a fork server its scripts hand their runs to (xhad does), so
# that a run costs a fork instead of an interpreter start.  xapid starts it at the stack's first
# script run, names its socket in XAPID_FORKSERVER, and stops it in ``close``.
FORKSERVER = "xapid-forkserver"
FORKSERVER_READY_TIMEOUT = 10.0
FORKSERVER_STOP_GRACE = 5.0


# The marker of the script running for a host is ``run/scripts/host-<uuid>`` (one per host);
# other markers (fork servers) are named by pid.
HOST_MARKER_PREFIX = "host-"
_MARKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks): a pid plus this names one process."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def valid_stack_name(name: str) -> bool:
    """True iff ``name`` can only denote a folder directly below the root.

    Non-empty, at most 64 characters, no ``/``, not ``..``, no leading ``.``, and no NUL or
    other control character (code points below 32 and 127).
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_STACK_NAME
        and "/" not in name
        and ".." not in name
        and not name.startswith(".")
        and not any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    )


@dataclass(frozen=True)
class ScriptResult:
    """A script run that exited 0."""

    stack: str
    script: str
    host_uuid: str
    args: tuple[str, ...]
    exit_code: int
    stdout: str
    duration: float
    stdout_truncated: bool = False


class ScriptError(ApiError):
    """A script exited with a non-zero MTC code.

    The XenAPI form is INTERNAL_ERROR naming the stack, script, host and MTC symbol; callers
    that give a code a specific meaning (12 -> HA_FAILED_TO_FORM_LIVESET, 8 ->
    HA_HOST_CANNOT_ACCESS_STATEFILE, 14 -> "daemon not running") test ``exit_code``.
    """

    def __init__(self, stack: str, script: str, host_uuid: str, exit_code: int, stdout: str = "") -> None:
        self.stack = stack
        self.script = script
        self.host_uuid = host_uuid
        self.exit_code = exit_code
        self.symbol = MTC_CODES[exit_code]
        self.stdout = stdout
        super().__init__(
            "INTERNAL_ERROR",
            f"Cluster stack script {stack}/{script} failed on host {host_uuid}: "
            f"{self.symbol} (exit code {exit_code})",
        )


@dataclass
class _Captured:
    """Bytes kept from one pipe, up to ``cap``; the rest is counted and dropped."""

    data: bytearray
    cap: int
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class ClusterStackRunner:
    """Runs the scripts of the stacks below ``root`` under the rules of ha.md 2.1.

    Thread-safe.  At most one script runs at a time per host UUID; different hosts run in
    parallel.
    """

    def __init__(
        self,
        root: Path,
        timeout: float = 60.0,
        start_timeout: float = 180.0,
        stdout_cap: int = 1 << 20,
        state_dir: Path | None = None,
        hardware: Callable[[str, str, bool], dict[str, str]] | None = None,
    ) -> None:
        self.root = Path(root)
        # hardware(need, host_uuid, create) -> extra environment: the emulated hardware a stack
        # asks for in its xapid-hardware file (``netns``: a network namespace per host).
        self.hardware = hardware
        self.state_dir = state_dir
        # One file per script running now, named by its pid (= its process group): what a daemon
        # killed mid-script leaves behind is found and ended at the next start (reap_orphans).
        self.running_dir = state_dir / "run" / "scripts" if state_dir is not None else None
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.stdout_cap = stdout_cap
        self._locks: dict[str, threading.Lock] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._locks_guard = threading.Lock()
        # Per stack: its running fork server and socket, or None once starting one failed.
        self._servers: dict[str, tuple[subprocess.Popen[bytes], str, Path | None] | None] = {}
        self._servers_lock = threading.Lock()
        self._closed = False

    def cancel(self, host_uuid: str) -> bool:
        """Kill the script running for ``host_uuid`` now (its whole process group); False if none runs.

        The interrupted call fails with INTERNAL_ERROR ("killed by SIGKILL").
        """
        with self._locks_guard:
            proc = self._procs.get(host_uuid)
            if proc is None or proc.poll() is not None:
                return False
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
        log.info("ha_script cancelled", host=host_uuid)
        return True

    def _host_lock(self, host_uuid: str) -> threading.Lock:
        """The lock serialising scripts for ``host_uuid``."""
        with self._locks_guard:
            return self._locks.setdefault(host_uuid, threading.Lock())

    def stack_dir(self, stack: str) -> Path:
        """The resolved directory of ``stack``.

        Raises UNKNOWN_CLUSTER_STACK if the name is not a plain folder name (checked before
        any filesystem access) or ``<root>/<stack>`` is not an existing directory.  The folder
        may be a symlink (packages install stacks that way): it is resolved wherever it leads,
        because only the administrator who owns the root can place it there.
        """
        if not valid_stack_name(stack):
            raise ApiError("UNKNOWN_CLUSTER_STACK", stack)
        try:
            root = self.root.resolve(strict=True)
            path = (root / stack).resolve(strict=True)
        except (OSError, RuntimeError):
            raise ApiError("UNKNOWN_CLUSTER_STACK", stack) from None
        if path == root or not path.is_dir():
            raise ApiError("UNKNOWN_CLUSTER_STACK", stack)
        return path

    def _inside(self, directory: Path, path: Path) -> bool:
        """True iff resolved ``path`` lies in the resolved root or in the resolved stack folder."""
        return path.is_relative_to(self.root.resolve()) or path.is_relative_to(directory)

    def supported_srs(self, stack: str) -> list[str] | None:
        """SR types listed in ``<root>/<stack>/ha_supported_srs`` (ha.md 1.5), in file order.

        None when the file is absent (a dangling symlink included), unreadable, or not a
        regular file: the stack then places no restriction, as in xapi.  A symlink is followed;
        one that leads outside both the cluster-stack root and the stack's own folder raises
        INTERNAL_ERROR naming the link and its target, so that a misplaced link can never lift
        the restriction silently.  Raises UNKNOWN_CLUSTER_STACK for an unknown stack.
        """
        directory = self.stack_dir(stack)
        link = directory / "ha_supported_srs"
        try:
            path = link.resolve(strict=True)
        except (OSError, RuntimeError):
            if link.is_symlink():
                log.warning("ha_supported_srs is a dangling symlink; no restriction", stack=stack,
                            path=str(link))
            return None
        if not self._inside(directory, path):
            log.error("ha_supported_srs resolves outside the cluster-stack root", stack=stack,
                      path=str(link), target=str(path))
            raise internal(f"{link} resolves outside the cluster-stack root {self.root.resolve()} (to {path}); "
                           f"refusing to guess which SR types stack {stack} supports")
        try:
            if not stat.S_ISREG(path.stat().st_mode):
                return None
            with path.open("rb") as handle:
                data = handle.read(_SUPPORTED_SRS_CAP)
        except OSError as exc:
            log.warning("ha_supported_srs cannot be read; no restriction", stack=stack, path=str(path),
                        error=exc.strerror)
            return None
        return data.decode("utf-8", errors="replace").split()

    def felt_faults(self, stack: str) -> set[str]:
        """Fabric faults the stack honours, from ``<root>/<stack>/xapid-faults`` (empty when absent)."""
        return self._words(stack, "xapid-faults")

    def needed_hardware(self, stack: str) -> set[str]:
        """Emulated hardware the stack needs, from ``<root>/<stack>/xapid-hardware`` (empty when absent)."""
        return self._words(stack, "xapid-hardware")

    def _words(self, stack: str, name: str) -> set[str]:
        """The words of the stack's file ``name``: a regular file inside the root, else none."""
        try:
            path = (self.stack_dir(stack) / name).resolve(strict=True)
            if not path.is_relative_to(self.root.resolve()) or not stat.S_ISREG(path.stat().st_mode):
                return set()
            with path.open("rb") as handle:
                return set(handle.read(_SUPPORTED_SRS_CAP).decode("utf-8", errors="replace").split())
        except (OSError, RuntimeError, ApiError):
            return set()

    def _script_path(self, stack: str, script: str) -> tuple[Path, Path]:
        """(stack folder, resolved script path) after every check of ``run``; raises otherwise."""
        if script not in SCRIPTS:
            raise internal(f"{script!r} is not a cluster-stack script")
        directory = self.stack_dir(stack)
        where = f"cluster stack script {stack}/{script}"
        try:
            path = (directory / script).resolve(strict=True)
            mode = path.stat().st_mode
        except (OSError, RuntimeError):
            raise internal(f"{where} does not exist") from None
        if not self._inside(directory, path):
            raise internal(f"{where} resolves outside the cluster-stack root {self.root.resolve()} (to {path})")
        if not stat.S_ISREG(mode):
            raise internal(f"{where} is not a regular file")
        if not mode & 0o111 or not os.access(path, os.X_OK):
            raise internal(f"{where} is not executable")
        return directory, path

    def run(
        self,
        stack: str,
        script: str,
        host_uuid: str,
        xhad_conf: Path,
        args: Sequence[str] = (),
        timeout: float | None = None,
    ) -> ScriptResult:
        """Run ``<root>/<stack>/<script> args...`` for ``host_uuid`` and return its result.

        Environment is exactly PATH (the daemon's plus the stack folder), XHAD_CONF,
        XAPI_HOST_UUID, XAPID_HOST_DIR, (with a state dir) XAPID_POOL_DIR and XAPID_HW_DIR, and
        what the emulated hardware the stack asks for adds (``XAPID_NETNS`` or ``XAPID_NETNS_ERROR``),
        and XAPID_FORKSERVER (the socket of the stack's ``xapid-forkserver``, when it ships one);
        cwd is the stack folder; stdin is /dev/null.  Exit 0 gives a
        ScriptResult; an MTC code raises ScriptError; anything else (unknown code, death by
        signal, timeout, missing/non-executable/escaping script) raises INTERNAL_ERROR, and an
        invalid or missing stack UNKNOWN_CLUSTER_STACK.
        """
        argv = tuple(str(a) for a in args)
        fields = {"stack": stack, "script": script, "host": host_uuid, "args": argv}
        try:
            directory, path = self._script_path(stack, script)
        except ApiError as exc:
            log.info("ha_script", **fields, exit_code=None, duration=0.0, refused=exc.description)
            raise
        if timeout is None:
            timeout = self.start_timeout if script == "ha_start_daemon" else self.timeout
        base_path = os.environ.get("PATH", os.defpath)
        env = {
            "PATH": f"{base_path}{os.pathsep}{directory}" if base_path else str(directory),
            "XHAD_CONF": str(xhad_conf),
            "XAPI_HOST_UUID": host_uuid,
            # The host folder also marks the host's processes for the emulated hardware (xapid/hw).
            "XAPID_HOST_DIR": str(Path(xhad_conf).parent),
        }
        if self.state_dir is not None:
            pool_dir = self.state_dir / "pool" / stack
            pool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            env["XAPID_POOL_DIR"] = str(pool_dir)
            env["XAPID_HW_DIR"] = str(self.state_dir / "hw")
        server = self._fork_server(stack, directory, base_path)
        if server is not None:
            env["XAPID_FORKSERVER"] = server
        if self.hardware is not None:
            for need in sorted(self.needed_hardware(stack)):
                # Only a start makes hardware; the other scripts learn what exists.
                env.update(self.hardware(need, host_uuid, script == "ha_start_daemon"))
        where = f"{stack}/{script} on host {host_uuid}"
        with self._host_lock(host_uuid):
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [str(path), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=directory,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                duration = round(time.monotonic() - started, 3)
                log.info("ha_script", **fields, exit_code=None, duration=duration, error=str(exc))
                raise internal(f"Cannot run cluster stack script {where}: {exc}") from None
            marker = self._mark_running(proc.pid, host_uuid)
            with self._locks_guard:
                self._procs[host_uuid] = proc
            try:
                stdout, stderr, timed_out = self._communicate(proc, started + timeout)
            finally:
                with self._locks_guard:
                    self._procs.pop(host_uuid, None)
                if marker is not None:
                    _release_marker(marker)
            duration = time.monotonic() - started
        code = proc.returncode
        log.info("ha_script", **fields, exit_code=code, duration=round(duration, 3), timed_out=timed_out)
        if stderr.data or stderr.dropped:
            log.warning("ha_script_stderr", **fields, stderr=stderr.text(), stderr_dropped=stderr.dropped)
        if stdout.dropped:
            log.warning("ha_script_stdout_truncated", **fields, kept=len(stdout.data), dropped=stdout.dropped)
        if timed_out:
            raise internal(f"Cluster stack script {where} timed out after {timeout:g} seconds; killed")
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise internal(f"Cluster stack script {where} was killed by {name}")
        if code == 0:
            return ScriptResult(
                stack, script, host_uuid, argv, 0, stdout.text(), duration, bool(stdout.dropped)
            )
        if code in MTC_CODES:
            raise ScriptError(stack, script, host_uuid, code, stdout.text())
        raise internal(f"Unrecognised MTC exit code {code} from {stack}/{script} on host {host_uuid}")

    def _fork_server(self, stack: str, directory: Path, base_path: str) -> str | None:
        """The path of the stack's fork server, started now if needed; None if the stack has none.

        The server runs in a session of its own with nothing but PATH in its environment, cwd the
        stack folder; it must print ``ready`` within FORKSERVER_READY_TIMEOUT.  One that fails to
        start is not tried again (the scripts then run without it, as they must be able to).
        """
        if self.running_dir is None:
            return None
        with self._servers_lock:
            if self._closed:
                return None
            if stack in self._servers:
                known = self._servers[stack]
                if known is None:
                    return None
                if known[0].poll() is None:
                    return known[1]
                log.warning("cluster-stack fork server exited; starting another", stack=stack,
                            exit_code=known[0].returncode)
                self._forget_server(stack)
            try:
                path = (directory / FORKSERVER).resolve(strict=True)
                mode = path.stat().st_mode
            except (OSError, RuntimeError):
                return None
            if not self._inside(directory, path) or not stat.S_ISREG(mode) or not os.access(path, os.X_OK):
                return None
            started = self._start_server(stack, directory, path, base_path)
            self._servers[stack] = started
            return started[1] if started is not None else None

    def _start_server(
        self, stack: str, directory: Path, path: Path, base_path: str
    ) -> tuple[subprocess.Popen[bytes], str, Path | None] | None:
        assert self.state_dir is not None
        folder = self.state_dir / "run" / "forkservers"
        sock = str(folder / f"{stack}.server")
        env = {"PATH": f"{base_path}{os.pathsep}{directory}" if base_path else str(directory)}
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(folder / f"{stack}.log", "ab") as err:
                proc = subprocess.Popen(
                    [str(path), sock], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                    cwd=directory, env=env, start_new_session=True, close_fds=True,
                )
        except OSError as exc:
            log.warning("cannot start the cluster-stack fork server", stack=stack, error=str(exc))
            return None
        marker = self._mark_running(proc.pid)
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + FORKSERVER_READY_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n") and len(line) < 64:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    break
                chunk = os.read(proc.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        proc.stdout.close()
        if line.strip() != b"ready":
            log.warning("cluster-stack fork server did not start; scripts run without it", stack=stack,
                        said=line.decode(errors="replace"))
            self._end_server(proc, sock, marker, grace=0.0)
            return None
        log.info("cluster-stack fork server started", stack=stack, pid=proc.pid)
        return proc, sock, marker

    def _forget_server(self, stack: str) -> None:
        known = self._servers.pop(stack, None)
        if known is not None:
            self._end_server(*known, grace=0.0)

    @staticmethod
    def _end_server(proc: subprocess.Popen[bytes], path: str, marker: Path | None, grace: float) -> None:
        """SIGTERM (when ``grace``) then SIGKILL the server's process group; always reaped, and its
        ``path`` removed."""
        if proc.poll() is None and grace > 0:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        _remove_tree(Path(path))  # what the server made there goes with it, even after a SIGKILL
        if marker is not None:
            marker.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the fork servers this runner started (scripts started later run without one).

        Heartbeat daemons they forked live in sessions of their own and are not touched.
        """
        with self._servers_lock:
            self._closed = True
            servers = [s for s in self._servers.values() if s is not None]
            self._servers.clear()
        for proc, path, marker in servers:
            self._end_server(proc, path, marker, grace=FORKSERVER_STOP_GRACE)

    def _mark_running(self, pid: int, host_uuid: str | None = None) -> Path | None:
        """Record ``pid`` as running (for :meth:`reap_orphans`); the marker, or None if not recorded.

        A script for a host goes to that host's one marker, ``host-<uuid>``, rewritten in place (a
        host runs one script at a time, its lock): a 64-host enable and disable would otherwise
        create and delete some 200 files, and on a file system without a journal every creation
        searches past the recently deleted inodes.  Anything else (a fork server) is named by pid.
        """
        if self.running_dir is None:
            return None
        start = _start_time(pid)
        if start is None:
            return None
        if host_uuid is not None and _MARKER_NAME.fullmatch(host_uuid):
            marker, data = self.running_dir / f"{HOST_MARKER_PREFIX}{host_uuid}", f"{pid} {start}\n"
        else:
            marker, data = self.running_dir / str(pid), start
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(marker, flags, 0o600)
            except FileNotFoundError:
                self.running_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(marker, flags, 0o600)
            try:
                os.pwrite(fd, data.encode(), 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot record a running script", pid=pid, error=str(exc))
            return None
        return marker

    def reap_orphans(self) -> list[int]:
        """Kill the scripts a previous run of the daemon left running (their whole process group).

        A daemon killed while a script ran leaves that script behind; it could still act later (start
        a heartbeat, write a pool state) behind the back of the new run.  Daemons the scripts started
        in sessions of their own are not touched.  Returns the pids killed.
        """
        if self.running_dir is None or not self.running_dir.is_dir():
            return []
        killed = []
        for marker in self.running_dir.iterdir():
            try:
                if marker.name.startswith(HOST_MARKER_PREFIX):
                    words = marker.read_text().split()
                    if not words:
                        continue  # nothing ran for this host when the daemon stopped
                    pid, recorded = int(words[0]), words[1]
                else:
                    pid, recorded = int(marker.name), marker.read_text()
            except (ValueError, IndexError, OSError):
                marker.unlink(missing_ok=True)
                continue
            if _start_time(pid) == recorded:
                try:
                    os.killpg(pid, signal.SIGKILL)
                    killed.append(pid)
                except (ProcessLookupError, PermissionError):
                    pass
            marker.unlink(missing_ok=True)
        if killed:
            log.warning("killed cluster-stack scripts a previous run left behind", pids=killed)
        servers = self.running_dir.parent / "forkservers"
        with self._servers_lock:
            mine = {Path(s[1]) for s in self._servers.values() if s is not None}
        if servers.is_dir():
            for path in servers.iterdir():
                if path.suffix == ".server" and path not in mine:  # the fork servers killed above
                    _remove_tree(path)
        return killed

    def _communicate(
        self, proc: subprocess.Popen[bytes], deadline: float
    ) -> tuple[_Captured, _Captured, bool]:
        """Drain both pipes until they close, or the child exited and EXIT_GRACE passed, or the
        deadline; on the deadline kill the child's process group.  Returns (stdout, stderr,
        timed_out); the child is always reaped."""
        out = _Captured(bytearray(), self.stdout_cap)
        err = _Captured(bytearray(), STDERR_CAP)
        assert proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        # The child's exit wakes the selector through a pidfd, so a run costs no polling wake-ups
        # (64 hosts' scripts run at once during an enable); without one, poll every 50 ms.
        pidfd = _pidfd(proc.pid)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, None)
        pipes = 2
        exited_at: float | None = None
        timed_out = False
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and pidfd is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and (not pipes or now - exited_at >= EXIT_GRACE):
                    break
                if exited_at is None and now >= deadline:
                    timed_out = True
                    break
                wait = (deadline if exited_at is None else exited_at + EXIT_GRACE) - now
                if pidfd is None:
                    wait = min(wait, 0.05)
                if not pipes and pidfd is None:
                    try:
                        proc.wait(timeout=max(wait, 0.0))
                    except subprocess.TimeoutExpired:
                        pass
                    continue
                for key, _ in sel.select(timeout=max(wait, 0.0)):
                    if key.data is None:  # the pidfd: the child has exited
                        sel.unregister(key.fileobj)
                        proc.poll()
                        exited_at = time.monotonic()
                        continue
                    chunk = os.read(key.fd, _READ_CHUNK)
                    if chunk:
                        key.data.add(chunk)
                    else:
                        sel.unregister(key.fileobj)
                        pipes -= 1
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            # Only while the child is unreaped is its pid (= process group id) safe from reuse.
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                timed_out = True
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return out, err, timed_out

    def query_liveset(
        self, stack: str, host_uuid: str, xhad_conf: Path, timeout: float | None = None
    ) -> liveset.Liveset:
        """Run ``ha_query_liveset`` and parse its output strictly (INTERNAL_ERROR if malformed).

        Exit 14 (daemon not running) arrives as ScriptError with ``exit_code == 14``.
        """
        result = self.run(stack, "ha_query_liveset", host_uuid, xhad_conf, timeout=timeout)
        try:
            return liveset.parse(result.stdout)
        except ApiError as exc:  # name the culprit, as for every other script failure
            detail = exc.params[0] if exc.params else exc.code
            raise internal(f"Cluster stack script {stack}/ha_query_liveset on host {host_uuid} "
                           f"printed a malformed liveset: {detail}") from None

    def propose_master(
        self, stack: str, host_uuid: str, xhad_conf: Path, timeout: float | None = None
    ) -> bool:
        """Run ``ha_propose_master``; True iff it printed ``TRUE`` (trailing whitespace ignored).

        A non-zero MTC exit means "not accepted" and gives False; other failures propagate.
        """
        try:
            result = self.run(stack, "ha_propose_master", host_uuid, xhad_conf, timeout=timeout)
        except ScriptError as exc:
            log.info("ha_propose_master_refused", stack=stack, host=host_uuid, exit_code=exc.exit_code)
            return False
        return result.stdout.rstrip() == "TRUE"


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _release_marker(marker: Path) -> None:
    """The recorded process ended: a host's marker is emptied (kept for its next script), any
    other removed."""
    if not marker.name.startswith(HOST_MARKER_PREFIX):
        marker.unlink(missing_ok=True)
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        marker.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` (a file, or a folder and its files); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
