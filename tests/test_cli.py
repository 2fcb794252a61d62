"""Command line: bad input fails fast with one line (no traceback, nothing started); `ui` binds
127.0.0.1 on the embedded store."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_serves

from kdsweep import cli
from kdsweep.orchestrate.ablation import run_ablation

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("rows: [{label: a, kd: [{loss: ssimm}]}]\n", "kd[0].loss 'ssimm' is unknown"),
        ("rows: [{label: a}]\nspace: {kd.0.weight: {beta: [1, 2]}}\n", "sampler 'beta' is unknown"),
        ("rows: [{label: a, train: {epochs: 0}}]\n", "epochs"),
        ("rowz: []\n", "key 'rowz' is unknown"),
    ],
)
def test_bad_search_space_exits_2_with_one_line_before_starting(tmp_path, monkeypatch, capsys, yaml_text, fragment):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    space = tmp_path / "bad.yaml"
    space.write_text(yaml_text)
    assert run_ablation(space, ["--preset", "smoke"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert fragment in line and str(space) in line
    assert not (tmp_path / "home" / "mlflow").exists()  # nothing was started or recorded


def test_bad_dataset_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text("{not json")
    (data / "val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    code = run_ablation(ROOT / "search_spaces" / "ablation_ssim.yaml", ["--preset", "smoke", "--data", str(data)])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.json" in err and "not valid JSON" in err


def test_unknown_preset_is_an_argparse_error():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--preset", "huge"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'huge'" in proc.stderr and "Traceback" not in proc.stderr


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """``(ip, port)`` of every listening TCP socket (IPv4 and IPv6) held by process ``pid`` or any
    of its descendants, whatever their process group (mlflow runs in one of its own)."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


@pytest.mark.slow
def test_ui_serves_the_embedded_store_on_loopback(tmp_path):
    """`kdsweep ui` serves the MLflow UI of KDSWEEP_HOME's store, bound to 127.0.0.1: every socket
    that the server's processes listen on is on loopback, read from the sockets themselves (so the
    check holds where the host name resolves to 127.0.0.1, as on CI machines)."""
    import os
    import signal

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert mlflow_serves(port)
        assert (tmp_path / "home" / "mlflow" / "mlflow.db").is_file()  # the embedded store it serves
        bound = listening_addresses(proc.pid)
        assert ("127.0.0.1", port) in bound, bound
        assert {ip for ip, _ in bound} <= {"127.0.0.1", "::1"}, bound  # nothing on 0.0.0.0, :: or a LAN address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_ui_prints_the_runs_url_and_sigterm_stops_its_whole_process_group(tmp_path):
    """`kdsweep ui` prints the runs view of the newest experiment in model-training mode; a SIGTERM
    to `kdsweep ui` alone stops mlflow's server and every process it started (its job runner and
    huey consumers, about 2 GB), not only the kdsweep process."""
    import os
    import signal
    import time

    import psutil

    from kdsweep.report.tracking import Tracker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / "home"
    env = dict(os.environ, KDSWEEP_HOME=str(home))
    (home / "mlflow").mkdir(parents=True)
    exp_id = Tracker(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", "kdsweep-ablation_ssim").experiment_id
    proc = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    groups = set()
    try:
        assert mlflow_serves(port)
        children = psutil.Process(proc.pid).children(recursive=True)
        groups = {os.getpgid(c.pid) for c in children} - {os.getpgid(proc.pid)}
        assert groups  # mlflow runs in a process group of its own
        proc.send_signal(signal.SIGTERM)  # to kdsweep ui only
        out, _ = proc.communicate(timeout=90)
        assert f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning" in out
        for group in groups:
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            with pytest.raises(ProcessLookupError):
                os.killpg(group, 0)  # nothing of it is left
    finally:
        for group in groups | {proc.pid}:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
