"""Each emulated host's toolstack (its xapi process) as the host's own software sees it.

A real host runs xapi as ``xapi.service``; xhad's xapi watchdog (xha daemon/xapi_mon.c) checks it
every XapiHealthCheckInterval with ``xapi-health-check`` (``xe host-ha-xapi-healthcheck`` over the
local socket) and restarts it with ``systemctl restart xapi.service``.  Here:

* the host's xapi answers at the host's own address (xapid/endpoints.py follows :meth:`serving`
  and :meth:`frozen` through the listeners registered with :meth:`on_change`);
* faults (``xapid fault xapi-hang|xapi-fail|xapi-crash``) break one host's xapi.  A *transient*
  fault is cured by a restart of that xapi (a deadlock, a leak); a *persistent* one comes back
  right after every restart (broken configuration) and is cured only by ``xapi-heal`` or a reboot
  of the host (a boot starts a fresh xapi: :meth:`reset`);
* a restart (:meth:`restart`; a stack asks for it with ``xapi-restart`` on the host's watchdog
  socket) takes the host's xapi down (its address refuses connections, its sessions end: xapi's
  session table is not persisted), waits :data:`RESTART_DOWNTIME`, clears a transient fault and
  starts it again, or reports failure when a persistent crash keeps it down;
* each host folder holds ``ptoken`` (the pool secret, xapi's ``/etc/xensource/ptoken``, for
  ``session.slave_local_login``) and ``xapi.json``, what ``systemctl`` would tell about the
  service: ``{"url": ..., "requested": N, "completed": N, "result": "ok"|"failed"|"none",
  "fault": ...}``; a stack that asked for a restart waits for ``completed`` to grow.

A daemon restart restarts every host's xapi: transient faults end with it, persistent ones are
read back from ``xapi.json`` (until ``xapi-heal`` or a boot of the host).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from xapid import statefiles

log = structlog.get_logger("xapid.hw.toolstack")

FAULTS = ("hang", "fail", "crash")
RESTART_DOWNTIME = 0.5  # seconds a restarted xapi is away before it answers again
STATUS_FILE = "xapi.json"
TOKEN_FILE = "ptoken"

# listener(host uuid, event): "down" (the address stops: sessions end), "up" (it answers again; the
# xapi start-up should run), "freeze" (accepts, answers nothing), "thaw".
ToolstackListener = Callable[[str, str], None]


class _Host:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fault: str | None = None
        self.persistent = False
        self.url = ""
        self.requested = 0
        self.completed = 0
        self.result = "none"
        self.restarting = False
        self.lock = threading.Lock()  # one restart at a time


class Toolstacks:
    """The xapi of every host, keyed by host uuid (thread-safe)."""

    def __init__(self, is_running: Callable[[str], bool]) -> None:
        self.secret = secrets.token_urlsafe(24)
        self._is_running = is_running
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._listeners: list[ToolstackListener] = []
        self.stopping = False  # the daemon stops: no more restarts

    # -- set-up -------------------------------------------------------------------------------------

    def attach(self, uuid: str, folder: Path) -> None:
        """Know host ``uuid`` (its folder exists): write its ``ptoken`` and ``xapi.json``.

        A daemon start restarts every host's xapi: a persistent fault the last ``xapi.json`` names
        comes back with it (a transient one is cured by that restart)."""
        with self._lock:
            host = self._hosts.get(uuid)
            if host is None:
                host = self._hosts[uuid] = _Host(folder)
                host.fault = _persistent_fault(folder)
                host.persistent = host.fault is not None
        statefiles.write_atomic(folder / TOKEN_FILE, (self.secret + "\n").encode(), mode=0o600)
        self._publish(host)

    def forget(self, uuid: str) -> None:
        """The host left the pool (its folder goes with it)."""
        with self._lock:
            self._hosts.pop(uuid, None)

    def on_change(self, listener: ToolstackListener) -> None:
        """Call ``listener(uuid, event)`` on every change of a host's xapi (in the changing thread)."""
        self._listeners.append(listener)

    def set_url(self, uuid: str, url: str) -> None:
        """Where the host's xapi answers (its own address), for the host's software."""
        host = self._get(uuid)
        if host is not None:
            host.url = url
            self._publish(host)

    def check_secret(self, psecret: object) -> bool:
        """Whether ``psecret`` is the pool secret (compared in constant time)."""
        return isinstance(psecret, str) and secrets.compare_digest(psecret.encode(), self.secret.encode())

    # -- queries ------------------------------------------------------------------------------------

    def _get(self, uuid: str) -> _Host | None:
        with self._lock:
            return self._hosts.get(uuid)

    def fault(self, uuid: str) -> tuple[str | None, bool]:
        """(fault or None, persistent) of host ``uuid``'s xapi."""
        host = self._get(uuid)
        return (host.fault, host.persistent) if host is not None else (None, False)

    def serving(self, uuid: str) -> bool:
        """Whether the host's xapi process runs (its address accepts connections)."""
        host = self._get(uuid)
        return host is None or (host.fault != "crash" and not host.restarting)

    def frozen(self, uuid: str) -> bool:
        """Whether the host's xapi is hung (connections are accepted, nothing is answered)."""
        host = self._get(uuid)
        return host is not None and host.fault == "hang"

    def healthy(self, uuid: str) -> bool:
        """What ``host.ha_xapi_healthcheck`` answers on the host (xapi_fist fail_healthcheck: false)."""
        host = self._get(uuid)
        return host is None or host.fault is None

    def describe(self, uuid: str) -> str:
        """``ok``, ``restarting``, or the fault (``hang``/``fail``/``crash``, ``+persistent``)."""
        host = self._get(uuid)
        if host is None:
            return "ok"
        if host.restarting:
            return "restarting"
        if host.fault is None:
            return "ok"
        return host.fault + ("+persistent" if host.persistent else "")

    def restarts(self, uuid: str) -> int:
        """How many restarts of the host's xapi completed since the daemon started."""
        host = self._get(uuid)
        return host.completed if host is not None else 0

    # -- changes ------------------------------------------------------------------------------------

    def _emit(self, uuid: str, event: str) -> None:
        for listener in self._listeners:
            try:
                listener(uuid, event)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("toolstack listener failed", host=uuid, toolstack_event=event)

    def _publish(self, host: _Host) -> None:
        doc = {"url": host.url, "requested": host.requested, "completed": host.completed,
               "result": host.result, "fault": host.fault, "persistent": host.persistent}
        try:
            statefiles.write_atomic(host.folder / STATUS_FILE, json.dumps(doc).encode(), mode=0o644)
        except OSError as e:  # the folder went with its host
            log.warning("cannot write the toolstack status", folder=str(host.folder), error=str(e))

    def inject(self, uuid: str, fault: str, persistent: bool = False) -> None:
        """Break host ``uuid``'s xapi (``hang``, ``fail`` or ``crash``), replacing any earlier fault."""
        if fault not in FAULTS:
            raise ValueError(f"unknown toolstack fault {fault!r}")
        host = self._get(uuid)
        if host is None:
            raise KeyError(uuid)
        old = host.fault
        host.fault, host.persistent = fault, persistent
        self._publish(host)
        log.warning("xapi fault injected", host=uuid, fault=fault, persistent=persistent, was=old)
        self._transition(uuid, old, fault)

    def heal(self, uuid: str) -> str | None:
        """End any fault of host ``uuid``'s xapi (a crashed one is started again); the fault it had."""
        host = self._get(uuid)
        if host is None:
            raise KeyError(uuid)
        old = host.fault
        host.fault, host.persistent = None, False
        self._publish(host)
        if old is not None:
            log.info("xapi fault healed", host=uuid, fault=old)
            self._transition(uuid, old, None)
        return old

    def _transition(self, uuid: str, old: str | None, new: str | None) -> None:
        if old == new:
            return
        host = self._get(uuid)
        if host is not None and host.restarting:
            return  # the restart in progress brings the address back as the fault says
        if old == "crash":
            self._emit(uuid, "up")
        elif old == "hang":
            self._emit(uuid, "thaw")
        if new == "crash":
            self._emit(uuid, "down")
        elif new == "hang":
            self._emit(uuid, "freeze")

    def reset(self, uuid: str) -> None:
        """The host booted: a fresh xapi, with no fault (the endpoints follow the power change)."""
        host = self._get(uuid)
        if host is None:
            return
        host.fault, host.persistent, host.restarting = None, False, False
        self._publish(host)

    def restart(self, uuid: str, why: str) -> bool:
        """``systemctl restart xapi.service`` on host ``uuid``: returns once xapi answers again
        (True) or failed to start (False: a persistent crash, or the host lost power)."""
        host = self._get(uuid)
        if host is None or self.stopping:
            return False
        with host.lock:
            host.requested += 1
            host.restarting = True
            self._publish(host)
            log.warning("restarting xapi", host=uuid, why=why, fault=host.fault, persistent=host.persistent)
            self._emit(uuid, "down")
            time.sleep(RESTART_DOWNTIME)
            if not host.persistent:
                host.fault = None
            running = self._is_running(uuid) and not self.stopping
            host.restarting = False
            ok = running and host.fault != "crash"
            if ok:
                self._emit(uuid, "up")
                if host.fault == "hang":
                    self._emit(uuid, "freeze")
            host.completed += 1
            host.result = "ok" if ok else "failed"
            self._publish(host)
        if ok:
            log.info("xapi restarted", host=uuid, fault=host.fault)
        else:
            log.warning("xapi restart failed", host=uuid, fault=host.fault, powered=running)
        return ok

    def restart_async(self, uuid: str, why: str) -> None:
        """:meth:`restart` on a thread of its own (from the watchdog thread, which must not wait)."""
        threading.Thread(target=self.restart, args=(uuid, why), name=f"xapi-restart-{uuid[:8]}",
                         daemon=True).start()

    def status(self, uuid: str) -> dict[str, Any]:
        """The host's ``xapi.json`` contents."""
        host = self._get(uuid)
        if host is None:
            return {}
        return {"url": host.url, "requested": host.requested, "completed": host.completed,
                "result": host.result, "fault": host.fault, "persistent": host.persistent}


def _persistent_fault(folder: Path) -> str | None:
    """The persistent fault ``xapi.json`` in ``folder`` records, if any."""
    data = statefiles.read_bytes(folder / STATUS_FILE)
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        return None
    fault = doc.get("fault") if isinstance(doc, dict) and doc.get("persistent") is True else None
    return fault if fault in FAULTS else None
