"""benchmarks/bench_loader.py: its CPU smoke version prints every measure, and its RSS probe shows
the compact annotations' point (a worker's dataset costs a fraction of the JSON's objects)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_version_prints_every_measure(tmp_path: Path) -> None:
    env = {"KDSWEEP_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for line in ("old: PIL, float32 in the loader", "3 loader process(es)", "waiting for data", "grouped batches of 2",
                 "full decode, 1 thread(s)", "headers only",
                 "old dataset built", "new dataset built"):
        assert line in text
    plain = float(re.search(r"plain batches of 2\s+([\d.]+) %", text).group(1))
    grouped = float(re.search(r"grouped batches of 2 \(k=3\)\s+([\d.]+) %", text).group(1))
    assert grouped < 1.0 < 10.0 < plain  # 70/30 landscape/portrait: grouping removes the orientation padding
    old = float(re.search(r"old dataset built\s+(-?\d+) MB", text).group(1))
    new = float(re.search(r"new dataset built\s+(-?\d+) MB", text).group(1))
    assert new < old / 4 and old > 10  # 2,000 images with polygons: tens of MB of objects against a few mapped pages
