"""The ablation launcher every ``launch/ablation_*.py`` script calls.

Flow: parse options -> validate the search space and the data (before anything starts) ->
MLflow parent run -> teacher (reused from MLflow when a FINISHED teacher run has the same
config hash, else trained as a Ray Train run) -> rows x seeds as Tune trials, each a child
MLflow run -> ``ablation.parquet``/``ablation.md``/``ablation.png`` on the parent -> print.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from kdsweep import paths
from kdsweep.config import ConfigError, config_hash, merge, to_dict
from kdsweep.orchestrate.preflight import dataset_classes, describe_row, preflight
from kdsweep.presets import PRESETS, get_preset
from kdsweep.orchestrate.space import Row, SearchSpace, build_experiment, load_space, tune_param_space, validate_space
from kdsweep.report.tracking import TAG_HASH, TAG_ROLE, TAG_ROW, TAG_SEED, Tracker, default_tracking_uri, flatten, tune_callback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every ablation launcher shares."""
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="experiment size (default: quick)")
    parser.add_argument("--data", help="dataset folder in the synth layout (train.json, val.json, images/); default: generated synthetic data")
    parser.add_argument("--train-ann", help="COCO instances file for training (with --val-ann and --images)")
    parser.add_argument("--val-ann", help="COCO instances file for validation")
    parser.add_argument("--images", help="image folder of --train-ann/--val-ann")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (http://..., sqlite:///...); default: embedded SQLite under KDSWEEP_HOME")
    parser.add_argument("--experiment", help="MLflow experiment name (default: kdsweep-<space name>)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers per trial")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPUs (NCCL, AMP)")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        help="where a run's workers go (STRICT_SPREAD: one per node); default PACK")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the preset's)")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once (default: the preset's)")
    parser.add_argument("--storage-path", help="Ray storage path (default: KDSWEEP_HOME/ray_results; use shared storage on a cluster)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--rows", help="comma-separated subset of row labels to run")
    parser.add_argument("--no-throughput", action="store_true", help="skip the params / inference images-per-second columns")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate everything a launch validates (space, every trial's teacher and student as the trials "
                             "build them, data), print the trial count and each row's models, start nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest interrupted run of this space and preset: finished trials are kept, "
                             "unfinished ones resume from their checkpoints, each keeps its one MLflow child run")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Experiment overrides from command-line options."""
    over: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for option in ("num_workers", "seeds", "max_concurrent"):  # 0 is a bad value, not "not given"
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} {value} must be >= 1")
    if args.num_workers:
        train["num_workers"] = args.num_workers
    if args.use_gpu:
        train.update(use_gpu=True, amp=True)
    if getattr(args, "placement_strategy", None):
        train["placement_strategy"] = args.placement_strategy
    if train:
        over["train"] = dict(train)
        over["teacher_train"] = dict(train)
    data: dict[str, Any] = {}
    if args.data:
        data["root"] = str(Path(args.data).expanduser().resolve())
    for key in ("train_ann", "val_ann", "images"):
        value = getattr(args, key)
        if value:
            data[key] = str(Path(value).expanduser().resolve())
    if data:
        over["data"] = data
    return over


def teacher_space(space: SearchSpace) -> SearchSpace:
    """A one-row space for the teacher run: the space's base config, no row overrides."""
    return SearchSpace(name=f"{space.name}-teacher", source=space.source, base=space.base, rows=(Row("teacher", {}),))


def teacher_identity(preset: dict[str, Any], space: SearchSpace, data: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Config hash of what determines the teacher: its model, its training and the data files."""
    exp = build_experiment(preset, teacher_space(space), "teacher", {}, None)
    ident = {"teacher": to_dict(exp.teacher), "teacher_train": to_dict(exp.teacher_train), "data": data}
    return config_hash(ident), ident


TAG_TUNE = "kdsweep.tune_name"


def open_parent(tracker: Tracker, args: argparse.Namespace, name: str, tags: dict[str, str],
                tune_prefix: str) -> tuple[str, str, bool]:
    """The MLflow parent run and the Tune experiment name: a new pair, or with ``--resume`` the
    newest unfinished parent with the same tags (reopened) and its Tune experiment.

    Returns ``(parent run id, tune name, resumed)``.
    Raises:
        ConfigError: ``--resume`` with nothing to resume.
    """
    if getattr(args, "resume", False):
        run = tracker.find_resumable(tags)
        if run is None or TAG_TUNE not in run.data.tags:
            raise ConfigError(f"--resume: no interrupted run of '{name}' in this MLflow experiment; run without --resume")
        tracker.client.update_run(run.info.run_id, status="RUNNING")
        tracker.client.set_tag(run.info.run_id, "kdsweep.resumed", "true")
        return run.info.run_id, run.data.tags[TAG_TUNE], True
    parent = tracker.start_run(name, tags=tags)
    tune_name = f"{tune_prefix}-{parent[:8]}"
    tracker.client.set_tag(parent, TAG_TUNE, tune_name)
    return parent, tune_name, False


def _describe(ctx, role: str, extra_tags: dict[str, str]):
    """``describe(config) -> (run name, params, tags, config)`` for the MLflow Tune callback.

    It closes over a copy of ``ctx`` *without* the teacher's ObjectRef: Tune pickles its
    callbacks into the experiment state, and an ObjectRef of this driver unpickled by a later
    ``--resume`` driver collides with that driver's own objects (Ray aborts with "Tried to create
    an owned object that already exists").
    """
    import dataclasses

    from kdsweep.orchestrate.runner import trial_experiment

    ctx = dataclasses.replace(ctx, teacher_state=None)

    def describe(config: dict[str, Any]):
        exp = to_dict(trial_experiment(ctx, config))
        row, seed = config["row"], config.get("seed", 0)
        sampled = config.get("params") or {}
        params = {"row": row, "seed": seed, **{f"space.{k}": v for k, v in sampled.items()}, **flatten(exp)}
        tags = {TAG_ROLE: role, TAG_ROW: row, TAG_SEED: str(seed), **extra_tags}
        name = "teacher" if role == "teacher" else f"{row} | seed {seed}"
        return name, params, tags, exp

    return describe


def throughput_columns(preset_dict: dict[str, Any], space: SearchSpace, data: dict[str, str],
                       with_teacher: bool, quick: bool = False) -> dict[str, dict[str, float]]:
    """Per row label (and ``teacher``): ``params_M`` (inference parameters, millions),
    ``infer_img_s`` (CPU images/s of the launcher's machine, after all trials, the models measured
    interleaved, see :func:`kdsweep.report.throughput.measure_configs`) and ``infer_speedup`` (vs the
    teacher). Rows with the same student config share one measurement."""
    import dataclasses
    import json

    from kdsweep.report.throughput import measure_configs

    classes = len(json.loads(Path(data["val_ann"]).read_text()).get("categories", [])) or 1
    unique: dict[str, Any] = {}
    label_key: dict[str, str] = {}
    for label in space.labels:
        exp = build_experiment(preset_dict, space, label, {}, None)
        cfg = dataclasses.replace(exp.student, weights=None)
        key = config_hash(to_dict(cfg))
        unique.setdefault(key, cfg)
        label_key[label] = key
        if with_teacher and "teacher" not in unique:
            unique["teacher"] = dataclasses.replace(exp.teacher, weights=None)
    settings = {"batch": 2, "iters": 2, "rounds": 1} if quick else {"batch": 4, "iters": 5, "rounds": 3}
    measured = measure_configs(unique, classes, **settings)
    out: dict[str, dict[str, float]] = {}
    teacher_rate = measured["teacher"]["images_per_s"] if "teacher" in measured else None
    for label, key in [*label_key.items(), *((("teacher", "teacher"),) if "teacher" in measured else ())]:
        m = measured[key]
        out[label] = {"params_M": m["inference_params"] / 1e6, "infer_img_s": m["images_per_s"]}
        if teacher_rate:
            out[label]["infer_speedup"] = m["images_per_s"] / teacher_rate
    return out


def _load_weights(path: Path) -> dict:
    """The detector state_dict in a ``model.pt`` written by :func:`~kdsweep.train.worker.save_checkpoint`."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def train_teacher(tracker: Tracker, parent: str, ctx, teacher_hash: str) -> tuple[dict[str, Any], dict]:
    """Train the teacher as a one-trial sweep; log its weights to its MLflow run, and only then
    mark that run FINISHED (a FINISHED teacher run always holds its weights, so it is reusable).

    The checkpoint is read through the storage's own filesystem (local, ``s3://``, ...).
    """
    from ray import tune

    from kdsweep.orchestrate.runner import result_rows, run_trials, storage_checkpoint
    from kdsweep.train.worker import student_weights_path

    callback = tune_callback(tracker, parent, _describe(ctx, "teacher", {TAG_HASH: teacher_hash}), finish_on_complete=False)
    param_space = {"row": tune.grid_search(["teacher"]), "seed": tune.grid_search([0]), "params": {}}
    try:
        results = run_trials(ctx, param_space, name=f"teacher-{teacher_hash}-{int(time.time())}", callbacks=[callback],
                             max_concurrent_trials=1)
        record = result_rows(results, lambda c: {"row": "teacher"})[0]
        if record["status"] != "FINISHED" or not record.get("checkpoint_path"):
            raise RuntimeError(f"teacher training failed: {record.get('error') or 'no checkpoint'}")
        local = paths.home() / "teachers" / teacher_hash
        storage_checkpoint(ctx.storage_path, record["checkpoint_path"]).to_directory(str(local))
        weights = student_weights_path(local)
        [run_id] = callback.completed
        tracker.log_artifact(run_id, weights, "teacher")
        callback.finish(run_id)
    except BaseException as exc:
        callback.kill_open_runs(f"teacher not usable: {exc}" if str(exc) else "interrupted")
        raise
    return record, _load_weights(weights)


def acquire_teacher(tracker: Tracker, parent: str, preset_dict: dict[str, Any], space: SearchSpace,
                    data: dict[str, str], storage: str, teacher_hash: str) -> tuple[dict[str, Any] | None, dict | None]:
    """The teacher's record and weights: reused from MLflow by config hash, else trained; tags the
    parent with its AP. ``(None, None)`` when no row of ``space`` distils (no teacher is needed)."""
    from kdsweep.orchestrate.runner import SweepContext

    if not any(build_experiment(preset_dict, space, label, {}, None).kd for label in space.labels):
        print("kdsweep: no row distils; no teacher needed", flush=True)
        return None, None
    reused = reuse_teacher(tracker, teacher_hash)
    if reused is not None:
        record, state = reused
        print(f"kdsweep: reusing teacher run {record['run_id']} (config hash {teacher_hash})", flush=True)
    else:
        print(f"kdsweep: training the teacher (config hash {teacher_hash})", flush=True)
        tctx = SweepContext(preset=preset_dict, space=teacher_space(space), data=data, storage_path=storage, role="teacher")
        record, state = train_teacher(tracker, parent, tctx, teacher_hash)
    tracker.client.set_tag(parent, "kdsweep.teacher_AP", f"{record.get('AP', float('nan')):.2f}")
    return record, state


def reuse_teacher(tracker: Tracker, teacher_hash: str) -> tuple[dict[str, Any], dict] | None:
    """Metrics and weights of a FINISHED teacher run with this hash, or None."""
    run = tracker.find_teacher(teacher_hash)
    if run is None:
        return None
    path = tracker.download(run.info.run_id, "teacher/model.pt", paths.home() / "teachers" / teacher_hash / run.info.run_id)
    record = {"row": "teacher", "status": "FINISHED", **run.data.metrics, "run_id": run.info.run_id}
    return record, _load_weights(path)


def run_ablation(default_space: str | Path, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of the ablation launchers; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=f"kdsweep ablation over {Path(default_space).name}")
    parser.add_argument("--space", default=str(default_space), help="search-space YAML (default: %(default)s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from kdsweep.data.coco import DataError

    try:
        return _dry_run(args) if args.dry_run else _run(args)
    except (ConfigError, DataError) as exc:
        print(f"kdsweep: error: {exc}", file=sys.stderr)
        return 2


def prepare_space(args: argparse.Namespace):
    """Preset, search space (``--rows`` applied), the merged preset dict and every trial's models
    as the preflight built them (:func:`kdsweep.orchestrate.preflight.preflight`): every row validated."""
    preset = get_preset(args.preset)
    space = load_space(args.space)
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        missing = [r for r in wanted if r not in space.labels]
        if missing:
            raise ConfigError(f"--rows: '{missing[0]}' is not a row of {space.source}; rows: {', '.join(space.labels)}")
        space = SearchSpace(**{**space.__dict__, "rows": tuple(r for r in space.rows if r.label in wanted)})
    preset_dict = merge(preset.experiment, cli_overrides(args))
    trials = validate_space(space, preset_dict)
    models = preflight(trials, dataset_classes(trials[0][1]), space.source)
    return preset, space, preset_dict, models


def _prepare(args: argparse.Namespace):
    """Everything checked before anything starts: preset, space, every trial's models, data."""
    from kdsweep.data.coco import load_validated, resolve_data

    preset, space, preset_dict, models = prepare_space(args)
    first = build_experiment(preset_dict, space, space.labels[0], {}, None)
    data_paths = resolve_data(first.data)
    for ann, images in ((data_paths.train_ann, data_paths.train_images), (data_paths.val_ann, data_paths.val_images)):
        load_validated(ann, images)
    data = {k: str(v) for k, v in data_paths.__dict__.items()}
    return preset, space, preset_dict, data


def check_data_only(preset_dict: dict[str, Any], space: SearchSpace) -> str:
    """What ``--dry-run`` says of the data: a given dataset is validated as a run validates it
    (problems raise a one-line DataError); the default synthetic data is described, not generated."""
    from kdsweep.data.coco import load_validated, resolve_data

    cfg = build_experiment(preset_dict, space, space.labels[0], {}, None).data
    if cfg.root is None and cfg.train_ann is None and cfg.val_ann is None:
        return (f"synthetic ({cfg.synth_style}): {cfg.synth_train} train / {cfg.synth_val} val images at {cfg.synth_size} px, "
                "generated under KDSWEEP_HOME on the first run")
    data_paths = resolve_data(cfg)
    reports = [load_validated(ann, images) for ann, images in
               ((data_paths.train_ann, data_paths.train_images), (data_paths.val_ann, data_paths.val_images))]
    return f"{data_paths.train_ann} ({reports[0].num_images} images), {data_paths.val_ann} ({reports[1].num_images} images): valid"


def print_models(space: SearchSpace, models: list) -> None:
    """One line per row: its teacher and student as the trials build them (the first
    configuration of rows with sampled values)."""
    shown: set[str] = set()
    for row in models:
        if row.label not in shown:
            shown.add(row.label)
            print(f"  {describe_row(row)}")
    if len(models) > len(shown):
        print(f"  ({len(models)} configurations built in all: every grid and choice value of the space)")


def _dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: the whole validation of a launch (space, every trial's models, data), then
    the trial count and one line per row; starts nothing and records nothing."""
    preset, space, preset_dict, models = prepare_space(args)
    data = check_data_only(preset_dict, space)
    seeds = args.seeds or preset.seeds
    print(f"{space.source} [{preset.name}]: valid; {len(space.labels) * seeds} trial(s): "
          f"{len(space.labels)} row(s) x {seeds} seed(s), {args.max_concurrent or preset.max_concurrent_trials} at once")
    print(f"  data: {data}")
    print_models(space, models)
    return 0


def _run(args: argparse.Namespace) -> int:
    preset, space, preset_dict, data = _prepare(args)
    import ray

    from kdsweep.orchestrate.runner import SweepContext, init_ray, interrupted, result_rows, run_trials
    from kdsweep.report.tables import plot, summarize, to_markdown, write_parquet
    from kdsweep.report.tracking import write_temp

    uri = args.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, args.experiment or f"kdsweep-{space.name}")
    seeds = list(range(args.seeds or preset.seeds))
    max_concurrent = args.max_concurrent or preset.max_concurrent_trials
    storage = str(Path(args.storage_path).resolve()) if args.storage_path and "://" not in args.storage_path else (args.storage_path or str(paths.ray_storage()))
    teacher_hash, ident = teacher_identity(preset_dict, space, data)
    parent, tune_name, resumed = open_parent(
        tracker, args, f"{space.name} [{preset.name}]",
        {TAG_ROLE: "ablation", "kdsweep.orchestrate.space": space.name, "kdsweep.preset": preset.name, TAG_HASH: teacher_hash},
        f"{space.name}-{preset.name}",
    )
    if not resumed:
        tracker.log_params(parent, {"preset": preset.name, "seeds": len(seeds), "rows": ",".join(space.labels), "space_file": space.source})
        tracker.log_text(parent, Path(space.source).read_text(), "search_space.yaml")
    print(f"kdsweep: MLflow {uri} experiment '{tracker.client.get_experiment(tracker.experiment_id).name}' parent run {parent}", flush=True)
    callbacks: list[Any] = []
    def body() -> int:
        init_ray(args.ray_address)
        teacher_record, teacher_state = acquire_teacher(tracker, parent, preset_dict, space, data, storage, teacher_hash)
        ctx = SweepContext(preset=preset_dict, space=space, data=data, storage_path=storage, role="student",
                           teacher_state=ray.put(teacher_state) if teacher_state is not None else None)
        callback = tune_callback(tracker, parent, _describe(ctx, "student", {}))
        callbacks.append(callback)
        print(f"kdsweep: running {len(space.labels)} rows x {len(seeds)} seeds", flush=True)
        if resumed:
            print(f"kdsweep: resuming {tune_name}: finished trials are kept", flush=True)
        results = run_trials(ctx, tune_param_space(space, seeds), name=tune_name, callbacks=callbacks,
                             max_concurrent_trials=max_concurrent, restore=resumed)
        if interrupted(results):
            raise KeyboardInterrupt
        records = result_rows(results, lambda c: {"row": c["row"], "seed": c.get("seed", 0)})
        throughput = {}
        if not args.no_throughput:
            print("kdsweep: measuring inference throughput of each row's student (and the teacher)", flush=True)
            try:
                throughput = throughput_columns(preset_dict, space, data, teacher_record is not None, quick=preset.name == "smoke")
            except Exception as exc:  # noqa: BLE001 - an extra column must not cost the finished trials
                print(f"kdsweep: warning: throughput not measured ({type(exc).__name__}: {exc}); the table goes on without it",
                      file=sys.stderr, flush=True)
        table = summarize(records, space.labels, teacher_record, baseline=space.baseline, extra=throughput)
        title = f"{space.name} [{preset.name}], {len(seeds)} seed(s)"
        markdown = to_markdown(table, title)
        folder = write_temp(markdown, "ablation.md").parent
        tracker.log_artifact(parent, folder / "ablation.md")
        tracker.log_artifact(parent, write_parquet(table, folder / "ablation.parquet"))
        tracker.log_artifact(parent, plot(table, folder / "ablation.png", title))
        print(markdown, flush=True)
        failed = sum(r["status"] != "FINISHED" for r in records)
        status = "FINISHED" if failed < len(records) else "FAILED"
        tracker.end_run(parent, status, reason=f"{failed} of {len(records)} trials failed" if failed else None)
        return 0 if status == "FINISHED" else 1

    return run_guarded(tracker, parent, callbacks, body)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_guarded(tracker: Tracker, parent: str, callbacks: list[Any], body: Any) -> int:
    """Run a launcher's ``body() -> exit code`` so that no MLflow run is left RUNNING.

    SIGTERM (``ray job stop``) is turned into KeyboardInterrupt; on Ctrl-C/SIGTERM the open
    child runs and the parent end KILLED (exit 130, the sweep continues with ``--resume``); on
    any other error they end FAILED with the reason as a tag and the error propagates.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body()
    except KeyboardInterrupt:
        for cb in callbacks:
            cb.kill_open_runs("interrupted")
        tracker.end_run(parent, "KILLED", reason="interrupted (Ctrl-C or SIGTERM)")
        print("kdsweep: interrupted; finished trials stay recorded in MLflow; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    except BaseException as exc:
        for cb in callbacks:
            cb.kill_open_runs(f"launcher failed: {exc}")
        tracker.end_run(parent, "FAILED", reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
