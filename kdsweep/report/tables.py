"""Ablation and sweep tables with pandas, from Tune's result dataframes.

* :func:`trial_frame`: one row per trial of a ``ResultGrid``, from ``ResultGrid.get_dataframe()``
  (the last reported metrics and the ``config/...`` columns), plus the trials that never reported,
  each with its status and one-line failure reason.
* :func:`seed_table`: one row per (row, seed), the per-seed values (``ablation.parquet``).
* :func:`ablation_table`: one row per configuration (the teacher first), mean and sample standard
  deviation over seeds of every COCO metric, the paired differences to the baseline row with
  their confidence intervals (:mod:`kdsweep.report.stats`), the failed trials and their reason;
  stored as Parquet (``ablation_summary.parquet``: numeric ``<metric>_mean``/``_std`` columns) and
  Markdown (``mean ± std`` cells, the way the papers print their tables).
* :func:`sweep_table`: one row per trial of a search in completion order, with the sampled
  values; :func:`best_index` and :func:`best_so_far` read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdsweep.report.stats import excludes_zero, paired_delta
from kdsweep.report.tracking import summarize_error
from kdsweep.train.evaluation import STAT_NAMES

__all__ = ["EXTRA_COLUMNS", "LEGEND", "ablation_table", "best_index", "best_so_far", "format_delta", "seed_table",
           "sweep_markdown", "sweep_table", "to_markdown", "trial_frame", "write_parquet"]


# ------------------------------------------------------------------------------------- trials
def trial_frame(results: Any) -> pd.DataFrame:
    """One row per trial of a Tune ``ResultGrid``: ``row``, ``seed``, ``params/<path>`` (the Tune
    config), the last reported metrics, ``status`` (FINISHED or FAILED) and ``error`` (the
    one-line reason of a failed trial, else empty)."""
    frame = results.get_dataframe()  # trials that reported; "logdir" holds the trial id
    if "logdir" not in frame:
        frame = pd.DataFrame({"logdir": pd.Series(dtype=object)})
    reported = set(frame["logdir"].astype(str))
    errors_by_id, silent = {}, []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is not None and str(trial_id) in reported:
            errors_by_id[str(trial_id)] = result.error
        else:  # failed before its first report: its config and error from the Result
            silent.append((pd.json_normalize({"config": result.config or {}}, sep="/"), result.error))
    frame = pd.concat([frame, *(part for part, _ in silent)], ignore_index=True) if silent else frame
    errors = [errors_by_id.get(str(tid)) for tid in frame["logdir"][: len(frame) - len(silent)]]
    errors += [error for _, error in silent]
    frame["status"] = ["FAILED" if e is not None else "FINISHED" for e in errors]
    frame["error"] = [(summarize_error(str(e)) or type(e).__name__)[:300] if e is not None else "" for e in errors]
    frame = frame.rename(columns=lambda c: c[len("config/"):] if c.startswith("config/") else c)
    return frame.reset_index(drop=True)


# ----------------------------------------------------------------------------------- ablations
def ablation_table(trials: pd.DataFrame, order: Sequence[str], teacher: Mapping[str, Any] | None = None,
                   baseline: str = "baseline", extra: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """Aggregate trials (``row``, ``status``, ``error`` and metric columns) into the ablation table.

    Rows come in ``order`` (the search-space order), after a ``teacher`` row when given (its
    record: metrics of the teacher's run). Columns: ``row, kind, seeds, failed, error`` (the
    reason of the row's first failed trial) then ``<m>_mean, <m>_std`` for m in AP, AP50, AP75,
    AP_S, AP_M, AP_L (sample std over the finished seeds; 0 for one seed), and for each KD row
    ``dAP``/``dAP_S``: the mean of its per-seed differences to the ``baseline`` row, with
    ``_low``/``_high`` (the 95 % Student's t interval, 2 pairs or more), ``_pairs`` and
    ``_unpaired`` (:func:`kdsweep.report.stats.paired_delta`). ``extra`` adds numeric columns per row
    label (e.g. ``params_M``, ``infer_img_s`` from :mod:`kdsweep.report.throughput`); rows without
    a value get NaN.
    """
    parts = []
    if teacher is not None:
        parts.append(pd.DataFrame([{"row": "teacher", "status": "FINISHED", "error": "", **dict(teacher)}]).assign(kind="teacher"))
    if not trials.empty:
        kinds = trials["row"].map(lambda r: "baseline" if r == baseline else "kd")
        parts.append(trials.assign(kind=kinds))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row", "status", "error", "kind"])
    for name in STAT_NAMES:
        if name not in rows:
            rows[name] = math.nan
    labels = (["teacher"] if teacher is not None else []) + list(order)
    done = rows[rows["status"] == "FINISHED"]
    grouped = done.groupby("row", sort=False)
    table = pd.DataFrame({"row": labels})
    table["kind"] = ["teacher" if (teacher is not None and i == 0) else ("baseline" if r == baseline else "kd")
                     for i, r in enumerate(labels)]
    table["seeds"] = table["row"].map(grouped.size()).fillna(0).astype(int)
    table["failed"] = table["row"].map(rows.groupby("row", sort=False)["status"].apply(lambda s: int((s != "FINISHED").sum())))
    table["failed"] = table["failed"].fillna(0).astype(int)
    first_error = rows[(rows["status"] != "FINISHED") & (rows["error"].fillna("") != "")].groupby("row", sort=False)["error"].first()
    table["error"] = [str(first_error.get(label, "")) for label in table["row"]]
    for name in STAT_NAMES:
        values = pd.to_numeric(done[name], errors="coerce").groupby(done["row"], sort=False)
        table[f"{name}_mean"] = table["row"].map(values.mean())
        std = values.std(ddof=1)
        std[values.count() < 2] = 0.0
        table[f"{name}_std"] = table["row"].map(std)
    seeds = done["seed"] if "seed" in done else done.groupby("row", sort=False).cumcount()
    for name in ("AP", "AP_S"):
        by_seed = {label: pd.Series(pd.to_numeric(part[name], errors="coerce").to_numpy(),
                                    index=seeds.loc[part.index].to_numpy())
                   for label, part in done.groupby("row", sort=False)}
        deltas = [paired_delta(by_seed.get(label, pd.Series(dtype=float)), by_seed[baseline])
                  if baseline in by_seed and kind == "kd" else None for label, kind in zip(table["row"], table["kind"])]
        table[f"d{name}"] = [d.mean if d else math.nan for d in deltas]
        table[f"d{name}_low"] = [d.low if d else math.nan for d in deltas]
        table[f"d{name}_high"] = [d.high if d else math.nan for d in deltas]
        table[f"d{name}_pairs"] = [d.pairs if d else 0 for d in deltas]
        table[f"d{name}_unpaired"] = [d.unpaired if d else 0 for d in deltas]
    for key in sorted({key for values in (extra or {}).values() for key in values}):
        table[key] = [float((extra or {}).get(label, {}).get(key, math.nan)) for label in table["row"]]
    return table


EXTRA_COLUMNS = {"params_M": ("params (M)", "{:.2f}"), "infer_img_s": ("img/s", "{:.1f}"), "infer_speedup": ("speed-up", "{:.2f}x")}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def seed_table(trials: pd.DataFrame, order: Sequence[str], teacher: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per (row, seed): ``row, seed, status, error`` and the six COCO metrics (NaN where a
    trial failed, or where an area range has no ground truth), in ``order`` after the teacher."""
    parts = []
    if teacher is not None:
        parts.append(pd.DataFrame([{"row": "teacher", "seed": 0, "status": "FINISHED", "error": "", **dict(teacher)}]))
    if not trials.empty:
        parts.append(trials)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row", "seed", "status", "error"])
    if "seed" not in frame:
        frame["seed"] = frame.groupby("row", sort=False).cumcount()
    for name in STAT_NAMES:
        frame[name] = pd.to_numeric(frame.get(name, pd.Series([math.nan] * len(frame))), errors="coerce")
    rank = {label: i for i, label in enumerate((["teacher"] if teacher is not None else []) + list(order))}
    frame = frame.assign(_rank=frame["row"].map(rank).fillna(len(rank)), seed=frame["seed"].fillna(0).astype(int))
    frame = frame.sort_values(["_rank", "seed"], kind="stable")
    return frame[["row", "seed", "status", "error", *STAT_NAMES]].reset_index(drop=True)


LEGEND = ("ΔAP, ΔAP_S: the mean of the per-seed differences to the baseline (a row and the baseline share "
          "each seed's initialisation and data order) and its 95 % confidence interval [low, high] (Student's t "
          "on the paired differences); * marks an interval that excludes 0.")


def format_delta(value: float, low: float, high: float) -> str:
    """``+2.5 [+0.2, +4.8]*``: a paired delta, its interval when there is one, ``*`` where it
    excludes 0; empty for a missing delta."""
    if _missing(value):
        return ""
    cell = f"{value:+.1f}"
    if not _missing(low):
        cell += f" [{low:+.1f}, {high:+.1f}]" + ("*" if excludes_zero(low, high) else "")
    return cell


def _delta_cell(data: Mapping[str, Any], name: str) -> str:
    if data["kind"] != "kd":
        return ""
    cell = format_delta(data[name], data.get(f"{name}_low", math.nan), data.get(f"{name}_high", math.nan))
    unpaired = data.get(f"{name}_unpaired", 0) or 0
    return cell + (f" ({int(unpaired)} unpaired)" if cell and unpaired else "")


def to_markdown(table: pd.DataFrame, title: str | None = None) -> str:
    """Markdown table: ``mean ± std`` cells (one decimal) over ``n`` seeds (the value alone when
    ``n=1``: one seed measures no spread), the paired deltas to the baseline with their
    intervals (:data:`LEGEND`, printed under the table when an interval is shown), and the failed
    trials' reasons. A statistic without a value in a finished row (an area range without
    ground-truth boxes) reads ``n/a``; a row with no finished seed, ``failed``."""
    extras = [k for k in EXTRA_COLUMNS if k in table]
    header = ["row", "seeds"] + list(STAT_NAMES) + ["ΔAP", "ΔAP_S"] + [EXTRA_COLUMNS[k][0] for k in extras]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in table.itertuples(index=False):
        data = row._asdict()
        cells = [data["row"], f"n={data['seeds']}" + (f" ({data['failed']} failed)" if data["failed"] else "")]
        for name in STAT_NAMES:
            mean, std = getattr(row, f"{name}_mean"), getattr(row, f"{name}_std")
            if _missing(mean):  # no finished seed, or an area range without ground truth (COCOeval's -1)
                cells.append("n/a" if data["seeds"] else "failed")
            else:
                cells.append(f"{mean:.1f}" if data["seeds"] < 2 else f"{mean:.1f} ± {std:.1f}")
        for name in ("dAP", "dAP_S"):
            cells.append(_delta_cell(data, name))
        for key in extras:
            value = data[key]
            cells.append("" if _missing(value) else EXTRA_COLUMNS[key][1].format(value))
        lines.append("| " + " | ".join(cells) + " |")
    if any(not _missing(v) for v in table.get("dAP_low", [])) or any(not _missing(v) for v in table.get("dAP_S_low", [])):
        lines += ["", LEGEND]
    failures = [(r, e) for r, e in zip(table["row"], table["error"]) if e]
    if failures:
        lines += ["", "Failed trials:"] + [f"- {row}: {reason}" for row, reason in failures]
    return "\n".join(lines) + "\n"


def write_parquet(table: pd.DataFrame, path: str | Path) -> Path:
    """The table as Parquet (pyarrow), its numeric columns numeric."""
    table.to_parquet(str(path), index=False)
    return Path(path)


# ------------------------------------------------------------------------------------- sweeps
def _cell(value: Any) -> Any:
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def sweep_table(trials: pd.DataFrame, params: Sequence[str], decode: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per trial in completion order: ``trial, row, seed, <param>..., status, epochs, <metrics>``.

    ``params``: the searched dotted paths (``trials`` has them as ``params/<path>``); ``decode``:
    path -> a function giving the config value of a Tune value (structured choices are JSON in
    Tune). Lists and mappings show as flow-style YAML.
    """
    frame = trials.copy()
    if "timestamp" not in frame:
        frame["timestamp"] = math.nan
    frame = frame.assign(_order=range(len(frame))).sort_values(["timestamp", "_order"], na_position="last")
    out = pd.DataFrame({"trial": range(1, len(frame) + 1)})
    out["row"] = list(frame.get("row", pd.Series([""] * len(frame))).fillna(""))
    out["seed"] = [int(s) if not _missing(s) else 0 for s in frame.get("seed", pd.Series([0] * len(frame)))]
    for path in params:
        column = frame.get(f"params/{path}", pd.Series([None] * len(frame)))
        fn = (decode or {}).get(path, lambda v: v)
        values = [None if _missing(v) else _cell(fn(v)) for v in column]
        if any(isinstance(v, str) for v in values):
            values = [None if v is None else str(v) for v in values]
        out[path] = values
    out["status"] = list(frame["status"])
    # the last reported epoch; Tune's training_iteration counts reports (it restarts on --resume)
    done = frame["epoch"] if "epoch" in frame else frame.get("training_iteration", pd.Series([0] * len(frame)))
    out["epochs"] = [int(v) if not _missing(v) else 0 for v in done]
    for name in STAT_NAMES:
        out[name] = pd.to_numeric(frame.get(name, pd.Series([math.nan] * len(frame))), errors="coerce").to_numpy()
    return out.reset_index(drop=True)


def best_index(table: pd.DataFrame, metric: str, mode: str) -> int | None:
    """Position of the best finished trial, or None."""
    ok = table[(table["status"] == "FINISHED") & table[metric].notna()]
    if ok.empty:
        return None
    return int(ok[metric].idxmax() if mode == "max" else ok[metric].idxmin())


def best_so_far(table: pd.DataFrame, metric: str, mode: str) -> list[float]:
    """The best ``metric`` among the first k completed trials, for k = 1..n (NaN before any)."""
    values = table[metric].where(table["status"] == "FINISHED")
    running = (values.cummax() if mode == "max" else values.cummin()).ffill()  # failed trials keep the best
    return [float(v) for v in running]


def sweep_markdown(table: pd.DataFrame, metric: str, mode: str, title: str, max_epochs: int | None = None) -> str:
    """Trials sorted best first (failed last), metrics with one decimal; with ``max_epochs``, a
    closing line on the trials that reached the last rung (an early-stopping scheduler stopped the
    others), naming their ``kd.use`` (the methods) when the space searches it."""
    params = [c for c in table.columns if c not in ("trial", "row", "seed", "status", "epochs", *STAT_NAMES)]
    header = ["trial", "row", *params, "epochs", *STAT_NAMES, "status"]
    finished = (table["status"] == "FINISHED") & table[metric].notna()
    key = table[metric].fillna(0.0) * (-1 if mode == "max" else 1)
    order = table.assign(_failed=~finished, _key=key).sort_values(["_failed", "_key"], kind="stable").index
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for i in order:
        r = table.loc[i]
        cells = [str(r["trial"]), str(r["row"])]
        cells += [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r[p] for p in params)]
        cells.append(str(r["epochs"]))
        cells += ["" if _missing(r[n]) else f"{r[n]:.1f}" for n in STAT_NAMES]
        cells.append(str(r["status"]))
        lines.append("| " + " | ".join(cells) + " |")
    if max_epochs is not None and len(table):
        last = table[(table["epochs"] >= max_epochs) & (table["status"] == "FINISHED")]
        named = [f"{r['trial']} ({r['kd.use']})" if "kd.use" in table else str(r["trial"]) for _, r in last.iterrows()]
        lines += ["", f"Reached the last rung ({max_epochs} epochs): {len(last)} of {len(table)} trials"
                  + (f": {', '.join(named)}" if named else "") + "."]
    return "\n".join(lines) + "\n"
