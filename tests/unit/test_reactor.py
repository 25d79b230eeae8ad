"""The event loop of idle connections (xapid/reactor.py) on socket pairs.

It must call ``ready`` for each parked entry with input and keep the entry parked when told so,
detach it before running what ``ready`` hands back (once), expire entries at their deadline (a
deadline pushed back while parked counts), and give back what is parked when closed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xapid.reactor import Reactor


class Item:
    def __init__(self, sock: socket.socket, idle: float = 30.0) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.idle_until = time.monotonic() + idle
        self.heaped = False


class Loop:
    """A reactor whose ``ready`` reads what arrived and does what the test says."""

    def __init__(self) -> None:
        self.got: list[tuple[Item, bytes]] = []
        self.expired: list[Item] = []
        self.handed: list[Item] = []
        self.changed = threading.Condition()
        self.reactor = Reactor(self.ready, self.expire, name="test-reactor")
        self.reactor.start()

    def ready(self, item: Item) -> Callable[[], None] | None:
        data = item.sock.recv(100)
        with self.changed:
            self.got.append((item, data))
            self.changed.notify_all()
        if data == b"hand":
            return lambda: self.hand(item)
        return None

    def hand(self, item: Item) -> None:
        with self.changed:
            self.handed.append(item)
            self.changed.notify_all()

    def expire(self, item: Item) -> None:
        with self.changed:
            self.expired.append(item)
            self.changed.notify_all()

    def wait_for(self, what: Callable[[], Any], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(what, timeout), "the loop did not get there in time"


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.reactor.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(4)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def test_ready_is_called_per_input_and_the_entry_stays_parked(loop: Loop, pairs: Any) -> None:
    items = [Item(b) for _a, b in pairs]
    for item in items:
        assert loop.reactor.park(item)
    for i, (a, _b) in enumerate(pairs):
        a.sendall(b"one%d" % i)
    loop.wait_for(lambda: len(loop.got) == 4)
    pairs[0][0].sendall(b"two")  # still parked: a second input is reported too
    loop.wait_for(lambda: len(loop.got) == 5)
    assert sorted(d for _i, d in loop.got) == [b"one0", b"one1", b"one2", b"one3", b"two"]
    assert loop.got[-1][0] is items[0]
    assert len(loop.reactor) == 4 and not loop.handed and not loop.expired


def test_a_handed_entry_is_detached_first_and_handed_once(loop: Loop, pairs: Any) -> None:
    a, b = pairs[0]
    item = Item(b)
    loop.reactor.park(item)
    a.sendall(b"hand")
    loop.wait_for(lambda: loop.handed == [item])
    assert len(loop.reactor) == 0
    a.sendall(b"more")  # not watched any more
    time.sleep(0.2)
    assert [d for _i, d in loop.got] == [b"hand"]
    assert loop.reactor.park(item)  # parked again, it is watched again
    loop.wait_for(lambda: len(loop.got) == 2)
    assert loop.got[-1][1] == b"more"


def test_deadlines_expire_entries_and_can_be_pushed_back(loop: Loop, pairs: Any) -> None:
    soon, later = Item(pairs[0][1], idle=0.1), Item(pairs[1][1], idle=0.1)
    start = time.monotonic()
    loop.reactor.park(soon)
    loop.reactor.park(later)
    later.idle_until = start + 0.6  # pushed back while parked
    loop.wait_for(lambda: loop.expired == [soon])
    assert time.monotonic() - start < 0.5
    loop.wait_for(lambda: loop.expired == [soon, later])
    assert time.monotonic() - start >= 0.6
    assert len(loop.reactor) == 0


def test_an_entry_parked_again_and_again_holds_one_deadline(loop: Loop, pairs: Any) -> None:
    a, b = pairs[0]
    item = Item(b)
    for i in range(50):
        loop.reactor.park(item)
        a.sendall(b"hand")
        loop.wait_for(lambda i=i: len(loop.handed) == i + 1)
    assert len(loop.reactor._deadlines) == 1


def test_close_gives_back_what_is_parked_and_parks_no_more(pairs: Any) -> None:
    lp = Loop()
    items = [Item(b) for _a, b in pairs[:2]]
    for item in items:
        lp.reactor.park(item)
    left = lp.reactor.close()
    assert sorted(map(id, left)) == sorted(map(id, items))
    assert not lp.reactor.park(Item(pairs[2][1]))
    assert not lp.reactor._thread.is_alive()
