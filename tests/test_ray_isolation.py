"""The slow tests' own Ray instances (conftest.ray_instance) stop alone: every process of the
test's instance ends, a detached actor's worker included, and another Ray instance on the machine
(a user's running ablation) is not touched, unlike `ray stop --force`, which stops every Ray here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RayNodes, free_port, ray_instance, ray_processes

pytestmark = pytest.mark.slow


def _head(nodes: RayNodes, port: int) -> None:
    nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                "--disable-usage-stats")


def test_a_tests_ray_instance_stops_alone_and_whole(tmp_path: Path) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "other").mkdir()
    other = RayNodes(env, tmp_path / "other")  # stands in for a user's instance
    try:
        _head(other, free_port())
        before = set(ray_processes(other.temp_dir))
        with ray_instance(env, tmp_path) as nodes:
            port = free_port()
            _head(nodes, port)
            # a detached actor outlives its driver: its worker is a daemon of the instance
            code = (f"import os, ray\nray.init(address='127.0.0.1:{port}', namespace='t')\n"
                    "@ray.remote(num_cpus=0)\nclass A:\n    def pid(self):\n        return os.getpid()\n"
                    "a = A.options(name='a', lifetime='detached').remote()\nprint(ray.get(a.pid.remote()))\n")
            out = subprocess.run([sys.executable, "-c", code], env=nodes.env(), capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            worker = int(out.stdout.strip().splitlines()[-1])
            assert worker in ray_processes(nodes.temp_dir)  # found by the marker its worker inherits
            ours = set(ray_processes(nodes.temp_dir))
            assert len(ours) >= 4 and not ours & before  # ray start, gcs, raylet, the worker, ...; not the other's
        assert not [pid for pid in ours if os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", "X")]
        assert set(ray_processes(other.temp_dir)) >= before  # the other instance runs on, untouched
        assert all(_state(pid) not in ("Z", "X", "") for pid in before)
    finally:
        survivors = other.stop()
    assert not survivors


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (R, S, Z, ...), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""
