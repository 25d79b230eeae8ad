"""The emulated watchdog device (xapid/hw/watchdog.py): arm, pet, disarm, fence, expiry."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xapid.hw.watchdog import Watchdogs, socket_address


class Recorder:
    def __init__(self) -> None:
        self.fenced: list[tuple[str, str, float]] = []
        self.event = threading.Event()

    def __call__(self, uuid: str, reason: str) -> None:
        self.fenced.append((uuid, reason, time.monotonic()))
        self.event.set()


@pytest.fixture
def dogs(tmp_path: Path) -> Iterator[tuple[Watchdogs, Recorder, Path]]:
    rec = Recorder()
    w = Watchdogs(rec)
    folder = tmp_path / ("h" * 80) / "host-a"  # longer than an AF_UNIX address can hold
    w.add("a", folder)
    w.start()
    yield w, rec, folder
    w.stop()


def send(folder: Path, message: str) -> None:
    import os

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), socket_address(folder, fd))
    finally:
        os.close(fd)


def test_unpetted_watchdog_fences_after_its_timeout(dogs: tuple[Watchdogs, Recorder, Path]) -> None:
    w, rec, folder = dogs
    armed_at = time.monotonic()
    send(folder, "arm 0.5")
    assert rec.event.wait(3)
    uuid, reason, when = rec.fenced[0]
    assert uuid == "a" and "not petted for 0.5 s" in reason
    assert 0.4 <= when - armed_at < 2.0
    assert w.state("a") is None  # fires once


def test_pets_keep_the_host_alive_and_disarm_stops_it(dogs: tuple[Watchdogs, Recorder, Path]) -> None:
    w, rec, folder = dogs
    send(folder, "arm 0.4")
    for _ in range(8):
        time.sleep(0.15)
        send(folder, "pet")
    assert rec.fenced == []
    send(folder, "disarm")
    time.sleep(0.8)
    assert rec.fenced == [] and w.state("a") is None


def test_fence_message_resets_at_once_with_its_reason(dogs: tuple[Watchdogs, Recorder, Path]) -> None:
    _w, rec, folder = dogs
    send(folder, "fence lost the partition")
    assert rec.event.wait(2)
    assert "lost the partition" in rec.fenced[0][1]


def test_garbage_and_bad_timeouts_are_ignored(dogs: tuple[Watchdogs, Recorder, Path]) -> None:
    w, rec, folder = dogs
    for bad in ("arm -1", "arm nan", "arm x", "explode", "", "pet"):
        send(folder, bad)
    time.sleep(0.3)
    assert rec.fenced == [] and w.state("a") is None
