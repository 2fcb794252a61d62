"""benchmarks/bench_eval.py at a tiny size: it runs end to end and prints every row of its two
tables (gather + unpack, old and new paths; COCOeval, both evaluators) with the ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_quick_prints_both_tables() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_eval.py"), "--quick", "--images", "24",
                          "--dets", "12", "--world", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    text = out.stdout
    assert "synthetic COCO: 24 images, 80 categories" in text and "12 detections per image (288)" in text
    for row in ("old: all_gather_object, every rank", "new: gather_rows, rank 0 (dst)", "new: gather_rows, other ranks",
                "old / new, rank 0: time", "old / new, other ranks: time"):
        assert row in text, text
    table = {cells[0]: cells[1:] for cells in map(str.split, text.splitlines())
             if len(cells) == 9 and cells[0] in ("pycocotools", "faster-coco-eval")}  # name, time, peak, six stats
    assert set(table) == {"pycocotools", "faster-coco-eval"}, text
    assert table["pycocotools"][2:] == table["faster-coco-eval"][2:]  # the six stats, as printed
    assert "pycocotools / faster-coco-eval: time" in text
