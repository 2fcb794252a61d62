"""What every launch shares, whatever the command (an ablation table, a hyperparameter search):
its options, its preparation before anything starts, its MLflow session, the guarded run that
never leaves a run RUNNING, and the student trials themselves.

A launch goes::

    prepare()        the space, every row's typed config, every trial's models (preflight), the data
    open_session()   the MLflow parent run and the Tune experiment's name (or those to --resume)
    run_guarded(...) the command's body: acquire_teachers(), run_students(), its tables

The two commands (:mod:`kdsweep.orchestrate.ablation`, :mod:`kdsweep.orchestrate.search`) are
thin bodies over these pieces; ``launch/*.py`` are the entry points users submit.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdsweep import paths
from kdsweep.config import ConfigError, ExperimentConfig, merge, teacher_model, to_dict
from kdsweep.data.annotations import ensure_compact
from kdsweep.data.coco import data_version, load_validated, resolve_data
from kdsweep.data.loader import check_steps
from kdsweep.names import check_experiment_name
from kdsweep.orchestrate.liveness import Heartbeat, describe_launch, launch_alive
from kdsweep.orchestrate.preflight import RowModels, dataset_classes, describe_row, preflight
from kdsweep.orchestrate.scheduling import fits, max_concurrent, parse_concurrency, scale_lr, start_retries
from kdsweep.orchestrate.space import Sampler, SearchSpace, load_space
from kdsweep.orchestrate.trials import row_configs, trial_config, variants
from kdsweep.presets import PRESETS, Preset, get_preset
from kdsweep.report.tracking import TAG_ROLE, TAG_ROW, TAG_SEED, Tracker, default_tracking_uri, flatten
from kdsweep.train.distiller import term_names

__all__ = ["Prepared", "Session", "TrialDescriber", "add_arguments", "cli_overrides", "open_session", "prepare",
           "print_dry_run", "run_guarded", "storage_path"]

TAG_TUNE = "kdsweep.tune_name"


# ------------------------------------------------------------------------------------- options
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every launcher shares."""
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="experiment size (default: quick)")
    parser.add_argument("--data", help="dataset folder in the synth layout (train.json, val.json, images/); default: generated synthetic data")
    parser.add_argument("--train-ann", help="COCO instances file for training (with --val-ann and --images)")
    parser.add_argument("--val-ann", help="COCO instances file for validation")
    parser.add_argument("--images", help="image folder of --train-ann/--val-ann")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (http://..., sqlite:///...); default: embedded SQLite under KDSWEEP_HOME")
    parser.add_argument("--experiment", help="MLflow experiment name (default: kdsweep-<space name>)")
    parser.add_argument("--num-workers", type=int,
                        help="Ray Train workers per trial; the learning rate follows the global batch (linear scaling rule)")
    parser.add_argument("--use-gpu", action="store_true", help="train on GPUs (NCCL, AMP)")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", "auto"],
                        help="where a run's workers go (STRICT_SPREAD: one per node; auto: STRICT_PACK when one node "
                             "holds them all, else PACK); default: the preset's")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the preset's)")
    parser.add_argument("--max-concurrent", help="trials running at once, or auto: as many as the cluster holds "
                                                 "(default: the preset's; auto for the GPU presets)")
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
    for option in ("num_workers", "seeds"):  # 0 is a bad value, not "not given"
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} {value} must be >= 1")
    parse_concurrency(getattr(args, "max_concurrent", None))
    if getattr(args, "experiment", None):
        check_experiment_name(args.experiment)
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


def storage_path(args: argparse.Namespace) -> str:
    """``--storage-path`` (an absolute local path, or a URI as given), else KDSWEEP_HOME's."""
    if args.storage_path:
        return args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    return str(paths.ray_storage())


# ----------------------------------------------------------------------------------- preparing
@dataclass(frozen=True)
class Prepared:
    """A launch, checked: everything that can be known before anything starts."""

    preset: Preset
    space: SearchSpace
    rows: dict[str, ExperimentConfig]  # row label -> its typed config (validated)
    models: list[RowModels]  # every configuration's teacher and student, as the preflight built them
    data: dict[str, str]  # the resolved, validated data paths ({} when not checked)
    notes: tuple[str, ...] = ()  # what the launch changed and why (the learning rate under --num-workers)

    def concurrency(self, given: str | int | None, cluster: Mapping[str, float] | None = None) -> tuple[int | str, str]:
        """Trials at once: ``given`` (``--max-concurrent``) or the preset's, ``auto`` resolved
        against ``cluster`` (``ray.cluster_resources()``; None leaves ``auto`` as it is, for
        ``--dry-run``). Returns ``(value, the line saying why)``."""
        value = parse_concurrency(given) or self.preset.max_concurrent_trials
        if cluster is None:
            return value, "as many at once as the cluster holds (auto)" if value == "auto" else f"{value} at once"
        exps = list(self.rows.values())
        return max_concurrent(value, [e.train for e in exps] + [e.teacher_train for e in exps if e.kd], cluster)

    def check_cluster(self, cluster: Mapping[str, float]) -> None:
        """Say in one line (stderr) when ``cluster`` (``ray.cluster_resources()``) cannot hold the
        largest run of the launch: its trials then wait for an autoscaler, and end with that reason."""
        exps = list(self.rows.values())
        short = fits([e.train for e in exps] + [e.teacher_train for e in exps if e.kd], cluster)
        if short:
            print(f"kdsweep: warning: {short}; such trials wait {start_retries()[1]:.0f} s for the resources "
                  "(an autoscaler), then end", file=sys.stderr, flush=True)

    @property
    def source(self) -> str:
        return self.space.source


def prepare(args: argparse.Namespace, with_data: bool = True) -> Prepared:
    """Preset, search space (``--rows`` applied), every row's typed config and every trial's models
    built as the trials will (:func:`kdsweep.orchestrate.preflight.preflight`), then the data
    (validated, the synthetic data generated on first use) when ``with_data``.

    Raises:
        ConfigError, DataError: one line naming the file, row and field.
    """
    preset = get_preset(args.preset)
    path = Path(args.space).expanduser()
    space = load_space(path.resolve() if path.exists() else args.space).for_preset(preset.name)
    if args.rows:
        space = space.with_rows([r.strip() for r in args.rows.split(",") if r.strip()])
    experiment = merge(preset.experiment, space.preset_experiment(preset.name))  # the file's own setting of the preset
    rows = row_configs(space, merge(experiment, cli_overrides(args)))
    notes: list[str] = []
    if args.num_workers:  # the linear scaling rule, against the same rows without --num-workers
        bases = row_configs(space, merge(experiment, cli_overrides(argparse.Namespace(**{**vars(args), "num_workers": None}))))
        changes: dict[str, None] = {}  # each distinct change once, in row order
        for label in rows:
            rows[label], changed = scale_lr(rows[label], bases[label])
            notes.extend(f"row '{label}': {line}" for line in changed)
            changes.update(dict.fromkeys(changed))
        for line in changes:
            print(f"kdsweep: --num-workers {args.num_workers}: {line}", flush=True)
    replaced: dict[str, None] = {}  # the teacher's resolution follows the student's (config.teacher_model)
    for label, exp in rows.items():
        ran = teacher_model(exp)
        # a teacher configured at the student's sizes follows them (the presets do); others are told
        if exp.kd and (exp.teacher.min_size, exp.teacher.max_size) not in (
                (exp.student.min_size, exp.student.max_size), (ran.min_size, ran.max_size)):
            line = (f"teacher.min_size/max_size {exp.teacher.min_size}/{exp.teacher.max_size} are not used: the teacher "
                    f"runs at the student's x student_scale x teacher_scale, {ran.min_size}/{ran.max_size}")
            notes.append(f"row '{label}': {line}")
            replaced[line] = None
    for line in replaced:
        print(f"kdsweep: note: {line}", flush=True)
    configs = variants(space, rows)
    models = preflight(configs, dataset_classes(configs[0][1]), space.source)
    data: dict[str, str] = {}
    if with_data:
        data_paths = resolve_data(next(iter(rows.values())).data)
        counts = []
        for ann, images in ((data_paths.train_ann, data_paths.train_images), (data_paths.val_ann, data_paths.val_images)):
            counts.append(load_validated(ann, images).num_images)
            ensure_compact(ann)  # once, here: the workers memory-map it (kdsweep.data.annotations)
        check_steps(configs, counts[0], data_paths.train_ann)  # batch_size x num_workers fits the training images
        data = data_paths.strings()
        data["version"] = data_version(data_paths)  # once, here: the teachers' identity (trials.teacher_hash)
    return Prepared(preset, space, rows, models, data, tuple(notes))


def data_note(prepared: Prepared) -> str:
    """What ``--dry-run`` says of the data: a given dataset is validated as a run validates it
    (problems raise a one-line DataError; so does a training set smaller than one step of some
    configuration); the default synthetic data is described, not generated."""
    cfg = next(iter(prepared.rows.values())).data
    configs = variants(prepared.space, prepared.rows)
    if cfg.root is None and cfg.train_ann is None and cfg.val_ann is None:
        check_steps(configs, cfg.synth_train, "synthetic data (data.synth_train)")  # as the launch will
        return (f"synthetic ({cfg.synth_style}): {cfg.synth_train} train / {cfg.synth_val} val images at {cfg.synth_size} px, "
                "generated under KDSWEEP_HOME on the first run")
    data_paths = resolve_data(cfg)
    reports = [load_validated(ann, images) for ann, images in
               ((data_paths.train_ann, data_paths.train_images), (data_paths.val_ann, data_paths.val_images))]
    check_steps(configs, reports[0].num_images, data_paths.train_ann)
    return f"{data_paths.train_ann} ({reports[0].num_images} images), {data_paths.val_ann} ({reports[1].num_images} images): valid"


def print_dry_run(prepared: Prepared, header: str) -> None:
    """``header``, the data line, then one line per row: its teacher and student as the trials
    build them (the first configuration of rows with sampled values)."""
    print(header)
    print(f"  data: {data_note(prepared)}")
    shown: set[str] = set()
    for row in prepared.models:
        if row.label not in shown:
            shown.add(row.label)
            print(f"  {describe_row(row)}")
    if len(prepared.models) > len(shown):
        print(f"  ({len(prepared.models)} configurations built in all: every grid and choice value of the space)")


# ------------------------------------------------------------------------------------- session
@dataclass(frozen=True)
class Session:
    """A launch's MLflow parent run and Tune experiment."""

    tracker: Tracker
    parent: str
    tune_name: str
    resumed: bool
    storage: str
    heartbeat: Heartbeat | None = None  # the parent's heartbeat (kdsweep.orchestrate.liveness), stopped by run_guarded

    @property
    def uri(self) -> str:
        return self.tracker.uri


def open_session(args: argparse.Namespace, prepared: Prepared, *, role: str, title: str,
                 params: Mapping[str, Any]) -> Session:
    """The MLflow parent run and the Tune experiment name: a new pair (its ``params`` and the
    space file logged), or with ``--resume`` the newest unfinished parent with the same tags
    (reopened) and its Tune experiment.

    Raises:
        ConfigError: ``--resume`` with nothing to resume.
    """
    uri = args.tracking_uri or default_tracking_uri()
    space = prepared.space
    tracker = Tracker(uri, args.experiment or f"kdsweep-{space.name}")
    tags = {TAG_ROLE: role, "kdsweep.space": space.name, "kdsweep.preset": prepared.preset.name}
    if args.resume:
        run = resumable(tracker, tags, title)
        tracker.reopen(run.info.run_id)
        session = Session(tracker, run.info.run_id, run.data.tags[TAG_TUNE], True, storage_path(args),
                          Heartbeat(tracker, run.info.run_id).start())
    else:
        paper = space.reproduces(prepared.preset.name)
        parent = tracker.start_run(title, tags={**tags, **({"kdsweep.reproduces": paper} if paper else {})})
        tune_name = f"{space.name}-{prepared.preset.name}-{parent[:8]}"
        tracker.client.set_tag(parent, TAG_TUNE, tune_name)
        tracker.log_params(parent, params)
        tracker.log_text(parent, Path(space.source).read_text(), "search_space.yaml")
        if prepared.notes:
            tracker.log_text(parent, "\n".join(prepared.notes) + "\n", "launch_notes.txt")
        session = Session(tracker, parent, tune_name, False, storage_path(args), Heartbeat(tracker, parent).start())
    experiment = tracker.client.get_experiment(tracker.experiment_id).name
    print(f"kdsweep: MLflow {uri} experiment '{experiment}' parent run {session.parent}", flush=True)
    return session


def resumable(tracker: Tracker, tags: Mapping[str, str], title: str) -> Any:
    """The newest parent run with ``tags`` that did not finish and whose launch is not alive
    (:func:`~kdsweep.orchestrate.liveness.launch_alive`): a launch that is still running is never
    taken over.

    Raises:
        ConfigError: nothing to resume, or the newest unfinished launch is still running (one line).
    """
    for run in tracker.unfinished(tags):
        if launch_alive(run):
            raise ConfigError(f"--resume: run {run.info.run_id} of '{title}' is still running ({describe_launch(run)}); "
                              "wait for it, or stop it (Ctrl-C, kill its launcher) and then --resume")
        if TAG_TUNE in run.data.tags:
            return run
    raise ConfigError(f"--resume: no interrupted run of '{title}' in this MLflow experiment; run without --resume")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_guarded(session: Session, body: Callable[[], int]) -> int:
    """Run a launcher's ``body() -> exit code`` so that no MLflow run is left RUNNING.

    SIGTERM (``ray job stop``) is turned into KeyboardInterrupt; on Ctrl-C/SIGTERM the open
    child runs and the parent end KILLED (exit 130, the sweep continues with ``--resume``); on
    any other error they end FAILED with the reason as a tag and the error propagates.
    """
    tracker, parent = session.tracker, session.parent
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body()
    except KeyboardInterrupt:
        tracker.end_running_children(parent, "KILLED", "interrupted")
        tracker.end_run(parent, "KILLED", reason="interrupted (Ctrl-C or SIGTERM)")
        print("kdsweep: interrupted; finished trials stay recorded in MLflow; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    except BaseException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        tracker.end_running_children(parent, "FAILED", f"launcher failed: {reason}")
        tracker.end_run(parent, "FAILED", reason=reason)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if session.heartbeat is not None:
            session.heartbeat.stop()


def end_session(session: Session, failed: int, total: int) -> int:
    """End the parent run: FINISHED unless every trial failed; the exit code."""
    status = "FINISHED" if failed < total else "FAILED"
    session.tracker.end_run(session.parent, status, reason=f"{failed} of {total} trials failed" if failed else None)
    return 0 if status == "FINISHED" else 1


# ------------------------------------------------------------------------------ trial records
@dataclass(frozen=True)
class TrialDescriber:
    """``describe(tune config) -> (run name, params, tags, config)`` for the MLflow callback:
    the trial's typed config (:func:`~kdsweep.orchestrate.trials.trial_config`, the function the
    Tune driver uses), flattened into params. Picklable and free of ObjectRefs: Tune pickles its
    callbacks into the experiment state, which a ``--resume`` unpickles in another process."""

    rows: Mapping[str, ExperimentConfig]
    samplers: Mapping[str, Sampler]
    role: str
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags_by_row: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    source: str = "space"
    name: Callable[[dict[str, Any]], str] | None = None  # run name from the Tune config

    def __call__(self, config: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]:
        typed = trial_config(self.rows, self.samplers, config, self.source)
        exp = to_dict(typed)
        row, seed = config["row"], config.get("seed", exp["train"]["seed"])
        sampled = config.get("params") or {}
        params = {"row": row, "seed": seed, **{f"space.{k}": v for k, v in sampled.items()}, **flatten(exp),
                  **kd_params(typed)}
        tags = {TAG_ROLE: self.role, TAG_ROW: row, TAG_SEED: str(seed), **self.tags, **self.tags_by_row.get(row, {})}
        name = self.name(config) if self.name is not None else f"{row} / seed {seed}"
        return name, params, tags, exp


def kd_params(exp: ExperimentConfig) -> dict[str, Any]:
    """The KD hyperparameters as flat params named by term (``kd.ssim.weight``, ``kd.ssim.alpha``;
    a repeated loss ``kd.ssim_1...``), so that MLflow's compare and parallel-coordinates views can
    plot them across runs whatever the position of the term in the ``kd`` list."""
    out: dict[str, Any] = {}
    for name, term in zip(term_names(exp.kd), exp.kd):
        out[f"kd.{name}.weight"] = term.weight
        out.update({f"kd.{name}.{key}": value for key, value in term.params.items()})
    return out
