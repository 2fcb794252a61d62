"""benchmarks/gpu_check.py, the command the first GPU machine runs.

* On a bare GPU machine (no Ray, MLflow, scipy, optuna, COCO evaluators or pytorch_msssim, and no
  package index) the training sections run; simulated here by blocking those imports.
* Its CPU smoke version runs every other section that does not need CUDA, and says why it skips
  the one that does.
* A collective child that dies or cannot import reports at once, not after the queue's timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

BARE = ("ray", "mlflow", "scipy", "pycocotools", "faster_coco_eval", "pytorch_msssim", "optuna")
"""What the GPU image lacks (issue: torch, torchvision, numpy, Pillow, pandas, pyarrow, pytest only)."""

BLOCKER = '''
import importlib.abc, os, sys
BLOCKED = set(os.environ.get("GPU_CHECK_TEST_BLOCK", "").split(","))
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
'''


def bare_env(tmp_path: Path, blocked: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python processes cannot import ``blocked`` and whose pip reaches no
    index: a ``sitecustomize`` on PYTHONPATH puts a blocking finder first on ``sys.meta_path``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               GPU_CHECK_TEST_BLOCK=",".join(blocked), PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/")
    return env


def test_the_blocker_blocks(tmp_path: Path) -> None:
    """The simulation itself: in that environment each blocked module fails to import (a check
    that the bare-machine test below is not vacuous), and torch still imports."""
    code = "import importlib\nfor m in %r:\n    try:\n        importlib.import_module(m); print('imported', m)\n" \
           "    except ImportError: pass\nimport torch; print('torch ok')" % (BARE,)
    out = subprocess.run([sys.executable, "-c", code], env=bare_env(tmp_path, BARE), capture_output=True, text=True)
    assert out.stdout.split() == ["torch", "ok"], out.stdout + out.stderr


@pytest.mark.slow
def test_on_a_bare_gpu_machine_the_training_sections_run(tmp_path: Path) -> None:
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--only", "amp,paper_step,collectives", "--wheels", str(wheels), "--json", str(tmp_path / "s.json")],
                         env=bare_env(tmp_path, BARE), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    sections = summary["sections"]
    assert sections["amp"]["ok"] and sections["paper_step"]["ok"]
    assert sections["collectives"]["skipped"].startswith("needs CUDA")
    # every wheel was missing and none could be installed: said, not failed
    assert all(status.startswith("missing: no wheel") for status in summary["wheels"].values()), summary["wheels"]
    assert summary["failed"] == []
    from kdsweep.methods import TERMS

    assert set(sections["amp"]["keys"]) == set(TERMS)  # every registry key, finite, KD terms in float32
    assert all(v["finite"] and v["kd_dtypes"] == ["torch.float32"] for v in sections["amp"]["keys"].values())
    assert "FrozenBatchNorm2d" in sections["paper_step"]["student"]  # the paper preset's model, nothing downloaded


@pytest.mark.slow
def test_cpu_smoke_version_runs_every_other_section_it_can(tmp_path: Path) -> None:
    """The sections the bare-machine test does not run (amp and paper_step run there)."""
    rest = [s for s in gpu_check.SECTIONS if s not in ("amp", "paper_step")]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--only", ",".join(rest), "--json", str(tmp_path / "gpu_check.json")],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = summary["sections"]
    assert list(sections) == rest
    assert sections["collectives"]["skipped"].startswith("needs CUDA")
    assert summary["failed"] == [] and "no CUDA device" in summary["note"]
    assert summary["section_seconds"].keys() == sections.keys()
    nccl = sections["nccl"]
    assert nccl["backend"] == "gloo" and all(nccl[k] for k in ("all_true", "all_false", "mean", "gather", "broadcast"))
    for row in ("ssim", "csa"):  # the freeze's re-wrap and the thaw under DDP
        ddp = sections["ddp_amp"][row]
        assert ddp["ddp_wraps_after_build"] == 2 and ddp["body_still_while_frozen"] and ddp["body_trains_after"]
    assert sections["ddp_amp"]["csa"]["own_adam_stepped"]
    assert sections["largest"]["teacher_input"] == "192x256"  # the 2x teacher
    ck = sections["checkpoint"]
    assert ck["same_weights"] and ck["same_optimizers"] and ck["optimizers"] == 2 and ck["next_loss"][0] == ck["next_loss"][1]
    ev = sections["evaluate"]
    assert ev["eval_images"] == ev["images"] and ev["detections_per_image"] > 0 and ev["AP50_amp"] > 0
    assert ev["faster_coco_eval_max_gap"] <= 0.1
    for name in ("tf32", "channels_last", "frozen_backbone", "ssim_window", "csa_attention"):
        assert sections["speedups"][name]["ratio"] > 0
    assert sections["ssim"]["max_abs_diff"] < 1e-4
    assert sections["throughput"]["ok"] and sections["throughput"]["student_params_M"] == pytest.approx(11.55, abs=0.01)


def _exits_silently() -> None:
    sys.exit(3)


def test_a_child_that_dies_without_reporting_fails_at_once() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_exits_silently) for _ in range(2)]
    for p in procs:
        p.start()
    start = time.time()
    results = gpu_check.gather_children(procs, queue, timeout=120)
    assert time.time() - start < 30
    assert all("exited with code 3 before reporting" in r["error"] for r in results.values())


def test_a_collective_child_that_cannot_import_reports_its_error_at_once(tmp_path: Path, monkeypatch) -> None:
    """The child's imports fail (kdsweep blocked): it puts the ImportError on the queue itself."""
    for key, value in bare_env(tmp_path, ("kdsweep",)).items():
        monkeypatch.setenv(key, value)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=gpu_check._collective_worker, args=(r, 2, 0, "gloo", queue)) for r in range(2)]
    for p in procs:
        p.start()
    start = time.time()
    results = gpu_check.gather_children(procs, queue, timeout=120)
    assert time.time() - start < 60
    assert all(r["error"].startswith("ImportError") and "kdsweep" in r["error"] for r in results.values()), results


def test_wheels_are_fetched_for_every_python_and_both_manylinux_tags() -> None:
    assert gpu_check.PYTHONS == ("3.10", "3.11", "3.12", "3.13")
    assert "manylinux_2_28_x86_64" in gpu_check.PLATFORMS and "manylinux2014_x86_64" in gpu_check.PLATFORMS
    pyproject = (ROOT / "pyproject.toml").read_text()
    for requirement in gpu_check.PACKAGES.values():  # the versions the project itself requires
        assert f'"{requirement}"' in pyproject, requirement
