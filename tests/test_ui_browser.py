"""What a user sees after `kdsweep ui`, in a real browser: headless Chromium renders the MLflow UI
of a smoke ablation's store, its JavaScript run, and the test reads the rendered page.

Chromium is the Debian `chromium` package (`.ci/run` installs it). Without it the test is skipped,
unless ``KDSWEEP_REQUIRE_BROWSER=1`` (CI sets it), where a missing browser fails the test. The
screenshot of the parent run's page is kept under the test's temporary folder and logged to the
parent run as ``ablation_ui.png``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mlflow_serves
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("baseline", "ssim")


def _browser() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


def _chromium(browser: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, with 20 s of (virtual) time for the page's JavaScript."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--window-size=1400,1000", "--virtual-time-budget=20000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _text(dom: str) -> str:
    """The rendered page's visible text, one space between words."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.slow
def test_kdsweep_ui_opens_on_the_runs_with_the_ablation_table_in_the_parents_description(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        if os.environ.get("KDSWEEP_REQUIRE_BROWSER") == "1":
            pytest.fail("KDSWEEP_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium; CI installs it)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--preset", "smoke", "--rows",
                          ",".join(ROWS), "--tracking-uri", uri, "--experiment", "ui", "--no-throughput"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ui")
    [parent] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kdsweep.role") == "ablation"]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "kdsweep.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    shot = tmp_path / "ablation_ui.png"
    try:
        printed = ""
        deadline = time.time() + 120
        while time.time() < deadline and "workflowType=machine_learning" not in printed:
            printed += ui.stdout.readline()
        runs_url = re.search(r"http://\S+workflowType=machine_learning", printed).group(0)
        assert runs_url == f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
        assert mlflow_serves(port)

        runs = _text(_chromium(browser, runs_url, "--dump-dom").stdout)
        parent_url = (f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
                      "?workflowType=machine_learning")
        _chromium(browser, parent_url, f"--screenshot={shot}")
        page = _chromium(browser, parent_url, "--dump-dom").stdout
        text = _text(page)
        try:
            # the runs view (its table of runs, the parent among them), not the GenAI overview
            assert "Run Name" in runs and parent.info.run_name in runs, runs[:2000]
            assert "Observability" not in runs and "Usage" not in runs, runs[:2000]
            # the parent's page: every row's child run by name, and the ablation table as its description
            for row in ROWS:
                assert f"{row} / seed 0" in text, text[:3000]
            assert "<table" in page and "ΔAP" in text and "seeds" in text, text[:3000]
            assert "No description" not in text
        except AssertionError:
            print(f"screenshot of the parent run's page: {shot}", file=sys.stderr)
            raise
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    assert shot.is_file() and shot.stat().st_size > 10_000
    client.log_artifact(parent.info.run_id, str(shot))
    assert "ablation_ui.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
