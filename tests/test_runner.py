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
    """A user's `ray start --head` runs on the machine (in the test's own Ray temp dir, RAY_TMPDIR,
    where it records its address): the launcher joins it, a Ray that outlives the launch, and
    starts no private instance. (Another Ray on the machine, such as a user's running ablation,
    may make Ray's helpers warn "Found multiple active Ray instances"; they then take the one
    `ray start` recorded, this one.)"""
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
    assert "using the Ray instance `ray start` runs on this machine (" in out.stdout
    assert f":{port}); pass --ray-address" in out.stdout  # the user's instance (its GCS port)
    assert "Started a local Ray instance" not in text and "started a private Ray instance" not in text


def test_launches_starting_at_once_agree_on_one_private_token(tmp_path, monkeypatch) -> None:
    """Ray's token file is created once, mode 600, whole: four launches that start their private
    instances at the same moment all read one token. A user's RAY_AUTH_MODE=disabled or own token
    is left alone."""
    import multiprocessing
    import stat

    from kdsweep.orchestrate.runner import ensure_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        pool.map(_make_token, range(4))
    token = tmp_path / ".ray" / "auth_token"
    assert len(token.read_text()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]  # no temporary file left
    first = token.read_text()
    assert ensure_token() is None and token.read_text() == first  # an existing token is kept
    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ensure_token() is None and not token.exists()


def _make_token(_: int) -> None:
    from kdsweep.orchestrate.runner import ensure_token

    ensure_token()


# --- the private instance of a local launch (issue 21, points 1 and 2) -------------------------
SERVE = """
import sys, time
from kdsweep.orchestrate.runner import init_ray
import ray
init_ray(num_cpus=1)


@ray.remote(num_cpus=0)
def nodes_seen():  # Ray's State API from inside the instance, as Train's controller queries it
    from ray.util.state import list_nodes
    return [n.node_id for n in list_nodes()]


try:
    state = "ok" if ray.get(nodes_seen.remote()) == [ray.get_runtime_context().get_node_id()] else "another-instance"
except Exception as exc:
    state = type(exc).__name__
print("GCS", ray.get_runtime_context().gcs_address, "STATE", state, flush=True)
sys.stdin.read()  # until the test closes it
"""

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1])
print("CONNECTED", ray.get(ray.remote(num_cpus=0)(lambda: 42).remote()), flush=True)
"""


def _machine_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (where another host reaches it)."""
    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name == "AF_INET" and not a.address.startswith("127.")]


def _serve(env: dict, log):
    """A launch's init_ray in a process of its own, until stdin closes; returns (process, GCS host:port)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, text=True, start_new_session=True)
    deadline = time.time() + 240
    line = ""
    while time.time() < deadline and not line.startswith("GCS "):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert line.startswith("GCS "), f"init_ray did not start (exit {proc.poll()})"
    return proc, line.split()[1], line.split()[3]


def _stop(proc) -> None:
    import os
    import signal

    proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except Exception:  # noqa: BLE001
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["default", "disabled by the user"])
def test_a_private_instance_refuses_a_client_without_the_token_over_the_network(tmp_path, auth) -> None:
    """Ray's GCS listens on every interface of the machine whatever node address is asked for.
    A local launch keeps Ray's token authentication: a client on another address of the machine
    without the token is refused. A user who sets RAY_AUTH_MODE=disabled keeps that choice (and
    then the client connects: the control, which the launch before this fix always gave)."""
    import os
    import subprocess
    import sys
    import tempfile

    from conftest import ray_instance

    addresses = _machine_addresses()
    if not addresses:
        pytest.skip("this machine has no address other than loopback")
    home = tempfile.mkdtemp(prefix="h", dir="/tmp")  # the token Ray creates goes to this HOME, not the user's
    env = dict(os.environ, HOME=home, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    if auth != "default":
        env["RAY_AUTH_MODE"] = "disabled"
    with ray_instance(env, tmp_path) as nodes, open(tmp_path / "serve.log", "w") as log:
        proc, gcs, _ = _serve(nodes.env(), log)
        try:
            port = gcs.rpartition(":")[2]
            client_env = dict(os.environ, HOME=tempfile.mkdtemp(prefix="c", dir="/tmp"), RAY_AUTH_MODE="disabled",
                              RAY_USAGE_STATS_ENABLED="0")
            client_env.pop("RAY_ADDRESS", None)
            try:
                out = subprocess.run([sys.executable, "-c", CLIENT, f"{addresses[0]}:{port}"], env=client_env,
                                     capture_output=True, text=True, timeout=120)
                connected = "CONNECTED 42" in out.stdout
            except subprocess.TimeoutExpired:
                connected = False
        finally:
            _stop(proc)
    if auth == "default":
        assert not connected, "a client without the token ran a task on the launch's Ray"
        assert os.path.exists(os.path.join(home, ".ray", "auth_token"))
    else:
        assert connected, (out.stdout + out.stderr)[-3000:]


@pytest.mark.slow
def test_a_launch_never_joins_another_launchers_private_instance(tmp_path) -> None:
    """Another launch's private instance ends with that launch (and takes the trials of any launch
    that joined it): a second launch starts its own, on other ports, with its own dashboard."""
    import os

    from conftest import ray_instance

    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with ray_instance(env, tmp_path) as nodes, open(tmp_path / "serve.log", "w") as log:
        first, gcs_first, state_first = _serve(nodes.env(), log)
        try:
            second, gcs_second, state_second = _serve(nodes.env(), log)
            _stop(second)
        finally:
            _stop(first)
    assert gcs_first != gcs_second
    # the State API inside each instance reaches that instance, even with two on the machine
    assert (state_first, state_second) == ("ok", "ok")
