"""kdsweep.report.compare (``kdsweep table``): ablation tables rebuilt from MLflow parent runs,
with the paired intervals, one or several side by side."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kdsweep.cli import main
from kdsweep.report.tables import ablation_table, write_parquet
from kdsweep.report.tracking import TAG_REASON, TAG_ROLE, TAG_ROW, TAG_SEED, Tracker


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


def _ablation(tracker: Tracker, name: str, values: dict[str, list[float]], tmp_path, summary: bool = True) -> str:
    """A parent run whose child runs are the (row, seed) trials of ``values``; a NaN value is a
    failed trial. With ``summary``, the parent also has the summary a launcher logs (its order,
    teacher and columns)."""
    parent = tracker.start_run(name, tags={TAG_ROLE: "ablation"})
    records = []
    for row, per_seed in values.items():
        for seed, ap in enumerate(per_seed):
            child = tracker.start_run(f"{row} / seed {seed}", parent=parent,
                                      tags={TAG_ROLE: "student", TAG_ROW: row, TAG_SEED: str(seed)})
            if math.isnan(ap):
                tracker.end_run(child, "FAILED", reason="non-finite loss")
            else:
                tracker.log_metrics(child, {"AP": ap, "AP50": ap + 10, "AP75": ap, "AP_S": ap / 2, "AP_M": ap,
                                            "AP_L": ap}, step=1)
                tracker.end_run(child)
            records.append({"row": row, "seed": seed, "status": "FAILED" if math.isnan(ap) else "FINISHED",
                            "error": "", "AP": ap})
    if summary:
        teacher = {"AP": 40.0, "AP50": 50.0, "AP75": 40.0, "AP_S": 20.0, "AP_M": 40.0, "AP_L": 40.0}
        table = ablation_table(pd.DataFrame(records), list(values), teacher,
                               extra={"teacher": {"params_M": 21.9}, **{r: {"params_M": 11.4} for r in values}})
        path = write_parquet(table, tmp_path / f"{parent}.parquet")
        tracker.client.log_artifact(parent, str(path.rename(path.with_name("ablation_summary.parquet"))))
    tracker.end_run(parent)
    return parent


def test_one_parent_prints_its_table_rebuilt_with_the_paired_intervals(tracker, tmp_path, capsys) -> None:
    parent = _ablation(tracker, "ssim quick", {"baseline": [4.0, 5.0, 4.5], "ssim": [6.0, 7.5, 6.0],
                                               "l2": [4.0, math.nan, 4.0]}, tmp_path)
    out_md = tmp_path / "t.md"
    assert main(["table", parent, "--tracking-uri", tracker.uri, "--out", str(out_md)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### ssim quick (")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["teacher"].startswith("| teacher | n=1 | 40.0 |") and "21.90" in lines["teacher"]
    # ssim - baseline per seed: 2.0, 2.5, 1.5 -> mean 2.0, s 0.5, half 4.303 * 0.5 / sqrt(3) = 1.242
    assert "+2.0 [+0.8, +3.2]*" in lines["ssim"]
    assert "| l2 | n=2 (1 failed) |" in lines["l2"] and "(1 unpaired)" in lines["l2"]
    assert out_md.read_text() == md.split("kdsweep: wrote")[0].rstrip("\n") + "\n"


def test_several_parents_side_by_side_and_to_parquet(tracker, tmp_path, capsys) -> None:
    first = _ablation(tracker, "embedded", {"baseline": [4.0, 5.0], "ssim": [6.0, 7.5]}, tmp_path)
    second = _ablation(tracker, "visdrone", {"baseline": [1.0, 1.2], "pkd": [1.1, 1.4]}, tmp_path, summary=False)
    out = tmp_path / "t.parquet"
    assert main(["table", first, second, "--tracking-uri", tracker.uri, "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| row | embedded (" in md and ": ΔAP [95 % CI] | " in md
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows == ["teacher", "baseline", "ssim", "pkd"]  # the union of the rows, first seen first
    frame = pd.read_parquet(out)
    assert list(frame["row"]) == rows
    pkd = frame[frame["row"] == "pkd"].iloc[0]
    assert math.isnan(pkd[f"embedded ({first[:8]}) | AP_mean"])
    assert pkd[f"visdrone ({second[:8]}) | dAP"] == pytest.approx(0.15)


def test_a_run_that_is_not_an_ablation_parent_is_one_line(tracker, capsys) -> None:
    lone = tracker.start_run("lonely")
    assert main(["table", lone, "--tracking-uri", tracker.uri]) == 2
    assert "has no trials of an ablation" in capsys.readouterr().err
    assert main(["table", "0123456789abcdef", "--tracking-uri", tracker.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in this store" in err


def test_a_negative_delta_gets_its_star_and_a_seed_without_a_metric_does_not_pair(tracker, tmp_path, capsys) -> None:
    """Rebuilt from MLflow: a row significantly *below* the baseline is starred like one above it,
    and a finished child run without an AP_S metric (NaN) is left out of that row's ΔAP_S pairs.

    worse - baseline per seed: -2.0, -2.2, -1.9 -> mean -2.033, s_d 0.1528, half 4.303 * 0.1528 /
    sqrt(3) = 0.380: [-2.41, -1.65]*. gap's AP_S (= AP / 2) on seeds 0, 2 only: differences 1.5, 1.0
    -> +1.25 [-1.93, +4.43] (n = 2, t(0.975, 1) = 12.706), 1 unpaired; pairing seed 1 would give
    n = 3 and [+0.63, +1.87]*."""
    parent = tracker.start_run("neg", tags={TAG_ROLE: "ablation"})
    values = {"baseline": [4.0, 5.0, 4.5], "worse": [2.0, 2.8, 2.6], "gap": [7.0, 7.0, 6.5]}
    for row, per_seed in values.items():
        for seed, ap in enumerate(per_seed):
            child = tracker.start_run(f"{row} / seed {seed}", parent=parent,
                                      tags={TAG_ROLE: "student", TAG_ROW: row, TAG_SEED: str(seed)})
            metrics = {"AP": ap, "AP50": ap + 10, "AP75": ap, "AP_S": ap / 2, "AP_M": ap, "AP_L": ap}
            if row == "gap" and seed == 1:
                del metrics["AP_S"]  # finished, but no AP_S (e.g. logged before the metric existed)
            tracker.log_metrics(child, metrics, step=1)
            tracker.end_run(child)
    tracker.end_run(parent)
    assert main(["table", parent, "--tracking-uri", tracker.uri]) == 0
    md = capsys.readouterr().out
    rows = {c[0]: c for c in ([x.strip() for x in line.strip().strip("|").split("|")]
                              for line in md.splitlines() if line.startswith("| "))}
    assert rows["worse"][8] == "-2.0 [-2.4, -1.7]*"
    assert rows["gap"][1] == "n=3" and rows["gap"][9] == "+1.2 [-1.9, +4.4] (1 unpaired)"
    assert rows["gap"][8].startswith("+2.3 [") and "unpaired" not in rows["gap"][8]  # AP: all three seeds pair
    other = _ablation(tracker, "other", {"baseline": [4.0, 5.0], "ssim": [6.0, 7.5]}, tmp_path, summary=False)
    assert main(["table", parent, other, "--tracking-uri", tracker.uri]) == 0
    side = capsys.readouterr().out
    worse = next(line for line in side.splitlines() if line.startswith("| worse |"))
    assert "| -2.0 [-2.4, -1.7]* |" in worse
