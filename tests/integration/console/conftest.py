"""Helpers for the console's endpoints: plain HTTP with the session in a header, the watchdog socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import requests

from tests.conftest import REPO, Xapid


def login(xapid: Xapid, user: str = "root", password: str | None = None) -> str:
    """A session ref from JSON-RPC ``session.login_with_password`` (what the console does)."""
    doc = requests.post(xapid.url + "jsonrpc", json={
        "jsonrpc": "2.0", "id": 1, "method": "session.login_with_password",
        "params": [user, xapid.password if password is None else password, "2.21", "pytest"]}, timeout=30).json()
    assert "result" in doc, doc
    return str(doc["result"])


def add_user(xapid: Xapid, user: str, password: str, role: str) -> None:
    """``xapid passwd --role ROLE USER`` against the running daemon's state dir."""
    done = subprocess.run([sys.executable, "-m", "xapid.cli.xapid", "passwd", "--state-dir", str(xapid.state_dir),
                           "--role", role, user], input=password + "\n", text=True, capture_output=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr


def hardware(xapid: Xapid, session: str | None, **query: Any) -> requests.Response:
    headers = {"X-Session-Id": session} if session is not None else {}
    return requests.get(xapid.url + "console/api/hardware", params=query, headers=headers, timeout=90)


def fault(xapid: Xapid, session: str | None, body: Any) -> requests.Response:
    headers = {"X-Session-Id": session} if session is not None else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(xapid.url + "xapid/fault", data=data, headers=headers, timeout=60)


def watchdog(xapid: Xapid, host_uuid: str, message: str) -> None:
    """Send one message to a host's watchdog socket, as a cluster stack does (hw-contract.md)."""
    folder = xapid.state_dir / "hosts" / host_uuid
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), f"/proc/self/fd/{fd}/watchdog")
    finally:
        os.close(fd)


def host_uuids(xapid: Xapid) -> dict[str, str]:
    """name-label -> uuid of every host."""
    s = xapid.session()
    try:
        x = s.xenapi
        return {x.host.get_name_label(h): x.host.get_uuid(h) for h in x.host.get_all()}
    finally:
        s.xenapi.session.logout()
