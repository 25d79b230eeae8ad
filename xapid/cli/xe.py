"""``xe``: xapi's command-line client, speaking XML-RPC to xapid (wire.md 8, ha.md 8).

This module only parses the command line and connects; commands live in
:mod:`xapid.cli.xe_commands`, output in :mod:`xapid.cli.xe_output`.

Connection settings, lowest priority first: ``~/.xe`` (``key=value`` lines,
``$HOME`` honoured), ``XE_EXTRA_ARGS`` (comma-separated, ``\\,`` escapes a
comma), the command line.  Keys: ``server`` (``-s``/``-h``, default
127.0.0.1), ``port`` (``-p``), ``username`` (``-u``, default root),
``password`` (``-pw``, default ``null``), ``passwordfile`` (``-pwf``: user on
line 1, password on line 2; overrides ``-u``/``-pw``), ``nossl``
(``--nossl``).  Non-connection arguments of ``XE_EXTRA_ARGS`` are appended to
the command's own.

Scheme rule: xapid speaks plain HTTP unless TLS is configured, so xe uses
``http`` when ``--nossl`` is given (default port 80) or when the port is not
443; only the default port 443 without ``--nossl`` uses ``https``.  As with
xe's stunnel, the server certificate is not verified.

Exit status: 0 on success and for help; 1 for every failure, each reported on
stderr the way xe reports it (wire.md 8.6), never as a traceback.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from xml.parsers.expat import ExpatError

from xapid.schema import load

from . import xe_output as output
from .xe_commands import Args, Command, Context, Database, registry
from .xe_errors import CONNECT_MESSAGE, ApiFailure, ConnectFailure, XeError, usage_error
from .xe_fields import build

THIN_CLI_PROTOCOL = "0.2"
CONNECTION_KEYS = ("server", "port", "username", "password", "passwordfile", "nossl")
IGNORED_KEYS = ("debug", "debugonfail", "debug-on-fail", "traceparent")
VALUE_FLAGS = {"-s": "server", "-h": "server", "-p": "port", "-u": "username", "-pw": "password",
               "-pwf": "passwordfile", "--traceparent": "traceparent"}


@dataclass
class Invocation:
    """A parsed command line: connection settings, the command and its arguments."""

    settings: dict[str, str] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    help: bool = False
    version: bool = False


def split_extra_args(text: str) -> list[str]:
    """``XE_EXTRA_ARGS`` split on commas, ``\\,`` standing for a literal comma."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] == ",":
            current.append(",")
            i += 2
            continue
        if text[i] == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return [p for p in parts if p]


def read_rc(home: str | None) -> list[str]:
    """The ``key=value`` lines of ``$HOME/.xe`` (missing or unreadable file: none)."""
    if not home:
        return []
    try:
        text = (Path(home) / ".xe").read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]


def scan(tokens: Sequence[str]) -> Invocation:
    """Separate global flags and connection keys (anywhere on the line) from the command words.

    ``--nossl`` stands for ``nossl=true``; ``-s HOST`` style flags take the next token; other
    ``--switch`` words stay as they are (the command's arguments turn them into ``switch=true``).
    """
    inv = Invocation()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in VALUE_FLAGS:
            if i >= len(tokens):
                raise usage_error(f"Syntax error: {token} needs a value")
            inv.settings[VALUE_FLAGS[token]] = tokens[i]
            i += 1
            continue
        if token in ("--help", "-help"):
            inv.help = True
            continue
        if token in ("-version", "--version"):
            inv.version = True
            continue
        switch = token.startswith("--") and "=" not in token
        key, eq, value = (token[2:], "=", "true") if switch else token.partition("=")
        if eq and key in CONNECTION_KEYS + IGNORED_KEYS:
            inv.settings[key] = value
        else:
            inv.words.append(token)
    return inv


def parse_invocation(argv: Sequence[str], environ: Mapping[str, str]) -> Invocation:
    """The command line merged with ``~/.xe`` and ``XE_EXTRA_ARGS`` (command line wins)."""
    rc = scan(read_rc(environ.get("HOME")))
    extra = scan(split_extra_args(environ.get("XE_EXTRA_ARGS", "")))
    cmd = scan(argv)
    rc_settings = {k: v for k, v in rc.settings.items() if k in CONNECTION_KEYS}
    cmd.settings = {**rc_settings, **extra.settings, **cmd.settings}
    cmd.words = cmd.words + extra.words
    cmd.help = cmd.help or extra.help
    return cmd


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect."""

    url: str
    username: str
    password: str


def target(settings: Mapping[str, str]) -> Target:
    """The URL (scheme rule in the module docstring) and the credentials of ``settings``."""
    host = settings.get("server") or "127.0.0.1"
    nossl = settings.get("nossl", "false").lower() in ("true", "1", "yes", "on")
    try:
        port = int(settings["port"]) if settings.get("port") else (80 if nossl else 443)
    except ValueError:
        raise usage_error(f"Syntax error: port must be a number, got '{settings['port']}'") from None
    scheme = "http" if nossl or port != 443 else "https"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    username = settings.get("username", "root")
    password = settings.get("password", "null")
    if settings.get("passwordfile"):
        try:
            lines = Path(settings["passwordfile"]).read_text().splitlines()
        except OSError as e:
            raise XeError(f"Error: cannot read password file {settings['passwordfile']}: {e.strerror}") from None
        username = lines[0].strip() if lines else ""
        password = lines[1].rstrip("\r\n") if len(lines) > 1 else ""
    return Target(f"{scheme}://{host}:{port}/", username, password)


class Connection:
    """An XML-RPC connection to the daemon; after :meth:`login`, :meth:`call` adds the session."""

    def __init__(self, url: str) -> None:
        context = ssl._create_unverified_context() if url.startswith("https:") else None
        self._proxy = xmlrpc.client.ServerProxy(url, allow_none=True, context=context)
        self.session: str | None = None
        self.local = False

    def _invoke(self, method: str, args: Sequence[Any]) -> Any:
        """The ``Value`` of the envelope; ApiFailure for a ``Failure``, ConnectFailure when unreachable."""
        try:
            reply = getattr(self._proxy, method)(*args)
        except xmlrpc.client.Fault as e:
            raise ApiFailure(str(e.faultCode), [str(e.faultString)]) from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, xmlrpc.client.ResponseError,
                ExpatError) as e:
            raise ConnectFailure(str(e)) from None
        if not isinstance(reply, dict) or "Status" not in reply:
            raise ConnectFailure(f"unexpected reply to {method}")
        if reply["Status"] == "Success":
            return reply.get("Value")
        description = [str(x) for x in reply.get("ErrorDescription") or ["INTERNAL_ERROR"]]
        raise ApiFailure(description[0], description[1:])

    def login(self, username: str, password: str) -> None:
        self.session = self._invoke("session.login_with_password", [username, password, "2.21", "cli"])

    def local_login(self, username: str, password: str) -> None:
        """A session of the contacted host alone (works on a slave: the emergency commands)."""
        self.session = self._invoke("session.slave_local_login_with_password", [username, password])
        self.local = True

    def call(self, method: str, *args: Any) -> Any:
        return self._invoke(method, [self.session, *args])

    def logout(self) -> None:
        """End the session; a failure here changes nothing for the user."""
        if self.session is None:
            return
        try:
            self._invoke("session.local_logout" if self.local else "session.logout", [self.session])
        except (ApiFailure, ConnectFailure):
            pass
        self.session = None


class Offline:
    """The connection of commands that never need the server."""

    def call(self, method: str, *args: Any) -> Any:
        raise ConnectFailure(method)


def run(argv: Sequence[str], environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """Run one xe invocation; returns the exit status (XeError/ConnectFailure propagate)."""
    inv = parse_invocation(argv, environ)
    if inv.version:
        out.write(f"ThinCLI protocol: {THIN_CLI_PROTOCOL}\n")
        return 0
    schema = load()
    classes = build(schema)
    commands = registry(classes)
    if inv.help or not inv.words:
        out.write(output.usage_text(sorted(commands)))
        return 0
    # Switches (--minimal, --force) may come before the command name.
    position = next((i for i, w in enumerate(inv.words) if not w.startswith("--")), None)
    if position is None or "=" in inv.words[position]:
        raise usage_error("Syntax error: command name is missing")
    name, rest = inv.words[position], inv.words[:position] + inv.words[position + 1:]
    command: Command | None = commands.get(name)
    if command is None:
        raise usage_error(f"Unknown command: {name}")
    args = Args.parse(rest, bare=command.bare)
    command.check(args)
    if command.local:
        command.run(Context(Offline(), schema, classes, Database(Offline(), schema), out), args)
        return 0
    where = target(inv.settings)
    conn = Connection(where.url)
    try:
        if command.local_session:
            conn.local_login(where.username, where.password)
        else:
            conn.login(where.username, where.password)
    except ApiFailure as e:
        err.write("\n".join(output.api_error_lines(e.code, e.params, lambda _label, ref: ref)) + "\n")
        return 1
    db = Database(conn, schema)
    try:
        command.run(Context(conn, schema, classes, db, out), args)
    except ApiFailure as e:
        out.flush()
        err.write("\n".join(output.api_error_lines(e.code, e.params, db.describe)) + "\n")
        return 1
    finally:
        conn.logout()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``xe`` console script: run the command line, report failures as xe does, return the status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = run(argv, os.environ, sys.stdout, sys.stderr)
        sys.stdout.flush()
        return status
    except XeError as e:
        sys.stdout.flush()
        sys.stderr.write("\n".join(e.lines) + "\n")
        return e.status
    except ConnectFailure:
        sys.stderr.write(CONNECT_MESSAGE + "\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
