"""The teachers' lifecycle: reused by config hash from the MLflow store, or trained, once each.

Each row that distils names its teacher by a config hash (:func:`~kdsweep.orchestrate.trials.teacher_hash`:
the teacher model, its training, the data (paths, content version, image limits)). For every distinct hash of a launch:

* a FINISHED teacher run with that hash anywhere in the MLflow store (every experiment: the SSIM
  and ScaleKD ablations share one teacher) gives its weights back (its ``teacher/model.pt``; the
  newest run whose file loads: an unreadable one is tagged, named on stderr and passed over);
* otherwise the teacher is trained: its run is ``teacher_experiment(row config)`` (the teacher as
  the student, no KD terms), a Tune trial like any student's, all missing teachers of the launch
  in one Tune run. Its weights are read through the storage's own filesystem (local or ``s3://``),
  logged to its MLflow run, and only then is that run marked FINISHED: a FINISHED teacher run
  always holds its weights, so it is always reusable.

One launch at a time trains a hash (:mod:`kdsweep.orchestrate.liveness`: a claim on its parent
run); another launch that needs it waits for its FINISHED run. ``--resume`` continues the
teachers' Tune run of the interrupted launch (named on its parent run) from its checkpoints.

The weights go to every student trial through the object store (one ``ray.put`` per teacher).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import torch
from ray import tune
from ray.train import Checkpoint

from kdsweep import paths
from kdsweep.config import ExperimentConfig, teacher_experiment
from kdsweep.export import MODEL_NAME, describe_student, log_model
from kdsweep.names import REPLAYED
from kdsweep.orchestrate.launch import Prepared, Session, TrialDescriber
from kdsweep.orchestrate.liveness import claim_or_reuse, release_claim, wait_for_claim
from kdsweep.orchestrate.runner import RunPlan, can_restore, run_trials, trial_checkpoint
from kdsweep.orchestrate.trials import distinct_teachers, teacher_hash
from kdsweep.report.tables import trial_frame
from kdsweep.report.tracking import (
    TAG_HASH,
    TAG_ROLE,
    TAG_TRIAL,
    TAG_UNREADABLE,
    MLflowTrialCallback,
    Tracker,
    model_not_logged,
)
from kdsweep.train.checkpoint import student_weights_path

__all__ = ["Teachers", "acquire_teachers"]


@dataclass
class Teachers:
    """The launch's teachers: their records (metrics of their runs) by hash, and the ObjectRef of
    each row's teacher weights (rows that distil)."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    refs_by_row: dict[str, Any] = field(default_factory=dict)

    @property
    def single_record(self) -> dict[str, Any] | None:
        """The teacher row of a table: the one teacher's record (None with none or several)."""
        return next(iter(self.records.values())) if len(self.records) == 1 else None


TEACHER_FILE = "teacher/model.pt"
"""A FINISHED teacher run's weights, as an artifact path."""


class UnreadableWeights(ValueError):
    """A ``model.pt`` that ``torch.load(weights_only=True)`` cannot read, or without a "model" state dict."""


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The detector state_dict in a ``model.pt`` of a checkpoint (:mod:`kdsweep.train.checkpoint`).

    Raises:
        UnreadableWeights: the file's content does not load (truncated, not a checkpoint); its
            message is the short reason.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # the file could not be opened: not a verdict on its content
    except Exception as err:  # noqa: BLE001 - a truncated zip, a bad pickle, an empty file
        text = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise UnreadableWeights(text[:200]) from err
    state = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableWeights('no "model" state dict in it')
    return dict(state)


def checkpoint_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """:func:`load_weights` of a Ray checkpoint's ``model.pt`` (local or remote storage): that one
    file is copied to a temporary folder, not the whole checkpoint with its optimizer state.

    Raises:
        OSError: the checkpoint has no ``model.pt``.
        UnreadableWeights: its content does not load.
    """
    with tempfile.TemporaryDirectory(prefix="kdsweep-weights-") as tmp:
        return load_weights(copy_weights(checkpoint, Path(tmp)))


def copy_weights(checkpoint: Checkpoint, folder: Path) -> Path:
    """Copy a Ray checkpoint's ``model.pt`` alone (not its optimizer state) into ``folder``
    (created) through the checkpoint's own filesystem; returns the local file.

    Raises:
        OSError: the checkpoint has no ``model.pt``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    local = student_weights_path(folder)
    pyarrow.fs.copy_files(f"{checkpoint.path.rstrip('/')}/{local.name}", str(local),
                          source_filesystem=checkpoint.filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def fetch_weights(tracker: Tracker, run_id: str, cache: Path) -> dict[str, torch.Tensor]:
    """Download a teacher run's weights into a fresh folder of this process, load them, and only
    then move the file into ``cache`` (as ``model.pt``): a copy already there (corrupt, or another
    launcher's download in progress) is never read.

    Raises:
        UnreadableWeights: the store's file does not load.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        path = tracker.download(run_id, TEACHER_FILE, tmp)  # MLflow writes a single file as tmp/model.pt
        state = load_weights(path)
        os.replace(path, cache / path.name)
    return state


def reuse_teacher(tracker: Tracker, key: str) -> tuple[dict[str, Any], dict] | None:
    """Metrics and weights of the newest FINISHED teacher run with this hash whose weights load,
    or None (the teacher is trained again).

    A run whose ``teacher/model.pt`` does not load gets a one-line warning on stderr and the tag
    :data:`~kdsweep.report.tracking.TAG_UNREADABLE` (later launches pass over it without
    downloading it; nothing of it is deleted); the next such run is tried.
    """
    tried: set[str] = set()
    run = tracker.find_teacher(key)
    while run is not None:
        run_id = run.info.run_id
        try:
            state = fetch_weights(tracker, run_id, paths.home() / "teachers" / key / run_id)
        except UnreadableWeights as err:
            tried.add(run_id)
            tracker.client.set_tag(run_id, TAG_UNREADABLE, str(err))
            run = tracker.find_teacher(key, skip=tried)
            then = f"trying teacher run {run.info.run_id}" if run is not None else "training it again"
            print(f"kdsweep: warning: teacher run {run_id} (hash {key}): {TEACHER_FILE} is unreadable ({err}); "
                  f"tagged {TAG_UNREADABLE}, {then}", file=sys.stderr, flush=True)
            continue
        return {"row": "teacher", "status": "FINISHED", **run.data.metrics, "run_id": run_id}, state
    return None


TAG_TEACHER_TUNE = "kdsweep.teacher_tune"
"""On the parent run: the Tune run that trains its teachers, which ``--resume`` continues."""


def _teacher_run_name(session: Session, configs: Mapping[str, ExperimentConfig]) -> tuple[str, bool]:
    """The teachers' Tune run: with ``--resume``, the one the interrupted launch started for the
    same hashes when its state is stored (continued from its checkpoints: ``True``); else a new
    one, named on the parent run."""
    prefix = f"teacher-{'-'.join(sorted(configs))[:40]}-"
    if session.resumed:
        earlier = session.tracker.client.get_run(session.parent).data.tags.get(TAG_TEACHER_TUNE, "")
        if earlier.startswith(prefix) and can_restore(session.storage, earlier):
            return earlier, True
    name = f"{prefix}{int(time.time())}"
    session.tracker.client.set_tag(session.parent, TAG_TEACHER_TUNE, name)
    return name, False


def train_teachers(session: Session, configs: Mapping[str, ExperimentConfig], data: Mapping[str, str],
                   max_concurrent: int) -> dict[str, tuple[dict[str, Any], dict]]:
    """Train the teachers of ``configs`` (hash -> teacher run config) as one Tune run; log each
    one's weights to its MLflow run and only then end that run FINISHED. Returns hash ->
    (record, weights).

    With ``--resume`` the interrupted launch's teacher run continues from its last checkpoint, in
    the same MLflow run. Without its Tune state (killed before Tune stored any), the teacher is
    trained anew and the run that the interrupted launch left RUNNING ends KILLED.

    Raises:
        RuntimeError: a teacher's training failed (its reason).
    """
    tracker = session.tracker
    plan = RunPlan(rows=dict(configs), data=dict(data), storage_path=session.storage, source="teacher")
    describe = TrialDescriber(rows=plan.rows, samplers={}, role="teacher", name=lambda c: "teacher",
                              tags_by_row={key: {TAG_HASH: key} for key in configs})
    callback = MLflowTrialCallback(tracker.uri, tracker.experiment_id, session.parent, describe, finish_on_complete=False)
    name, restore = _teacher_run_name(session, configs)
    if session.resumed:
        print(f"kdsweep: {'continuing' if restore else 'no stored state of'} the interrupted launch's teacher "
              f"training{' from its last checkpoint' if restore else '; training it again'}", flush=True)
        if not restore:
            for run in tracker.children(session.parent):
                if run.info.status == "RUNNING" and run.data.tags.get(TAG_ROLE) == "teacher":
                    tracker.end_run(run.info.run_id, "KILLED", reason="its launcher stopped; the resumed launch trained "
                                                                      "the teacher again")
    results, stopped = run_trials(plan, {"row": tune.grid_search(list(configs))}, name=name, callbacks=[callback],
                                  max_concurrent_trials=max_concurrent, restore=restore)
    if stopped:
        raise KeyboardInterrupt
    frame = trial_frame(results)
    runs = {run.data.tags[TAG_TRIAL]: run.info.run_id for run in tracker.children(session.parent)
            if TAG_TRIAL in run.data.tags}  # the callback that ran may be Tune's restored copy, not this one
    out = {}
    for _, record in frame.iterrows():
        key = record["row"]
        checkpoint = trial_checkpoint(session.storage, record.get("checkpoint_path"), str(record["trial_id"]))
        if record["status"] != "FINISHED" or checkpoint is None:
            raise RuntimeError(f"teacher training failed: {record.get('error') or 'no checkpoint'}")
        run_id = runs[str(record["trial_id"])]
        # the weights alone: the checkpoint's optimizer state (state.pt) has no use here
        weights = copy_weights(checkpoint, paths.home() / "teachers" / key / run_id)
        state = load_weights(weights)  # checked before it is stored: a FINISHED teacher run always loads
        tracker.log_artifact(run_id, weights, "teacher")
        metrics = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != REPLAYED}
        try:  # also as an MLflow model, like a student's (kdsweep.export); teacher reuse reads only teacher/model.pt
            info = describe_student(configs[key].student, data.get("val_ann"),
                                    {"role": "teacher", "row": "teacher", "run_id": run_id, "teacher_hash": key})
            log_model(tracker.uri, run_id, state, info, MODEL_NAME["teacher"], step=int(metrics.get("epoch", 0)))
        except Exception as exc:  # noqa: BLE001 - the teacher is reusable without it
            model_not_logged(tracker, run_id, "teacher", exc)
        tracker.end_run(run_id, "FINISHED")
        out[key] = ({"row": "teacher", "status": "FINISHED", **metrics, "run_id": run_id}, state)
    return out


def _train_claimed(session: Session, configs: Mapping[str, ExperimentConfig], data: Mapping[str, str],
                   max_concurrent: int) -> dict[str, tuple[dict[str, Any], dict]]:
    """:func:`train_teachers` for teachers this launch has claimed; the claims end with it."""
    try:
        return train_teachers(session, configs, data, max_concurrent)
    finally:
        for key in configs:
            release_claim(session.tracker, session.parent, key)


def acquire_teachers(session: Session, prepared: Prepared, max_concurrent: int) -> Teachers:
    """Every teacher the rows of ``prepared`` distil from: reused by hash, else trained (see the
    module docstring); the parent run gets each one's AP as a tag. Empty when no row distils.

    A teacher is trained by one launch at a time in the whole MLflow store
    (:mod:`kdsweep.orchestrate.liveness`): a launch that finds another live launch training the
    same hash waits for its FINISHED run and reuses it, or trains it itself if that launch ends
    without one."""
    teachers = Teachers()
    needed = distinct_teachers(prepared.rows, prepared.data)
    if not needed:
        print("kdsweep: no row distils; no teacher needed", flush=True)
        return teachers
    tracker = session.tracker
    states: dict[str, dict] = {}
    missing: dict[str, ExperimentConfig] = {}
    waiting: dict[str, ExperimentConfig] = {}
    for key, exp in needed.items():
        action, reused = claim_or_reuse(tracker, session.parent, key, lambda key=key: reuse_teacher(tracker, key))
        if action == "reuse":
            teachers.records[key], states[key] = reused
            print(f"kdsweep: reusing teacher run {reused[0]['run_id']} (config hash {key})", flush=True)
        elif action == "train":
            print(f"kdsweep: training the teacher (config hash {key})", flush=True)
            missing[key] = teacher_experiment(exp)
        else:
            waiting[key] = teacher_experiment(exp)
    trained = _train_claimed(session, missing, prepared.data, max_concurrent) if missing else {}
    for key, config in waiting.items():
        reused = wait_for_claim(tracker, session.parent, key, lambda key=key: reuse_teacher(tracker, key))
        if reused is None:  # the launch that trained it ended without it: this one holds the claim now
            print(f"kdsweep: training the teacher (config hash {key})", flush=True)
            reused = _train_claimed(session, {key: config}, prepared.data, max_concurrent)[key]
        else:
            print(f"kdsweep: reusing teacher run {reused[0]['run_id']} (config hash {key})", flush=True)
        trained[key] = reused
    for key, (record, state) in trained.items():
        teachers.records[key], states[key] = record, state
    refs = {key: ray.put(state) for key, state in states.items()}
    for label, exp in prepared.rows.items():
        if exp.kd:
            teachers.refs_by_row[label] = refs[teacher_hash(exp, prepared.data)]
    for key, record in teachers.records.items():
        suffix = "" if len(teachers.records) == 1 else f".{key}"
        tracker.client.set_tag(session.parent, f"kdsweep.teacher_AP{suffix}", f"{record.get('AP', float('nan')):.2f}")
    return teachers
