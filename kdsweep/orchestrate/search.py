"""``kdsweep sweep``: run any search-space file as a Ray Tune search, recorded in MLflow.

Where an ablation (:mod:`kdsweep.orchestrate.ablation`) crosses fixed rows with seeds, a sweep *searches*:
the file's ``search`` block picks the algorithm (``random``: Tune's variant generator, or
``optuna``: Bayesian TPE through ``ray.tune.search.optuna.OptunaSearch``), the scheduler (``fifo``
or ``asha``: ``ASHAScheduler`` stopping weak trials at epoch milestones) and ``num_samples``.
Flow: validate (space, preset, data) -> MLflow parent run -> the teacher (reused by config hash,
as in ablations; skipped when no row distils) -> Tune trials, each a child run -> on the parent:
``sweep.parquet`` and ``sweep.md`` (one row per trial: sampled values, epochs run, metrics),
``best_config.yaml`` (the whole experiment config of the best trial), ``<metric>_vs_<param>.png``
for every searched parameter and ``best_so_far.png`` (the search's best metric against trials
completed). ``--dry-run`` only validates and prints the trial count and the first configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import yaml

from kdsweep import paths
from kdsweep.config import ConfigError, to_dict
from kdsweep.train.evaluation import STAT_NAMES
from kdsweep.orchestrate.space import SearchSpace, build_experiment, count_grid_trials, tune_param_space
from kdsweep.report.tracking import TAG_HASH, TAG_ROLE, Tracker, default_tracking_uri, tune_callback


@dataclass(frozen=True)
class SearchPlan:
    """How Tune explores a space (from the file's ``search`` block and the command line)."""

    algorithm: str = "random"
    scheduler: str = "fifo"
    num_samples: int = 1
    max_concurrent: int = 2
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0


def make_plan(space: SearchSpace, num_samples: int | None, max_concurrent: int | None, preset_concurrent: int) -> SearchPlan:
    """The :class:`SearchPlan` of ``space`` with command-line overrides."""
    s = space.search
    if num_samples is not None and num_samples < 1:
        raise ConfigError("--num-samples must be >= 1")
    return SearchPlan(
        algorithm=s.get("algorithm", "random"),
        scheduler=s.get("scheduler", "fifo"),
        num_samples=num_samples or s.get("num_samples", 1),
        max_concurrent=max_concurrent or s.get("max_concurrent_trials", preset_concurrent),
        grace_period=s.get("grace_period", 1),
        reduction_factor=s.get("reduction_factor", 2),
        seed=s.get("seed", 0),
    )


def trial_count(space: SearchSpace, plan: SearchPlan, seeds: int) -> int:
    """Trials Tune will start: rows x seeds x grid sizes x num_samples (before ASHA stops any)."""
    return count_grid_trials(space, seeds, plan.num_samples)


def preview(space: SearchSpace, plan: SearchPlan, seeds: Sequence[int], n: int = 3) -> list[dict[str, Any]]:
    """The first ``n`` trial configs (grids enumerated, other samplers drawn with ``plan.seed``)."""
    rng = random.Random(plan.seed)
    grids = {p: s.values() for p, s in space.space.items() if s.kind == "grid"}
    out: list[dict[str, Any]] = []
    combos = itertools.product(space.labels, seeds, *grids.values(), range(plan.num_samples))
    for combo in combos:
        row, seed, *grid_values, _ = combo
        sampled = dict(zip(grids, grid_values))
        for path, sampler in space.space.items():
            if sampler.kind == "choice":
                sampled[path] = rng.choice(list(sampler.args))
            elif sampler.kind == "uniform":
                sampled[path] = rng.uniform(*sampler.args)
            elif sampler.kind == "loguniform":
                lo, hi = sampler.args
                sampled[path] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            elif sampler.kind == "randint":
                sampled[path] = rng.randrange(*sampler.args)
        out.append({"row": row, "seed": seed, "params": sampled})
        if len(out) >= n:
            break
    return out


def param_space(space: SearchSpace, plan: SearchPlan, seeds: list[int]) -> dict[str, Any]:
    """Tune ``param_space``. Optuna cannot take grid_search, so its single row and seed are constants."""
    if plan.algorithm == "optuna":
        if len(seeds) != 1:
            raise ConfigError("optuna searches one seed; drop --seeds (or use algorithm: random)")
        return {"row": space.labels[0], "seed": seeds[0], "params": {p: s.to_tune() for p, s in space.space.items()}}
    return tune_param_space(space, seeds)


def make_search_alg(plan: SearchPlan, metric: str, mode: str) -> Any:
    """``OptunaSearch`` (TPE, seeded) for ``optuna``; None (Tune's random variant generator) else."""
    if plan.algorithm != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # metric and mode go to TuneConfig (Tune rejects them in both places)
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=plan.seed))


def make_scheduler(plan: SearchPlan, metric: str, mode: str, max_epochs: int) -> Any:
    """``ASHAScheduler`` over epochs (``training_iteration``) for ``asha``; None (FIFO) else."""
    if plan.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(  # metric and mode go to TuneConfig
        time_attr="training_iteration", max_t=max_epochs,
        grace_period=min(plan.grace_period, max_epochs), reduction_factor=plan.reduction_factor,
    )


# ------------------------------------------------------------------------------------- outputs
def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str)) or value is None else yaml.safe_dump(value, default_flow_style=True).strip()


def sweep_table(records: list[dict[str, Any]], space: SearchSpace) -> pa.Table:
    """One row per trial in completion order: ``trial, row, seed, <param>..., status, epochs, metrics``."""
    order = sorted(range(len(records)), key=lambda i: (records[i].get("timestamp", math.inf), i))
    columns: dict[str, list[Any]] = {"trial": [], "row": [], "seed": []}
    params = list(space.space)
    for path in params:
        columns[path] = []
    columns.update({"status": [], "epochs": []})
    for name in STAT_NAMES:
        columns[name] = []
    for rank, i in enumerate(order):
        r = records[i]
        columns["trial"].append(rank + 1)
        columns["row"].append(r.get("row", ""))
        columns["seed"].append(int(r.get("seed", 0)))
        for path in params:
            columns[path].append(_cell(r.get("params", {}).get(path)))
        columns["status"].append(r.get("status", ""))
        columns["epochs"].append(int(r.get("training_iteration", 0) or 0))
        for name in STAT_NAMES:
            columns[name].append(float(r[name]) if name in r else math.nan)
    for path in params:  # mixed types (e.g. ints and floats) -> one Arrow type
        values = columns[path]
        if any(isinstance(v, str) for v in values):
            columns[path] = [None if v is None else str(v) for v in values]
        elif any(isinstance(v, float) for v in values):
            columns[path] = [None if v is None else float(v) for v in values]
    return pa.table(columns)


def best_index(table: pa.Table, metric: str, mode: str) -> int | None:
    """Row of the best finished trial, or None."""
    data = table.to_pydict()
    ok = [i for i, s in enumerate(data["status"]) if s == "FINISHED" and not math.isnan(data[metric][i])]
    if not ok:
        return None
    pick = max if mode == "max" else min
    return pick(ok, key=lambda i: data[metric][i])


def best_so_far(table: pa.Table, metric: str, mode: str) -> list[float]:
    """The best ``metric`` among the first k completed trials, for k = 1..n (NaN before any)."""
    out, best = [], math.nan
    for value, status in zip(table.column(metric).to_pylist(), table.column("status").to_pylist()):
        if status == "FINISHED" and not math.isnan(value):
            best = value if math.isnan(best) else (max(best, value) if mode == "max" else min(best, value))
        out.append(best)
    return out


def to_markdown(table: pa.Table, metric: str, mode: str, title: str) -> str:
    """Trials sorted best first (failed last), metrics with one decimal."""
    data = table.to_pydict()
    params = [c for c in table.column_names if c not in ("trial", "row", "seed", "status", "epochs", *STAT_NAMES)]
    header = ["trial", "row", *params, "epochs", *STAT_NAMES, "status"]
    sign = -1 if mode == "max" else 1

    def key(i: int) -> tuple[int, float]:
        value = data[metric][i]
        return (data["status"][i] != "FINISHED" or math.isnan(value), sign * (0 if math.isnan(value) else value))

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for i in sorted(range(table.num_rows), key=key):
        cells = [str(data["trial"][i]), str(data["row"][i])]
        cells += [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (data[p][i] for p in params)]
        cells.append(str(data["epochs"][i]))
        cells += ["" if math.isnan(data[n][i]) else f"{data[n][i]:.1f}" for n in STAT_NAMES]
        cells.append(data["status"][i])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_param(table: pa.Table, param: str, metric: str, path: Path) -> Path:
    """Scatter of ``metric`` against one searched parameter (categorical values as labels)."""
    plt = _pyplot()
    values, ys = table.column(param).to_pylist(), table.column(metric).to_pylist()
    pairs = [(v, y) for v, y in zip(values, ys) if v is not None and not math.isnan(y)]
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
    return path


def plot_best_so_far(table: pa.Table, metric: str, mode: str, path: Path) -> Path:
    """The search's best-so-far curve: best ``metric`` against the number of completed trials."""
    plt = _pyplot()
    curve = best_so_far(table, metric, mode)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    trials = list(range(1, len(curve) + 1))
    ax.step(trials, curve, where="post", label=f"best {metric}")
    ax.scatter(trials, table.column(metric).to_pylist(), s=12, alpha=0.6, label="trial")
    ax.set_xlabel("trials completed")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ------------------------------------------------------------------------------------ launcher
def build_parser(prog: str | None = None, default_space: str | None = None) -> argparse.ArgumentParser:
    from kdsweep.orchestrate.ablation import add_arguments

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
    from kdsweep.data.coco import DataError

    try:
        if args.dry_run:
            return _dry_run(args)
        return _run(args)
    except (ConfigError, DataError) as exc:
        print(f"kdsweep: error: {exc}", file=sys.stderr)
        return 2


def _validated(args: argparse.Namespace, with_data: bool):
    from kdsweep.orchestrate.ablation import _prepare, prepare_space

    args.space = str(Path(args.space).expanduser().resolve()) if Path(args.space).expanduser().exists() else args.space
    if with_data:
        preset, space, preset_dict, data = _prepare(args)
        models = []
    else:
        preset, space, preset_dict, models = prepare_space(args)
        data = {}
    seeds = list(range(args.seeds or 1))
    plan = make_plan(space, args.num_samples, args.max_concurrent, preset.max_concurrent_trials)
    param_space(space, plan, seeds)  # optuna's constraints, before anything starts
    return preset, space, preset_dict, data, seeds, plan, models


def _dry_run(args: argparse.Namespace) -> int:
    from kdsweep.orchestrate.ablation import check_data_only, print_models

    preset, space, preset_dict, _, seeds, plan, models = _validated(args, with_data=False)
    data = check_data_only(preset_dict, space)
    count = trial_count(space, plan, len(seeds))
    print(f"{space.source}: valid. {count} trial(s): {len(space.labels)} row(s) x {len(seeds)} seed(s)"
          f" x {plan.num_samples} sample(s); algorithm {plan.algorithm}, scheduler {plan.scheduler}, "
          f"{plan.max_concurrent} at once, preset {preset.name}")
    print(f"  data: {data}")
    print_models(space, models)
    for i, trial in enumerate(preview(space, plan, seeds), 1):
        exp = build_experiment(preset_dict, space, trial["row"], trial["params"], trial["seed"])
        shown = {"row": trial["row"], "seed": trial["seed"], "sampled": trial["params"],
                 "kd": [to_dict(t) for t in exp.kd], "teacher_scale": exp.teacher_scale}
        print(f"--- trial {i}\n" + yaml.safe_dump(shown, sort_keys=False, default_flow_style=None).rstrip())
    return 0


def _run(args: argparse.Namespace) -> int:
    preset, space, preset_dict, data, seeds, plan, _ = _validated(args, with_data=True)
    import ray

    from kdsweep.orchestrate.ablation import _describe, acquire_teacher, teacher_identity
    from kdsweep.orchestrate.runner import SweepContext, init_ray, interrupted, result_rows, run_trials, trial_experiment
    from kdsweep.report.tables import write_parquet
    from kdsweep.report.tracking import write_temp

    uri = args.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, args.experiment or f"kdsweep-{space.name}")
    storage = (str(Path(args.storage_path).resolve()) if args.storage_path and "://" not in args.storage_path
               else (args.storage_path or str(paths.ray_storage())))
    metric, mode = space.metric, space.mode
    teacher_hash, _ = teacher_identity(preset_dict, space, data)
    from kdsweep.orchestrate.ablation import open_parent, run_guarded

    parent, tune_name, resumed = open_parent(
        tracker, args, f"{space.name} [{preset.name}] {plan.algorithm}/{plan.scheduler}",
        {TAG_ROLE: "sweep", "kdsweep.orchestrate.space": space.name, "kdsweep.preset": preset.name, TAG_HASH: teacher_hash},
        f"{space.name}-{preset.name}",
    )
    if not resumed:
        tracker.log_params(parent, {"preset": preset.name, "algorithm": plan.algorithm, "scheduler": plan.scheduler,
                                    "num_samples": plan.num_samples, "seeds": len(seeds), "space_file": space.source,
                                    "metric": metric, "mode": mode})
        tracker.log_text(parent, Path(space.source).read_text(), "search_space.yaml")
    print(f"kdsweep: MLflow {uri} parent run {parent}; {trial_count(space, plan, len(seeds))} trial(s), "
          f"{plan.algorithm} search, {plan.scheduler} scheduler", flush=True)
    callbacks: list[Any] = []
    def body() -> int:
        init_ray(args.ray_address)
        _, teacher_state = acquire_teacher(tracker, parent, preset_dict, space, data, storage, teacher_hash)
        ctx = SweepContext(preset=preset_dict, space=space, data=data, storage_path=storage, role="student",
                           teacher_state=ray.put(teacher_state) if teacher_state is not None else None)
        describe = _describe(ctx, "student", {"kdsweep.orchestrate.runner": space.name})

        def named(config: dict[str, Any]):
            name, params, tags, exp = describe(config)
            sampled = config.get("params") or {}
            short = ", ".join(f"{p.split('.')[-1]}={_fmt(space.space[p].decode(v))}" for p, v in sampled.items() if p in space.space)
            return (f"{config['row']} | {short}" if short else name), params, tags, exp

        callbacks.append(tune_callback(tracker, parent, named))
        max_epochs = trial_experiment(ctx, {"row": space.labels[0], "params": {}, "seed": 0}).train.epochs
        results = run_trials(
            ctx, param_space(space, plan, seeds), name=tune_name, callbacks=callbacks, restore=resumed,
            max_concurrent_trials=plan.max_concurrent, num_samples=plan.num_samples,
            search_alg=make_search_alg(plan, metric, mode), scheduler=make_scheduler(plan, metric, mode, max_epochs),
            metric=metric, mode=mode,
        )
        if interrupted(results):
            raise KeyboardInterrupt
        records = result_rows(results, lambda c: {
            "row": c["row"], "seed": c.get("seed", 0),
            "params": {p: space.space[p].decode(v) for p, v in (c.get("params") or {}).items() if p in space.space},
        })
        for rec, result in zip(records, results):
            rec["experiment"] = to_dict(trial_experiment(ctx, result.config))
        table = sweep_table(records, space)
        title = f"{space.name} [{preset.name}], {plan.algorithm}/{plan.scheduler}, {table.num_rows} trials"
        markdown = to_markdown(table, metric, mode, title)
        folder = write_temp(markdown, "sweep.md").parent
        tracker.log_artifact(parent, folder / "sweep.md")
        tracker.log_artifact(parent, write_parquet(table, folder / "sweep.parquet"))
        best = best_index(table, metric, mode)
        order = sorted(range(len(records)), key=lambda i: (records[i].get("timestamp", math.inf), i))
        if best is not None:
            best_exp = records[order[best]]["experiment"]
            (folder / "best_config.yaml").write_text(yaml.safe_dump(best_exp, sort_keys=False))
            tracker.log_artifact(parent, folder / "best_config.yaml")
            tracker.log_metrics(parent, {f"best_{metric}": table.column(metric)[best].as_py()}, step=0)
        for p in space.space:
            tracker.log_artifact(parent, plot_param(table, p, metric, folder / f"{metric}_vs_{_safe(p)}.png"), "plots")
        tracker.log_artifact(parent, plot_best_so_far(table, metric, mode, folder / "best_so_far.png"), "plots")
        epochs = sum(table.column("epochs").to_pylist())
        tracker.log_metrics(parent, {"trial_epochs": epochs}, step=0)
        print(markdown, flush=True)
        if best is not None:
            print(f"kdsweep: best {metric} {table.column(metric)[best].as_py():.2f} (trial {best + 1}); "
                  f"{epochs} trial-epochs; best config logged as best_config.yaml", flush=True)
        failed = sum(r["status"] != "FINISHED" for r in records)
        if args.summary_json:
            summary = {"trials": table.num_rows, "failed": failed, "trial_epochs": epochs, "parent_run": parent,
                       "best": table.column(metric)[best].as_py() if best is not None else None, "metric": metric}
            Path(args.summary_json).write_text(json.dumps(summary, indent=1))
        status = "FINISHED" if failed < len(records) else "FAILED"
        tracker.end_run(parent, status, reason=f"{failed} of {len(records)} trials failed" if failed else None)
        return 0 if status == "FINISHED" else 1

    return run_guarded(tracker, parent, callbacks, body)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace(" ", "")


__all__ = ["SearchPlan", "best_index", "best_so_far", "make_plan", "param_space", "preview", "run_sweep", "sweep_table"]
