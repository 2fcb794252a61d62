"""``kdsweep table``: the ablation tables of finished parent runs, rebuilt from MLflow, side by side.

Each parent run's table is rebuilt from what MLflow holds: its child runs (one per row and seed:
the ``kdsweep.row`` and ``kdsweep.seed`` tags, the last value of each COCO metric, FINISHED or
FAILED with the reason) and, when the parent has one, its logged summary (``ablation_summary.parquet``,
or the ``ablation.parquet`` of older versions): the row order, the teacher's metrics, which row
is the baseline, and the params / img/s columns. The statistics are recomputed
(:func:`kdsweep.report.tables.ablation_table`: paired differences with their intervals), so a
table logged by an older version gets them too.

One parent prints its whole table. Several print one column group per run (AP, AP_S, ΔAP with
its interval, n) over the union of their rows: e.g. the same ablation on the embedded data and on
VisDrone, or on two stores (``--tracking-uri`` per store is one URI for all; copy runs across
stores with MLflow's own tools).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdsweep.config import ConfigError
from kdsweep.report.tables import EXTRA_COLUMNS, _missing, ablation_table, format_delta, to_markdown, write_parquet
from kdsweep.report.tracking import PARENT_TAG, TAG_REASON, TAG_ROLE, TAG_ROW, TAG_SEED, default_tracking_uri
from kdsweep.train.evaluation import STAT_NAMES

__all__ = ["parent_table", "run_table", "side_by_side"]


def _summary(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The parent's logged summary table, if it has one (new name first, then the old one)."""
    names = {a.path for a in client.list_artifacts(run_id)}
    for name in ("ablation_summary.parquet", "ablation.parquet"):
        if name in names:
            with tempfile.TemporaryDirectory() as tmp:
                frame = pd.read_parquet(client.download_artifacts(run_id, name, tmp))
            if "AP_mean" in frame:  # a summary (the per-seed ablation.parquet has no _mean columns)
                return frame
    return None


def parent_table(client: MlflowClient, parent: str) -> tuple[str, pd.DataFrame]:
    """``(title, ablation table)`` of parent run ``parent``, rebuilt from its child runs.

    Raises:
        ConfigError: no such run, or a run that has no child trials (not an ablation's parent).
    """
    try:
        run = client.get_run(parent)
    except MlflowException:
        raise ConfigError(f"kdsweep table: run '{parent}' is not in this store; pass its run id (the parent of an "
                          "ablation, see `kdsweep ui`) and --tracking-uri for another store") from None
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
                                  max_results=10000)
    students = [c for c in children if c.data.tags.get(TAG_ROLE) == "student" and TAG_ROW in c.data.tags]
    if not students:
        raise ConfigError(f"kdsweep table: run '{parent}' ({run.info.run_name}) has no trials of an ablation; pass the "
                          "parent run of an ablation")
    records = []
    for child in students:
        tags, metrics = child.data.tags, child.data.metrics
        finished = child.info.status == "FINISHED"
        records.append({"row": tags[TAG_ROW], "seed": int(tags.get(TAG_SEED, 0)),
                        "status": "FINISHED" if finished else "FAILED",
                        "error": "" if finished else tags.get(TAG_REASON, child.info.status),
                        **{name: metrics.get(name, math.nan) for name in STAT_NAMES}})
    trials = pd.DataFrame(records)
    summary = _summary(client, parent)
    order = list(dict.fromkeys(trials["row"]))
    teacher, baseline, extra = None, "baseline", None
    if summary is not None:
        logged = [r for r in summary["row"] if r != "teacher"]
        order = logged + [r for r in order if r not in logged]
        kinds = dict(zip(summary["row"], summary["kind"]))
        baseline = next((r for r, k in kinds.items() if k == "baseline"), baseline)
        if "teacher" in kinds:
            first = summary[summary["row"] == "teacher"].iloc[0]
            teacher = {name: first[f"{name}_mean"] for name in STAT_NAMES}
        columns = [k for k in EXTRA_COLUMNS if k in summary]
        extra = {r: {k: float(v[k]) for k in columns} for r, v in summary.set_index("row").iterrows()} if columns else None
    return run.info.run_name or parent, ablation_table(trials, order, teacher, baseline=baseline, extra=extra)


def side_by_side(tables: Sequence[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """One row per row label (in first-seen order), one column group per table:
    ``<title> | AP``, ``AP_S``, ``ΔAP`` (mean and interval as the Markdown prints it), ``n``."""
    labels = list(dict.fromkeys(r for _, table in tables for r in table["row"]))
    out = pd.DataFrame({"row": labels})
    for title, table in tables:
        by_row = table.set_index("row")
        for name in ("AP_mean", "AP_S_mean", "dAP", "dAP_low", "dAP_high", "seeds"):
            out[f"{title} | {name}"] = [by_row[name].get(label, math.nan) if name in by_row else math.nan
                                        for label in labels]
    return out


def _markdown(combined: pd.DataFrame, titles: Sequence[str]) -> str:
    header = ["row"] + [f"{t}: {c}" for t in titles for c in ("AP", "AP_S", "ΔAP [95 % CI]", "n")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in combined.iterrows():
        cells = [str(r["row"])]
        for t in titles:
            ap, aps, d, lo, hi, n = (r[f"{t} | {c}"] for c in ("AP_mean", "AP_S_mean", "dAP", "dAP_low", "dAP_high",
                                                              "seeds"))
            cells.append("" if _missing(ap) else f"{ap:.1f}")
            cells.append("" if _missing(aps) else f"{aps:.1f}")
            cells.append(format_delta(d, lo, hi))
            cells.append("" if _missing(n) else str(int(n)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_table(args: argparse.Namespace) -> int:
    """``kdsweep table``: print (and with ``--out`` write) the parents' tables."""
    client = MlflowClient(tracking_uri=args.tracking_uri or default_tracking_uri())
    tables = [parent_table(client, parent) for parent in args.parents]
    titles = [f"{title} ({parent[:8]})" for (title, _), parent in zip(tables, args.parents)]
    tables = [(t, table) for t, (_, table) in zip(titles, tables)]
    if len(tables) == 1:
        markdown, frame = to_markdown(tables[0][1], tables[0][0]), tables[0][1]
    else:
        frame = side_by_side(tables)
        markdown = _markdown(frame, titles)
    print(markdown, flush=True)
    if args.out:
        out = Path(args.out)
        if out.suffix not in (".md", ".parquet"):
            raise ConfigError(f"--out {out}: write a .md or a .parquet file")
        if out.suffix == ".md":
            out.write_text(markdown)
        else:
            write_parquet(frame, out)
        print(f"kdsweep: wrote {out}", flush=True)
    return 0
