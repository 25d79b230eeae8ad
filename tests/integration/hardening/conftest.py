"""Helpers for the hardening tests: raw HTTP, the pool invariants over the SDK, process facts."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import Xapid
from tests.unit.hardening.support import pool_invariants
from xapid.schema import Schema


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def post(url: str, path: str, body: bytes, content_type: str = "text/xml", timeout: float = 30.0) -> Response:
    """One POST on a fresh connection; the answer with its wall time."""
    host, port = address(url)
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"content-type": content_type})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - start)
    finally:
        conn.close()


def raw_exchange(url: str, request: bytes, half_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send ``request`` bytes as they are; return everything the server sends until it closes."""
    with socket.create_connection(address(url), timeout=timeout) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def xml_call(method: str, *params_xml: str) -> bytes:
    params = "".join(f"<param>{p}</param>" for p in params_xml)
    return f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params>{params}</params>" \
           f"</methodCall>".encode()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def invariants(api: Any, schema: Schema) -> list[str]:
    """The database invariants of issue 5 as the SDK sees them ([] when they hold)."""
    return pool_invariants(schema, lambda cls: getattr(api, cls).get_all_records())


def armed_hosts(xapid: Xapid) -> list[str]:
    """Hosts whose local database says HA is armed (``<state>/hosts/<uuid>/local.json``)."""
    out = []
    for p in (xapid.state_dir / "hosts").glob("*/local.json"):
        try:
            if json.loads(p.read_text()).get("ha.armed"):
                out.append(p.parent.name)
        except ValueError:
            out.append(p.parent.name + " (unreadable local.json)")
    return out


def daemon_alive(xapid: Xapid) -> bool:
    return xapid.proc is not None and xapid.proc.poll() is None


def clean_log(xapid: Xapid) -> None:
    """No traceback and no unexpected exception reached the daemon's log."""
    text = xapid.log()
    assert "Traceback" not in text
    assert "unexpected exception" not in text
    assert '"exception"' not in text


def add_user(daemon: Xapid, name: str, role: str) -> str:
    """``xapid passwd --role ROLE NAME`` on the daemon's state dir; the password is ``<name>-pw``."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(daemon.state_dir),
                           "--role", role, name], input=f"{name}-pw\n", text=True, capture_output=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return f"{name}-pw"
