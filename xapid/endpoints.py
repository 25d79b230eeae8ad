"""Every emulated host's own address (``host.address``), served on the port of ``--listen``.

Part of the wire layer: what a host's endpoint *answers* is decided per call (the dispatcher
compares the endpoint with ``pool.master``); this module only opens, freezes and closes the
listening sockets as the emulated hardware's power changes:

* off or fenced: the socket is closed (connections are refused) and every connection it held is
  cut, answered or not, as a machine losing power;
* hung: nothing is accepted (connections wait in the backlog) or answered until it thaws;
* on again after a boot: the socket is bound again on the same address and port.

The host's toolstack (xapid/hw/toolstack.py) is followed the same way: a crashed or restarting xapi
closes the host's socket (its sessions end elsewhere), a hung one freezes it, and a xapi that
starts again binds it again.  The pool's address and the Unix socket are xapid's own doors and
keep answering whatever one host's xapi does.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from xapid.server import ApiServer, HostServer, bind_tcp

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.endpoints")

PORT_ATTEMPTS = 50  # port 0: ports tried until one is free on every address


def wildcard(address: str) -> bool:
    """Whether ``address`` listens on every address (no per-host socket can share its port then)."""
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return address == ""


def bind_all(address: str, port: int, host_addresses: list[str],
             first: socket.socket | None = None) -> tuple[socket.socket, dict[str, socket.socket]]:
    """Bind ``address:port`` and every one of ``host_addresses`` on the same port.

    ``first`` is ``address`` already bound (its port is tried first).  With port 0, ports are tried
    until one is free everywhere; otherwise a busy address raises :class:`OSError` naming it.
    """
    for _attempt in range(PORT_ATTEMPTS):
        sock = first if first is not None else bind_tcp(address, port)
        first = None
        chosen = sock.getsockname()[1]
        bound: dict[str, socket.socket] = {}
        try:
            for a in host_addresses:
                bound[a] = bind_tcp(a, chosen)
            return sock, bound
        except OSError as e:
            for s in bound.values():
                s.close()
            sock.close()
            if port != 0:
                raise OSError(e.errno, f"{a}:{chosen}: {e.strerror}") from None
    raise OSError(0, f"no port free on {address} and every host address after {PORT_ATTEMPTS} attempts")


class HostEndpoints:
    """The listeners of the hosts' own addresses, following each host's power."""

    def __init__(self, daemon: Daemon, server: ApiServer, port: int, tls: ssl.SSLContext | None) -> None:
        self.daemon = daemon
        self.server = server
        self.port = port
        self.tls = tls
        self.listeners: dict[str, HostServer] = {}  # host uuid -> its listener while it is powered
        self._lock = threading.Lock()
        self._address: dict[str, str] = {}
        daemon.hw.on_power_change(self._on_power_change)
        daemon.hw.toolstack.on_change(self._on_toolstack)
        self.scheme = "https" if tls else "http"

    def adopt(self, sockets: dict[str, socket.socket]) -> None:
        """Serve the sockets :func:`bind_all` bound (by address); a host that is off closes its own."""
        by_address = {rec["address"]: (ref, rec["uuid"]) for ref, rec in self.daemon.store.items("host")}
        for address, sock in sockets.items():
            ref, uuid = by_address[address]
            self._address[uuid] = address
            toolstack = self.daemon.hw.toolstack
            toolstack.set_url(uuid, f"{self.scheme}://{address}:{self.port}/")
            power = self.daemon.hw.power(uuid)
            if power in ("off", "fenced") or not toolstack.serving(uuid):
                sock.close()
                continue
            listener = HostServer(sock, ref, self.tls)
            if power == "hung" or toolstack.frozen(uuid):
                listener.running.clear()
            with self._lock:
                self.listeners[uuid] = listener
            self.server.serve(listener)

    def urls(self, scheme: str) -> dict[str, str]:
        """Each host's URL, by host uuid."""
        return {uuid: f"{scheme}://{address}:{self.port}/" for uuid, address in self._address.items()}

    def _on_power_change(self, uuid: str, old: str, new: str) -> None:
        toolstack = self.daemon.hw.toolstack
        action: Callable[[], None] | None = None
        with self._lock:
            listener = self.listeners.get(uuid)
            if new in ("off", "fenced") and listener is not None:
                del self.listeners[uuid]
                action = lambda: self.server.withdraw(listener)  # noqa: E731
            elif new == "hung" and listener is not None:
                listener.running.clear()
            elif new == "on" and listener is not None:
                if not toolstack.frozen(uuid):  # a thawed host's hung xapi is still hung
                    listener.running.set()
            elif new == "on" and uuid in self._address and toolstack.serving(uuid):
                action = lambda: self._reopen(uuid)  # noqa: E731
        if action is not None:
            action()

    def _on_toolstack(self, uuid: str, event: str) -> None:
        """The host's xapi went down, came up, hung or thawed (xapid/hw/toolstack.py)."""
        action: Callable[[], None] | None = None
        with self._lock:
            listener = self.listeners.get(uuid)
            if event == "down" and listener is not None:
                del self.listeners[uuid]
                action = lambda: self.server.withdraw(listener)  # noqa: E731
            elif event == "freeze" and listener is not None:
                listener.running.clear()
            elif event == "thaw" and listener is not None and self.daemon.hw.is_running(uuid):
                listener.running.set()
            elif event == "up" and listener is None and uuid in self._address:
                action = lambda: self._reopen(uuid)  # noqa: E731
        if action is not None:
            action()

    def _reopen(self, uuid: str) -> None:
        """The host booted, or its xapi started again: its address answers again, on the same port."""
        address = self._address[uuid]
        ref = self.daemon.store.by_uuid("host", uuid)
        try:
            sock = bind_tcp(address, self.port)
        except OSError as e:
            log.error("cannot listen on a booted host's address again; it stays dark", host=uuid,
                      address=f"{address}:{self.port}", error=e.strerror or str(e))
            return
        listener = HostServer(sock, ref or "", self.tls)
        toolstack = self.daemon.hw.toolstack
        with self._lock:
            if uuid in self.listeners or not self.daemon.hw.is_running(uuid) or not toolstack.serving(uuid):
                sock.close()  # another change won the race
                return
            if toolstack.frozen(uuid):
                listener.running.clear()
            self.listeners[uuid] = listener
        self.server.add(listener)
        log.info("host address answering again", host=uuid, address=f"{address}:{self.port}")
