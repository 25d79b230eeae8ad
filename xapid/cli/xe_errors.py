"""The failures the ``xe`` client reports, each mapped to xe's stderr text and exit status.

Three kinds exist: :class:`ApiFailure` (the server answered ``Failure``),
:class:`ConnectFailure` (no usable answer from the server) and
:class:`XeError` (the client itself refuses: usage errors, read-only fields,
missing map keys).  Only :func:`xapid.cli.xe.main` turns them into output.
"""

from __future__ import annotations

from xapid.errors import DESCRIPTIONS

USAGE_HINT = "For usage run: 'xe help'"
CONNECT_MESSAGE = "Unable to contact server. Please check server and port settings."


class XeError(Exception):
    """A client-side failure: ``lines`` go to stderr verbatim, then exit with ``status``."""

    def __init__(self, *lines: str, status: int = 1) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)
        self.status = status


class ApiFailure(Exception):
    """The server's ``Failure`` envelope: ``[code, *params]``."""

    def __init__(self, code: str, params: list[str]) -> None:
        super().__init__(code, *params)
        self.code = code
        self.params = params


class ConnectFailure(Exception):
    """The server could not be reached or did not speak XML-RPC."""


def usage_error(message: str) -> XeError:
    """A failure xe follows with its usage hint (unknown command, missing or malformed parameter)."""
    return XeError(message, USAGE_HINT)


def failwith(text: str) -> XeError:
    """A failure raised by a command's own logic, printed as xapi prints an OCaml ``Failure``."""
    return XeError(DESCRIPTIONS["INTERNAL_ERROR"], f"message: Failure: {text}")
