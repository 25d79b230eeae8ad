"""Helpers shared by the ``xe`` end-to-end tests (this module holds no tests).

:class:`Xe` runs the installed ``xe`` console script as a subprocess against a
daemon from the fixtures, the way an administrator would:
``xe -s 127.0.0.1 -p <port> -u root -pwf <file> --nossl <command> ...``,
with ``HOME`` pointing at an empty folder and no ``XE_EXTRA_ARGS``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xapid.schema import load

REPO = Path(__file__).resolve().parents[2]
XE_SCRIPT = Path(sys.executable).with_name("xe")
SCHEMA = load()


def xe_argv0() -> list[str]:
    """The installed console script, or the module when the venv has no script."""
    return [str(XE_SCRIPT)] if XE_SCRIPT.exists() else [sys.executable, "-m", "xapid.cli.xe"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Xe:
    """``xe`` bound to one daemon, with a password file and a private ``HOME``."""

    def __init__(self, tmp_path: Path, daemon: Any = None) -> None:
        self.daemon = daemon
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        self.pwf = tmp_path / "xe-password"
        if daemon is not None:
            self.port = str(urlparse(daemon.url).port)
            self.pwf.write_text(f"root\n{daemon.password}\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "XE_EXTRA_ARGS"}
        env["HOME"] = str(self.home)
        env.update(extra)
        return env

    def raw(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """Run ``xe`` with exactly ``args`` (no connection flags added)."""
        proc = subprocess.run([*xe_argv0(), *args], capture_output=True, text=True, env=env or self.env(),
                              timeout=120, cwd=REPO)
        assert "Traceback" not in proc.stderr, proc.stderr
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def __call__(self, *args: str) -> Result:
        return self.raw("-s", "127.0.0.1", "-p", self.port, "-u", "root", "-pwf", str(self.pwf), "--nossl", *args)

    def ok(self, *args: str) -> str:
        """stdout of a command that must succeed silently on stderr."""
        r = self(*args)
        assert (r.rc, r.err) == (0, ""), f"xe {' '.join(args)}: rc={r.rc} {r.err}"
        return r.out

    def fail(self, *args: str) -> str:
        """stderr of a command that must fail with status 1 and print nothing on stdout."""
        r = self(*args)
        assert r.rc == 1, f"xe {' '.join(args)}: rc={r.rc} out={r.out!r}"
        assert r.out == ""
        return r.err

    def get(self, cls: str, uuid: str, field: str, key: str | None = None) -> str:
        """``<cls>-param-get`` without the trailing newline."""
        extra = [f"param-key={key}"] if key is not None else []
        out = self.ok(f"{cls}-param-get", f"uuid={uuid}", f"param-name={field}", *extra)
        assert out.endswith("\n")
        return out[:-1]


LABEL = re.compile(r"^( *)(\S+ \((?: RO| RW|MRO|MRW|SRO|SRW)\)(?: \[DEPRECATED\])?)( *): (.*)$")


def check_layout(text: str) -> list[dict[str, tuple[str, str]]]:
    """Assert xe's record layout on every record of ``text``; return each record as name -> (tag, value).

    Rule: w = 4 + the longest ``name (tag)`` label of the record; the first
    label is left-aligned and padded to w, every other one right-aligned to
    w; then ``: value``; records end with a blank line.
    """
    assert text.endswith("\n\n"), repr(text[-40:])
    records = []
    for block in text[:-2].split("\n\n"):
        matches = []
        for line in block.split("\n"):
            m = LABEL.match(line)
            assert m, f"not a record line: {line!r}"
            matches.append(m)
        width = 4 + max(len(m.group(2)) for m in matches)
        first = matches[0]
        assert first.group(1) == "" and len(first.group(2) + first.group(3)) == width, first.group(0)
        for m in matches[1:]:
            assert m.group(3) == "" and len(m.group(1) + m.group(2)) == width, m.group(0)
        rec = {}
        for m in matches:
            name, _, tag = m.group(2).partition(" (")
            rec[name] = (tag.split(")")[0], m.group(4))
        records.append(rec)
    return records


def values(text: str) -> list[dict[str, str]]:
    """The records of a listing as name -> value, after checking the layout."""
    return [{k: v for k, (_t, v) in rec.items()} for rec in check_layout(text)]


def make(api: Any, cls: str, **given: Any) -> str:
    """Create an object through the SDK, filling every mandatory constructor field from the schema."""
    cdef = SCHEMA.classes[cls]
    rec: dict[str, Any] = {}
    for f in cdef.fields.values():
        if f.qualifier not in ("RW", "SRO") or f.has_default or f.derived_from or f.removed:
            continue
        if f.type.kind == "enum":
            rec[f.name] = SCHEMA.enums[f.type.name][0]
        elif f.type.kind == "int":
            rec[f.name] = "0"
        else:
            rec[f.name] = f.type.zero()
    rec.update(given)
    return str(getattr(api, cls).create(rec))


def make_vm(api: Any, name: str) -> str:
    """A halted 1 GiB, 1 vCPU VM; returns its ref."""
    gib = str(1024**3)
    return make(api, "VM", name_label=name, is_a_template=False, memory_static_max=gib, memory_dynamic_max=gib,
                memory_dynamic_min=gib, memory_static_min=gib, VCPUs_max="1", VCPUs_at_startup="1",
                actions_after_shutdown="destroy", actions_after_reboot="restart", actions_after_crash="restart")
