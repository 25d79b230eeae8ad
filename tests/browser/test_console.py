"""The pool console in a real headless Chromium: what a person sees and does (issue 15).

Every test starts a real ``xapid`` (tests/conftest.py) and only clicks, types and reads the page;
the SDK is used to check that what the page showed is what the pool did.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

from tests.browser.conftest import Browser, ConsolePage
from tests.integration.console.conftest import add_user, host_uuids, watchdog
from tests.integration.ha.conftest import wait_for
from xapid.hw.faults import FaultClient

FAILOVER = 40.0  # seconds, as tests/integration/ha/test_failover.py: T = 10 detection, fencing margin, a start


def index(entries: list[tuple[str, str]], pattern: str, after: int = -1) -> int:
    """Position of the first timeline entry after ``after`` whose text matches ``pattern``."""
    for i, (_when, what) in enumerate(entries):
        if i > after and re.search(pattern, what):
            return i
    raise AssertionError(f"no entry matching {pattern!r} after #{after} in {entries}")


def test_admin_enables_ha_crashes_a_host_and_watches_the_pool_recover(xapid_factory: Any, browser: Browser) -> None:
    d = xapid_factory(**{"fence-reboot-delay": "1"})
    c = ConsolePage(browser, d)
    page = c.page
    c.open()
    c.login()
    page.wait_for_selector("article.host")
    assert page.locator("article.host").count() == 3
    assert [c.card(f"host{i}").locator("h3").inner_text() for i in (1, 2, 3)] == ["host1", "host2", "host3"]
    assert c.card("host1").locator(".master-badge").count() == 1
    assert page.locator("#pool [data-field=ha]").inner_text() == "off"

    # Partition the heartbeat network: drag host3 into a new group, pick the same group for host2
    # from its list (the keyboard way), apply; then heal.
    page.locator(".chip[data-host='host3'] span").drag_to(page.locator(".group.new-group"))
    page.wait_for_selector(".group[data-group='1'] .chip[data-host='host3']")
    page.select_option("#network .chip[data-host='host2'] select", "1")
    page.click("#partition-apply")
    c.wait_card("host3", network="1")
    c.wait_card("host2", network="1")
    assert c.card("host1").get_attribute("data-network") == "0"
    c.wait_timeline(r"^fault: partition host2 host3 \| host1$")
    page.click("#network-heal")
    c.wait_card("host3", network="0")
    c.wait_timeline(r"^fault: heal$")

    # Enable HA with the form: the shared SR as heartbeat SR, the xhad stack, T = 10.
    assert page.locator("#ha-sr option:checked").inner_text() == "Shared NFS storage"
    page.select_option("#ha-stack", "xhad")
    page.fill("#ha-timeout", "10")
    page.click("#ha-enable")
    page.wait_for_selector("#pool [data-field=ha]:text-is('on')", timeout=60_000)
    x = d.session().xenapi
    pool = x.pool.get_all()[0]
    assert x.pool.get_ha_enabled(pool) and x.pool.get_ha_cluster_stack(pool) == "xhad"
    assert page.locator("#pool [data-field=stack]").inner_text() == "xhad"

    # A protected VM on host2, made with the form.
    page.fill("#new-vm-name", "web")
    page.select_option("#new-vm-priority", "restart")
    page.select_option("#new-vm-host", label="host2")
    page.click("#new-vm-create")
    page.wait_for_selector("article.host[data-host='host2'] [data-vm='web']")
    assert c.card("host2").locator("[data-vm='web'] .prio").inner_text().startswith("protected")
    web = x.VM.get_by_name_label("web")[0]
    assert x.VM.get_ha_restart_priority(web) == "restart"
    assert x.host.get_name_label(x.VM.get_resident_on(web)) == "host2"

    # Crash host2 with a click: the card goes dead, the VM comes back on a survivor.
    crashed = time.monotonic()
    c.card("host2").get_by_role("button", name="Crash").click()
    c.wait_card("host2", power="off", timeout=15)
    c.wait_card("host2", live="false", timeout=FAILOVER)
    page.wait_for_selector("article.host:not([data-host='host2']) [data-vm='web']", timeout=FAILOVER * 1000)
    failover = time.monotonic() - crashed
    assert failover < FAILOVER
    survivor = next(h for h in ("host1", "host3") if "web" in c.vms_on(h))
    assert c.vms_on("host2") == []
    assert c.card("host2").locator("[data-field=reason]").inner_text() == " (xapid fault crash)"
    assert x.VM.get_power_state(web) == "Running" and x.host.get_name_label(x.VM.get_resident_on(web)) == survivor

    # The timeline tells the story in order, timed from the fault.
    c.wait_timeline(r"^HA_HOST_FAILED: host2$")
    entries = c.timeline()
    fault = index(entries, r"^fault: crash host2$")
    power = index(entries, r"^host2 power: on → off \(xapid fault crash\)$", fault)
    failed = index(entries, r"^HA_HOST_FAILED: host2$", power)
    index(entries, r"^host2 is no longer live", fault)
    restarted = index(entries, rf"^VM web: .* → Running on {survivor}$", fault)
    assert restarted > power and failed > power
    assert all(when.startswith("+") and when.endswith(" s") for when, _ in entries[fault + 1:]), entries
    assert float(entries[restarted][0][1:-2]) <= failover + 1
    page.evaluate("window.scrollTo(0, 0)")
    shot = c.screenshot("console-failover.png")
    assert shot.stat().st_size > 10_000

    # Boot host2 back with the keyboard.  (Whether it then rejoins the liveset is HA's start-up on
    # boot, tested in tests/integration/ha; the page shows host_metrics.live as it comes.)
    boot = c.card("host2").get_by_role("button", name="Boot")
    boot.focus()
    page.keyboard.press("Enter")
    c.wait_card("host2", power="on", timeout=10)
    c.wait_timeline(r"^host2 power: off → on$")
    entries = c.timeline()
    booted = index(entries, r"^fault: boot host2$", restarted)
    index(entries, r"^host2 power: off → on$", booted)
    assert c.card("host2").get_by_role("button", name="Crash").is_enabled()

    # Readable on a narrow window: nothing wider than the screen.
    page.set_viewport_size({"width": 480, "height": 800})
    page.wait_for_timeout(200)
    assert page.evaluate("document.documentElement.scrollWidth") <= 480
    c.screenshot("console-narrow.png")
    assert browser.same_origin_only(c.origin) == []
    assert browser.problems == []


def test_a_read_only_login_shows_the_live_pool_without_controls(xapid_factory: Any, browser: Browser) -> None:
    d = xapid_factory(**{"fence-reboot-delay": "0.5"})
    add_user(d, "viewer", "viewer-password", "read-only")
    c = ConsolePage(browser, d)
    page = c.page
    c.open()
    c.login("viewer", "not the password")
    page.wait_for_selector("#login-error:text('wrong user name or password')")
    c.login("viewer", "viewer-password")
    page.wait_for_selector("article.host")
    assert page.locator("article.host").count() == 3
    assert "read-only" in page.locator("#who").inner_text()
    assert page.locator("#app button, #app select, #app input, #app [draggable=true]").count() == 0
    assert page.locator("button:visible").all_inner_texts() == ["Log out"]

    # It is live all the same: a host fenced by its watchdog shows up with the reason.
    host3 = host_uuids(d)["host3"]
    watchdog(d, host3, "fence demonstrating the console")
    c.wait_timeline(r"^host3 power: on → fenced \(.*demonstrating the console\)$")
    c.wait_timeline(r"^host3 power: fenced → on$")
    assert page.locator("#timeline li.kind-fence").count() == 1
    page.click("#logout")
    page.wait_for_selector("#login-form")
    assert page.locator("#app").is_hidden() and page.locator("#timeline li").count() == 0
    assert browser.problems == []


def test_a_daemon_restart_reconnects_the_page(xapid_factory: Any, browser: Browser) -> None:
    d = xapid_factory()
    c = ConsolePage(browser, d)
    page = c.page
    c.open()
    c.login()
    page.wait_for_selector("article.host")
    page.wait_for_selector("#connection.connected")
    port = urlsplit(d.url).port
    d.extra_args += ["--listen", f"127.0.0.1:{port}"]  # the last --listen wins: come back on the same port
    d.stop()
    page.wait_for_selector("#connection.reconnecting", timeout=10_000)
    started = time.monotonic()
    d.start()
    page.wait_for_selector("#connection.connected", timeout=20_000)
    assert time.monotonic() - started < 20
    # Both feeds run again on a new session: a XenAPI change and a fault both reach the page.
    x = d.session().xenapi
    x.pool.set_name_label(x.pool.get_all()[0], "renamed after the restart")
    page.wait_for_selector("#pool-name:text-is('renamed after the restart')", timeout=10_000)
    FaultClient(d.state_dir).crash("host3")
    c.wait_card("host3", power="off", timeout=10)
    wait_for(lambda: any(w == "fault: crash host3" for _t, w in c.timeline()), timeout=10, what="the fault entry")
