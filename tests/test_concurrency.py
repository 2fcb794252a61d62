"""Eight trials logging at once to one `mlflow server` (SQLite backend): nothing lost, no
"database is locked". Services bind 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
WRITERS, PARAMS, STEPS = 8, 25, 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _writer(uri: str, index: int, queue) -> None:
    """One 'trial': a run with PARAMS params and STEPS steps of three metrics, as the Tune
    callback writes them (one call per epoch)."""
    try:
        from kdsweep.report.tracking import Tracker

        tracker = Tracker(uri, "concurrency")
        run = tracker.start_run(f"trial {index}", tags={"kdsweep.trial_id": str(index)})
        tracker.log_params(run, {f"p{i}": f"{index}-{i}" for i in range(PARAMS)})
        for step in range(1, STEPS + 1):
            tracker.log_metrics(run, {"AP": index + step / 100, "AP_S": step, "loss": 1.0 / step}, step=step)
        tracker.end_run(run)
        queue.put((index, run, ""))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((index, None, f"{type(exc).__name__}: {exc}"))


def test_eight_writers_through_one_server_lose_nothing(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(uri, i, queue)) for i in range(WRITERS)]
        for p in procs:
            p.start()
        outcomes = [queue.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    errors = [e for _, _, e in outcomes if e]
    assert not errors, errors
    assert "database is locked" not in (tmp_path / "server.log").read_text()

    from mlflow.tracking import MlflowClient

    # read back straight from the SQLite file: everything every writer sent is there
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == WRITERS and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        index = int(run.data.tags["kdsweep.trial_id"])
        assert run.data.params == {f"p{i}": f"{index}-{i}" for i in range(PARAMS)}
        for key in ("AP", "AP_S", "loss"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), (index, key)
        assert run.data.metrics["AP"] == pytest.approx(index + STEPS / 100)
