"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer


class FdLogger:
    """A structlog logger that writes each line with one ``write(2)`` on a file descriptor.

    One call, one line: with stderr in append mode (or a pipe, for lines under PIPE_BUF) whole
    lines never interleave, so unlike structlog's PrintLogger no lock and no flush are needed on
    the per-call hot path.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # a closed or broken stderr must not fail a call
            data = data[written:]

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def fd_logger_factory(*_args: Any) -> Any:
    """An :class:`FdLogger` on stderr, or structlog's PrintLogger when stderr has no descriptor."""
    try:
        return FdLogger(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return structlog.PrintLogger(sys.stderr)


def configure(level: str = "info") -> None:
    """Route structlog (and stdlib logging) to stderr at ``level``."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    # Tracebacks never carry local variables: they would put passwords and session refs in the log.
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            tracebacks if not sys.stderr.isatty() else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=fd_logger_factory,
        cache_logger_on_first_use=True,
    )
