"""Emulated xhad's xapi watchdog (xenserver/xha daemon/xapi_mon.c), run by the heartbeat process.

Standard library only; never imports xapid.  xhad_engine.py starts :class:`XapiMon` when the host
goes Online (xha sm.c: ``start_xapi_monitor`` right after the join, before fencing is armed) and
polls :attr:`XapiMon.fence_reason` in its loop.

What it does, as xapi_mon.c does:

* Every XapiHealthCheckInterval seconds it runs the health check of **this host's** xapi, given
  XapiHealthCheckTimeout seconds in all (xhad kills a checker still running then: "hung").  The
  check is xapi's ``scripts/xapi-health-check``: ``xe host-ha-xapi-healthcheck`` retried while the
  CLI reports a communication failure (exit 1), at most 20 times, 5 s apart; ``false`` is exit 2,
  an API error exit 3 (cli_operations.ml host_ha_xapi_healthcheck).  Here ``xe`` is one JSON-RPC
  exchange with the host's own address (the ``url`` in ``<host folder>/xapi.json``):
  ``session.slave_local_login`` with the pool secret in ``<host folder>/ptoken`` (xe's local
  session on the local socket), ``host.ha_xapi_healthcheck``, ``session.local_logout``.  A host
  folder without ``xapi.json`` or without a url (no per-host address is served) is not checked.
* A failed check restarts xapi (xapi_mon.c ``xapi_restart``): ``xapi-restart`` on the host's
  watchdog socket stands for ``systemctl restart xapi.service``; the restart has succeeded when
  ``completed`` in ``xapi.json`` grows with ``result`` ``ok`` (systemctl exited 0), failed when it
  grows with ``failed``, and is hung when neither happens in time.  At most XapiRestartAttempts
  restarts are made, all within XapiRestartTimeout seconds of the first; the count is reset only
  when the last successful restart is more than a day old, so with one attempt a second failure
  within a day goes straight to fencing.  A successful restart is not checked at once: the next
  health check comes an interval later.
* When the attempts are used up, it waits 2 x HeartbeatInterval ("to notify the other hosts")
  and asks for a self-fence, which the heartbeat loop carries out through the watchdog like any
  other fence.  A disarmed host never fences (sm.c ``self_fence`` acts only while armed); its
  monitor keeps checking.
* Statistics for the liveset: the latency of the last healthy check and the min/max over the
  last 16, the wall time of the check running now and of the restart in progress
  (``time_since_xapi_restart_first_attempted``), and ``Xapi_healthcheck_approaching_timeout``
  when the maximum latency, or the check running now, passed half of XapiHealthCheckTimeout
  (xha sc_func.c).  Every state change is logged to the heartbeat log (``xhad.log``).

Defaults when the conf lacks a parameter are xhad's (xha include/config.h): interval 60 s,
timeout 10 s, 1 attempt, restart timeout 30 s (xapi always writes all four).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

STATUS_FILE = "xapi.json"
TOKEN_FILE = "ptoken"
ATTEMPTS = 20  # scripts/xapi-health-check: retries of a communication failure
PAUSE = 5.0  # ... seconds apart
ONE_DAY = 86400.0
POLL = 0.1
MAX_ANSWER = 1 << 20
WINDOW = 16

HEALTHY, COMMS, REPORTS_FALSE, EXCEPTION, HUNG, SKIPPED = 0, 1, 2, 3, -1, -2

DEFAULTS = {"XapiHealthCheckInterval": 60, "XapiHealthCheckTimeout": 10, "XapiRestartAttempts": 1,
            "XapiRestartTimeout": 30}


class CommFailure(Exception):
    """The host's xapi could not be reached or answered something that is not an RPC answer."""


class Timeout(Exception):
    """The time given to the check ran out."""


class ApiFailure(Exception):
    """The RPC answered with an error."""


# --------------------------------------------------------------------------- one RPC


def _split_url(url: str) -> tuple[bool, str, int]:
    """(tls, address, port) of ``http[s]://address:port/``; CommFailure if it is not one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise CommFailure(f"not an http(s) url: {url!r}")
    netloc = rest.split("/", 1)[0]
    address, _, port = netloc.rpartition(":")
    if not address or not port.isdigit():
        raise CommFailure(f"no address:port in {url!r}")
    return scheme == "https", address.strip("[]"), int(port)


def rpc(url: str, method: str, params: list[Any], deadline: float) -> Any:
    """One JSON-RPC call to ``url`` finished by ``deadline`` (time.monotonic); its result.

    Raises CommFailure (refused, cut, not HTTP 200, not JSON-RPC), Timeout, ApiFailure.
    """
    tls, address, port = _split_url(url)
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
    head = (f"POST /jsonrpc HTTP/1.1\r\nHost: {address}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nUser-Agent: xhad-xapi-mon\r\n\r\n").encode()

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"{method}: no answer in time")
        return left

    try:
        sock: socket.socket = socket.create_connection((address, port), timeout=remaining())
    except TimeoutError:
        raise Timeout(f"{method}: connecting timed out") from None
    except OSError as exc:
        raise CommFailure(f"cannot connect to {address}:{port}: {exc.strerror or exc}") from None
    try:
        if tls:
            import ssl  # only here: importing it costs every ha_query_liveset 13 ms

            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname=address)
        sock.sendall(head + body)
        data = b""
        length: int | None = None
        start = -1
        while True:
            sock.settimeout(remaining())
            chunk = sock.recv(65536)
            if chunk:
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise CommFailure("answer too large")
            if start < 0 and b"\r\n\r\n" in data:
                start = data.index(b"\r\n\r\n") + 4
                for line in data[:start].decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length" and value.strip().isdigit():
                        length = int(value.strip())
            if start >= 0 and length is not None and len(data) - start >= length:
                break
            if not chunk:
                break
    except TimeoutError:
        raise Timeout(f"{method}: no answer in time") from None
    except OSError as exc:
        raise CommFailure(f"{method}: connection failed: {exc}") from None
    finally:
        sock.close()
    if start < 0:
        raise CommFailure(f"{method}: connection closed before an answer")
    status = data.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise CommFailure(f"{method}: HTTP {b' '.join(status[1:]).decode('latin-1')}")
    try:
        doc = json.loads(data[start:start + length if length is not None else None])
    except ValueError:
        raise CommFailure(f"{method}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise CommFailure(f"{method}: the answer is not a JSON-RPC object")
    error = doc.get("error")
    if error:
        if isinstance(error, dict):
            data_ = error.get("data")
            parts = [str(error.get("message", ""))] + ([str(d) for d in data_] if isinstance(data_, list) else [])
        else:
            parts = [str(e) for e in error] if isinstance(error, list) else [str(error)]
        raise ApiFailure(" ".join(parts))
    return doc.get("result")


# --------------------------------------------------------------------------- the health check


def read_status(hostdir: str) -> dict[str, Any]:
    """``<host folder>/xapi.json`` (empty when missing or unreadable)."""
    try:
        with open(os.path.join(hostdir, STATUS_FILE), "rb") as handle:
            doc = json.loads(handle.read(MAX_ANSWER))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def xe_healthcheck(hostdir: str, deadline: float) -> tuple[int, str]:
    """``xe host-ha-xapi-healthcheck`` once: (exit code, what went wrong) as cli_operations.ml."""
    url = read_status(hostdir).get("url")
    try:
        with open(os.path.join(hostdir, TOKEN_FILE)) as handle:
            token = handle.read().strip()
    except OSError:
        token = ""
    if not isinstance(url, str) or not url or not token:
        return SKIPPED, "this host's xapi has no address to check"
    try:
        session = rpc(url, "session.slave_local_login", [token], deadline)
        try:
            healthy = rpc(url, "host.ha_xapi_healthcheck", [session], deadline)
        finally:
            try:
                rpc(url, "session.local_logout", [session], min(deadline, time.monotonic() + 1.0))
            except (CommFailure, Timeout, ApiFailure):
                pass
    except Timeout as exc:
        return HUNG, str(exc)
    except CommFailure as exc:
        return COMMS, str(exc)
    except ApiFailure as exc:
        return EXCEPTION, f"Host.ha_xapi_healthcheck threw exception: {exc}"
    if healthy is True:
        return HEALTHY, ""
    return REPORTS_FALSE, "Host.ha_xapi_healthcheck reports false"


def health_check(hostdir: str, deadline: float, wait: Callable[[float], object] = time.sleep,
                 pause: float = PAUSE) -> tuple[int, str]:
    """xapi's ``xapi-health-check``: retry communication failures (20 times, ``pause`` apart), all
    within ``deadline``; (exit code, last error).  HUNG when the deadline passes (xhad's SIGKILL)."""
    code, detail = COMMS, ""
    for _attempt in range(ATTEMPTS):
        code, detail = xe_healthcheck(hostdir, deadline)
        if code != COMMS:
            return code, detail
        if time.monotonic() + pause >= deadline:
            wait(max(0.0, deadline - time.monotonic()))
            return HUNG, f"still failing when the health check timed out: {detail}"
        wait(pause)
    return code, detail


# --------------------------------------------------------------------------- the monitor thread


def parameter(parameters: Mapping[str, int], name: str) -> int:
    """A xapi-monitor parameter of xhad.conf, or xhad's default; attempts may be 0, the rest >= 1."""
    value = parameters.get(name, DEFAULTS[name])
    return max(0 if name == "XapiRestartAttempts" else 1, int(value))


class XapiMon:
    """The xapi monitor thread of one heartbeat process (see the module docstring)."""

    def __init__(self, hostdir: str, parameters: Mapping[str, int], heartbeat_interval: float,
                 restart: Callable[[], None], armed: Callable[[], bool], wake: Callable[[], None],
                 log: Callable[[str], None], pause: float = PAUSE) -> None:
        self.hostdir = hostdir
        self.interval = parameter(parameters, "XapiHealthCheckInterval")
        self.timeout = parameter(parameters, "XapiHealthCheckTimeout")
        self.attempts = parameter(parameters, "XapiRestartAttempts")
        self.restart_timeout = parameter(parameters, "XapiRestartTimeout")
        self.heartbeat_interval = heartbeat_interval
        self._request_restart = restart
        self._armed = armed
        self._wake = wake
        self._log = log
        self.pause = pause
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Statistics (xapi_mon.h COM_DATA_XAPIMON), read by the heartbeat loop for the view.
        self.latencies: list[int] = []
        self.latency = -1
        self.check_started: float | None = None  # wall time of the check running now
        self.restart_started: float | None = None  # wall time of time_Xapi_restart (None: -1)
        self.error = ""
        self.checks = 0
        self.restarts = 0
        # xapi_restart's statics.
        self.restart_count = 0
        self.time_restarted: float | None = None
        self.fence_reason = ""

    def start(self) -> None:
        """Start the thread (a daemon thread: it ends with the heartbeat process)."""
        if self._thread is None:
            self._log(f"xapi monitor started: every {self.interval} s, timeout {self.timeout} s, "
                      f"{self.attempts} restart(s) within {self.restart_timeout} s")
            self._thread = threading.Thread(target=self._run, name="xapimon", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the monitor must outlive a surprise (logged)
                self._log(f"xapi monitor: unexpected error {exc!r}")

    def tick(self) -> None:
        """One health check, and the restart procedure if it failed."""
        start = time.monotonic()
        self.check_started = time.time()
        code, detail = health_check(self.hostdir, start + self.timeout, self._stop.wait, self.pause)
        self.check_started = None
        self.checks += 1
        if code == SKIPPED:
            return
        if code == HEALTHY:
            self.latency = int((time.monotonic() - start) * 1000)
            self.latencies = (self.latencies + [self.latency])[-WINDOW:]
            self.error = ""
            return
        self.error = detail
        what = {HUNG: "is hung", COMMS: "cannot reach xapi"}.get(code, f"has reported an error ({code})")
        self._log(f"Xapimon: Xapi healthchecker {what}. - [{detail}]")
        self.restart_xapi()

    def restart_xapi(self) -> None:
        """xapi_mon.c xapi_restart: restart xapi, or fence when the attempts are used up."""
        now = time.monotonic()
        self.restart_started = time.time()
        if self.time_restarted is None or now - self.time_restarted > ONE_DAY:
            self.restart_count = 0
        deadline = now + self.restart_timeout
        self._log("Xapimon: restarting Xapi.")
        while self.restart_count < self.attempts and not self._stop.is_set():
            self.restart_count += 1
            outcome = self.restart_once(deadline)
            if outcome == "ok":
                self.restart_started = None
                self.time_restarted = time.monotonic()
                self.restarts += 1
                self._log("Xapimon: Xapi restarted.")
                return
            if outcome == "failed":
                self._log(f"Xapimon: Xapi restart failed (try={self.restart_count}).")
            else:
                self._log(f"Xapimon: Xapi restart process is hung (try={self.restart_count}).")
        if self._stop.is_set():
            return
        self._log("Xapimon: Xapi failed.  Self Fence.")
        self._log("Xapimon: Sleep t1 * 2 to notify the other hosts.")
        if self._stop.wait(2 * self.heartbeat_interval):
            return
        if self._armed():
            self.fence_reason = f"Xapimon: Xapi failed ({self.error or 'restart failed'}) - Self-Fence"
            self._wake()
        else:
            self._log("Xapimon: fencing is disarmed: not fencing.")

    def restart_once(self, deadline: float) -> str:
        """Ask for one restart and wait for it until ``deadline``: ``ok``, ``failed`` or ``hung``."""
        before = read_status(self.hostdir).get("completed", 0)
        self._request_restart()
        while time.monotonic() < deadline:
            status = read_status(self.hostdir)
            completed = status.get("completed", 0)
            if isinstance(completed, int) and isinstance(before, int) and completed > before:
                return "ok" if status.get("result") == "ok" else "failed"
            if self._stop.wait(POLL):
                break
        return "hung"

    def figures(self) -> dict[str, Any]:
        """What the liveset shows of this monitor (see :func:`liveset_figures`)."""
        lat = self.latencies
        return {"lat": [self.latency, min(lat) if lat else -1, max(lat) if lat else -1],
                "check": self.check_started, "restart": self.restart_started, "timeout": self.timeout}


def liveset_figures(view: Mapping[str, Any], now: float) -> tuple[list[int], int, bool]:
    """From a heartbeat view: ([latency, min, max] in ms, time since the restart in progress was
    first attempted in ms or -1, Xapi_healthcheck_approaching_timeout) as xha sc_func.c reports them."""
    xapi = view.get("xapi")
    if not isinstance(xapi, dict):
        return [-1, -1, -1], -1, False
    lat = xapi.get("lat")
    figures = [int(v) for v in lat] if isinstance(lat, list) and len(lat) == 3 and all(
        isinstance(v, int) for v in lat) else [-1, -1, -1]
    timeout = xapi.get("timeout") if isinstance(xapi.get("timeout"), int) else 0
    half_ms = timeout * 1000 // 2
    check, restart = xapi.get("check"), xapi.get("restart")
    approaching = figures[2] >= 0 and figures[2] > half_ms
    if isinstance(check, (int, float)) and (now - check) * 1000 >= half_ms:
        approaching = True
    since = int((now - restart) * 1000) if isinstance(restart, (int, float)) else -1
    return figures, since, approaching
