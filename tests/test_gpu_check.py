"""benchmarks/gpu_check.py, the command the first GPU machine runs: its CPU smoke version runs
every section that does not need CUDA, and says why it skips the one that does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_version_runs_every_section_it_can(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--json", str(tmp_path / "gpu_check.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = summary["sections"]
    assert list(sections) == ["amp", "ssim", "collectives", "paper_step", "evaluate", "throughput"]
    assert sections["collectives"]["skipped"].startswith("needs CUDA")
    assert summary["failed"] == [] and "no CUDA device" in summary["note"]
    amp = sections["amp"]["keys"]
    from kdsweep.methods import TERMS

    assert set(amp) == set(TERMS)  # every registry key, each finite with float32 KD terms
    assert all(v["finite"] and v["kd_dtypes"] == ["torch.float32"] for v in amp.values())
    assert sections["ssim"]["max_abs_diff"] < 1e-4
    step = sections["paper_step"]
    assert step["trainer_loader"]["ms_per_step"] > 0 and 0 <= step["trainer_loader"]["data_wait_share"] < 1
    assert step["paper_loader"]["workers"] == 3 and step["paper_loader"]["images_per_s"] > 0
    assert sections["evaluate"]["eval_images"] == sections["evaluate"]["images"]
    assert sections["throughput"]["ok"] and sections["throughput"]["student_params_M"] == pytest.approx(11.55, abs=0.01)
