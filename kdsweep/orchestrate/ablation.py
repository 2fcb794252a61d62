"""The ablation command every ``launch/ablation_*.py`` runs: rows x seeds, one table.

Flow: :func:`~kdsweep.orchestrate.launch.prepare` (space, every trial's models, data, before
anything starts) -> the MLflow parent run -> the teachers (reused by config hash, else trained)
-> rows x seeds as Tune trials, each a child MLflow run -> ``ablation.parquet`` (per seed),
``ablation_summary.parquet``/``ablation.md``/
``ablation.png`` on the parent -> the table printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import ray

from kdsweep.config import ConfigError
from kdsweep.data.coco import DataError
from kdsweep.orchestrate.launch import (
    Prepared,
    Session,
    add_arguments,
    end_session,
    open_session,
    prepare,
    print_dry_run,
    run_guarded,
)
from kdsweep.orchestrate.runner import init_ray
from kdsweep.orchestrate.students import run_students
from kdsweep.orchestrate.teacher import acquire_teachers
from kdsweep.orchestrate.trials import tune_param_space
from kdsweep.report.plots import plot_ablation
from kdsweep.report.tables import ablation_table, seed_table, to_markdown, trial_frame, write_parquet
from kdsweep.report.throughput import row_throughput, throughput_device, val_classes
from kdsweep.report.tracking import write_temp

__all__ = ["run_ablation"]


def run_ablation(default_space: str | Path, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the ablation launchers; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=f"kdsweep ablation over {Path(default_space).name}")
    parser.add_argument("--space", default=str(default_space), help="search-space YAML (default: %(default)s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            prepared = prepare(args, with_data=False)
            seeds = args.seeds or prepared.preset.seeds
            rows = len(prepared.space.labels)
            print_dry_run(prepared, f"{prepared.source} [{prepared.preset.name}]: valid; {rows * seeds} trial(s): "
                                    f"{rows} row(s) x {seeds} seed(s), "
                                    f"{prepared.concurrency(args.max_concurrent)[1]}")
            paper = prepared.space.reproduces(prepared.preset.name)
            if paper:
                print(f"  the paper reports ({prepared.preset.name} setting): {paper}")
            return 0
        prepared = prepare(args)
        seeds = list(range(args.seeds or prepared.preset.seeds))
        session = open_session(args, prepared, role="ablation", title=f"{prepared.space.name} [{prepared.preset.name}]",
                               params={"preset": prepared.preset.name, "seeds": len(seeds),
                                       "rows": ",".join(prepared.space.labels), "space_file": prepared.source})
    except (ConfigError, DataError) as exc:
        print(f"kdsweep: error: {exc}", file=sys.stderr)
        return 2
    return run_guarded(session, lambda: _body(args, prepared, session, seeds))


def _throughput(prepared: Prepared, session: Session, with_teacher: bool) -> dict[str, dict[str, float]]:
    """The params / img/s / speed-up columns, measured where the trials trained: on this machine's
    CPU for CPU trials, inside a Ray task holding one GPU for GPU trials, or left out (with the
    reason printed and tagged on the parent run) when no GPU is there to measure on."""
    device, why = throughput_device(prepared.rows, ray.cluster_resources())
    session.tracker.client.set_tag(session.parent, "kdsweep.throughput", why)
    quick = prepared.preset.name == "smoke"
    classes = val_classes(prepared.data)
    if device is None:
        print(f"kdsweep: throughput columns {why}", flush=True)
        return {}
    if device == "cpu":
        return row_throughput(prepared.rows, classes, with_teacher, quick=quick)
    measure = ray.remote(num_gpus=1)(row_throughput)
    return ray.get(measure.remote(prepared.rows, classes, with_teacher, quick=quick, device=device))


def _body(args: argparse.Namespace, prepared: Prepared, session: Session, seeds: list[int]) -> int:
    init_ray(args.ray_address)
    prepared.check_cluster(ray.cluster_resources())
    max_concurrent, why = prepared.concurrency(args.max_concurrent, ray.cluster_resources())
    print(f"kdsweep: {why}", flush=True)
    teachers = acquire_teachers(session, prepared, max_concurrent)
    print(f"kdsweep: running {len(prepared.space.labels)} rows x {len(seeds)} seeds", flush=True)
    results = run_students(session, prepared, teachers, tune_param_space(prepared.space, seeds),
                           max_concurrent=max_concurrent)
    trials = trial_frame(results)
    extra = {}
    if not args.no_throughput:
        print("kdsweep: measuring inference throughput of each row's student (and the teacher)", flush=True)
        try:
            extra = _throughput(prepared, session, with_teacher=bool(teachers.records))
        except Exception as exc:  # noqa: BLE001 - an extra column must not cost the finished trials
            print(f"kdsweep: warning: throughput not measured ({type(exc).__name__}: {exc}); the table goes on without it",
                  file=sys.stderr, flush=True)
    table = ablation_table(trials, prepared.space.labels, teachers.single_record, baseline=prepared.space.baseline,
                           extra=extra)
    title = f"{prepared.space.name} [{prepared.preset.name}], {len(seeds)} seed(s)"
    markdown = to_markdown(table, title)
    paper = prepared.space.reproduces(prepared.preset.name)
    if paper:  # the paper's number, next to the result (the table, its MLflow artifact, the parent's tag)
        markdown += f"\nThe paper reports ({prepared.preset.name} setting): {paper}\n"
    folder = write_temp(markdown, "ablation.md").parent
    tracker = session.tracker
    tracker.log_artifact(session.parent, folder / "ablation.md")
    tracker.set_note(session.parent, markdown, "ablation.md")  # the run page shows the table itself
    tracker.log_artifact(session.parent, write_parquet(seed_table(trials, prepared.space.labels, teachers.single_record),
                                                       folder / "ablation.parquet"))  # one row per (row, seed)
    tracker.log_artifact(session.parent, write_parquet(table, folder / "ablation_summary.parquet"))
    tracker.log_artifact(session.parent, plot_ablation(table, folder / "ablation.png", title))
    print(markdown, flush=True)
    return end_session(session, int((trials["status"] != "FINISHED").sum()), len(trials))
