"""The console's static files: in the wheel, nothing the CSP would block, nothing fetched from elsewhere."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from tests.conftest import REPO
from xapid.console import CONTENT_TYPES, STATIC, static_files

SVG_NS = "http://www.w3.org/2000/svg"


def shipped_patterns() -> list[str]:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "xapid.console" in doc["tool"]["setuptools"]["packages"]
    return list(doc["tool"]["setuptools"]["package-data"]["xapid.console"])


def every_file() -> list[Path]:
    return sorted(p for p in STATIC.rglob("*") if p.is_file())


def test_every_static_file_is_in_the_wheel_and_served_with_a_known_type() -> None:
    patterns = shipped_patterns()
    files = every_file()
    assert {"index.html", "root.html", "console.css", "js/main.js", "js/xapi.js"} <= {
        p.relative_to(STATIC).as_posix() for p in files}
    for path in files:
        rel = path.relative_to(STATIC.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns), f"{rel} would be left out of the wheel"
        assert path.suffix in CONTENT_TYPES, f"{rel} has no content type"
    assert len(static_files()) == len(files)


def test_nothing_is_fetched_from_elsewhere() -> None:
    for path in every_file():
        text = path.read_text()
        for url in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text):
            assert url == SVG_NS, f"{path.name} refers to {url}"
        if path.suffix == ".js":
            for spec in re.findall(r"^import .* from \"([^\"]+)\";", text, re.M):
                assert spec.startswith("./"), f"{path.name} imports {spec}"
        if path.suffix == ".css":
            assert "@import" not in text and "url(" not in text


def test_pages_have_no_inline_script_style_or_handlers_the_csp_would_block() -> None:
    for name in ("index.html", "root.html"):
        html = (STATIC / name).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), name
        assert "<style" not in html and not re.search(r"\sstyle=", html), name
        assert not re.search(r"\son[a-z]+=", html), name
    for path in (STATIC / "js").glob("*.js"):
        text = path.read_text()
        assert "innerHTML =" not in text and "eval(" not in text and "new Function" not in text, path.name
        assert "localStorage" not in text and "sessionStorage" not in text and "document.cookie" not in text, path.name
