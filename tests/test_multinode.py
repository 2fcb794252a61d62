"""A two-node Ray cluster on this machine (a head plus `ray start --address` on loopback): a
2-worker run with one worker per node (STRICT_SPREAD), storage on a shared path, the record in
MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, ray_instance

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _alive_nodes(env: dict, address: str) -> int:
    code = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def test_two_nodes_one_worker_each_shared_storage_mlflow_record(tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", KDSWEEP_HOME=str(tmp_path / "home"))
    gcs, dash = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    with ray_instance(env, tmp_path) as nodes:  # both nodes stopped alone: no `ray stop`, which stops every Ray here
        env = nodes.env()
        nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--disable-usage-stats")
        nodes.start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats")
        deadline = time.time() + 120
        while _alive_nodes(env, address) < 2:
            assert time.time() < deadline, "the second node did not join"
            time.sleep(2)
        shared = tmp_path / "shared"  # stands in for NFS: one path both nodes see
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--preset", "smoke", "--rows", "baseline",
               "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD", "--ray-address", address,
               "--storage-path", str(shared), "--tracking-uri", uri, "--experiment", "two-nodes", "--no-throughput"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([exp.experiment_id])
    [child] = [r for r in runs if r.data.tags.get("kdsweep.role") == "student"]
    assert child.info.status == "FINISHED"
    assert child.data.metrics["world_size"] == 2
    assert child.data.metrics["nodes"] == 2  # STRICT_SPREAD: the two workers ran on different nodes
    assert child.data.metrics["eval_images"] > 0
    checkpoints = list(shared.glob("train-*/checkpoint_*"))
    assert checkpoints, "no checkpoint on the shared storage path"
    [parent] = [r for r in runs if r.data.tags.get("kdsweep.role") == "ablation"]
    assert parent.info.status == "FINISHED"
    assert child.data.params["train.placement_strategy"] == "STRICT_SPREAD"  # the trial config as logged
