"""The console's view of the emulated hardware: per-host power, fabric and a log of what happened.

The pool database says what xapi believes (``host_metrics.live``, ``resident_on``); the
hardware says what really happened to a machine (power cut, fence and why, hang, partition).
Real xapi has no API for the second, so it stays out of the XenAPI datamodel and is served
by the console's own endpoint, ``GET /console/api/hardware`` (see :mod:`xapid.console`).

The feed is event-friendly in the way ``event.from`` is: every change gets a sequence
number, a client passes the token of the last answer it saw and the call blocks (without
polling) until something newer exists or its timeout passes.  A token carries the daemon's
boot id, so after a restart an old token is recognised and the client gets a fresh start.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from xapid.ha.scripts import valid_stack_name

if TYPE_CHECKING:
    from xapid.daemon import Daemon

LOG_SIZE = 1000
MAX_WAIT = 60.0


class HardwareFeed:
    """Records every power change and fault of ``daemon.hw`` and answers long-polls for them."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.boot_id = secrets.token_hex(4)
        self._cv = threading.Condition()
        self._seq = 0
        self._log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self._stopped = False
        daemon.hw.on_power_change(self._on_power)
        daemon.faults.on_fault(self._on_fault)

    # -- recording --------------------------------------------------------------------------------

    def _append(self, entry: dict[str, Any], at: float | None = None) -> None:
        with self._cv:
            self._seq += 1
            entry["seq"] = self._seq
            entry["time"] = round(time.time() if at is None else at, 3)
            self._log.append(entry)
            self._cv.notify_all()

    def _on_power(self, uuid: str, old: str, new: str) -> None:
        if new in ("off", "fenced"):
            clean, reason = self.daemon.hw.last_stop(uuid)
        else:
            clean, reason = True, "thaw" if old == "hung" else ("hang" if new == "hung" else "boot")
        self._append({"kind": "power", "host": uuid, "old": old, "new": new, "reason": reason, "clean": clean})

    def _on_fault(self, request: dict[str, Any], lines: list[str], started: float) -> None:
        hosts = request.get("hosts") if isinstance(request.get("hosts"), list) else []
        groups = request.get("groups") if isinstance(request.get("groups"), list) else []
        origin = request.get("origin")
        self._append({"kind": "fault", "verb": str(request.get("verb")), "hosts": [str(h) for h in hosts],
                      "groups": [[str(h) for h in g] for g in groups if isinstance(g, list)],
                      "lines": list(lines), "origin": origin if isinstance(origin, str) else "xapid fault"},
                     at=started)

    def stop(self) -> None:
        """Release every waiting client (the daemon is stopping)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    # -- answering --------------------------------------------------------------------------------

    def token(self) -> str:
        return f"{self.boot_id}:{self._seq}"

    def _since(self, token: str) -> int:
        """The sequence number a token stands for; -1 (everything) for "" or another boot's token."""
        boot, _, seq = token.partition(":")
        if boot != self.boot_id or not seq.isdigit():
            return -1
        return int(seq)

    def wait(self, token: str, timeout: float) -> dict[str, Any]:
        """The hosts' hardware now, and the log entries after ``token``; blocks up to ``timeout`` for news.

        ``reset`` is true when the token was not one of this boot's (the client must drop what it
        had: the log it saw is gone).  Never blocks when there is news or the token is unknown.
        """
        since = self._since(token)
        deadline = time.monotonic() + min(max(0.0, timeout), MAX_WAIT)
        with self._cv:
            while since >= 0 and self._seq <= since and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            entries = [e for e in self._log if e["seq"] > since]
            token_now = self.token()
        return {"token": token_now, "reset": since < 0, "now": round(time.time(), 3), "log": entries,
                "hosts": self.hosts(), "cluster_stacks": self.cluster_stacks(), "felt_faults": self.felt_faults()}

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Per host uuid: power, last stop (clean, reason), network group, statefile access, armed."""
        out: dict[str, dict[str, Any]] = {}
        for h in self.daemon.faults.host_status():
            clean, reason = self.daemon.hw.last_stop(h["uuid"])
            out[h["uuid"]] = {"power": h["power"], "last_stop_reason": reason, "last_stop_clean": clean,
                              "network": h["network"], "statefile": h["statefile"], "armed": h["armed"]}
        return out

    def cluster_stacks(self) -> list[str]:
        """The stack folders under ``cluster-stack-root`` (what ``pool.enable_ha`` may be asked for)."""
        root = self.daemon.ha.runner.root
        try:
            return sorted(p.name for p in root.iterdir() if p.is_dir() and valid_stack_name(p.name))
        except OSError:
            return []

    def felt_faults(self) -> list[str] | None:
        """Fabric faults the active stack honours (None: HA is off, every fault is allowed)."""
        pool = self.daemon.store.get("pool", self.daemon.pool_ref()) or {}
        if not pool.get("ha_enabled"):
            return None
        return sorted(self.daemon.ha.runner.felt_faults(str(pool.get("ha_cluster_stack") or "")))
