"""The emulated hardware beneath HA: each host's power, its watchdog, the heartbeat network.

HA (``xapid/ha``) decides and this layer obeys: it never reads the pool database's HA
fields.  What a host's "hardware" does is what a real host's would: a power cut kills
everything the host runs, a hang freezes it, a watchdog that is not petted resets it, and a
boot runs xapi's start-up on it (through the callback the daemon registers).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from xapid import statefiles
from xapid.hw.fabric import Fabric
from xapid.hw.netns import ClusterNetwork, NetnsError
from xapid.hw.processes import kill_all, signal_all
from xapid.hw.watchdog import Watchdogs

log = structlog.get_logger("xapid.hw")

POWER_STATES = ("on", "off", "fenced", "hung")
PowerListener = Callable[[str, str, str], None]


class Hardware:
    """The machines of one emulated pool, keyed by host uuid.

    Power states persist in ``<state>/hw/power.json``: a host that was off stays off across a
    daemon restart (a hung host comes back running: its processes did not survive the restart).
    """

    def __init__(self, state_dir: Path, reboot_delay: float) -> None:
        self.dir = state_dir / "hw"
        self.hosts_dir = state_dir / "hosts"
        statefiles.make_dirs(self.dir)
        self.reboot_delay = reboot_delay
        self.fabric = Fabric(self.dir / "fabric.json")
        # The hosts' cluster network (namespaces), made on demand for stacks that need one.
        self.netns = ClusterNetwork(state_dir, self.dir)
        self.fabric.on_change(self.netns.apply)
        self._path = self.dir / "power.json"
        self._lock = threading.RLock()
        self._state: dict[str, dict[str, object]] = self._load()
        self._listeners: list[PowerListener] = []
        self._startup: Callable[[str], None] | None = None
        self._timers: dict[str, threading.Timer] = {}
        self._stopping = False
        self.watchdogs = Watchdogs(self.fence)

    # -- persistence ------------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = statefiles.read_bytes(self._path)
            if data is None:
                return {}
            doc = json.loads(data)
            state = {str(k): dict(v) for k, v in doc.items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError):
            return {}
        for entry in state.values():
            if entry.get("power") not in POWER_STATES or entry.get("power") == "hung":
                entry["power"] = "on"
        return state

    def _save(self) -> None:
        statefiles.write_atomic(self._path, json.dumps(self._state, indent=1, sort_keys=True).encode(), mode=0o600)

    # -- life cycle -------------------------------------------------------------------------------

    def attach(self, uuids: list[str]) -> None:
        """Give every host its folder and watchdog; hosts never seen before are powered on."""
        with self._lock:
            for uuid in uuids:
                self._state.setdefault(uuid, {"power": "on", "clean": True, "reason": ""})
                self.watchdogs.add(uuid, self.host_dir(uuid))
            self._save()

    def detach(self, uuid: str) -> None:
        """The machine leaves the pool (``host.destroy``): whatever it runs is killed and it is
        forgotten with its folder, its watchdog and its power state."""
        with self._lock:
            timer = self._timers.pop(uuid, None)
            self._state.pop(uuid, None)
            self._save()
        if timer is not None:
            timer.cancel()
        self.watchdogs.remove(uuid)
        kill_all(self.host_dir(uuid))
        shutil.rmtree(self.host_dir(uuid), ignore_errors=True)

    def start(self) -> None:
        self.netns.reclaim()
        self.watchdogs.start()

    def prepare_stop(self) -> None:
        """Before the daemon stops its hosts' software: no more timers or reboots; hung hosts run again."""
        with self._lock:
            self._stopping = True
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            hung = [uuid for uuid, entry in self._state.items() if entry["power"] == "hung"]
        for uuid in hung:
            signal_all(self.host_dir(uuid), signal.SIGCONT)

    def stop(self) -> None:
        """Stop the watchdog thread and kill whatever process a host still runs (nothing is left behind)."""
        self.prepare_stop()
        self.watchdogs.stop()
        with self._lock:
            uuids = list(self._state)
        for uuid in uuids:
            left = self.end_processes(uuid)
            if left:
                log.warning("killed processes a host still ran at daemon stop", host=uuid, processes=left)
        self.netns.teardown()

    # -- the cluster network --------------------------------------------------------------------------

    def cluster_network(self, uuid: str, create: bool) -> dict[str, str]:
        """What a stack needing namespaces learns about host ``uuid``: ``XAPID_NETNS`` (its namespace),
        or ``XAPID_NETNS_ERROR`` (why there is none).  ``create`` makes the network for every host first.
        """
        if create:
            with self._lock:
                uuids = list(self._state)
            try:
                self.netns.ensure(uuids, dict(self.fabric.network))
            except NetnsError as exc:
                return {"XAPID_NETNS_ERROR": str(exc)}
        name = self.netns.host_netns(uuid)
        if name is None:
            return {"XAPID_NETNS_ERROR": "the cluster network does not exist (ha_start_daemon makes it)"}
        return {"XAPID_NETNS": name}

    def release_cluster_network(self) -> None:
        """Nothing needs the cluster network any more: kill what runs in it and delete it."""
        self.netns.teardown()

    def on_power_change(self, listener: PowerListener) -> None:
        """Call ``listener(uuid, old, new)`` after every power change (in the changing thread)."""
        self._listeners.append(listener)

    def on_boot(self, startup: Callable[[str], None]) -> None:
        """Register xapi's start-up for a host, run (in its own thread) after every boot."""
        self._startup = startup

    # -- queries ----------------------------------------------------------------------------------

    def host_dir(self, uuid: str) -> Path:
        return self.hosts_dir / uuid

    def power(self, uuid: str) -> str:
        """``on``, ``off``, ``fenced`` or ``hung``."""
        with self._lock:
            return str(self._state.get(uuid, {}).get("power", "on"))

    def is_running(self, uuid: str) -> bool:
        """Whether the host's software runs (powered on and not frozen)."""
        return self.power(uuid) == "on"

    def last_stop(self, uuid: str) -> tuple[bool, str]:
        """(clean, reason) of the host's last power-off, fence or crash."""
        with self._lock:
            entry = self._state.get(uuid, {})
            return bool(entry.get("clean", True)), str(entry.get("reason", ""))

    # -- changes ----------------------------------------------------------------------------------

    def _set(self, uuid: str, power: str, reason: str, clean: bool | None = None) -> str:
        with self._lock:
            entry = self._state.setdefault(uuid, {"power": "on", "clean": True, "reason": ""})
            old = str(entry["power"])
            entry["power"] = power
            if clean is not None:
                entry.update(clean=clean, reason=reason)
            self._save()
            timer = self._timers.pop(uuid, None)
        if timer is not None:
            timer.cancel()
        if old != power:
            log.warning("host power", host=uuid, power=power, was=old, reason=reason)
            for listener in self._listeners:
                try:
                    listener(uuid, old, power)
                except Exception:  # noqa: BLE001 - one listener must not stop the others
                    log.exception("power listener failed", host=uuid)
        return old

    def end_processes(self, uuid: str) -> int:
        """Kill whatever the host still runs, without changing its power state; how many processes."""
        return kill_all(self.host_dir(uuid))

    def crash(self, uuid: str, reason: str = "power cut") -> None:
        """Cut the power: every process of the host dies at once; it stays off until :meth:`boot`."""
        self.watchdogs.disarm(uuid)
        killed = kill_all(self.host_dir(uuid))
        log.warning("host crashed", host=uuid, reason=reason, processes_killed=killed)
        self._set(uuid, "off", reason, clean=False)

    def fence(self, uuid: str, reason: str) -> None:
        """Reset the host as its watchdog would; it boots again after the reboot delay (0 = stays off)."""
        if self.power(uuid) in ("off", "fenced"):
            return
        self.watchdogs.disarm(uuid)
        killed = kill_all(self.host_dir(uuid))
        log.warning("host fenced", host=uuid, reason=reason, processes_killed=killed)
        self._set(uuid, "fenced", reason, clean=False)
        if self.reboot_delay > 0:
            self._later(uuid, self.reboot_delay, self.boot)

    def power_off(self, uuid: str, reason: str) -> None:
        """A clean power-off (after xapi's shutdown steps): the host's processes end; it stays off."""
        self.watchdogs.disarm(uuid)
        kill_all(self.host_dir(uuid))
        self._set(uuid, "off", reason, clean=True)

    def hang(self, uuid: str, seconds: float | None = None) -> None:
        """Freeze the host: its processes are stopped (not killed) until :meth:`thaw` or ``seconds`` pass."""
        if self.power(uuid) != "on":
            return
        stopped = signal_all(self.host_dir(uuid), signal.SIGSTOP)
        log.warning("host hung", host=uuid, processes_stopped=stopped, seconds=seconds)
        self._set(uuid, "hung", "hang")
        if seconds is not None and seconds > 0:
            self._later(uuid, seconds, self.thaw)

    def thaw(self, uuid: str) -> None:
        """Let a hung host run again (a fenced or off host is left as it is)."""
        if self.power(uuid) != "hung":
            return
        signal_all(self.host_dir(uuid), signal.SIGCONT)
        self._set(uuid, "on", "thaw")

    def boot(self, uuid: str) -> bool:
        """Power on a host that is off or fenced and run xapi's start-up on it; False if it was not off."""
        with self._lock:
            if self._stopping or self.power(uuid) not in ("off", "fenced"):
                return False
        self._set(uuid, "on", "boot")
        self.run_startup(uuid)
        return True

    def run_startup(self, uuid: str) -> None:
        """Run the registered start-up for ``uuid`` in a thread of its own."""
        if self._startup is not None:
            threading.Thread(target=self._startup, args=(uuid,), name=f"boot-{uuid[:8]}", daemon=True).start()

    def _later(self, uuid: str, delay: float, action: Callable[[str], object]) -> None:
        with self._lock:
            if self._stopping:
                return
            timer = threading.Timer(delay, action, args=(uuid,))
            timer.daemon = True
            old = self._timers.pop(uuid, None)
            self._timers[uuid] = timer
        if old is not None:
            old.cancel()
        timer.start()
