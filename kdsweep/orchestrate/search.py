"""``kdsweep sweep``: a search-space file as a Ray Tune search, recorded in MLflow.

Where an ablation (:mod:`kdsweep.orchestrate.ablation`) crosses fixed rows with seeds, a sweep
*searches*: the file's ``search`` block picks the algorithm (``random``: Tune's variant
generator, or ``optuna``: Bayesian TPE through ``ray.tune.search.optuna.OptunaSearch``), the
scheduler (``fifo`` or ``asha``: ``ASHAScheduler`` stopping weak trials at epoch milestones) and
``num_samples``. Flow: :func:`~kdsweep.orchestrate.launch.prepare` -> the MLflow parent run ->
the teachers -> Tune trials, each a child run -> on the parent: ``sweep.parquet`` and ``sweep.md``
(one row per trial: sampled values, epochs run, metrics), ``best_config.yaml`` (the whole
experiment config of the best trial, as its worker got it), ``<metric>_vs_<param>.png`` for every
searched parameter and ``best_so_far.png``. ``--dry-run`` validates and prints the trial count,
each row's models and what is searched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
import yaml
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from kdsweep.config import ConfigError, to_dict
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
from kdsweep.orchestrate.scheduling import parse_concurrency
from kdsweep.orchestrate.space import SearchSpace
from kdsweep.orchestrate.students import run_students
from kdsweep.orchestrate.teacher import acquire_teachers
from kdsweep.orchestrate.trials import count_trials, trial_config, tune_param_space
from kdsweep.report.plots import plot_best_so_far, plot_param
from kdsweep.report.tables import best_index, sweep_markdown, sweep_table, trial_frame, write_parquet
from kdsweep.report.tracking import write_temp

__all__ = ["SearchPlan", "make_plan", "make_scheduler", "make_search_alg", "param_space", "run_sweep"]


@dataclass(frozen=True)
class SearchPlan:
    """How Tune explores a space (from the file's ``search`` block and the command line)."""

    algorithm: str = "random"
    scheduler: str = "fifo"
    num_samples: int = 1
    max_concurrent: int | str = 2  # or "auto", resolved once Ray is up (Prepared.concurrency)
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0


def make_plan(space: SearchSpace, num_samples: int | None, max_concurrent: int | str | None,
              preset_concurrent: int | str) -> SearchPlan:
    """The :class:`SearchPlan` of ``space`` with command-line overrides."""
    s = space.search
    if num_samples is not None and num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    return SearchPlan(
        algorithm=s.get("algorithm", "random"),
        scheduler=s.get("scheduler", "fifo"),
        num_samples=num_samples or s.get("num_samples", 1),
        max_concurrent=parse_concurrency(max_concurrent) or s.get("max_concurrent_trials", preset_concurrent),
        grace_period=s.get("grace_period", 1),
        reduction_factor=s.get("reduction_factor", 2),
        seed=s.get("seed", 0),
    )


def param_space(space: SearchSpace, plan: SearchPlan, seeds: list[int]) -> dict[str, Any]:
    """Tune ``param_space``. Optuna cannot take grid_search, so its single row and seed are constants."""
    if plan.algorithm == "optuna":
        if len(seeds) != 1:
            raise ConfigError("optuna searches one seed; drop --seeds (or use algorithm: random)")
        return {"row": space.labels[0], "seed": seeds[0], "params": {p: s.to_tune() for p, s in space.space.items()}}
    return tune_param_space(space, seeds)


def make_search_alg(plan: SearchPlan) -> Any:
    """``OptunaSearch`` (TPE, seeded) for ``optuna``; None (Tune's random variant generator) else.
    The metric and mode go to ``TuneConfig`` (Tune rejects them in both places)."""
    if plan.algorithm != "optuna":
        return None
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=plan.seed))


def make_scheduler(plan: SearchPlan, max_epochs: int) -> Any:
    """``ASHAScheduler`` over the reported ``epoch`` for ``asha``; None (FIFO) else.

    Not ``training_iteration``: Tune counts reports, which after a ``--resume`` restart at 1 for a
    trial that continues from its Train checkpoint, and include the checkpoint's epoch reported
    again (:data:`kdsweep.names.REPLAYED`)."""
    if plan.scheduler != "asha":
        return None
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs,
                         grace_period=min(plan.grace_period, max_epochs), reduction_factor=plan.reduction_factor)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace(" ", "")


def _describe_sampler(path: str, sampler: Any, plan: SearchPlan) -> str:
    how = "every value" if sampler.kind == "grid" else f"sampled by {plan.algorithm}"
    return f"  space: {path} ~ {sampler.kind}{list(sampler.args)} ({how})"


def evaluate_every_epoch(prepared: Prepared) -> list[str]:
    """A sweep's trials evaluate every epoch: ASHA's rungs and the searchers read the metric at
    every report (Tune rejects a report without it), and the best-so-far plot follows it. Sets
    ``train.eval_every`` to 1 in every row that says otherwise; returns the notes saying so."""
    notes = []
    for label, exp in prepared.rows.items():
        if exp.train.eval_every != 1:
            notes.append(f"row '{label}': train.eval_every {exp.train.eval_every} -> 1 (a sweep reads "
                         f"{prepared.space.metric} after every epoch)")
            prepared.rows[label] = dataclasses.replace(exp, train=dataclasses.replace(exp.train, eval_every=1))
    return notes


# ------------------------------------------------------------------------------------ launcher
def build_parser(prog: str | None = None, default_space: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="kdsweep sweep: a Ray Tune search over a search-space file")
    if default_space:
        parser.add_argument("space", nargs="?", default=default_space, help="search-space YAML (default: %(default)s)")
    else:
        parser.add_argument("space", help="search-space YAML (search_spaces/*.yaml)")
    parser.add_argument("--num-samples", type=int, help="trials per grid point (default: the file's search.num_samples)")
    parser.add_argument("--summary-json", help="also write {trials, trial_epochs, best, parent_run} to this JSON file")
    add_arguments(parser)
    return parser


def run_sweep(argv: Sequence[str] | None = None, prog: str | None = None, default_space: str | None = None) -> int:
    """Entry point of ``kdsweep sweep`` and ``launch/sweep.py``; returns the exit code."""
    args = build_parser(prog, default_space).parse_args(argv)
    try:
        prepared = prepare(args, with_data=not args.dry_run)
        changed = evaluate_every_epoch(prepared)
        for line in changed:
            print(f"kdsweep: {line}", flush=True)
        prepared = dataclasses.replace(prepared, notes=prepared.notes + tuple(changed))
        seeds = list(range(args.seeds or 1))
        plan = make_plan(prepared.space, args.num_samples, args.max_concurrent, prepared.preset.max_concurrent_trials)
        space_of_tune = param_space(prepared.space, plan, seeds)  # optuna's constraints, before anything starts
        count = count_trials(prepared.space, len(seeds), plan.num_samples)
        if args.dry_run:
            print_dry_run(prepared, f"{prepared.source}: valid. {count} trial(s): {len(prepared.space.labels)} row(s) x "
                                    f"{len(seeds)} seed(s) x {plan.num_samples} sample(s); algorithm {plan.algorithm}, "
                                    f"scheduler {plan.scheduler}, {prepared.concurrency(plan.max_concurrent)[1]}, preset {prepared.preset.name}")
            for path, sampler in prepared.space.space.items():
                print(_describe_sampler(path, sampler, plan))
            return 0
        space = prepared.space
        session = open_session(
            args, prepared, role="sweep", title=f"{space.name} [{prepared.preset.name}] {plan.algorithm}/{plan.scheduler}",
            params={"preset": prepared.preset.name, "algorithm": plan.algorithm, "scheduler": plan.scheduler,
                    "num_samples": plan.num_samples, "seeds": len(seeds), "space_file": space.source,
                    "metric": space.metric, "mode": space.mode})
    except (ConfigError, DataError) as exc:
        print(f"kdsweep: error: {exc}", file=sys.stderr)
        return 2
    print(f"kdsweep: {count} trial(s), {plan.algorithm} search, {plan.scheduler} scheduler", flush=True)
    return run_guarded(session, lambda: _body(args, prepared, session, plan, space_of_tune))


def _body(args: argparse.Namespace, prepared: Prepared, session: Session, plan: SearchPlan,
          space_of_tune: dict[str, Any]) -> int:
    space = prepared.space
    metric, mode = space.metric, space.mode
    init_ray(args.ray_address)
    prepared.check_cluster(ray.cluster_resources())
    concurrent, why = prepared.concurrency(plan.max_concurrent, ray.cluster_resources())
    plan = dataclasses.replace(plan, max_concurrent=concurrent)
    print(f"kdsweep: {why}", flush=True)
    teachers = acquire_teachers(session, prepared, plan.max_concurrent)

    def run_name(config: dict[str, Any]) -> str:
        sampled = config.get("params") or {}
        short = ", ".join(f"{_short(p)}={_fmt(space.space[p].decode(v))}" for p, v in sampled.items() if p in space.space)
        return f"{config['row']} | {short}" if short else f"{config['row']} / seed {config.get('seed', 0)}"

    max_epochs = max(exp.train.epochs for exp in prepared.rows.values())
    results = run_students(session, prepared, teachers, space_of_tune, max_concurrent=plan.max_concurrent,
                           tags={"kdsweep.sweep": space.name}, name=run_name, num_samples=plan.num_samples,
                           search_alg=make_search_alg(plan), scheduler=make_scheduler(plan, max_epochs),
                           metric=metric, mode=mode)
    trials = trial_frame(results)
    table = sweep_table(trials, list(space.space), {p: s.decode for p, s in space.space.items()})
    title = f"{space.name} [{prepared.preset.name}], {plan.algorithm}/{plan.scheduler}, {len(table)} trials"
    markdown = sweep_markdown(table, metric, mode, title, max_epochs if plan.scheduler == "asha" else None)
    folder = write_temp(markdown, "sweep.md").parent
    tracker = session.tracker
    tracker.log_artifact(session.parent, folder / "sweep.md")
    tracker.set_note(session.parent, markdown, "sweep.md")
    tracker.log_artifact(session.parent, write_parquet(table, folder / "sweep.parquet"))
    best = best_index(table, metric, mode)
    best_value = float(table[metric][best]) if best is not None else None
    if best is not None:
        exp = best_trial_config(prepared, trials, metric, mode)
        (folder / "best_config.yaml").write_text(yaml.safe_dump(to_dict(exp), sort_keys=False))
        tracker.log_artifact(session.parent, folder / "best_config.yaml")
        tracker.log_metrics(session.parent, {f"best_{metric}": best_value}, step=0)
    for p in space.space:
        tracker.log_artifact(session.parent, plot_param(table, p, metric, folder / f"{metric}_vs_{_safe(p)}.png"), "plots")
    tracker.log_artifact(session.parent, plot_best_so_far(table, metric, mode, folder / "best_so_far.png"), "plots")
    epochs = int(table["epochs"].sum())
    tracker.log_metrics(session.parent, {"trial_epochs": epochs}, step=0)
    print(markdown, flush=True)
    if best is not None:
        print(f"kdsweep: best {metric} {best_value:.2f} (trial {best + 1}); {epochs} trial-epochs; best config logged "
              "as best_config.yaml", flush=True)
    failed = int((table["status"] != "FINISHED").sum())
    if args.summary_json:
        best_params = {p: _python(table[p][best]) for p in space.space} if best is not None else None
        summary = {"trials": len(table), "failed": failed, "trial_epochs": epochs, "parent_run": session.parent,
                   "best": best_value, "metric": metric, "best_params": best_params,
                   "last_rung": [{p: _python(r[p]) for p in space.space} for _, r in table.iterrows()
                                 if r["epochs"] >= max_epochs and r["status"] == "FINISHED"]}
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return end_session(session, failed, len(table))


def best_trial_config(prepared: Prepared, trials: pd.DataFrame, metric: str, mode: str):
    """The typed config of the best finished trial, built from its Tune config as its driver built it."""
    ordered = trials.assign(_order=range(len(trials))).sort_values(["timestamp", "_order"], na_position="last") \
        if "timestamp" in trials else trials  # completion order, as the sweep table (ties: the first)
    done = ordered[(ordered["status"] == "FINISHED") & ordered[metric].notna()]
    best = done.loc[done[metric].idxmax() if mode == "max" else done[metric].idxmin()]
    params = {p: _python(best[f"params/{p}"]) for p in prepared.space.space
              if f"params/{p}" in best and not _missing(best[f"params/{p}"])}
    config = {"row": best["row"], "seed": int(best["seed"]), "params": params}
    return trial_config(prepared.rows, dict(prepared.space.space), config, prepared.source)


def _python(value: Any) -> Any:
    """A pandas cell as the Python value Tune sampled (numpy scalars -> int, float, ...)."""
    return value.item() if hasattr(value, "item") else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short(path: str) -> str:
    """A run name's label of a space path: its last key, or ``<loss>.<key>`` / ``use`` for the
    method paths (``kd.pkd.weight`` -> ``pkd.weight``), so that two terms' weights stay apart."""
    keys = path.split(".")
    if keys[0] == "kd" and len(keys) > 2 and not keys[1].isdigit():
        return f"{keys[1]}.{keys[-1]}"
    return keys[-1]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
