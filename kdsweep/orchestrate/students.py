"""The student trials of a launch: one Tune run of the rows (x seeds x samples), each trial a child
MLflow run, every trial's config built from its row's typed config (:class:`~kdsweep.orchestrate.runner.RunPlan`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kdsweep.orchestrate.launch import Prepared, Session, TrialDescriber
from kdsweep.orchestrate.runner import RunPlan, can_restore, run_trials
from kdsweep.orchestrate.teacher import Teachers
from kdsweep.report.tracking import MLflowTrialCallback

__all__ = ["run_students"]


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
    callback = MLflowTrialCallback(session.uri, session.tracker.experiment_id, session.parent, describe)
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
