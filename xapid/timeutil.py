"""Timestamps in xapi's wire form (``20250319T04:16:24Z``)."""

from __future__ import annotations

import time


def now_iso() -> str:
    """The current UTC time, second precision, compact ISO 8601 with ``Z``."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())
