"""Ablation tables: trial records -> one row per config with mean +- std over seeds.

Stored as Parquet (pyarrow, numeric ``<metric>_mean``/``<metric>_std`` columns) and Markdown
(``mean ± std`` cells, the way the papers print their tables), and plotted as AP / AP_S bars.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from kdsweep.train.evaluation import STAT_NAMES


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(records: list[dict[str, Any]], order: Sequence[str], teacher: dict[str, Any] | None = None,
              baseline: str = "baseline", extra: dict[str, dict[str, float]] | None = None) -> pa.Table:
    """Aggregate trial records (``row``, ``status`` and metric keys) into the ablation table.

    Rows come in ``order`` (the search-space order), after a ``teacher`` row when given. Columns:
    ``row, kind, seeds, failed, error`` (the one-line reason of the row's first failed trial) then ``<m>_mean, <m>_std`` for m in AP, AP50, AP75, AP_S, AP_M,
    AP_L, and ``dAP``/``dAP_S``: the difference of the means to the ``baseline`` row. ``extra``
    adds numeric columns per row label (e.g. ``params_M``, ``infer_img_s`` from
    :mod:`kdsweep.report.throughput`); rows without a value get NaN.
    """
    table: dict[str, list[Any]] = {"row": [], "kind": [], "seeds": [], "failed": [], "error": []}
    for name in STAT_NAMES:
        table[f"{name}_mean"], table[f"{name}_std"] = [], []
    entries: list[tuple[str, str, list[dict[str, Any]]]] = []
    if teacher is not None:
        entries.append(("teacher", "teacher", [teacher]))
    for label in order:
        kind = "baseline" if label == baseline else "kd"
        entries.append((label, kind, [r for r in records if r.get("row") == label]))
    for label, kind, group in entries:
        done = [r for r in group if r.get("status", "FINISHED") == "FINISHED"]
        table["row"].append(label)
        table["kind"].append(kind)
        table["seeds"].append(len(done))
        table["failed"].append(len(group) - len(done))
        table["error"].append(next((str(r["error"]) for r in group if r.get("status") != "FINISHED" and r.get("error")), ""))
        for name in STAT_NAMES:
            mean, std = _mean_std([float(r[name]) for r in done if name in r])
            table[f"{name}_mean"].append(mean)
            table[f"{name}_std"].append(std)
    base = table["row"].index(baseline) if baseline in table["row"] else None
    for name in ("AP", "AP_S"):
        col = table[f"{name}_mean"]
        table[f"d{name}"] = [v - col[base] if base is not None else math.nan for v in col]
    columns = sorted({key for values in (extra or {}).values() for key in values})
    for key in columns:
        table[key] = [float((extra or {}).get(label, {}).get(key, math.nan)) for label in table["row"]]
    return pa.table(table)


EXTRA_COLUMNS = {"params_M": ("params (M)", "{:.2f}"), "infer_img_s": ("img/s", "{:.1f}"), "infer_speedup": ("speed-up", "{:.2f}x")}


def to_markdown(table: pa.Table, title: str | None = None) -> str:
    """Markdown table with ``mean ± std`` cells (one decimal), deltas to the baseline."""
    data = table.to_pydict()
    extras = [k for k in EXTRA_COLUMNS if k in data]
    header = ["row", "seeds"] + list(STAT_NAMES) + ["ΔAP", "ΔAP_S"] + [EXTRA_COLUMNS[k][0] for k in extras]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for i, row in enumerate(data["row"]):
        seeds = f"{data['seeds'][i]}" + (f" ({data['failed'][i]} failed)" if data["failed"][i] else "")
        cells = [row, seeds]
        for name in STAT_NAMES:
            mean, std = data[f"{name}_mean"][i], data[f"{name}_std"][i]
            cells.append("failed" if mean is None or math.isnan(mean) else f"{mean:.1f} ± {std:.1f}")
        for name in ("dAP", "dAP_S"):
            value = data[name][i]
            cells.append("" if value is None or math.isnan(value) or data["kind"][i] != "kd" else f"{value:+.1f}")
        for key in extras:
            value = data[key][i]
            cells.append("" if value is None or math.isnan(value) else EXTRA_COLUMNS[key][1].format(value))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [(row, data["error"][i]) for i, row in enumerate(data["row"]) if data.get("error") and data["error"][i]]
    if failures:
        lines += ["", "Failed trials:"] + [f"- {row}: {reason}" for row, reason in failures]
    return "\n".join(lines) + "\n"


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    pq.write_table(table, str(path))
    return Path(path)


def plot(table: pa.Table, path: str | Path, title: str = "") -> Path:
    """Grouped bars of AP and AP_S per row with std error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = table.to_pydict()
    rows = data["row"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    width = 0.4
    for offset, name in ((-width / 2, "AP"), (width / 2, "AP_S")):
        means = [0.0 if math.isnan(v) else v for v in data[f"{name}_mean"]]
        ax.bar([x + offset for x in xs], means, width, yerr=data[f"{name}_std"], capsize=3, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(rows, rotation=30, ha="right")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return Path(path)
