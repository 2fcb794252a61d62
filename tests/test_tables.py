"""Ablation and sweep tables (kdsweep.report.tables): pandas from the trials' dataframe; mean ± std
over seeds, order, deltas, failure reasons, Parquet and Markdown; completion order, best trial and
best-so-far of a search."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from kdsweep.report.stats import paired_delta
from kdsweep.report.tables import (
    LEGEND,
    ablation_table,
    best_index,
    best_so_far,
    seed_table,
    sweep_markdown,
    sweep_table,
    to_markdown,
    trial_frame,
    write_parquet,
)


def _rec(row, ap, status="FINISHED", **kw):
    base = {"row": row, "status": status, "error": "", "AP": ap, "AP50": ap + 10, "AP75": ap - 5, "AP_S": ap / 2,
            "AP_M": ap, "AP_L": ap + 5}
    base.update(kw)
    return base


def test_mean_std_order_teacher_deltas_and_failure_reasons(tmp_path: Path) -> None:
    trials = pd.DataFrame([_rec("ssim", 30.0, seed=0), _rec("ssim", 34.0, seed=1), _rec("baseline", 28.0, seed=0),
                           _rec("baseline", 29.0, seed=1),
                           _rec("l2", math.nan, status="FAILED", error="non-finite loss at epoch 1 step 0 (not retried)",
                                seed=0)])
    table = ablation_table(trials, ["baseline", "l2", "ssim"], teacher=_rec("teacher", 40.0))
    assert list(table["row"]) == ["teacher", "baseline", "l2", "ssim"]
    assert list(table["kind"]) == ["teacher", "baseline", "kd", "kd"]
    i = list(table["row"]).index("ssim")
    assert table["AP_mean"][i] == pytest.approx(32.0)
    assert table["AP_std"][i] == pytest.approx(math.sqrt(8.0))  # sample std of 30, 34
    assert table["dAP"][i] == pytest.approx(3.5) and table["dAP_S"][i] == pytest.approx(1.75)  # (2 + 5) / 2
    assert table["AP_std"][0] == 0.0  # the teacher: one record
    j = list(table["row"]).index("l2")
    assert table["seeds"][j] == 0 and table["failed"][j] == 1 and math.isnan(table["AP_mean"][j])
    assert table["error"][j] == "non-finite loss at epoch 1 step 0 (not retried)" and table["error"][i] == ""
    md = to_markdown(table, "t")
    assert "| ssim | n=2 | 32.0 ± 2.8 |" in md
    assert "| l2 | n=0 (1 failed) | failed |" in md
    assert "| teacher | n=1 | 40.0 | 50.0 |" in md and "± 0.0" not in md  # one value: no spread printed
    assert "+3.5 [-15.6, +22.6]" in md  # t(0.975, 1) = 12.706; s_d = 2.121; half = 12.706 * 2.121 / sqrt(2)
    assert LEGEND in md
    assert md.rstrip().endswith("- l2: non-finite loss at epoch 1 step 0 (not retried)")  # the reason, under the table
    stored = pd.read_parquet(write_parquet(table, tmp_path / "a.parquet"))
    assert stored["AP_mean"][i] == pytest.approx(32.0) and list(stored["row"]) == list(table["row"])


def test_paired_intervals_by_hand_and_unpaired_seeds_are_dropped_and_counted() -> None:
    """Row r and the baseline share seeds 0..3; r's seed 3 failed and the baseline's seed 4 has no
    r at all: those two are unpaired. Differences on seeds 0, 1, 2: 1.0, 2.0, 4.5."""
    base = {0: 10.0, 1: 11.0, 2: 9.0, 3: 10.0, 4: 12.0}
    mine = {0: 11.0, 1: 13.0, 2: 13.5}
    trials = pd.DataFrame([_rec("baseline", v, seed=s) for s, v in base.items()]
                          + [_rec("r", v, seed=s) for s, v in mine.items()]
                          + [_rec("r", math.nan, status="FAILED", error="x", seed=3)])
    row = ablation_table(trials, ["baseline", "r"]).iloc[1]
    d = [1.0, 2.0, 4.5]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert row["dAP"] == pytest.approx(mean)
    assert (row["dAP_low"], row["dAP_high"]) == (pytest.approx(mean - half, rel=1e-6), pytest.approx(mean + half, rel=1e-6))
    assert row["dAP_pairs"] == 3 and row["dAP_unpaired"] == 2
    delta = paired_delta(pd.Series(mine), pd.Series(base))
    assert delta.pairs == 3 and delta.unpaired == 2 and not delta.significant  # 2.5 ± 4.7 includes 0
    strong = paired_delta(pd.Series({0: 12.0, 1: 13.1}), pd.Series({0: 10.0, 1: 11.0}))
    assert strong.mean == pytest.approx(2.05) and strong.significant  # n = 2: t(0.975, 1) = 12.706, half = 0.635
    assert (strong.low, strong.high) == (pytest.approx(2.05 - 0.6353, abs=1e-3), pytest.approx(2.05 + 0.6353, abs=1e-3))
    md = to_markdown(ablation_table(trials, ["baseline", "r"]))
    assert f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] (2 unpaired)" in md
    lone = paired_delta(pd.Series({0: 5.0}), pd.Series({0: 4.0}))
    assert lone.mean == 1.0 and math.isnan(lone.low) and not lone.significant


def test_seed_table_has_one_row_per_row_and_seed_in_order() -> None:
    trials = pd.DataFrame([_rec("ssim", 30.0, seed=1), _rec("baseline", 28.0, seed=0), _rec("ssim", 31.0, seed=0)])
    seeds = seed_table(trials, ["baseline", "ssim"], teacher=_rec("teacher", 40.0))
    assert list(zip(seeds["row"], seeds["seed"], seeds["AP"])) == [("teacher", 0, 40.0), ("baseline", 0, 28.0),
                                                                   ("ssim", 0, 31.0), ("ssim", 1, 30.0)]


def test_an_area_range_without_ground_truth_is_n_a_in_markdown_nan_in_parquet_and_no_bar(tmp_path: Path) -> None:
    """A validation set without large boxes: every AP_L is NaN (COCOeval's -1), which the table
    prints as n/a (not 0.0 ± 0.0, not failed), Parquet keeps as NaN and the plot leaves out."""
    from kdsweep.report.plots import plot_ablation

    trials = pd.DataFrame([_rec("baseline", 20.0, AP_L=math.nan), _rec("baseline", 22.0, AP_L=math.nan),
                           _rec("ssim", 24.0, AP_L=math.nan, AP_S=math.nan)])
    table = ablation_table(trials, ["baseline", "ssim"], teacher=_rec("teacher", 30.0, AP_L=math.nan))
    md = to_markdown(table)
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    rows = {c[0]: c for c in cells}
    assert rows["teacher"][7] == "n/a" and rows["baseline"][7] == "n/a" and rows["ssim"][7] == "n/a"
    assert rows["ssim"][5] == "n/a" and rows["ssim"][9] == ""  # no AP_S, so no ΔAP_S
    assert rows["baseline"][2] == "21.0 ± 1.4" and "failed" not in md
    stored = pd.read_parquet(write_parquet(table, tmp_path / "a.parquet"))
    assert stored["AP_L_mean"].isna().all() and not stored["AP_mean"].isna().any()
    assert plot_ablation(table, tmp_path / "a.png").stat().st_size > 0


def test_extra_columns_and_a_named_baseline_row() -> None:
    trials = pd.DataFrame([_rec("s-head only", 2.0), _rec("mimic", 3.5)])
    extra = {"s-head only": {"params_M": 11.3, "infer_img_s": 40.0}, "mimic": {"params_M": 11.3, "infer_img_s": 40.0},
             "teacher": {"params_M": 21.9, "infer_img_s": 20.0, "infer_speedup": 1.0}}
    table = ablation_table(trials, ["s-head only", "mimic"], _rec("teacher", 5.0), baseline="s-head only", extra=extra)
    assert list(table["kind"]) == ["teacher", "baseline", "kd"]
    assert table["dAP"][2] == pytest.approx(1.5) and list(table["params_M"]) == [21.9, 11.3, 11.3]
    assert math.isnan(table["infer_speedup"][1])
    md = to_markdown(table)
    assert "| params (M) | img/s | speed-up |" in md and "| 21.90 | 20.0 | 1.00x |" in md


def _sweep_trials() -> pd.DataFrame:
    stats = {"AP50": 1.0, "AP75": 1.0, "AP_S": 1.0, "AP_M": 1.0, "AP_L": 1.0}
    return pd.DataFrame([
        {"row": "a", "seed": 0, "params/w": 0.5, "params/d": "[1, 2]", "status": "FINISHED", "error": "", "AP": 3.0,
         "timestamp": 30, "epoch": 4, "training_iteration": 2, **stats},  # resumed: Tune's count restarted
        {"row": "a", "seed": 0, "params/w": 2.0, "params/d": "[1, 2, 3]", "status": "FINISHED", "error": "", "AP": 5.0,
         "timestamp": 10, "epoch": 1, "training_iteration": 1, **stats},
        {"row": "a", "seed": 0, "params/w": 1.0, "params/d": "[1]", "status": "FAILED", "error": "x", "timestamp": 20,
         "training_iteration": 0},
        {"row": "a", "seed": 0, "params/w": 4.0, "params/d": "[1]", "status": "FINISHED", "error": "", "AP": 4.0,
         "timestamp": 40, "epoch": 2, "training_iteration": 2, **stats},
    ])


def test_sweep_table_is_in_completion_order_with_best_and_best_so_far() -> None:
    import json

    table = sweep_table(_sweep_trials(), ["w", "d"], {"d": json.loads})
    assert list(table["trial"]) == [1, 2, 3, 4] and list(table["w"]) == [2.0, 1.0, 0.5, 4.0]
    assert list(table["d"]) == ["[1, 2, 3]", "[1]", "[1, 2]", "[1]"]  # decoded, shown as flow YAML
    assert list(table["epochs"]) == [1, 0, 4, 2] and table["epochs"].sum() == 7  # trial-epochs (ASHA stops early), not reports
    assert math.isnan(table["AP"][1]) and table["status"][1] == "FAILED"
    assert best_index(table, "AP", "max") == 0 and best_index(table, "AP", "min") == 2
    assert best_so_far(table, "AP", "max") == [5.0, 5.0, 5.0, 5.0]
    assert best_so_far(table, "AP", "min") == [5.0, 5.0, 3.0, 3.0]
    md = sweep_markdown(table, "AP", "max", "title")
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert [line.split(" | ")[0] for line in body] == ["| 1", "| 4", "| 3", "| 2"]  # best first, failed last
    assert body[-1].endswith("FAILED |")
    assert "Reached the last rung" not in md
    md = sweep_markdown(table, "AP", "max", "title", max_epochs=4)
    assert md.rstrip().endswith("Reached the last rung (4 epochs): 1 of 4 trials: 3.")
    methods = table.assign(**{"kd.use": ["[pkd]", "[cwd]", "[fgd, crosskd]", "[mgd]"]})
    assert sweep_markdown(methods, "AP", "max", "t", max_epochs=2).rstrip().endswith(
        "Reached the last rung (2 epochs): 2 of 4 trials: 3 ([fgd, crosskd]), 4 ([mgd]).")


def test_trial_frame_keeps_trials_that_never_reported_with_their_reason() -> None:
    """Tune's dataframe holds the trials that reported; a trial that failed at step 0 comes from
    its Result (its config and error), so the table counts and explains it."""
    reported = pd.DataFrame([{"AP": 4.0, "trial_id": "t0", "config/row": "a", "config/seed": 0, "config/params/w": 0.5,
                              "logdir": "t0"}])
    error = RuntimeError("Traceback (most recent call last):\n  File x\nkdsweep.orchestrate.runner.TrialFailure: "
                         "non-finite loss at epoch 1 step 0 (not retried)")
    items = [SimpleNamespace(metrics={"trial_id": "t0", "AP": 4.0}, error=None,
                             config={"row": "a", "seed": 0, "params": {"w": 0.5}}),
             SimpleNamespace(metrics={}, error=error, config={"row": "b", "seed": 0, "params": {"w": 2.0}})]

    class Grid(list):
        def get_dataframe(self):
            return reported

    frame = trial_frame(Grid(items))
    assert list(frame["row"]) == ["a", "b"] and list(frame["status"]) == ["FINISHED", "FAILED"]
    assert frame["error"][1] == ("kdsweep.orchestrate.runner.TrialFailure: non-finite loss at epoch 1 step 0 "
                                 "(not retried)") and frame["error"][0] == ""
    assert frame["params/w"][1] == 2.0 and frame["AP"][0] == 4.0 and math.isnan(frame["AP"][1])


def test_a_significantly_negative_delta_is_significant_and_gets_its_star() -> None:
    """An interval entirely below 0 excludes 0 just as one above it does: KD that hurts must be
    flagged too. Per-seed differences (n = 2, t(0.975, 1) = 12.706, half = 12.706 * s_d / sqrt(2)):
    worse -2.0, -2.2 -> -2.1 [-3.37, -0.83]*; better +2.0, +2.2 -> +2.1 [+0.83, +3.37]*;
    noise +0.5, -0.5 -> 0.0 [-6.35, +6.35], no star."""
    base = {0: 10.0, 1: 11.0}
    per_row = {"worse": {0: 8.0, 1: 8.8}, "better": {0: 12.0, 1: 13.2}, "noise": {0: 10.5, 1: 10.5}}
    worse = paired_delta(pd.Series(per_row["worse"]), pd.Series(base))
    half = 12.706205 * math.sqrt(0.02) / math.sqrt(2)  # s_d of (-2.0, -2.2) = sqrt(0.02)
    assert worse.mean == pytest.approx(-2.1) and worse.low == pytest.approx(-2.1 - half, rel=1e-6)
    assert worse.high == pytest.approx(-2.1 + half, rel=1e-6) and worse.high < 0
    assert worse.significant  # high < 0
    assert paired_delta(pd.Series(per_row["better"]), pd.Series(base)).significant
    assert not paired_delta(pd.Series(per_row["noise"]), pd.Series(base)).significant
    trials = pd.DataFrame([_rec("baseline", v, seed=s) for s, v in base.items()]
                          + [_rec(r, v, seed=s) for r, values in per_row.items() for s, v in values.items()])
    md = to_markdown(ablation_table(trials, ["baseline", "worse", "better", "noise"]))
    rows = {c[0]: c for c in ([x.strip() for x in line.strip().strip("|").split("|")]
                              for line in md.splitlines() if line.startswith("| "))}
    assert rows["worse"][8] == "-2.1 [-3.4, -0.8]*"
    assert rows["better"][8] == "+2.1 [+0.8, +3.4]*"
    assert rows["noise"][8] == "+0.0 [-6.4, +6.4]"


def test_a_nan_seed_does_not_pair() -> None:
    """A finished seed whose metric is NaN (no value for that area range) pairs with nothing: it
    leaves the count of pairs, the mean and the interval, and is counted unpaired. AP_S of the
    row on seeds 0, 1, 2: 3, NaN, 5; of the baseline: 1, 1, 2. Pairs: seeds 0 and 2, differences
    2 and 3: mean 2.5, s_d = sqrt(0.5), half = t(0.975, 1) * s_d / sqrt(2) = 6.353, so
    [-3.85, +8.85], not significant. (Pairing the NaN seed would give n = 3, t(0.975, 2) and
    [+0.74, +4.26]: a spurious star.)"""
    row, base = pd.Series({0: 3.0, 1: math.nan, 2: 5.0}), pd.Series({0: 1.0, 1: 1.0, 2: 2.0})
    half = 12.706205 * math.sqrt(0.5) / math.sqrt(2)
    delta = paired_delta(row, base)
    assert delta.pairs == 2 and delta.unpaired == 1
    assert delta.mean == pytest.approx(2.5)
    assert (delta.low, delta.high) == (pytest.approx(2.5 - half, rel=1e-6), pytest.approx(2.5 + half, rel=1e-6))
    assert not delta.significant
    flipped = paired_delta(base, row)  # the NaN on the baseline's side: the same seed drops out
    assert flipped.pairs == 2 and flipped.unpaired == 1 and flipped.mean == pytest.approx(-2.5)
    trials = pd.DataFrame([_rec("baseline", 20.0 + s, seed=s, AP_S=v) for s, v in base.items()]
                          + [_rec("r", 21.0 + s, seed=s, AP_S=v) for s, v in row.items()])
    table = ablation_table(trials, ["baseline", "r"])
    r = table.iloc[1]
    assert r["dAP_S_pairs"] == 2 and r["dAP_S_unpaired"] == 1 and r["dAP_S"] == pytest.approx(2.5)
    assert r["dAP_S_low"] == pytest.approx(2.5 - half, rel=1e-6)
    assert r["dAP_pairs"] == 3 and r["dAP_unpaired"] == 0  # AP itself has all three seeds
    assert "| +2.5 [-3.9, +8.9] (1 unpaired) |" in to_markdown(table)
