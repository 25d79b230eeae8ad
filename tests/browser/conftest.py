"""A real headless Chromium (Debian's ``chromium``) driven by Playwright for Python, and the console page.

The browser is never downloaded (no ``playwright install``): Playwright drives ``/usr/bin/chromium``
with a fresh profile per test.  Without the browser or Playwright the tests skip with the reason
(under CI, tests/conftest.py turns that skip into a failure: ``.ci/run`` installs both).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, Xapid

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
BUILD = REPO / "build"


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install -e '.[test]'")
    driver = sync_playwright().start()
    try:
        yield driver
    finally:
        driver.stop()


@dataclass
class Browser:
    """One page in a fresh Chromium profile, with what it requested and complained about."""

    page: Any
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def same_origin_only(self, origin: str) -> list[str]:
        """Requests that went anywhere but ``origin`` (must be none)."""
        return [url for url in self.requests if not url.startswith(origin)]


@pytest.fixture
def browser(playwright_driver: Any, tmp_path: Path) -> Iterator[Browser]:
    context = playwright_driver.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=ARGS, headless=True,
        viewport=VIEWPORT)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(30_000)
        b = Browser(page)
        page.on("request", lambda request: b.requests.append(request.url))
        page.on("pageerror", lambda error: b.problems.append(f"page error: {error}"))
        page.on("console", lambda msg: b.problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" and "Failed to load resource" not in msg.text else None)
        yield b
    finally:
        context.close()


class ConsolePage:
    """The console as a person uses it: log in, read cards and the timeline, click."""

    def __init__(self, browser: Browser, xapid: Xapid) -> None:
        self.browser = browser
        self.page = browser.page
        self.xapid = xapid

    @property
    def origin(self) -> str:
        url = urlsplit(self.xapid.url)
        return f"{url.scheme}://{url.netloc}/"

    def open(self) -> None:
        self.page.goto(self.xapid.url)
        self.page.click("#console-link")
        self.page.wait_for_selector("#login-form")

    def login(self, user: str = "root", password: str | None = None) -> None:
        """Type the credentials and press Enter (keyboard only)."""
        self.page.fill("#login-user", user)
        self.page.fill("#login-password", self.xapid.password if password is None else password)
        self.page.press("#login-password", "Enter")

    def card(self, host: str) -> Any:
        return self.page.locator(f"article.host[data-host='{host}']")

    def wait_card(self, host: str, timeout: float = 15.0, **attrs: str) -> float:
        """Wait until the host's card has these data- attributes; the seconds it took."""
        started = time.monotonic()
        selector = f"article.host[data-host='{host}']" + "".join(f"[data-{k}='{v}']" for k, v in attrs.items())
        self.page.wait_for_selector(selector, timeout=timeout * 1000)
        return time.monotonic() - started

    def vms_on(self, host: str) -> list[str]:
        return [str(v) for v in self.card(host).locator("[data-vm]").evaluate_all(
            "els => els.map(e => e.dataset.vm)")]

    def timeline(self) -> list[tuple[str, str]]:
        """(time label, text) of every timeline entry, in the order shown."""
        rows = self.page.locator("#timeline li").evaluate_all(
            "els => els.map(e => [e.querySelector('time').textContent, e.querySelector('.what').textContent])")
        return [(str(when), str(what)) for when, what in rows]

    def wait_timeline(self, pattern: str, timeout: float = 15.0) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(regex.search(what) for _w, what in self.timeline()):
                return
            self.page.wait_for_timeout(100)
        raise AssertionError(f"no timeline entry matching {pattern!r} in {self.timeline()}")

    def screenshot(self, name: str) -> Path:
        BUILD.mkdir(exist_ok=True)
        path = BUILD / name
        self.page.screenshot(path=str(path))
        return path
