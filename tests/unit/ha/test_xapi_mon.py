"""The emulated xhad's xapi watchdog (scripts/cluster-stack/xhad/xapi_mon.py) against a small JSON-RPC server
standing for one host's xapi: the xapi-health-check exit codes (xapi scripts/xapi-health-check,
cli_operations.ml host_ha_xapi_healthcheck) and xha daemon/xapi_mon.c's restart-then-fence rule."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ENGINE_DIR = Path(__file__).resolve().parents[3] / "scripts" / "cluster-stack" / "xhad"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xapi_mon_under_test", ENGINE_DIR / "xapi_mon.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


xm = load()


class FakeXapi:
    """What the host's xapi answers: ``mode`` healthy / false / error / hang / http500."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.mode = "healthy"
        self.calls: list[tuple[str, list[Any]]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.calls.append((body["method"], body["params"]))
                if fake.mode == "hang":
                    fake.release.wait(10)
                    return
                if fake.mode == "http500":
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if body["method"] == "session.slave_local_login":
                    doc: dict[str, Any] = {"jsonrpc": "2.0", "result": "OpaqueRef:s", "id": body["id"]}
                    if body["params"] != ["secret"]:
                        doc = {"jsonrpc": "2.0", "error": {"code": 1, "message": "SESSION_AUTHENTICATION_FAILED",
                                                           "data": ["", "Authentication failure"]}, "id": body["id"]}
                elif body["method"] == "host.ha_xapi_healthcheck" and fake.mode == "error":
                    doc = {"jsonrpc": "2.0", "error": {"code": 1, "message": "HOST_IS_SLAVE", "data": ["x"]},
                           "id": body["id"]}
                elif body["method"] == "host.ha_xapi_healthcheck":
                    doc = {"jsonrpc": "2.0", "result": fake.mode == "healthy", "id": body["id"]}
                else:
                    doc = {"jsonrpc": "2.0", "result": None, "id": body["id"]}
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def xapi() -> Iterator[FakeXapi]:
    fake = FakeXapi()
    yield fake
    fake.close()


def host_folder(tmp_path: Path, url: str, completed: int = 0, result: str = "none") -> Path:
    (tmp_path / "ptoken").write_text("secret\n")
    (tmp_path / "xapi.json").write_text(json.dumps({"url": url, "completed": completed, "result": result}))
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the health check (xapi-health-check) ---------------------------------------------------------------


def test_healthy_false_and_error_answers_give_the_cli_exit_codes(xapi: FakeXapi, tmp_path: Path) -> None:
    folder = host_folder(tmp_path, xapi.url)
    assert xm.health_check(str(folder), time.monotonic() + 5) == (xm.HEALTHY, "")
    assert [c[0] for c in xapi.calls] == ["session.slave_local_login", "host.ha_xapi_healthcheck",
                                          "session.local_logout"]
    assert xapi.calls[0][1] == ["secret"] and xapi.calls[1][1] == ["OpaqueRef:s"]
    xapi.mode = "false"
    assert xm.health_check(str(folder), time.monotonic() + 5) == (
        xm.REPORTS_FALSE, "Host.ha_xapi_healthcheck reports false")
    xapi.mode = "error"
    code, detail = xm.health_check(str(folder), time.monotonic() + 5)
    assert code == xm.EXCEPTION and "HOST_IS_SLAVE x" in detail
    (folder / "ptoken").write_text("wrong\n")
    code, detail = xm.health_check(str(folder), time.monotonic() + 5)
    assert code == xm.EXCEPTION and "SESSION_AUTHENTICATION_FAILED" in detail


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_an_https_host_address_is_checked_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    fake = FakeXapi((cert, key))
    try:
        assert fake.url.startswith("https://")
        folder = tmp_path / "host"
        folder.mkdir()
        assert xm.health_check(str(host_folder(folder, fake.url)), time.monotonic() + 5) == (xm.HEALTHY, "")
    finally:
        fake.close()


def test_a_hung_xapi_is_killed_at_the_timeout(xapi: FakeXapi, tmp_path: Path) -> None:
    xapi.mode = "hang"
    folder = host_folder(tmp_path, xapi.url)
    started = time.monotonic()
    code, _detail = xm.health_check(str(folder), started + 0.6)
    assert code == xm.HUNG
    assert 0.5 <= time.monotonic() - started < 1.5


def test_communication_failures_are_retried_until_the_timeout(tmp_path: Path) -> None:
    """xapi-health-check retries exit 1 (20 times, 5 s apart) and xhad kills it at XapiHealthCheckTimeout."""
    folder = host_folder(tmp_path, f"http://127.0.0.1:{free_port()}/")
    waits: list[float] = []
    code, detail = xm.health_check(str(folder), time.monotonic() + 100, waits.append, pause=0.0)
    assert code == xm.COMMS and "cannot connect" in detail
    assert len(waits) == xm.ATTEMPTS  # then it gives up with exit 1
    started = time.monotonic()
    code, detail = xm.health_check(str(folder), started + 0.3)
    assert code == xm.HUNG and "cannot connect" in detail
    assert time.monotonic() - started >= 0.25


def test_http_errors_are_communication_failures(xapi: FakeXapi, tmp_path: Path) -> None:
    xapi.mode = "http500"
    code, detail = xm.xe_healthcheck(str(host_folder(tmp_path, xapi.url)), time.monotonic() + 2)
    assert code == xm.COMMS and "HTTP 500" in detail


def test_a_host_folder_without_an_address_is_not_checked(tmp_path: Path) -> None:
    assert xm.xe_healthcheck(str(tmp_path), time.monotonic() + 1)[0] == xm.SKIPPED
    (tmp_path / "xapi.json").write_text(json.dumps({"url": ""}))
    assert xm.xe_healthcheck(str(tmp_path), time.monotonic() + 1)[0] == xm.SKIPPED


# -- restart then fence (xapi_mon.c xapi_restart) -----------------------------------------------------------


class Host:
    """The restart side: each ``xapi-restart`` completes with ``outcome`` (or never: ``None``)."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder = folder
        self.url = url
        self.outcome: str | None = "ok"
        self.requests = 0
        self.logs: list[str] = []
        self.woken = 0
        self.armed = True

    def restart(self) -> None:
        self.requests += 1
        if self.outcome is not None:
            (self.folder / "xapi.json").write_text(json.dumps(
                {"url": self.url, "completed": self.requests, "result": self.outcome}))

    def monitor(self, attempts: int = 1, restart_timeout: int = 1, interval: int = 1) -> Any:
        return xm.XapiMon(str(self.folder), {"XapiHealthCheckInterval": interval, "XapiHealthCheckTimeout": 1,
                                             "XapiRestartAttempts": attempts, "XapiRestartTimeout": restart_timeout},
                          0.05, restart=self.restart, armed=lambda: self.armed, wake=self.wake,
                          log=self.logs.append, pause=0.0)

    def wake(self) -> None:
        self.woken += 1


def test_one_failure_restarts_xapi_and_a_second_within_a_day_fences(xapi: FakeXapi, tmp_path: Path) -> None:
    host = Host(host_folder(tmp_path, xapi.url), xapi.url)
    mon = host.monitor(attempts=1)
    mon.tick()
    assert host.requests == 0 and mon.latency >= 0 and mon.figures()["lat"][0] == mon.latency
    xapi.mode = "false"
    mon.tick()
    assert host.requests == 1 and mon.fence_reason == "" and mon.restart_started is None
    assert "Xapimon: Xapi restarted." in host.logs
    xapi.mode = "healthy"
    mon.tick()
    xapi.mode = "false"
    mon.tick()  # the budget of one restart a day is spent: straight to the fence
    assert host.requests == 1
    assert "reports false" in mon.fence_reason and host.woken == 1
    assert mon.figures()["restart"] is not None  # time_Xapi_restart stays set when it fenced


def test_the_restart_budget_is_renewed_a_day_after_the_last_restart(xapi: FakeXapi, tmp_path: Path) -> None:
    host = Host(host_folder(tmp_path, xapi.url), xapi.url)
    mon = host.monitor(attempts=1)
    xapi.mode = "false"
    mon.tick()
    assert mon.time_restarted is not None
    mon.time_restarted -= xm.ONE_DAY + 1
    mon.tick()
    assert host.requests == 2 and mon.fence_reason == ""


def test_failed_and_hung_restarts_use_up_the_attempts_within_the_restart_timeout(
        xapi: FakeXapi, tmp_path: Path) -> None:
    host = Host(host_folder(tmp_path, xapi.url), xapi.url)
    host.outcome = "failed"
    mon = host.monitor(attempts=3)
    xapi.mode = "false"
    mon.tick()
    assert host.requests == 3 and mon.fence_reason
    assert sum("Xapi restart failed" in line for line in host.logs) == 3
    (tmp_path / "h").mkdir()
    hung = Host(host_folder(tmp_path / "h", xapi.url), xapi.url)
    hung.outcome = None
    mon = hung.monitor(attempts=2, restart_timeout=1)
    started = time.monotonic()
    mon.tick()
    # The first attempt waits the whole XapiRestartTimeout; the second has nothing left (one deadline).
    assert hung.requests == 2 and 1.0 <= time.monotonic() - started < 2.5
    assert sum("is hung" in line for line in hung.logs) == 2 and mon.fence_reason


def test_zero_attempts_fence_at_once_and_a_disarmed_host_never_fences(xapi: FakeXapi, tmp_path: Path) -> None:
    host = Host(host_folder(tmp_path, xapi.url), xapi.url)
    mon = host.monitor(attempts=0)
    xapi.mode = "false"
    mon.tick()
    assert host.requests == 0 and mon.fence_reason
    host2 = Host(host_folder(tmp_path, xapi.url), xapi.url)
    host2.armed = False
    mon = host2.monitor(attempts=0)
    mon.tick()
    assert mon.fence_reason == "" and host2.woken == 0
    assert "Xapimon: fencing is disarmed: not fencing." in host2.logs


def test_the_thread_checks_every_interval(xapi: FakeXapi, tmp_path: Path) -> None:
    host = Host(host_folder(tmp_path, xapi.url), xapi.url)
    mon = host.monitor(interval=1)
    mon.start()
    try:
        time.sleep(2.5)
    finally:
        mon.stop()
    assert mon.checks == 2 and host.requests == 0


def test_liveset_figures_as_sc_func_reports_them() -> None:
    now = 1000.0
    assert xm.liveset_figures({}, now) == ([-1, -1, -1], -1, False)
    view = {"xapi": {"lat": [40, 20, 900], "check": None, "restart": None, "timeout": 2}}
    assert xm.liveset_figures(view, now) == ([40, 20, 900], -1, False)
    view["xapi"]["lat"] = [40, 20, 1001]  # the maximum passed half the timeout
    assert xm.liveset_figures(view, now)[2] is True
    view = {"xapi": {"lat": [-1, -1, -1], "check": now - 1.2, "restart": now - 3.5, "timeout": 2}}
    assert xm.liveset_figures(view, now) == ([-1, -1, -1], 3500, True)


def test_defaults_are_xhads() -> None:
    assert [xm.parameter({}, n) for n in ("XapiHealthCheckInterval", "XapiHealthCheckTimeout",
                                           "XapiRestartAttempts", "XapiRestartTimeout")] == [60, 10, 1, 30]
    assert xm.parameter({"XapiRestartAttempts": 0}, "XapiRestartAttempts") == 0
    assert xm.parameter({"XapiHealthCheckInterval": 0}, "XapiHealthCheckInterval") == 1
