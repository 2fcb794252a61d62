"""Tune over Train (kdsweep.orchestrate.runner): which failed runs are restarted, the one-line
reasons, and a local launch beside a running Ray instance."""

from __future__ import annotations

import pytest
import ray.exceptions
from ray.train import ControllerError, WorkerGroupError

from kdsweep.orchestrate.runner import classify_failure


class _Wrapped(Exception):
    """What Ray Train hands back for an exception raised in the training function: its text is
    the worker's traceback (Ray's UserExceptionWithTraceback)."""


def _traceback(line: str) -> _Wrapped:
    return _Wrapped(f"Traceback (most recent call last):\n  File \"train_loop.py\", line 9, in _run_worker\n{line}\n")


NAN = "kdsweep.train.engine.NonFiniteLossError: non-finite loss at epoch 1 step 0 (kd_l2=inf); lower the learning rate"


def test_a_lost_worker_is_restarted():
    kind, reason = classify_failure(WorkerGroupError("rank 1 died", {1: ray.exceptions.ActorDiedError()}))
    assert kind == "lost" and reason


def test_deterministic_failures_are_not_restarted_even_beside_a_lost_worker():
    for line in (NAN, "kdsweep.train.engine.TrialOutOfMemoryError: out of memory at epoch 3 step 0 (2 images per worker)",
                 "kdsweep.config.ConfigError: kd.ssim.params.alpha must be a number"):
        kind, reason = classify_failure(WorkerGroupError("x", {0: _traceback(line), 1: ray.exceptions.ActorDiedError()}))
        assert (kind, reason) == ("fatal", line)


def test_a_bug_in_the_training_code_is_not_restarted():
    kind, reason = classify_failure(WorkerGroupError("x", {0: _traceback("ZeroDivisionError: division by zero")}))
    assert (kind, reason) == ("fatal", "ZeroDivisionError: division by zero")


def test_a_controller_error_is_not_restarted_here():
    kind, _ = classify_failure(ControllerError(RuntimeError("placement group could not be scheduled")))
    assert kind == "fatal"


@pytest.mark.slow
def test_a_local_launch_uses_the_ray_instance_already_running(tmp_path) -> None:
    """A user's `ray start --head` (with its own temp dir, so Ray's "latest cluster" file does not
    point at it) runs on the machine: the launcher connects to it instead of starting a second
    instance, whose helpers would fail on "Found multiple active Ray instances"."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ray_instance

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", KDSWEEP_HOME=str(tmp_path / "home"))
    env.pop("RAY_ADDRESS", None)
    with ray_instance(env, tmp_path) as nodes:  # stopped alone: no `ray stop`, which stops every Ray here
        nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", "--dashboard-port=0", "--disable-usage-stats")
        out = subprocess.run([sys.executable, str(root / "launch" / "ablation_ssim.py"), "--preset", "smoke", "--rows", "baseline",
                              "--no-throughput", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                             env=nodes.env(), capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "using the Ray instance already running on this machine (" in out.stdout
    assert f":{port}); pass --ray-address" in out.stdout  # the user's instance (its GCS port)
    assert "Started a local Ray instance" not in text
    assert "Found multiple active Ray instances" not in text
