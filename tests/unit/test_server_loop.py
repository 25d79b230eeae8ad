"""The server's event loop (``inline-reads = 1``, xapid/server.py with xapid/reactor.py) against
the thread per connection (``inline-reads = 0``).

A real in-process daemon behind two started ApiServers on 127.0.0.1:0, one each way; raw sockets
play the client.  Answers must be byte for byte the same, plain reads must be answered without a
thread, a read that saw a change must not leave before the change is on disk, and the loop's
connections must obey the same deadlines, withdrawals, freezes and stops.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.unit.hardening.support import in_process_daemon
from xapid import server as server_mod
from xapid.daemon import Daemon
from xapid.errors import ApiError
from xapid.server import ApiServer, Limits, XapiServer, bind_tcp, durable_now, inline_methods, inline_writes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = in_process_daemon(tmp_path_factory.mktemp("loop"))
    yield d
    d.stop()


def login(daemon: Daemon) -> str:
    return daemon.sessions.login("root", daemon.state_dir.joinpath("root-password").read_text().strip(), "test")


@pytest.fixture(scope="module")
def session(daemon: Daemon) -> str:
    return login(daemon)


def start_server(daemon: Daemon, inline: int = 1, **limits: Any) -> tuple[ApiServer, XapiServer]:
    """An ApiServer started on ``daemon`` at 127.0.0.1:0 (``inline``: the event loop or not)."""
    lim = dataclasses.replace(Limits.from_config(daemon.config), inline_reads=inline, **limits)
    server = ApiServer(daemon, lim)
    listener = XapiServer(bind_tcp("127.0.0.1", 0))
    server.serve(listener)
    server.start()
    return server, listener


Serve = Callable[..., tuple[ApiServer, XapiServer]]


@pytest.fixture
def serve(daemon: Daemon) -> Iterator[Serve]:
    """Start an ApiServer on the daemon (``inline``: the event loop or not; limits overridden)."""
    started: list[ApiServer] = []

    def start(inline: int = 1, **limits: Any) -> tuple[ApiServer, XapiServer]:
        server, listener = start_server(daemon, inline, **limits)
        started.append(server)
        return server, listener

    yield start
    for s in started:
        s.stop()


def http(path: str, body: bytes, close: bool = False) -> bytes:
    return (b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-type: text/xml\r\ncontent-length: %d\r\n%b\r\n%b"
            % (path.encode(), len(body), b"connection: close\r\n" if close else b"", body))


def xml(method: str, *params: Any) -> bytes:
    return http("/", xmlrpc.client.dumps(tuple(params), method).encode())


def jsonrpc(method: str, *params: Any) -> bytes:
    return http("/jsonrpc", json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 7}).encode())


class Client:
    def __init__(self, listener: XapiServer) -> None:
        self.sock = socket.create_connection(listener.server_address, timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> bytes:
        """One whole answer, head and body."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            self._more()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    def call(self, data: bytes) -> bytes:
        self.send(data)
        return self.answer()

    def _more(self) -> None:
        got = self.sock.recv(65536)
        if not got:
            raise ConnectionError("closed")
        self.buf += got

    def closed_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def requests(daemon: Daemon, session: str) -> list[bytes]:
    vm = daemon.store.refs("VM")[0]
    host = daemon.store.refs("host")[0]
    pool = daemon.store.refs("pool")[0]
    uuid = daemon.store.get("VM", vm)["uuid"]  # type: ignore[index]
    return [
        xml("VM.get_record", session, vm), xml("host.get_record", session, host), xml("pool.get_record", session, pool),
        xml("VM.get_name_label", session, vm), xml("VM.get_VBDs", session, vm), xml("VM.get_other_config", session, vm),
        xml("VM.get_by_uuid", session, uuid), xml("VM.get_all", session), xml("host.get_all", session),
        xml("VM.get_record", session, "OpaqueRef:nope"), xml("VM.get_record", "OpaqueRef:bad-session", vm),
        xml("VM.get_record", session), xml("VM.get_by_uuid", session, "no-such-uuid"),
        jsonrpc("VM.get_record", session, vm), jsonrpc("host.get_name_label", session, host),
        jsonrpc("VM.get_record", session, "OpaqueRef:nope"), jsonrpc("VM.get_all", session),
        xml("VM.get_all_records", session), xml("VM.get_power_state", session, vm),  # a thread's
        http("/", b"<methodCall><methodName>VM.get_record</methodName><params>"),  # malformed: 500, close
    ]


def test_answers_are_byte_identical_with_and_without_the_loop(serve: Serve, daemon: Daemon, session: str) -> None:
    _s1, loop = serve(inline=1)
    _s0, threads = serve(inline=0)
    for req in requests(daemon, session):
        a, b = Client(loop), Client(threads)
        try:
            assert a.call(req) == b.call(req), req
            if b"methodCall><methodName>VM.get_record</methodName><params>" not in req:
                assert a.call(req) == b.call(req), req  # and again on the same (kept) connection
        finally:
            a.close()
            b.close()


def test_pipelined_requests_are_answered_in_order(serve: Serve, daemon: Daemon, session: str) -> None:
    _s, loop = serve()
    vm = daemon.store.refs("VM")[0]
    reads = [xml("VM.get_name_label", session, vm), xml("VM.get_power_state", session, vm),
             xml("VM.get_uuid", session, vm), xml("VM.set_name_description", session, vm, "piped"),
             xml("VM.get_name_description", session, vm)]
    c = Client(loop)
    try:
        c.send(b"".join(reads))
        answers = [c.answer() for _ in reads]
        one_by_one = [Client(loop).call(r) for r in reads]
    finally:
        c.close()
    assert answers == one_by_one
    assert b"piped" in answers[-1]


def test_plain_reads_are_answered_without_a_thread(serve: Serve, daemon: Daemon, session: str) -> None:
    server, loop = serve()
    vm = daemon.store.refs("VM")[0]
    clients = [Client(loop) for _ in range(4)]
    try:
        for _ in range(25):
            for c in clients:
                assert b"<name>Status</name><value>Success</value>" in c.call(xml("VM.get_record", session, vm))
                assert b"\"result\"" in c.call(jsonrpc("VM.get_name_label", session, vm))
        assert server.threads_started == 0
        clients[0].call(xml("VM.get_all_records", session))  # not a plain read: a thread serves it
        assert server.threads_started == 1
    finally:
        for c in clients:
            c.close()


def test_get_all_of_a_large_class_goes_to_a_thread(serve: Serve, daemon: Daemon, session: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, loop = serve()
    c = Client(loop)
    try:
        assert b"Success" in c.call(xml("VM.get_all", session))
        assert server.threads_started == 0
        monkeypatch.setattr(server_mod, "INLINE_ALL", len(daemon.store.refs("VM")) - 1)
        assert b"Success" in Client(loop).call(xml("VM.get_all", session))
        assert server.threads_started == 1
    finally:
        c.close()


def test_without_the_loop_every_connection_has_a_thread(serve: Serve, daemon: Daemon, session: str) -> None:
    server, threads = serve(inline=0)
    vm = daemon.store.refs("VM")[0]
    clients = [Client(threads) for _ in range(3)]
    try:
        for c in clients:
            c.call(xml("VM.get_record", session, vm))
        assert server.threads_started == 3
    finally:
        for c in clients:
            c.close()


def test_the_loop_runs_only_side_effect_free_generic_reads(daemon: Daemon) -> None:
    names = inline_methods(daemon.dispatcher.table)
    assert {"VM.get_record", "host.get_record", "pool.get_record", "VM.get_by_uuid", "VM.get_all",
            "VM.get_name_label", "VM.get_VBDs"} <= names.keys()
    for name in ("VM.set_name_label", "VM.get_all_records", "VM.get_all_records_where", "VM.get_by_name_label",
                 "event.from", "event.next", "session.login_with_password", "VM.start", "Async.VM.get_record",
                 "VM_get_record", "host.get_servertime"):
        assert name not in names, name
    assert all(daemon.dispatcher.table[n].impl.__module__ == "xapid.generic" for n in names)  # type: ignore[union-attr]
    assert names["VM.get_all"] == "VM" and names["VM.get_record"] is None  # get_all: bounded by the class size


def test_the_durability_check_reads_the_store(daemon: Daemon) -> None:
    daemon.store.wait_durable()
    assert durable_now(daemon.store)
    vm = daemon.store.refs("VM")[0]
    with daemon.store.lock:  # a change in memory, not yet on disk
        daemon.store.generation += 1
        daemon.store._queue(daemon.store.generation, [])
        try:
            assert not durable_now(daemon.store)
        finally:
            pass
    daemon.store.wait_durable()
    assert durable_now(daemon.store) and daemon.store.get("VM", vm) is not None


def test_a_read_that_saw_a_change_leaves_after_it_is_on_disk(serve: Serve, daemon: Daemon, session: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _s, loop = serve()
    store = daemon.store
    vm = store.refs("VM")[0]
    written: list[float] = []
    write = store._write

    def slow_write(rows: list[Any]) -> None:
        time.sleep(0.4)  # a slow disk: the change is in memory well before it is durable
        write(rows)
        written.append(time.monotonic())

    monkeypatch.setattr(store, "_write", slow_write)
    reader = Client(loop)
    reader.call(xml("VM.get_name_label", session, vm))  # parked in the loop
    writer = Client(loop)
    writer.send(xml("VM.set_name_label", session, vm, "renamed-slowly"))
    deadline = time.monotonic() + 5
    while store.get("VM", vm)["name_label"] != "renamed-slowly" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.002)
    answer = reader.call(xml("VM.get_name_label", session, vm))
    answered = time.monotonic()
    assert b"renamed-slowly" in answer
    assert written and answered >= written[0]
    assert b"Success" in writer.answer()
    assert b"Success" in reader.call(xml("VM.get_name_label", session, vm))  # and the loop goes on
    reader.close()
    writer.close()


def test_the_loop_runs_only_generic_field_writes(daemon: Daemon) -> None:
    names = inline_writes(daemon.dispatcher.table)
    assert {"VM.set_name_label", "VM.set_name_description", "pool.add_to_other_config",
            "pool.remove_from_other_config", "VM.add_tags", "VM.remove_tags"} <= names
    for name in ("VM.get_record", "VM.start", "VM.create", "VM.destroy", "Async.VM.set_name_label",
                 "session.logout", "pool.enable_ha", "VM.set_memory_static_max"):
        assert name not in names, name
    assert all(daemon.dispatcher.table[n].impl.__module__ == "xapid.generic" for n in names)  # type: ignore[union-attr]


def test_concurrent_field_writes_share_a_disk_write_and_answer_only_after_it(
        serve: Serve, daemon: Daemon, session: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop runs the writes and holds their answers to the end of its batch: one disk write
    for all it ran, then the answers (no thread started)."""
    server, loop = serve()
    store = daemon.store
    vms = store.refs("VM")[:4]
    written: list[float] = []
    write = store._write

    def slow_write(rows: list[Any]) -> None:
        time.sleep(0.3)  # a slow disk: the writes arriving meanwhile queue for the next batch
        write(rows)
        written.append(time.monotonic())

    monkeypatch.setattr(store, "_write", slow_write)
    clients = [Client(loop) for _ in vms]
    try:
        before = store.flushes
        for c, vm in zip(clients, vms, strict=True):
            c.send(xml("VM.set_name_label", session, vm, f"batched {vm[-4:]}"))
        answers = []
        for c in clients:
            answers.append(c.answer())
            assert written and time.monotonic() >= written[0]
        assert all(b"<name>Status</name><value>Success</value>" in a for a in answers)
        assert [store.get("VM", vm)["name_label"] for vm in vms] == [f"batched {vm[-4:]}" for vm in vms]  # type: ignore[index]
        assert store.flushes - before <= 2 < len(vms)
        assert server.threads_started == 0
        # The connections are parked again: the next call is the loop's too.
        assert b"batched" in clients[0].call(xml("VM.get_name_label", session, vms[0]))
        assert server.threads_started == 0
    finally:
        for c in clients:
            c.close()


def test_a_field_write_while_another_thread_holds_the_store_goes_to_a_thread(serve: Serve, daemon: Daemon,
                                                                             session: str) -> None:
    server, loop = serve()
    vm = daemon.store.refs("VM")[0]
    c = Client(loop)
    held = threading.Event()
    release = threading.Event()

    def long_transaction() -> None:
        with daemon.store.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=long_transaction)
    holder.start()
    try:
        assert held.wait(5)
        c.send(xml("VM.set_name_description", session, vm, "after the long one"))
        reader = Client(loop)  # the loop is not stuck behind the holder: it still answers reads
        assert b"Success" in reader.call(xml("VM.get_uuid", session, vm))
        reader.close()
        release.set()
        assert b"Success" in c.answer()
        assert server.threads_started == 1
        assert daemon.store.get("VM", vm)["name_description"] == "after the long one"  # type: ignore[index]
    finally:
        release.set()
        holder.join(5)
        c.close()


def test_a_held_answer_whose_disk_write_fails_is_an_internal_error(tmp_path: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d = in_process_daemon(tmp_path)
    try:
        sess = login(d)
        server, listener = start_server(d)
        vm = d.store.refs("VM")[0]

        def failing_write(rows: list[Any]) -> None:
            raise ApiError("INTERNAL_ERROR", "disk full")

        monkeypatch.setattr(d.store, "_write", failing_write)
        c = Client(listener)
        try:
            answer = c.call(jsonrpc("VM.set_name_label", sess, vm, "never on disk"))
            error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
            assert (error["message"], error["data"]) == ("INTERNAL_ERROR", ["disk full"])
            assert server.threads_started == 0
        finally:
            c.close()
            server.stop()
    finally:
        d.stop()


def test_idle_connections_in_the_loop_keep_their_deadlines(serve: Serve, daemon: Daemon, session: str) -> None:
    _s, loop = serve(header_timeout=0.3, keepalive_timeout=0.5)
    vm = daemon.store.refs("VM")[0]
    silent, kept = Client(loop), Client(loop)
    try:
        start = time.monotonic()
        kept.call(xml("VM.get_name_label", session, vm))
        assert silent.closed_within(2.0)  # nothing sent: header-timeout from the accept
        assert 0.25 <= time.monotonic() - start < 1.0
        assert kept.closed_within(2.0)  # idle after an answer: keepalive-timeout
        assert time.monotonic() - start >= 0.45
    finally:
        silent.close()
        kept.close()


def test_a_trickled_head_gets_header_timeout_from_its_first_byte(serve: Serve) -> None:
    _s, loop = serve(header_timeout=0.4)
    c = Client(loop)
    try:
        c.send(b"POST / HTTP/1.1\r\n")
        start = time.monotonic()
        answer = c.answer()
        assert answer.startswith(b"HTTP/1.1 408")
        assert 0.3 <= time.monotonic() - start < 1.5
    finally:
        c.close()


def test_withdrawing_the_listener_cuts_its_parked_connections_at_once(serve: Serve, daemon: Daemon,
                                                                     session: str) -> None:
    server, loop = serve()
    vm = daemon.store.refs("VM")[0]
    clients = [Client(loop) for _ in range(3)]
    for c in clients:
        c.call(xml("VM.get_name_label", session, vm))
    server.withdraw(loop)
    assert all(c.closed_within(1.0) for c in clients)
    with pytest.raises(OSError):
        socket.create_connection(loop.server_address, timeout=1).close()


def test_a_frozen_listener_answers_its_parked_connections_when_it_thaws(serve: Serve, daemon: Daemon,
                                                                       session: str) -> None:
    _s, loop = serve()
    vm = daemon.store.refs("VM")[0]
    c = Client(loop)
    try:
        c.call(xml("VM.get_name_label", session, vm))
        loop.running.clear()
        c.send(xml("VM.get_name_label", session, vm))
        c.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(10)
        loop.running.set()
        assert b"Success" in c.answer()
    finally:
        loop.running.set()
        c.close()


def test_stop_closes_parked_connections_and_answers_with_close(serve: Serve, daemon: Daemon, session: str) -> None:
    server, loop = serve(shutdown_timeout=0.5)
    vm = daemon.store.refs("VM")[0]
    clients = [Client(loop) for _ in range(5)]
    for c in clients:
        c.call(xml("VM.get_name_label", session, vm))
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 2.0
    assert all(c.closed_within(1.0) for c in clients)
    assert server._reactor is not None and len(server._reactor) == 0


def test_eviction_takes_parked_idle_connections_first(serve: Serve, daemon: Daemon, session: str) -> None:
    _s, loop = serve(max_connections=3, max_connections_per_ip=3)
    vm = daemon.store.refs("VM")[0]
    served = [Client(loop) for _ in range(2)]
    for c in served:
        c.call(xml("VM.get_name_label", session, vm))
    fresh = Client(loop)  # never completed a request: the first to go
    time.sleep(0.1)
    newcomer = Client(loop)
    try:
        assert fresh.closed_within(2.0)
        assert b"Success" in newcomer.call(xml("VM.get_name_label", session, vm))
        assert all(b"Success" in c.call(xml("VM.get_name_label", session, vm)) for c in served)
    finally:
        for c in [*served, fresh, newcomer]:
            c.close()
