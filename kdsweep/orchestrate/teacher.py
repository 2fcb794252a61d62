"""The teachers' lifecycle: reused by config hash from the MLflow store, or trained, once each.

Each row that distils names its teacher by a config hash (:func:`~kdsweep.orchestrate.trials.teacher_hash`:
the teacher model, its training, the data (paths, content version, image limits)). For every distinct hash of a launch:

* a FINISHED teacher run with that hash anywhere in the MLflow store (every experiment: the SSIM
  and ScaleKD ablations share one teacher) gives its weights back (its ``teacher/model.pt``);
* otherwise the teacher is trained: its run is ``teacher_experiment(row config)`` (the teacher as
  the student, no KD terms), a Tune trial like any student's, all missing teachers of the launch
  in one Tune run. Its weights are read through the storage's own filesystem (local or ``s3://``),
  logged to its MLflow run, and only then is that run marked FINISHED: a FINISHED teacher run
  always holds its weights, so it is always reusable.

The weights go to every student trial through the object store (one ``ray.put`` per teacher).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from kdsweep import paths
from kdsweep.config import ExperimentConfig, teacher_experiment
from kdsweep.orchestrate.launch import Prepared, Session, TrialDescriber
from kdsweep.orchestrate.runner import RunPlan, run_trials, storage_checkpoint
from kdsweep.orchestrate.trials import distinct_teachers, teacher_hash
from kdsweep.report.tables import trial_frame
from kdsweep.report.tracking import TAG_HASH, MLflowTrialCallback, Tracker
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


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The detector state_dict in a ``model.pt`` of a checkpoint (:mod:`kdsweep.train.checkpoint`)."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def reuse_teacher(tracker: Tracker, key: str) -> tuple[dict[str, Any], dict] | None:
    """Metrics and weights of a FINISHED teacher run with this hash, or None."""
    run = tracker.find_teacher(key)
    if run is None:
        return None
    path = tracker.download(run.info.run_id, "teacher/model.pt", paths.home() / "teachers" / key / run.info.run_id)
    record = {"row": "teacher", "status": "FINISHED", **run.data.metrics, "run_id": run.info.run_id}
    return record, load_weights(path)


def train_teachers(session: Session, configs: Mapping[str, ExperimentConfig], data: Mapping[str, str],
                   max_concurrent: int) -> dict[str, tuple[dict[str, Any], dict]]:
    """Train the teachers of ``configs`` (hash -> teacher run config) as one Tune run; log each
    one's weights to its MLflow run and only then end that run FINISHED. Returns hash ->
    (record, weights).

    Raises:
        RuntimeError: a teacher's training failed (its reason).
    """
    tracker = session.tracker
    plan = RunPlan(rows=dict(configs), data=dict(data), storage_path=session.storage, source="teacher")
    describe = TrialDescriber(rows=plan.rows, samplers={}, role="teacher", name=lambda c: "teacher",
                              tags_by_row={key: {TAG_HASH: key} for key in configs})
    callback = MLflowTrialCallback(tracker.uri, tracker.experiment_id, session.parent, describe, finish_on_complete=False)
    name = f"teacher-{'-'.join(sorted(configs))[:40]}-{int(time.time())}"
    results, stopped = run_trials(plan, {"row": tune.grid_search(list(configs))}, name=name, callbacks=[callback],
                                  max_concurrent_trials=max_concurrent)
    if stopped:
        raise KeyboardInterrupt
    frame = trial_frame(results)
    out = {}
    for _, record in frame.iterrows():
        key = record["row"]
        checkpoint_path = record.get("checkpoint_path")
        if record["status"] != "FINISHED" or not isinstance(checkpoint_path, str):
            raise RuntimeError(f"teacher training failed: {record.get('error') or 'no checkpoint'}")
        local = paths.home() / "teachers" / key
        storage_checkpoint(session.storage, checkpoint_path).to_directory(str(local))
        weights = student_weights_path(local)
        run_id = callback.runs.pop(str(record["trial_id"]))
        tracker.log_artifact(run_id, weights, "teacher")
        tracker.end_run(run_id, "FINISHED")
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[key] = ({"row": "teacher", "status": "FINISHED", **metrics, "run_id": run_id}, load_weights(weights))
    return out


def acquire_teachers(session: Session, prepared: Prepared, max_concurrent: int) -> Teachers:
    """Every teacher the rows of ``prepared`` distil from: reused by hash, else trained (see the
    module docstring); the parent run gets each one's AP as a tag. Empty when no row distils."""
    teachers = Teachers()
    needed = distinct_teachers(prepared.rows, prepared.data)
    if not needed:
        print("kdsweep: no row distils; no teacher needed", flush=True)
        return teachers
    states: dict[str, dict] = {}
    missing: dict[str, ExperimentConfig] = {}
    for key, exp in needed.items():
        reused = reuse_teacher(session.tracker, key)
        if reused is None:
            print(f"kdsweep: training the teacher (config hash {key})", flush=True)
            missing[key] = teacher_experiment(exp)
            continue
        teachers.records[key], states[key] = reused
        print(f"kdsweep: reusing teacher run {reused[0]['run_id']} (config hash {key})", flush=True)
    if missing:
        for key, (record, state) in train_teachers(session, missing, prepared.data, max_concurrent).items():
            teachers.records[key], states[key] = record, state
    refs = {key: ray.put(state) for key, state in states.items()}
    for label, exp in prepared.rows.items():
        if exp.kd:
            teachers.refs_by_row[label] = refs[teacher_hash(exp, prepared.data)]
    for key, record in teachers.records.items():
        suffix = "" if len(teachers.records) == 1 else f".{key}"
        session.tracker.client.set_tag(session.parent, f"kdsweep.teacher_AP{suffix}", f"{record.get('AP', float('nan')):.2f}")
    return teachers
