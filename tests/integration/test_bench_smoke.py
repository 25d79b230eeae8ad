"""The benchmark harness in its tiny mode (``make bench-smoke``), so that it cannot rot.

Runs ``python -m bench.run --smoke`` as a subprocess and checks that ``results.json`` carries
every figure with a finite value, and that the harness left no process behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.run import FIGURES
from tests.conftest import REPO


def running_under(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path``."""
    needle = os.fsencode(str(path))
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--workdir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "smoke"
    assert doc["meta"]["complete"] is True
    # Figures this machine cannot measure (the corosync ones without root) are listed, never silent.
    assert list(doc["figures"]) == [f for f in FIGURES if f not in doc["meta"]["unavailable"]]
    if os.geteuid() == 0 and shutil.which("corosync"):
        assert doc["meta"]["unavailable"] == []
    for name, figure in doc["figures"].items():
        assert isinstance(figure["value"], (int, float)) and math.isfinite(figure["value"]), name
        assert figure["value"] > 0, name
        if figure["target"] is not None:
            assert isinstance(figure["met"], bool), name
    for name in FIGURES:
        assert name in done.stdout or doc["figures"][name]["label"] in done.stdout
    assert list(work.iterdir()) == [], "the harness leaves its work dir behind"
    assert running_under(work) == [], "the harness leaves processes behind"
