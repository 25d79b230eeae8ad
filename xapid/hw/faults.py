"""``xapid fault``: break a running emulated pool on purpose, and the one client for it.

The daemon serves :class:`FaultService` at ``POST /xapid/fault`` on its local Unix socket
only (root: whoever can open the socket).  The request is JSON
``{"verb": ..., "hosts": [...], "groups": [[...], ...], "seconds": S}``; the answer is JSON
``{"ok": bool, "lines": [...], "error": "..."}``.  :class:`FaultClient` speaks it, for the
command line and for tests alike.

Verbs: crash, hang, thaw, partition, heal, statefile-loss, statefile-restore, boot, status, and for
one host's toolstack (xapid/hw/toolstack.py) xapi-hang, xapi-fail, xapi-crash (``"persistent": true``
to survive xapi restarts), xapi-heal and xapi-restart.  HOST is a host uuid or name-label.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xapid import unixsock

if TYPE_CHECKING:
    from xapid.daemon import Daemon

PATH = "/xapid/fault"
XAPI_VERBS = ("xapi-hang", "xapi-fail", "xapi-crash", "xapi-heal", "xapi-restart")
VERBS = ("crash", "hang", "thaw", "partition", "heal", "statefile-loss", "statefile-restore", "boot", "status",
         *XAPI_VERBS)
# Faults a cluster stack feels only if it reads the fabric file; it says so in its `xapid-faults` file.
FABRIC_FAULTS = {"partition": "network partitions", "statefile-loss": "loss of the heartbeat SR",
                 "statefile-restore": "loss of the heartbeat SR"}


FaultListener = Callable[[dict[str, Any], list[str], float], None]


class FaultError(Exception):
    """A fault request that cannot be carried out; the message says why (exit status 2)."""


class FaultService:
    """Carries out fault requests against ``daemon.hw``."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._listeners: list[FaultListener] = []

    def on_fault(self, listener: FaultListener) -> None:
        """Call ``listener(request, lines, started)`` after every fault carried out (not ``status``).

        ``started`` is the wall-clock time the fault began: the power changes it caused come after it.
        """
        self._listeners.append(listener)

    def handle(self, body: bytes) -> dict[str, Any]:
        """Answer one request body; never raises."""
        try:
            request = json.loads(body.decode("utf-8"))
            if not isinstance(request, dict):
                raise FaultError("the request must be a JSON object")
            started = time.time()
            lines = self.apply(request)
            if request.get("verb") != "status":
                for listener in self._listeners:
                    listener(request, lines, started)
            return {"ok": True, "lines": lines}
        except FaultError as e:
            return {"ok": False, "error": str(e)}
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed request: {e}"}

    # -- hosts ------------------------------------------------------------------------------------

    def _hosts(self) -> list[tuple[str, dict[str, Any]]]:
        return self.daemon.store.items("host")

    def resolve(self, names: list[Any]) -> list[str]:
        """Host uuids for uuids or name-labels; FaultError naming the first unknown or ambiguous one."""
        hosts = self._hosts()
        out: list[str] = []
        for name in names:
            if not isinstance(name, str):
                raise FaultError(f"a host must be a uuid or name-label, got {name!r}")
            matches = [h["uuid"] for _r, h in hosts if name in (h["uuid"], h["name_label"])]
            if not matches:
                raise FaultError(f"unknown host {name!r}")
            if len(matches) > 1:
                raise FaultError(f"host name {name!r} is ambiguous: use a uuid ({', '.join(matches)})")
            if matches[0] not in out:
                out.append(matches[0])
        return out

    def _all_or(self, names: list[Any]) -> list[str]:
        if names == ["all"]:
            return [h["uuid"] for _r, h in self._hosts()]
        return self.resolve(names)

    def _check_felt(self, verb: str) -> None:
        pool = self.daemon.store.get("pool", self.daemon.pool_ref()) or {}
        if not pool.get("ha_enabled"):
            return
        stack = str(pool.get("ha_cluster_stack") or "")
        felt = self.daemon.ha.runner.felt_faults(stack)
        if verb not in felt:
            raise FaultError(f"the active cluster stack {stack!r} cannot feel {FABRIC_FAULTS[verb]} "
                             f"(its folder has no xapid-faults file listing {verb!r})")

    def _heartbeat_sr_folders(self) -> list[str]:
        store = self.daemon.store
        pool = store.get("pool", self.daemon.pool_ref()) or {}
        folders = []
        for vdi in pool.get("ha_statefiles", []):
            rec = store.get("VDI", vdi)
            sr = store.get("SR", rec["SR"]) if rec else None
            if sr is not None:
                folder = str(self.daemon.disks.sr_dir(sr["uuid"]))
                if folder not in folders:
                    folders.append(folder)
        if not folders:
            raise FaultError("HA is not enabled: there is no heartbeat SR to lose")
        return folders

    # -- verbs ------------------------------------------------------------------------------------

    def apply(self, request: dict[str, Any]) -> list[str]:
        verb = request.get("verb")
        hosts = request.get("hosts", [])
        if not isinstance(hosts, list):
            raise FaultError("hosts must be a list")
        hw = self.daemon.hw
        if verb == "status":
            return self.status()
        if verb == "heal":
            hw.fabric.heal()
            return ["network healed: every host sees every other"]
        if verb == "partition":
            self._check_felt("partition")
            groups = request.get("groups")
            if not isinstance(groups, list) or not groups or not all(isinstance(g, list) and g for g in groups):
                raise FaultError("partition needs at least one non-empty group of hosts")
            resolved = [self.resolve(g) for g in groups]
            seen: set[str] = set()
            for group in resolved:
                if seen & set(group):
                    raise FaultError("a host may appear in only one group")
                seen |= set(group)
            everyone = [h["uuid"] for _r, h in self._hosts()]
            hw.fabric.partition(resolved, everyone)
            return [f"network partitioned: {' | '.join(hw.fabric.group(u) + ':' + self._name(u) for u in everyone)}"]
        if verb not in VERBS:
            raise FaultError(f"unknown fault {verb!r}; one of: {', '.join(VERBS)}")
        if not hosts:
            raise FaultError(f"{verb} needs at least one HOST")
        if verb in ("statefile-loss", "statefile-restore"):
            self._check_felt(verb)
            uuids = self._all_or(hosts)
            folders = self._heartbeat_sr_folders()
            if verb == "statefile-loss":
                hw.fabric.block_storage(uuids, folders)
            else:
                hw.fabric.restore_storage(uuids, folders)
            return [f"{self._name(u)}: heartbeat SR {'unreachable' if verb == 'statefile-loss' else 'reachable'}"
                    for u in uuids]
        uuids = self.resolve(hosts)
        if verb in XAPI_VERBS:
            return self._toolstack(verb, uuids, request.get("persistent", False))
        lines = []
        for uuid in uuids:
            before = hw.power(uuid)
            if verb == "crash":
                hw.crash(uuid, "xapid fault crash")
            elif verb == "hang":
                seconds = request.get("seconds")
                if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
                    raise FaultError("--seconds must be a positive number")
                hw.hang(uuid, float(seconds) if seconds is not None else None)
            elif verb == "thaw":
                hw.thaw(uuid)
            elif verb == "boot":
                hw.boot(uuid)
            lines.append(f"{self._name(uuid)}: {before} -> {hw.power(uuid)}")
        return lines

    def _toolstack(self, verb: str, uuids: list[str], persistent: object) -> list[str]:
        """The xapi-* verbs: break, heal or restart the hosts' xapi (their hardware is left alone)."""
        if not isinstance(persistent, bool):
            raise FaultError("persistent must be true or false")
        if persistent and verb not in ("xapi-hang", "xapi-fail", "xapi-crash"):
            raise FaultError(f"--persistent applies to xapi-hang, xapi-fail and xapi-crash, not {verb}")
        hw = self.daemon.hw
        toolstack = hw.toolstack
        for uuid in uuids:
            if verb != "xapi-heal" and not hw.is_running(uuid):
                raise FaultError(f"{self._name(uuid)} is {hw.power(uuid)}: its xapi does not run")
        lines = []
        for uuid in uuids:
            before = toolstack.describe(uuid)
            if verb == "xapi-heal":
                toolstack.heal(uuid)
            elif verb == "xapi-restart":
                toolstack.restart(uuid, "xapid fault xapi-restart")
            else:
                toolstack.inject(uuid, verb.removeprefix("xapi-"), persistent)
            lines.append(f"{self._name(uuid)}: xapi {before} -> {toolstack.describe(uuid)}")
        return lines

    def _name(self, uuid: str) -> str:
        ref = self.daemon.store.by_uuid("host", uuid)
        rec = self.daemon.store.get("host", ref) if ref else None
        return str(rec["name_label"]) if rec else uuid

    def host_status(self) -> list[dict[str, Any]]:
        """Per host: uuid, name, power, network group, statefile (ok/lost), armed, live as the pool sees it,
        its xapi (ok, restarting, or its fault) and how many times that xapi was restarted."""
        hw = self.daemon.hw
        folders: list[str] = []
        try:
            folders = self._heartbeat_sr_folders()
        except FaultError:
            pass
        out = []
        for _ref, h in self._hosts():
            uuid = h["uuid"]
            metrics = self.daemon.store.get("host_metrics", h["metrics"])
            blocked = set(hw.fabric.blocked(uuid))
            out.append({"uuid": uuid, "name": h["name_label"], "power": hw.power(uuid),
                        "network": hw.fabric.group(uuid),
                        "statefile": "lost" if folders and blocked & set(folders) else "ok",
                        "armed": bool(self.daemon.ha.local.get(uuid, "ha.armed", False)),
                        "live": bool(metrics and metrics["live"]),
                        "xapi": hw.toolstack.describe(uuid), "xapi_restarts": hw.toolstack.restarts(uuid)})
        return out

    def status(self) -> list[str]:
        """One line per host: power, network group, statefile access, armed, live as the pool sees it, xapi."""
        return [f"{h['name']} {h['uuid']} power={h['power']} network={h['network']} statefile={h['statefile']} "
                f"armed={str(h['armed']).lower()} live={str(h['live']).lower()} xapi={h['xapi']} "
                f"xapi-restarts={h['xapi_restarts']}" for h in self.host_status()]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            unixsock.connect(sock, self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class FaultClient:
    """Talks to the daemon whose state dir is ``state_dir`` over its local socket."""

    def __init__(self, state_dir: Path | str, socket_path: Path | str | None = None, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path or Path(state_dir) / "xapi.sock")
        self.timeout = timeout

    def request(self, verb: str, hosts: list[str] | None = None, **extra: Any) -> list[str]:
        """Carry out one fault; the output lines, or FaultError with the daemon's reason."""
        body = json.dumps({"verb": verb, "hosts": hosts or [], **extra}).encode()
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("POST", PATH, body, {"content-type": "application/json"})
            answer = conn.getresponse().read()
        except FileNotFoundError:
            raise FaultError(f"xapid is not running (no socket at {self.socket_path})") from None
        except ConnectionRefusedError:
            raise FaultError(f"xapid is not running (nothing listens on {self.socket_path})") from None
        except PermissionError:
            raise FaultError(
                f"permission denied on {self.socket_path}: xapid fault must run as the daemon's user") from None
        except OSError as e:
            raise FaultError(f"cannot reach xapid at {self.socket_path}: {e}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(answer)
        except ValueError:
            raise FaultError(f"unexpected answer from xapid: {answer[:200]!r}") from None
        if not doc.get("ok"):
            raise FaultError(str(doc.get("error", "unknown error")))
        return [str(line) for line in doc.get("lines", [])]

    def crash(self, *hosts: str) -> list[str]:
        return self.request("crash", list(hosts))

    def hang(self, *hosts: str, seconds: float | None = None) -> list[str]:
        return self.request("hang", list(hosts), **({"seconds": seconds} if seconds is not None else {}))

    def thaw(self, *hosts: str) -> list[str]:
        return self.request("thaw", list(hosts))

    def boot(self, *hosts: str) -> list[str]:
        return self.request("boot", list(hosts))

    def partition(self, *groups: list[str]) -> list[str]:
        return self.request("partition", [], groups=[list(g) for g in groups])

    def heal(self) -> list[str]:
        return self.request("heal")

    def statefile_loss(self, *hosts: str) -> list[str]:
        return self.request("statefile-loss", list(hosts))

    def statefile_restore(self, *hosts: str) -> list[str]:
        return self.request("statefile-restore", list(hosts))

    def status(self) -> list[str]:
        return self.request("status")

    def xapi_hang(self, *hosts: str, persistent: bool = False) -> list[str]:
        return self.request("xapi-hang", list(hosts), persistent=persistent)

    def xapi_fail(self, *hosts: str, persistent: bool = False) -> list[str]:
        return self.request("xapi-fail", list(hosts), persistent=persistent)

    def xapi_crash(self, *hosts: str, persistent: bool = False) -> list[str]:
        return self.request("xapi-crash", list(hosts), persistent=persistent)

    def xapi_heal(self, *hosts: str) -> list[str]:
        return self.request("xapi-heal", list(hosts))

    def xapi_restart(self, *hosts: str) -> list[str]:
        return self.request("xapi-restart", list(hosts))


def main(argv: list[str]) -> int:
    """``xapid fault --state-dir DIR VERB [HOST...] [-- HOST...] [--seconds S] [--persistent] [--socket PATH]``."""
    import sys

    args = list(argv)
    state_dir = "./var"
    socket_path = None
    seconds: float | None = None
    persistent = False
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--state-dir", "--socket", "--seconds") and i + 1 < len(args):
            value = args[i + 1]
            if a == "--state-dir":
                state_dir = value
            elif a == "--socket":
                socket_path = value
            else:
                try:
                    seconds = float(value)
                except ValueError:
                    print(f"xapid fault: --seconds needs a number, got {value!r}", file=sys.stderr)
                    return 2
            i += 2
            continue
        if a.startswith("--state-dir="):
            state_dir = a.split("=", 1)[1]
        elif a == "--persistent":
            persistent = True
        elif a in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            rest.append(a)
        i += 1
    if not rest:
        print(USAGE, file=sys.stderr)
        return 2
    verb, operands = rest[0], rest[1:]
    client = FaultClient(state_dir, socket_path)
    try:
        if verb == "partition":
            groups: list[list[str]] = [[]]
            for word in operands:
                if word == "--":
                    groups.append([])
                else:
                    groups[-1].append(word)
            lines = client.request("partition", [], groups=[g for g in groups if g] or [[]])
        elif verb == "hang" and seconds is not None:
            lines = client.hang(*operands, seconds=seconds)
        elif persistent:
            lines = client.request(verb, operands, persistent=True)
        else:
            lines = client.request(verb, operands)
    except FaultError as e:
        print(f"xapid fault: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


USAGE = """usage: xapid fault --state-dir DIR VERB [HOST...]
  crash HOST...                      power cut: the host stops at once, until boot
  hang HOST... [--seconds S]         freeze the host (processes stopped) for S seconds or until thaw
  thaw HOST...                       let a hung host run again
  partition HOST... -- HOST... [-- HOST...]
                                     split the heartbeat network into these groups (the rest form one more)
  heal                               join the network again
  statefile-loss HOST...|all         the hosts lose access to the heartbeat SR
  statefile-restore HOST...|all      ... and get it back
  boot HOST...                       power on a crashed or fenced host (xapi start-up runs on it)
  status                             one line per host: power, network group, statefile, armed, live,
                                     xapi (ok / restarting / its fault), xapi restarts so far
  xapi-hang HOST... [--persistent]   the host's xapi accepts connections at its address, answers nothing
  xapi-fail HOST... [--persistent]   the host's host.ha_xapi_healthcheck answers false
  xapi-crash HOST... [--persistent]  the host's xapi dies: its address refuses connections, its sessions end
  xapi-heal HOST...                  end the host's xapi fault (a crashed xapi starts again)
  xapi-restart HOST...               restart the host's xapi, as xhad does (clears a fault unless --persistent)
HOST is a host uuid or name-label. Exit status 0 when done, 2 with a message otherwise."""
