"""The NBD protocol as every emulated host's ``xapi-nbd`` speaks it (read-only disk exports).

xapi-nbd (xapi-project/xapi-nbd ``src/main.ml``, on the ``nbd`` library's ``lib/server.ml``)
listens on port 10809 and speaks fixed-newstyle NBD: the client names its export with
``NBD_OPT_EXPORT_NAME`` (``/<vdi-uuid>?session_id=<ref>``, what ``VDI.get_nbd_info`` hands out);
``NBD_OPT_LIST`` is refused by policy, ``NBD_OPT_STARTTLS`` upgrades the connection, every other
option is unsupported (clients such as libnbd and qemu then fall back to ``EXPORT_NAME``).  In
TLS mode (a network has the purpose ``nbd``) any option before ``STARTTLS`` gets
``NBD_REP_ERR_TLS_REQD`` and a cleartext ``EXPORT_NAME`` ends the connection.  The export is
read-only (``NBD_FLAG_READ_ONLY``): ``NBD_CMD_READ`` of whole 512-byte sectors, ``NBD_CMD_WRITE``
is ``EPERM``, ``NBD_CMD_DISC`` ends the connection, anything else is ``EINVAL``.

This module is only the wire protocol and the sockets: what an export name opens, and whether
TLS is required, is the :class:`Exports` the daemon gives (``xapid/api/vdi_nbd.py``).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from typing import Protocol

import structlog

log = structlog.get_logger("xapid.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
CLIENT_FIXED_NEWSTYLE = 1
CLIENT_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5

REP_ACK = 1
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005

TX_HAS_FLAGS = 1
TX_READ_ONLY = 2

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2

EPERM = 1
EIO = 5
EINVAL = 22

SECTOR = 512
MAX_OPTION_DATA = 65536  # export names are at most 4096 bytes; anything far larger is not a client
MAX_READ = 32 * 1024 * 1024  # the largest request the NBD spec asks servers to take
MAX_WRITE_DISCARD = MAX_READ
NEGOTIATION_TIMEOUT = 30.0
CHUNK = 4 * 1024 * 1024


class Refused(Exception):
    """The connection may not go on (no NBD network, bad export name, invalid session...)."""


class Export(Protocol):
    """An opened export: its size in bytes, reads at an offset, and the end of its use."""

    size: int

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (within ``size``)."""
        ...

    def close(self) -> None:
        """The client is gone: release what :meth:`Exports.open` took."""
        ...


class Exports(Protocol):
    """What one host's NBD service serves."""

    def tls(self) -> ssl.SSLContext | None:
        """The server context when TLS is required, None for cleartext; :class:`Refused` when NBD
        is not offered at all."""
        ...

    def open(self, name: str) -> Export:
        """The export the client named; :class:`Refused` if it cannot have it."""
        ...


class _Closed(Exception):
    pass


class _Wire:
    """Exact reads and whole writes on a socket that may become a TLS socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, n: int) -> bytes:
        parts, have = [], 0
        while have < n:
            try:
                got = self.sock.recv(min(n - have, CHUNK))
            except (OSError, ssl.SSLError):
                raise _Closed from None
            if not got:
                raise _Closed
            parts.append(got)
            have += len(got)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            raise _Closed from None


def _option_reply(wire: _Wire, option: int, reply: int, data: bytes = b"") -> None:
    wire.write(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, len(data)) + data)


def negotiate(wire: _Wire, exports: Exports) -> tuple[_Wire, Export, bool]:
    """Run the fixed-newstyle handshake; return the wire (TLS after STARTTLS), the opened export
    and whether the client asked for no trailing zeroes.  :class:`Refused`/:class:`_Closed` end it."""
    context = exports.tls()
    wire.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE))
    (client_flags,) = struct.unpack(">I", wire.read(4))
    if context is not None and not client_flags & CLIENT_FIXED_NEWSTYLE:
        raise Refused("the client does not speak fixed newstyle and TLS is required")
    secure = context is None
    while True:
        magic, option, length = struct.unpack(">QII", wire.read(16))
        if magic != IHAVEOPT:
            raise Refused("bad option magic")
        if length > MAX_OPTION_DATA:
            raise Refused(f"option of {length} bytes")
        data = wire.read(length)
        if not secure:
            if option == OPT_STARTTLS:
                _option_reply(wire, option, REP_ACK)
                assert context is not None
                try:
                    wire.sock.settimeout(NEGOTIATION_TIMEOUT)
                    wire = _Wire(context.wrap_socket(wire.sock, server_side=True))
                except (OSError, ssl.SSLError) as e:
                    raise Refused(f"TLS handshake failed: {e}") from None
                secure = True
            elif option in (OPT_EXPORT_NAME, OPT_ABORT):
                raise Refused("export requested over cleartext while TLS is required")
            else:
                _option_reply(wire, option, REP_ERR_TLS_REQD)
            continue
        if option == OPT_EXPORT_NAME:
            export = exports.open(data.decode("utf-8", "replace"))
            return wire, export, bool(client_flags & CLIENT_NO_ZEROES)
        if option == OPT_ABORT:
            try:
                _option_reply(wire, option, REP_ACK)
            except _Closed:
                pass
            raise _Closed
        if option == OPT_STARTTLS:
            _option_reply(wire, option, REP_ERR_INVALID if context is not None else REP_ERR_POLICY)
        elif option == OPT_LIST:
            _option_reply(wire, option, REP_ERR_POLICY)
        else:
            _option_reply(wire, option, REP_ERR_UNSUP)


def transmit(wire: _Wire, export: Export) -> None:
    """Answer requests until ``NBD_CMD_DISC`` or the client goes."""
    while True:
        magic, _flags, command, handle, offset, length = struct.unpack(">IHHQQI", wire.read(28))
        if magic != REQUEST_MAGIC:
            raise Refused("bad request magic")

        def reply(error: int) -> bytes:
            return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)  # noqa: B023 - used at once

        if command == CMD_DISC:
            return
        if command == CMD_WRITE:
            # The payload follows the request whatever the answer; it is read and dropped.
            if length > MAX_WRITE_DISCARD:
                raise Refused(f"write of {length} bytes")
            wire.read(length)
            wire.write(reply(EPERM))
        elif command == CMD_READ:
            if (offset % SECTOR or length % SECTOR or length > MAX_READ
                    or offset + length > export.size):
                wire.write(reply(EINVAL))
                continue
            try:
                data = export.read(offset, length)
            except OSError:
                wire.write(reply(EIO))
                continue
            wire.write(reply(0) + data)
        else:
            wire.write(reply(EINVAL))


class NbdServer:
    """One host's NBD listener: a thread accepting, a thread per connection.

    :meth:`stop` closes the socket and cuts every connection at once (a machine losing power), and
    returns after their threads released their exports.
    """

    def __init__(self, sock: socket.socket, exports: Exports, name: str, max_connections: int = 64) -> None:
        self.sock = sock
        self.exports = exports
        self.name = name
        self.max_connections = max_connections
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = False
        sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._accept, name=f"nbd-{name}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.1)
                continue
            with self._lock:
                if self._stopping or len(self._conns) >= self.max_connections:
                    conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t = threading.Thread(target=self._serve, args=(conn,), name=f"nbd-conn-{self.name}", daemon=True)
                self._conns[conn] = t
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        export: Export | None = None
        wire = _Wire(conn)
        try:
            conn.settimeout(NEGOTIATION_TIMEOUT)
            wire, export, no_zeroes = negotiate(wire, self.exports)
            flags = TX_HAS_FLAGS | TX_READ_ONLY
            wire.write(struct.pack(">QH", export.size, flags) + (b"" if no_zeroes else bytes(124)))
            wire.sock.settimeout(None)  # an export may stay open, idle, as long as its client likes
            transmit(wire, export)
        except Refused as e:
            log.info("nbd connection refused", host=self.name, reason=str(e))
        except _Closed:
            pass
        except Exception as e:  # noqa: BLE001 - one connection's failure must not reach the listener
            log.warning("nbd connection failed", host=self.name, error=repr(e))
        finally:
            if export is not None:
                try:
                    export.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("nbd export release failed", host=self.name, error=repr(e))
            try:
                wire.sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.pop(conn, None)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            conns = dict(self._conns)
        try:
            self.sock.close()
        except OSError:
            pass
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        for t in conns.values():
            t.join(max(0.0, deadline - time.monotonic()))


def bind(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (port 0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock
