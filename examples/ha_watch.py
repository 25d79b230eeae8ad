"""Follow a pool's HA state live through ``event.from``; print each change.

Usage: python examples/ha_watch.py URL USER PASSWORD [--seconds N]

Prints one line per change of the pool's HA fields, a host's HA fields or a
host's liveness (``host_metrics.live``), e.g.::

    pool xapid pool: ha_enabled=True ha_cluster_stack=xhad ha_statefiles=1
    host host3: live=False
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import XenAPI

POOL_FIELDS = ("ha_enabled", "ha_cluster_stack", "ha_plan_exists_for", "ha_overcommitted")


def describe(ev: dict[str, Any], hosts_by_metrics: dict[str, str]) -> str | None:
    """One line for an HA-relevant event, or None when the event is not about HA."""
    snap = ev.get("snapshot", {})
    if ev["class"] == "pool" and ev["operation"] != "del":
        fields = " ".join(f"{f}={snap[f]}" for f in POOL_FIELDS)
        return f"pool {snap['name_label']}: {fields} ha_statefiles={len(snap['ha_statefiles'])}"
    if ev["class"] == "host" and ev["operation"] != "del":
        hosts_by_metrics[snap["metrics"]] = snap["hostname"]
        return f"host {snap['hostname']}: ha_network_peers={len(snap['ha_network_peers'])}"
    if ev["class"] == "host_metrics" and ev["operation"] != "del":
        return f"host {hosts_by_metrics.get(ev['ref'], ev['ref'])}: live={snap['live']}"
    return None


def watch(url: str, user: str, password: str, seconds: float) -> None:
    session = XenAPI.Session(url)
    session.login_with_password(user, password, "2.21", "ha_watch")
    try:
        x = session.xenapi
        hosts_by_metrics = {x.host.get_metrics(h): x.host.get_hostname(h) for h in x.host.get_all()}
        token = x.event.inject("pool", x.pool.get_all()[0])  # start from "now", as Xen Orchestra does
        last: dict[str, str] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = x.event_from(["pool", "host", "host_metrics"], token, 5.0)
            token = batch["token"]
            for ev in batch["events"]:
                line = describe(ev, hosts_by_metrics)
                if line is not None and last.get(ev["ref"]) != line:
                    last[ev["ref"]] = line
                    print(line, flush=True)
    finally:
        session.xenapi.session.logout()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("--seconds", type=float, default=3600.0)
    args = parser.parse_args()
    watch(args.url, args.user, args.password, args.seconds)


if __name__ == "__main__":
    main()
