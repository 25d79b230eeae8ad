"""A client that logs in at any host of a pool and follows the master through a failover.

Usage: ``python examples/failover_client.py URL PASSWORD_FILE [SECONDS]`` (README "Testing
failover in your client").  It logs in at URL, following ``HOST_IS_SLAVE`` to the address the
error names (same scheme and port), remembers every host's address, then reads the VM list
once a second.  When the master goes away it tries the known addresses in turn (following
``HOST_IS_SLAVE`` again) until one accepts a login, reports how long that took and whether
every VM kept its ref and uuid, and exits 0.  Exit status 1 if no failover completed in
SECONDS (default 300).
"""

from __future__ import annotations

import sys
import time
import xmlrpc.client
from urllib.parse import urlparse

import XenAPI

UNREACHABLE = (OSError, xmlrpc.client.ProtocolError)


def say(text: str) -> None:
    print(time.strftime("%H:%M:%S"), text, flush=True)


def same_port(base: str, address: str) -> str:
    parsed = urlparse(base)
    return f"{parsed.scheme}://{address}:{parsed.port}/"


def connect(urls: list[str], password: str, deadline: float) -> tuple[XenAPI.Session, str]:
    """Log in at the first of ``urls`` that is the master, following HOST_IS_SLAVE."""
    queue = list(urls)
    while time.monotonic() < deadline:
        url = queue.pop(0)
        queue.append(url)
        session = XenAPI.Session(url)
        try:
            session.login_with_password("root", password, "2.21", "failover-client")
            return session, url
        except XenAPI.Failure as e:
            if e.details[0] != "HOST_IS_SLAVE":
                raise
            master = same_port(url, e.details[1])
            say(f"{url} says HOST_IS_SLAVE {e.details[1]}")
            if master in queue:
                queue.remove(master)
            queue.insert(0, master)
        except UNREACHABLE as e:
            say(f"{url} unreachable: {e}")
            time.sleep(1.0)
    raise TimeoutError("no master answered")


def main(argv: list[str]) -> int:
    url, password = argv[1], open(argv[2]).read().strip()
    deadline = time.monotonic() + (float(argv[3]) if len(argv) > 3 else 300.0)
    session, at = connect([url], password, deadline)
    x = session.xenapi
    known = [same_port(at, rec["address"]) for rec in x.host.get_all_records().values()]
    vms = {ref: rec["uuid"] for ref, rec in x.VM.get_all_records().items()}
    say(f"logged in at {at}; hosts {', '.join(known)}; {len(vms)} VMs")
    while time.monotonic() < deadline:
        try:
            session.xenapi.VM.get_all()
            time.sleep(1.0)
            continue
        except XenAPI.Failure as e:
            say(f"lost the master: {e.details}")
        except UNREACHABLE as e:
            say(f"lost the master: {e}")
        lost = time.monotonic()
        session, at = connect([u for u in known if u != at] + [at], password, deadline)
        x = session.xenapi
        now = {ref: rec["uuid"] for ref, rec in x.VM.get_all_records().items()}
        master = x.host.get_name_label(x.pool.get_master(x.pool.get_all()[0]))
        say(f"logged in at {at} ({master}) {time.monotonic() - lost:.1f} s later; "
            f"every VM kept its ref and uuid: {now == vms}")
        x.session.logout()
        return 0
    say("no failover seen")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
