"""The student trials of a launch: one Tune run of the rows (x seeds x samples), each trial a child
MLflow run, every trial's config built from its row's typed config (:class:`~kdsweep.orchestrate.runner.RunPlan`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kdsweep.config import ExperimentConfig, student_model
from kdsweep.export import describe_student, log_model
from kdsweep.orchestrate.launch import Prepared, Session, TrialDescriber
from kdsweep.orchestrate.runner import RunPlan, can_restore, run_trials, trial_checkpoint
from kdsweep.orchestrate.space import Sampler
from kdsweep.orchestrate.teacher import Teachers, checkpoint_weights
from kdsweep.orchestrate.trials import trial_config
from kdsweep.report.tracking import MLflowTrialCallback, Tracker

__all__ = ["LogStudent", "run_students"]


@dataclass(frozen=True)
class LogStudent:
    """What a finished student trial logs last: its final student as the MLflow model ``student``
    of its child run (:func:`kdsweep.export.log_model`), with the config it was built from.

    Runs in the launcher, in the MLflow callback's ``on_finish`` (after the trial's last report,
    before its run ends FINISHED): the training loop never waits for it. The weights are the
    ``model.pt`` of the trial's last checkpoint (its last report names it; a resumed trial that had
    nothing left to train reported none: then the newest checkpoint of its Train run), read
    through the storage's own filesystem (local or ``s3://``). Picklable: Tune stores the callback.
    """

    rows: Mapping[str, ExperimentConfig]
    samplers: Mapping[str, Sampler]
    data: Mapping[str, str]
    storage: str
    source: str = "space"

    def __call__(self, tracker: Tracker, run_id: str, trial: Any) -> None:
        result = trial.last_result or {}
        checkpoint = trial_checkpoint(self.storage, result.get("checkpoint_path"), trial.trial_id)
        if checkpoint is None:
            raise FileNotFoundError(f"trial {trial.trial_id} left no checkpoint under {self.storage}")
        state = checkpoint_weights(checkpoint)
        exp = trial_config(self.rows, self.samplers, trial.config, self.source)
        source = {"role": "student", "row": trial.config["row"], "seed": trial.config.get("seed", exp.train.seed),
                  "run_id": run_id}
        info = describe_student(student_model(exp), self.data.get("val_ann"), source)
        log_model(tracker.uri, run_id, state, info, "student", step=int(result.get("epoch", 0) or 0))


def run_students(session: Session, prepared: Prepared, teachers: Teachers, param_space: dict[str, Any], *,
                 max_concurrent: int, tags: Mapping[str, str] | None = None,
                 name: Callable[[dict[str, Any]], str] | None = None, **tune: Any) -> Any:
    """Run the students' Tune run (``param_space``: rows, seeds, samplers; ``tune``: num_samples,
    search_alg, scheduler, metric, mode), or continue it with ``--resume`` (started afresh when the
    interrupted launch stopped before it: in its teacher phase, or between phases); return the
    ``ResultGrid``.

    Raises:
        KeyboardInterrupt: Ctrl-C stopped it (the launcher ends the runs KILLED; ``--resume`` continues).
    """
    samplers = dict(prepared.space.space)
    plan = RunPlan(rows=prepared.rows, samplers=samplers, data=prepared.data, storage_path=session.storage,
                   teachers=teachers.refs_by_row, source=prepared.source)
    describe = TrialDescriber(rows=prepared.rows, samplers=samplers, role="student", tags=dict(tags or {}),
                              source=prepared.source, name=name)
    log = LogStudent(rows=prepared.rows, samplers=samplers, data=prepared.data, storage=session.storage,
                     source=prepared.source)
    callback = MLflowTrialCallback(session.uri, session.tracker.experiment_id, session.parent, describe, on_finish=log)
    restore = session.resumed and can_restore(session.storage, session.tune_name)
    if restore:
        print(f"kdsweep: resuming {session.tune_name}: finished trials are kept", flush=True)
    elif session.resumed:  # stopped before its student trials (teacher phase, or between phases)
        print(f"kdsweep: the interrupted launch had started no student trial; starting {session.tune_name}", flush=True)
    results, stopped = run_trials(plan, param_space, name=session.tune_name, callbacks=[callback],
                                  max_concurrent_trials=max_concurrent, restore=restore, **tune)
    if stopped:
        raise KeyboardInterrupt
    return results
