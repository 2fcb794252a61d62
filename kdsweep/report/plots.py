"""The figures logged to MLflow: ablation bars, a search's metric against each parameter, and its
best-so-far curve. PNG files through matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to files only (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kdsweep.report.tables import best_so_far  # noqa: E402

__all__ = ["plot_ablation", "plot_best_so_far", "plot_param"]


def plot_ablation(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Two panels, saved as PNG: AP and AP_S per row (bars, std error bars), and each KD row's
    paired ΔAP and ΔAP_S to the baseline with their 95 % confidence intervals (the table's
    intervals; none with fewer than 2 paired seeds). A missing value (a failed row, or AP_S of a
    dataset without small objects) has no bar but the label ``n/a``."""
    rows = list(table["row"])
    xs = range(len(rows))
    kd = [i for i, kind in enumerate(table["kind"]) if kind == "kd"] if "dAP" in table else []
    panels = 2 if kd else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 1.1 * len(rows)) * (1 + 0.8 * (panels - 1)), 4), squeeze=False)
    ax = axes[0][0]
    width = 0.4
    for offset, name in ((-width / 2, "AP"), (width / 2, "AP_S")):
        means = [0.0 if math.isnan(v) else v for v in table[f"{name}_mean"]]
        ax.bar([x + offset for x in xs], means, width, yerr=list(table[f"{name}_std"].fillna(0.0)), capsize=3, label=name)
        for x, value in zip(xs, table[f"{name}_mean"]):
            if math.isnan(value):
                ax.text(x + offset, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(rows, rotation=30, ha="right")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(title)
    ax.legend()
    if kd:
        ax = axes[0][1]
        for offset, name in ((-width / 2, "dAP"), (width / 2, "dAP_S")):
            values = [table[name][i] for i in kd]
            low = [table[f"{name}_low"][i] for i in kd]
            high = [table[f"{name}_high"][i] for i in kd]
            errors = [[0.0 if math.isnan(lo) else v - lo for v, lo in zip(values, low)],
                      [0.0 if math.isnan(hi) else hi - v for v, hi in zip(values, high)]]
            ax.bar([k + offset for k in range(len(kd))], [0.0 if math.isnan(v) else v for v in values], width,
                   yerr=errors, capsize=3, label=name.replace("d", "Δ", 1))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(list(range(len(kd))))
        ax.set_xticklabels([rows[i] for i in kd], rotation=30, ha="right")
        ax.set_ylabel("paired Δ to the baseline (95 % CI)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return Path(path)


def plot_param(table: pd.DataFrame, param: str, metric: str, path: str | Path) -> Path:
    """Scatter of ``metric`` against one searched parameter (categorical values as labels)."""
    pairs = [(v, y) for v, y in zip(table[param], table[metric]) if v is not None and not math.isnan(y)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pairs and all(isinstance(v, (int, float)) for v, _ in pairs):
        ax.scatter([v for v, _ in pairs], [y for _, y in pairs])
        lows = [v for v, _ in pairs if v > 0]
        if lows and len(lows) == len(pairs) and max(lows) / min(lows) > 20:
            ax.set_xscale("log")
    else:
        labels = sorted({str(v) for v, _ in pairs})
        ax.scatter([labels.index(str(v)) for v, _ in pairs], [y for _, y in pairs])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} vs {param.split('.')[-1]}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return Path(path)


def plot_best_so_far(table: pd.DataFrame, metric: str, mode: str, path: str | Path) -> Path:
    """The search's best-so-far curve: best ``metric`` against the number of completed trials."""
    curve = best_so_far(table, metric, mode)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    trials = list(range(1, len(curve) + 1))
    ax.step(trials, curve, where="post", label=f"best {metric}")
    ax.scatter(trials, list(table[metric]), s=12, alpha=0.6, label="trial")
    ax.set_xlabel("trials completed")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return Path(path)
