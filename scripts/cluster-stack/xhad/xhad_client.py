"""Hands one cluster-stack script run to the stack's fork server (see xhad_engine, "fork server").

Imports only what the interpreter has built in (no ``socket``, ``json`` or ``signal``: their
imports cost more than the run), so that a delegated run costs little more than the interpreter's
start.  ``delegate`` returns None when there is no server to ask (``XAPID_FORKSERVER`` unset, no
socket, refused): the caller then runs the script in-process, exactly as without a server.
"""

import _socket
import os
import sys

PROTOCOL = b"xhad-fork-1"
UNIX_PATH_MAX = 100


def _request(script: str, argv: list[str]) -> bytes:
    fields = [PROTOCOL, script.encode(), os.fsencode(os.getcwd()), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in os.environ.items()]
    return b"".join(f + b"\0" for f in fields)


def delegate(script: str, argv: list[str]) -> int | None:
    """Run ``script argv`` in a worker of the fork server; its exit status, or None if not served.

    A worker killed by a signal kills this process with the same signal.  Once the server has the
    request the run is never repeated here: a lost server answers 127.
    """
    path = os.environ.get("XAPID_FORKSERVER")
    if not path:
        return None
    dir_fd = -1
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        target = path
        if len(os.fsencode(path)) >= UNIX_PATH_MAX:
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            target = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
        sock.connect(target)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # C ints; array costs a dlopen
        sock.sendmsg([_request(script, argv)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    except OSError:
        return None
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    try:
        reply = sock.recv(64)
    except OSError:
        reply = b""
    words = reply.split()
    if words == [b"refused"]:
        return None
    if len(words) == 2 and words[1].isdigit():
        if words[0] == b"exit":
            return int(words[1])
        if words[0] == b"signal":
            sys.stdout.flush()
            os.kill(os.getpid(), int(words[1]))
    return 127
