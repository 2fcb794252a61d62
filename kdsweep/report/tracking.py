"""MLflow bookkeeping: experiments, parent/child runs, the per-trial Tune callback.

Every write goes through an explicit ``MlflowClient`` and run id (no global active run), from
the launcher process only, so concurrent trials never write to the store at once. With no
``--tracking-uri`` the embedded store is SQLite under ``KDSWEEP_HOME`` with filesystem
artifacts; any MLflow URI (``http://...``, ``sqlite:///...``) works.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from kdsweep import paths
from kdsweep.names import REPLAYED

TAG_ROLE = "kdsweep.role"
TAG_HASH = "kdsweep.teacher_hash"
TAG_ROW = "kdsweep.row"
TAG_SEED = "kdsweep.seed"
TAG_TRIAL = "kdsweep.trial_id"
TAG_REASON = "kdsweep.failure_reason"
TAG_PREVIOUS_REASON = "kdsweep.previous_failure_reason"
TAG_UNREADABLE = "kdsweep.teacher_unreadable"
"""On a teacher run whose ``teacher/model.pt`` did not load (the reason): :meth:`Tracker.find_teacher` passes over it."""
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview."""
NOTE = "mlflow.note.content"
"""A run's description in the MLflow UI (Markdown): the ablation table on the parent run."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or paths.mlflow_uri()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to ``a.b.c`` keys; lists become JSON strings (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite store (``<file>.lock`` beside it) for what two launches
    must not do at once: MLflow creates a new store's tables with alembic migrations on first use,
    and two processes doing that together fail ("Online migration expected to match one row ...").
    Other stores need no lock (a server serialises its own writes)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one experiment."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        with store_lock(uri):  # the first use of a new SQLite store creates its tables
            self.client = MlflowClient(tracking_uri=uri)
            existing = self.client.get_experiment_by_name(experiment)
        if existing is not None:
            self.experiment_id = existing.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
                location = (paths.mlflow_artifacts() / experiment).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags={EXPERIMENT_KIND: MODEL_TRAINING})
            except Exception:  # created concurrently by another launcher
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        if existing is not None and existing.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)

    @classmethod
    def bound(cls, uri: str, experiment_id: str) -> "Tracker":
        """A tracker of an existing experiment, by id."""
        tracker = cls.__new__(cls)
        tracker.uri, tracker.client, tracker.experiment_id = uri, MlflowClient(tracking_uri=uri), experiment_id
        return tracker

    def end_running_children(self, parent: str, status: str, reason: str) -> None:
        """End every child run of ``parent`` still RUNNING with ``status`` and ``reason`` (no
        run is left RUNNING when a launcher stops)."""
        for run in self.children(parent):
            if run.info.status == "RUNNING":
                self.end_run(run.info.run_id, status, reason=reason)

    def start_run(self, name: str, *, parent: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """Create a RUNNING run (a child when ``parent`` is given) and return its id."""
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches (values cut to MLflow's 6000-character limit)."""
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numeric entries of ``metrics`` at ``step``."""
        now = int(time.time() * 1000)
        items = [
            Metric(k.replace("/", "."), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def has_step(self, run_id: str, key: str, step: int) -> bool:
        """Whether run ``run_id`` logged metric ``key`` at ``step``."""
        return any(m.step == step for m in self.client.get_metric_history(run_id, key))

    def set_note(self, run_id: str, markdown: str, artifact: str) -> None:
        """Make ``markdown`` the run's description in the MLflow UI (:data:`NOTE`), cut to what a
        tag holds, with a pointer to ``artifact`` (the whole text) when cut."""
        limit = 7500  # MLflow keeps tag values up to 8,000 characters
        if len(markdown) > limit:
            markdown = markdown[:limit].rsplit("\n", 1)[0] + f"\n\n(cut here; the whole table is the artifact {artifact})\n"
        self.client.set_tag(run_id, NOTE, markdown)

    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        """Store ``data`` as a JSON or YAML artifact called ``name``."""
        self.client.log_dict(run_id, data, name)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def reopen(self, run_id: str) -> None:
        """A resumed run: RUNNING again and tagged ``kdsweep.resumed``. The reason it ended with
        before moves to ``kdsweep.previous_failure_reason``: a run that then finishes must not
        still read "interrupted" (or a trial's old error) in its failure reason."""
        reason = self.client.get_run(run_id).data.tags.get(TAG_REASON)
        if reason:
            self.client.set_tag(run_id, TAG_PREVIOUS_REASON, reason)
            self.client.delete_tag(run_id, TAG_REASON)
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "kdsweep.resumed", "true")

    def end_run(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        """Terminate a run with ``status`` (FINISHED, FAILED, KILLED); keep a reason tag."""
        if reason:
            self.client.set_tag(run_id, TAG_REASON, reason[:5000])
        self.client.set_terminated(run_id, status)

    def find_teacher(self, teacher_hash: str, skip: Collection[str] = ()) -> Any | None:
        """The newest FINISHED teacher run with this config hash that holds weights, or None.

        Every active experiment of the store is searched: the hash covers the teacher's model, its
        training and the data files, so the SSIM and ScaleKD ablations share one teacher, and so
        do the mimic and MimicDet ones. Runs in ``skip`` (ids) and runs tagged
        :data:`TAG_UNREADABLE` (their weights did not load) are passed over.
        """
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(
            experiments,
            filter_string=f"tags.`{TAG_HASH}` = '{teacher_hash}' and tags.`{TAG_ROLE}` = 'teacher' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
        for run in runs:
            if run.info.run_id in skip or TAG_UNREADABLE in run.data.tags:
                continue
            names = [a.path for a in self.client.list_artifacts(run.info.run_id, "teacher")]
            if "teacher/model.pt" in names:
                return run
        return None

    def download(self, run_id: str, artifact: str, dest: str | Path) -> Path:
        """Download one artifact of a run into ``dest``; return its local path."""
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dest)))

    def unfinished(self, tags: Mapping[str, str]) -> list[Any]:
        """The parent runs with these tags that did not finish (KILLED, FAILED, RUNNING), newest first."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=" and ".join(clauses),
            order_by=["attributes.start_time DESC"], max_results=20,
        )
        return [run for run in runs if run.info.status != "FINISHED"]

    def children(self, parent: str) -> list[Any]:
        """Child runs of ``parent``."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=10000)


Describe = Callable[[dict[str, Any]], tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]]


class MLflowTrialCallback(Callback):
    """A Ray Tune callback that mirrors each trial into one child MLflow run of ``parent``.

    ``describe(trial.config) -> (run_name, params, tags, config)``; ``config`` is stored as the
    run's ``config.json`` artifact. Per-epoch results are logged with ``step = epoch``; the run
    ends FINISHED, or FAILED with the trial's one-line reason as a tag.

    The callback holds only the tracking URI, ids and ``describe`` (picklable), and opens its
    MLflow client on first use: Tune pickles it into the experiment state, and the copy that a
    ``--resume`` (``Tuner.restore``) unpickles in a new launcher process works as it is. At the
    start of an experiment it finds the child runs that trials already have, so a resumed trial
    continues in its own run. A resumed worker first reports its checkpoint's epoch again
    (:data:`kdsweep.names.REPLAYED`); it is logged only where the run lacks that epoch, which is
    the case when the launcher was stopped after the workers saved it.

    With ``finish_on_complete=False`` a completed trial's run stays RUNNING until the caller has
    logged what must be in it and ends it (the teacher: its weights).

    ``on_finish(tracker, run_id, trial)`` (picklable, like ``describe``) runs once when a trial
    completes, before its run ends FINISHED: the students log their model there
    (:class:`kdsweep.orchestrate.students.LogStudent`). If it raises, the run still ends FINISHED
    with everything it logged, and a one-line warning says what was not logged
    (:func:`model_not_logged`).
    """

    def __init__(self, uri: str, experiment_id: str, parent: str, describe: Describe,
                 finish_on_complete: bool = True,
                 on_finish: Callable[["Tracker", str, Any], None] | None = None) -> None:
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent
        self.describe = describe
        self.finish_on_complete = finish_on_complete
        self.on_finish = on_finish
        self.runs: dict[str, str] = {}  # trial id -> open MLflow run id
        self.existing: dict[str, str] | None = None  # trial id -> child run id (a resumed sweep)
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_tracker=None, runs={}, existing=None)
        return state

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker.bound(self.uri, self.experiment_id)
        return self._tracker

    def _existing(self) -> dict[str, str]:
        if self.existing is None:
            self.existing = {run.data.tags[TAG_TRIAL]: run.info.run_id
                             for run in self.tracker.children(self.parent) if TAG_TRIAL in run.data.tags}
        return self.existing

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:
            return
        existing = self._existing()
        if trial.trial_id in existing:  # resumed: one child run per trial, reopened
            run_id = existing.pop(trial.trial_id)
            self.tracker.reopen(run_id)
            self.runs[trial.trial_id] = run_id
            return
        name, params, tags, config = self.describe(trial.config)
        tags = dict(tags, **{TAG_TRIAL: trial.trial_id})
        run_id = self.tracker.start_run(name, parent=self.parent, tags=tags)
        self.tracker.log_params(run_id, params)
        self.tracker.log_dict(run_id, config, "config.json")
        self.runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if result.get(REPLAYED):  # a resumed worker's checkpoint epoch: logged only if it never arrived
            if self.tracker.has_step(run_id, "epoch", step):
                return
            result = {k: v for k, v in result.items() if k != REPLAYED}
        self.tracker.log_metrics(run_id, result, step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.finish_on_complete:
            return
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is not None:
            on_finish = getattr(self, "on_finish", None)  # a callback pickled by an older kdsweep has none
            if on_finish is not None:
                try:
                    on_finish(self.tracker, run_id, trial)
                except Exception as exc:  # noqa: BLE001 - the trial's results are recorded whatever this does
                    model_not_logged(self.tracker, run_id, "student", exc)
            self.tracker.end_run(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is not None:
            self.tracker.end_run(run_id, "FAILED", reason=failure_reason(trial))


TAG_NOT_LOGGED = "kdsweep.model_not_logged"
"""On a finished run whose model could not be logged to MLflow: the one-line reason."""


def model_not_logged(tracker: Tracker, run_id: str, what: str, exc: BaseException) -> None:
    """Say in one line (stderr) that run ``run_id``'s ``what`` model was not logged and why, and
    keep the reason as the tag :data:`TAG_NOT_LOGGED` (``kdsweep export`` shows it)."""
    reason = f"{type(exc).__name__}: {summarize_error(str(exc)) or 'no message'}"[:300]
    print(f"kdsweep: warning: run {run_id}: its {what} model was not logged to MLflow ({reason}); the run and its "
          "metrics are recorded, its checkpoints stay in the Ray storage", file=sys.stderr, flush=True)
    try:
        tracker.client.set_tag(run_id, TAG_NOT_LOGGED, reason)
    except Exception:  # noqa: BLE001 - the store itself may be what failed; the warning was given
        pass


def failure_reason(trial: Any) -> str:
    """The most telling line of a failed trial's error text."""
    text = ""
    try:
        err = trial.get_error()
        text = str(err) if err is not None else ""
    except Exception:  # noqa: BLE001 - best effort, the reason is informational
        pass
    if not text and getattr(trial, "error_file", None) and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text()
    return summarize_error(text) or "trial failed"


def summarize_error(text: str) -> str:
    """Pick the root-cause line out of a (possibly nested) traceback text."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("TrialFailure", "NonFiniteLossError", "ConfigError", "DataError", "OutOfMemoryError", "Error:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return hits[-1][:1000]
    return lines[-1][:1000] if lines else ""


def write_temp(text: str, name: str) -> Path:
    """Write ``text`` into a fresh temp folder as ``name``; return the path."""
    folder = Path(tempfile.mkdtemp(prefix="kdsweep-"))
    path = folder / name
    path.write_text(text)
    return path
