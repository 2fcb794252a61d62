"""End to end with real components: a Ray head (`ray start --head`), an `mlflow server` on
SQLite, and `ray job submit --working-dir .` of the smoke SSIM ablation. Checks the MLflow record.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port, ray_instance

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture()
def services(tmp_path):
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job is this venv's
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        KDSWEEP_HOME=str(tmp_path / "home"),
    )
    gcs, dash, mlf = free_port(), free_port(), free_port()
    with ray_instance(env, tmp_path) as nodes:  # stopped alone: no `ray stop`, which stops every Ray here
        nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats")
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(mlf),
             "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # not Ray's: stopped by its own process group below
        try:
            wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
            wait_http(f"http://127.0.0.1:{mlf}/health", 120)
            # `ray job submit` and the job's driver carry the instance's marker: stopped with it
            yield {"env": nodes.env(), "dashboard": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlf}"}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_ray_job_submit_smoke_ablation_records_full_table(services, tmp_path):
    from mlflow.tracking import MlflowClient

    cmd = [str(BIN / "ray"), "job", "submit", "--address", services["dashboard"], "--working-dir", str(ROOT), "--",
           "python", "launch/ablation_ssim.py", "--preset", "smoke", "--tracking-uri", services["mlflow"],
           "--experiment", "e2e"]
    deadline = time.time() + 180
    while True:  # the head's job agent registers after the dashboard answers: Ray asks to retry
        job = subprocess.run(cmd, env=services["env"], capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in job.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()

    client = MlflowClient(tracking_uri=services["mlflow"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("kdsweep.role") == "ablation"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"ablation.parquet", "ablation_summary.parquet", "ablation.md", "ablation.png"} <= names
    per_seed = pq.read_table(client.download_artifacts(parent, "ablation.parquet", str(tmp_path))).to_pydict()
    table = pq.read_table(client.download_artifacts(parent, "ablation_summary.parquet", str(tmp_path))).to_pydict()
    from kdsweep.orchestrate.space import load_space

    labels = load_space(ROOT / "search_spaces" / "ablation_ssim.yaml").for_preset("smoke").labels  # the rows of this preset
    assert table["row"] == ["teacher", *labels]
    assert per_seed["row"] == ["teacher", *labels] and set(per_seed["seed"]) == {0}  # one seed: one row each
    for i, row in enumerate(table["row"]):
        assert table["failed"][i] == 0, row
        for name in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"):
            assert math.isfinite(table[f"{name}_mean"][i]), (row, name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    students = [r for r in children if r.data.tags.get("kdsweep.role") == "student"]
    assert sorted(r.data.tags["kdsweep.row"] for r in students) == sorted(labels)
    for run in students:
        history = client.get_metric_history(run.info.run_id, "AP")
        assert history and all(math.isfinite(m.value) for m in history)
        assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
