"""Issue 17 finding 9: ``pip install`` of the project prints no setuptools warning.

setuptools >= 77 warns (three times per install) about a ``project.license`` TOML table and wants an
SPDX expression string; it also warns about any folder shipped as data that Python could import as a
package but ``packages`` does not list.  Both are checked on the files themselves (no network, no build).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_and_the_backend_understands_it() -> None:
    assert PROJECT["project"]["license"] == "MIT"
    requires = " ".join(PROJECT["build-system"]["requires"])
    m = re.search(r"setuptools>=(\d+)", requires)
    assert m and int(m.group(1)) >= 77, requires  # SPDX strings need setuptools 77


def test_every_shipped_data_folder_that_looks_like_a_package_is_listed() -> None:
    setuptools = PROJECT["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        for sub in (REPO / folder).rglob("*"):
            if sub.is_dir() and "__pycache__" not in sub.parts:
                rel = sub.relative_to(REPO / folder).parts
                if all(part.isidentifier() for part in rel):
                    assert ".".join((package, *rel)) in packages, sub
