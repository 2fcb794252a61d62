"""Trial and teacher checkpoints on S3: a real S3-compatible server (moto, in server mode) on
127.0.0.1, the launcher run as a user runs it with ``--storage-path s3://...``.

Checks the three things a cluster user relies on: the smoke SSIM ablation finishes with its
checkpoints on S3, a second launch reuses the teacher (its MLflow run holds the weights), and
``--resume`` continues an interrupted trial from its checkpoint on S3 (``start_epoch`` 2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "kdsweep-test"
pytestmark = pytest.mark.slow


@pytest.fixture()
def s3(tmp_path):
    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
               AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, KDSWEEP_HOME=str(tmp_path / "home"),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"env": env, "client": client}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _launch(env, uri, *extra):
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--preset", "smoke", "--tracking-uri", uri,
           "--storage-path", f"s3://{BUCKET}/kd", "--no-throughput", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_checkpoints_teacher_reuse_and_resume_on_s3(s3, tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    env, client = s3["env"], s3["client"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = MlflowClient(uri)

    # 1. the smoke SSIM ablation (two of its rows) with its storage on S3: the teacher is trained
    first = _launch(env, uri, "--rows", "baseline,ssim", "--experiment", "s3")
    assert "training the teacher" in first.stdout
    keys = _keys(client, "kd/")
    assert any("/checkpoint_" in k and k.endswith("model.pt") for k in keys), keys[:20]
    assert not (tmp_path / "home" / "ray_results").exists() or not any((tmp_path / "home" / "ray_results").iterdir())
    exp = mlflow.get_experiment_by_name("s3")
    runs = mlflow.search_runs([exp.experiment_id])
    [teacher] = [r for r in runs if r.data.tags.get("kdsweep.role") == "teacher"]
    assert teacher.info.status == "FINISHED"
    assert "teacher/model.pt" in [a.path for a in mlflow.list_artifacts(teacher.info.run_id, "teacher")]
    assert all(r.info.status == "FINISHED" for r in runs)
    from kdsweep.export import load_student

    students = [r for r in runs if r.data.tags.get("kdsweep.role") == "student"]
    assert len(students) == 2 and not any("kdsweep.model_not_logged" in r.data.tags for r in students)
    for r in students:  # each logged its student, read from its last checkpoint on S3
        assert type(load_student(r.info.run_id, tracking_uri=uri)).__name__ == "RetinaNet"

    # 2. a second launch reuses that teacher (its MLflow run holds the weights) and is interrupted
    #    after a trial's first epoch; 3. --resume continues that trial from its checkpoint on S3
    space = tmp_path / "two_epochs.yaml"
    # (batch 2: epochs long enough to interrupt; the teacher's config, hence its hash, is unchanged)
    space.write_text(yaml.safe_dump({"name": "s3_resume", "base": {"train": {"epochs": 3, "batch_size": 2}},
                                     "rows": [{"label": "l2", "kd": [{"loss": "l2", "adapter": True}]}]}))
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--preset", "smoke", "--tracking-uri", uri,
           "--storage-path", f"s3://{BUCKET}/kd", "--no-throughput", "--space", str(space), "--experiment", "resume",
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    child = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and child is None:
        exp = mlflow.get_experiment_by_name("resume")
        students = [r for r in mlflow.search_runs([exp.experiment_id]) if r.data.tags.get("kdsweep.role") == "student"] if exp else []
        child = next((r for r in students if "AP" in r.data.metrics and r.info.status == "RUNNING"), None)
        time.sleep(0.5)
    assert child is not None, "no trial reported its first epoch before the deadline"
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert f"reusing teacher run {teacher.info.run_id}" in out and "training the teacher" not in out
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming" in again.stdout
    resumed = mlflow.get_run(child.info.run_id)  # the same MLflow run went on
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["epoch"] == 3
    starts = [m.value for m in mlflow.get_metric_history(child.info.run_id, "start_epoch")]
    # epoch 1 (and 2, when the workers finished it before they stopped) came from the checkpoint
    # on S3, not retrained
    assert starts[0] == 1 and starts[-1] >= 2, starts
    assert any(k.startswith("kd/s3_resume-smoke-") for k in _keys(client, "kd/"))  # Tune's own state is on S3 too
