"""Helpers for the tests of the hosts' own addresses (this module holds no tests).

Only the plain SDK and sockets: a host's URL is its ``host.address`` on the daemon's port.
"""

from __future__ import annotations

import socket
import time
import xmlrpc.client
from typing import Any
from urllib.parse import urlparse

import XenAPI

CONNECT_ERRORS = (OSError, xmlrpc.client.ProtocolError, ConnectionError)


def host_url(daemon: Any, address: str) -> str:
    """The URL of the host at ``address`` (same scheme and port as the pool's address)."""
    parsed = urlparse(daemon.url)
    return f"{parsed.scheme}://{address}:{parsed.port}/"


def addresses(api: Any) -> dict[str, str]:
    """name-label -> host.address."""
    return {rec["name_label"]: rec["address"] for rec in api.host.get_all_records().values()}


def refuses(url: str) -> bool:
    """True iff a TCP connection to ``url``'s address is refused."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def login_error(url: str, password: str, *extra: str) -> list[str] | None:
    """The ErrorDescription of a login at ``url`` (None if it succeeded: the session is logged out)."""
    s = XenAPI.Session(url)
    try:
        s.login_with_password("root", password, *extra)
    except XenAPI.Failure as e:
        return list(e.details)
    s.xenapi.session.logout()
    return None


def follow_master(urls: list[str], password: str, port_of: str, deadline: float,
                  originator: str = "pytest") -> tuple[XenAPI.Session, str]:
    """Log in as a careful client does: try each known address, follow ``HOST_IS_SLAVE`` to the
    address it names (keeping scheme and port), retry unreachable ones until ``deadline``.

    Returns the session and the URL that accepted the login.
    """
    scheme_port = urlparse(port_of)
    queue = list(urls)
    last: Exception | None = None
    while time.monotonic() < deadline:
        url = queue.pop(0)
        queue.append(url)
        s = XenAPI.Session(url)
        try:
            s.login_with_password("root", password, "2.21", originator)
            return s, url
        except XenAPI.Failure as e:
            last = e
            if e.details[0] == "HOST_IS_SLAVE":
                named = f"{scheme_port.scheme}://{e.details[1]}:{scheme_port.port}/"
                if named in queue:
                    queue.remove(named)
                queue.insert(0, named)
                continue
            raise
        except CONNECT_ERRORS as e:
            last = e
            time.sleep(0.2)
    raise AssertionError(f"no master found at {urls}: {last}")
