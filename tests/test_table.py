"""Ablation table: mean +- std over seeds, order, deltas, Parquet and Markdown, plot."""

import math

import pyarrow.parquet as pq
import pytest

from kdsweep.report.tables import plot, summarize, to_markdown, write_parquet


def _rec(row, ap, status="FINISHED", **kw):
    base = {"row": row, "status": status, "AP": ap, "AP50": ap + 10, "AP75": ap - 5, "AP_S": ap / 2, "AP_M": ap, "AP_L": ap + 5}
    base.update(kw)
    return base


def test_mean_std_order_teacher_and_deltas(tmp_path):
    records = [_rec("ssim", 30.0), _rec("ssim", 34.0), _rec("baseline", 28.0), _rec("l2", 0.0, status="FAILED", error="non-finite loss at epoch 1 step 0 (not retried)")]
    table = summarize(records, ["baseline", "l2", "ssim"], teacher=_rec("teacher", 40.0))
    data = table.to_pydict()
    assert data["row"] == ["teacher", "baseline", "l2", "ssim"]
    i = data["row"].index("ssim")
    assert data["AP_mean"][i] == pytest.approx(32.0)
    assert data["AP_std"][i] == pytest.approx(math.sqrt(8.0))  # sample std of 30, 34
    assert data["dAP"][i] == pytest.approx(4.0)
    assert data["dAP_S"][i] == pytest.approx(2.0)
    j = data["row"].index("l2")
    assert data["seeds"][j] == 0 and data["failed"][j] == 1 and math.isnan(data["AP_mean"][j])
    md = to_markdown(table, "t")
    assert "| ssim | 2 | 32.0 ± 2.8 |" in md
    assert "| l2 | 0 (1 failed) | failed |" in md
    assert data["error"][j] == "non-finite loss at epoch 1 step 0 (not retried)" and data["error"][i] == ""
    assert md.rstrip().endswith("- l2: non-finite loss at epoch 1 step 0 (not retried)")  # the reason, under the table
    assert "+4.0" in md
    out = write_parquet(table, tmp_path / "a.parquet")
    assert pq.read_table(out).to_pydict()["AP_mean"][i] == pytest.approx(32.0)
    png = plot(table, tmp_path / "a.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_extra_columns_and_a_named_baseline_row() -> None:
    from kdsweep.report.tables import summarize, to_markdown

    recs = [
        {"row": "s-head only", "status": "FINISHED", "AP": 2.0, "AP_S": 1.0},
        {"row": "mimic", "status": "FINISHED", "AP": 3.5, "AP_S": 1.5},
    ]
    extra = {"s-head only": {"params_M": 11.3, "infer_img_s": 40.0}, "mimic": {"params_M": 11.3, "infer_img_s": 40.0},
             "teacher": {"params_M": 21.9, "infer_img_s": 20.0, "infer_speedup": 1.0}}
    table = summarize(recs, ["s-head only", "mimic"], {"row": "teacher", "status": "FINISHED", "AP": 5.0}, baseline="s-head only", extra=extra)
    data = table.to_pydict()
    assert data["kind"] == ["teacher", "baseline", "kd"]
    assert data["dAP"][2] == 1.5 and data["params_M"] == [21.9, 11.3, 11.3]
    assert math.isnan(data["infer_speedup"][1])
    md = to_markdown(table)
    assert "| params (M) | img/s | speed-up |" in md and "| 21.90 | 20.0 | 1.00x |" in md
