"""The access log's background writer (xapid/logging.py): its lines are structlog's, byte for byte,
and none is lost at a flush."""

from __future__ import annotations

import json
import os
import time

import pytest
from structlog.processors import JSONRenderer

from xapid.logging import AccessLog, _utc_iso, _utc_iso_slow

FIELDS = [
    ("VM.get_record", "root", "OpaqueRef:0b2d3e5c...", "Success", 0.04, 1764601115.734216),
    ("session.login_with_password", "", "", "SESSION_AUTHENTICATION_FAILED", 5012.5, 1764601115.0),
    ("m\u00e9thod \"q\" \\ \ud800", "us\ner", "<redacted>", "INTERNAL_ERROR", 12.0, 1764601116.5),
]


@pytest.mark.parametrize("entry", FIELDS)
def test_a_line_is_what_structlogs_json_renderer_makes(entry: tuple) -> None:  # type: ignore[type-arg]
    method, user, session, result, duration_ms, t = entry
    # The processors of xapid.logging.configure, in order: the call's keys, event, level, timestamp.
    event = {"method": method, "user": user, "session": session, "result": result, "duration_ms": duration_ms,
             "event": "call", "level": "info", "timestamp": _utc_iso(t)}
    assert AccessLog.render(entry) == JSONRenderer()(None, "info", event)  # type: ignore[arg-type]


def test_the_time_stamp_is_structlogs_iso_utc() -> None:
    assert _utc_iso(1764601115.734216) == "2025-12-01T14:58:35.734216Z"
    assert _utc_iso(1764601115.0) == "2025-12-01T14:58:35Z"  # isoformat drops a zero fraction


def read_lines(path: str) -> list[dict[str, object]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_every_queued_line_is_written_whole_and_in_order(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        log = AccessLog(fd, interval=0.001, idle_after=0.01)
        for i in range(5000):
            log.call(f"m{i}", "root", "s", "Success", 0.01)
        log.flush()  # what the server's stop does: nothing may stay queued
        lines = read_lines(path)
        assert [line["method"] for line in lines] == [f"m{i}" for i in range(5000)]
        time.sleep(0.05)  # the writer is idle now: a lone call wakes it
        log.call("lone", "root", "s", "Success", 0.01)
        deadline = time.monotonic() + 2.0
        while len(read_lines(path)) < 5001 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert read_lines(path)[-1]["method"] == "lone"
    finally:
        os.close(fd)


@pytest.mark.parametrize("duration", [0.0, 0.1, 12.34, 1e-05, 123456789.12, 3, float("inf")])
def test_durations_are_written_as_json_writes_them(duration: float) -> None:
    entry = ("m", "u", "s", "Success", duration, 0.5)
    assert json.loads(AccessLog.render(entry).replace("Infinity", "1e999"))["duration_ms"] == duration
    assert f'"duration_ms": {json.dumps(duration)},' in AccessLog.render(entry)


def test_the_cached_time_stamp_is_the_datetime_one() -> None:
    import random

    rng = random.Random(16)
    now = time.time()
    instants = [now + rng.uniform(-1e5, 1e5) for _ in range(3000)]
    instants += [float(int(now)), int(now) + 0.9999995, int(now) + 0.0000005, int(now) + 0.5, 0.0, 1e9 + 0.999999]
    instants += [int(now) + k / 1e6 for k in range(0, 1_000_000, 99_991)]
    for t in sorted(instants) + instants:  # in order (the cache reused) and shuffled
        assert _utc_iso(t) == _utc_iso_slow(t), t
