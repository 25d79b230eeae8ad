"""The per-call log lines of a real daemon: written off the request threads, yet every one is in
the log after a clean stop, in structlog's JSON form."""

from __future__ import annotations

import http.client
import json
import xmlrpc.client
from urllib.parse import urlparse

from tests.conftest import Xapid

CALLS = 600


def test_no_call_line_is_lost_at_a_clean_stop(xapid: Xapid) -> None:
    session = xapid.session()._session
    address = urlparse(xapid.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    body = xmlrpc.client.dumps((session,), "VM.get_all").encode()
    for _ in range(CALLS):  # back to back on one keep-alive connection, then stop at once
        conn.request("POST", "/", body, {"content-type": "text/xml"})
        reply = conn.getresponse().read()
        assert b">Success<" in reply
    conn.close()
    assert xapid.stop() == 0
    lines = [json.loads(line) for line in xapid.log().splitlines()
             if line.startswith("{") and '"event": "call"' in line]
    calls = [line for line in lines if line["method"] == "VM.get_all"]
    assert len(calls) == CALLS
    assert list(calls[0]) == ["method", "user", "session", "result", "duration_ms", "event", "level", "timestamp"]
    assert calls[0]["user"] == "root" and calls[0]["result"] == "Success" and calls[0]["level"] == "info"
    assert str(calls[0]["session"]).endswith("...") and str(calls[0]["timestamp"]).endswith("Z")
