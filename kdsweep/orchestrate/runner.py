"""Ray Tune over Ray Train (V2): ``train_driver_fn`` per trial, ``run_trials`` per sweep.

Layers (Ray's ``train_tune_interop`` pattern): ``train_fn_per_worker`` (per worker, reports
metrics), ``train_driver_fn`` (per Tune trial: builds a ``TorchTrainer`` named from the trial id
and fits it; ``TuneReportCallback`` forwards rank 0's metrics to Tune), and the ``Tuner`` built
by :func:`run_trials`. The Tune driver takes a fraction of a CPU so that it never starves its
own Train workers on a small machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from kdsweep.config import to_dict
from kdsweep.orchestrate.space import SearchSpace, build_experiment
from kdsweep.report.tracking import summarize_error

DRIVER_CPU = 0.05


@dataclass(frozen=True)
class SweepContext:
    """Constants every trial of one sweep shares (shipped once through the object store)."""

    preset: dict[str, Any]
    space: SearchSpace
    data: dict[str, str]
    storage_path: str
    role: str = "student"
    teacher_state: Any = None  # ObjectRef of the teacher's state_dict
    max_failures: int = 2  # Train restarts of a trial's workers from its last checkpoint


def trial_experiment(ctx: SweepContext, config: dict[str, Any]):
    """The ExperimentConfig of a trial from its Tune config (row, seed, sampled params)."""
    return build_experiment(ctx.preset, ctx.space, config["row"], config.get("params") or {}, config.get("seed"))


class TrialFailure(RuntimeError):
    """A trial that failed for a reason a restart cannot fix; the message is its one-line reason."""


DETERMINISTIC_ERRORS = ("NonFiniteLossError", "TrialOutOfMemoryError", "ConfigError", "DataError")
"""Failures that a restart from the last checkpoint would meet again in exactly the same way."""

LOST_WORKER_ERRORS = ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError")


def _lost_worker(error: BaseException) -> bool:
    """A worker process or its node went away (killed, crashed, preempted, stopped answering)."""
    from ray.exceptions import RayActorError

    inner = getattr(error, "health_check_failure", error)
    return isinstance(inner, RayActorError) or type(error).__name__ in LOST_WORKER_ERRORS


def classify_failure(error: BaseException) -> tuple[str, str]:
    """``(kind, reason)`` of a failed ``TorchTrainer.fit()``: kind ``lost`` (a worker or node was
    lost and nothing else went wrong: restart from the last checkpoint) or ``fatal`` (a
    deterministic error such as a non-finite loss, out of memory or a bad config, or any other
    error in the training code: restarting would fail the same way and burn GPU-hours); reason is
    the root cause in one line."""
    from ray.train import WorkerGroupError

    from kdsweep.report.tracking import summarize_error

    failures = list(error.worker_failures.values()) if isinstance(error, WorkerGroupError) else [error]
    texts = [str(f) for f in failures]
    deterministic = [t for t in texts if any(name in t for name in DETERMINISTIC_ERRORS)]
    if deterministic:
        return "fatal", summarize_error(deterministic[0])
    lost = [f for f in failures if _lost_worker(f)]
    others = [t for f, t in zip(failures, texts) if not _lost_worker(f)]
    if lost and isinstance(error, WorkerGroupError):
        return "lost", summarize_error(str(lost[0])) or "a worker was lost"
    return "fatal", summarize_error(others[0] if others else str(error)) or type(error).__name__


def train_driver_fn(config: dict[str, Any], ctx: SweepContext) -> None:
    """Tune trainable: fit one ``TorchTrainer`` for this trial (resumes if its run exists).

    Failures: Ray Train itself retries nothing but preemptions (``FailureConfig(max_failures=0)``).
    Here a run whose workers or nodes were lost is fitted again under the same name, so it resumes
    from its last checkpoint, up to ``ctx.max_failures`` times; any other failure (a non-finite
    loss, out of memory, a config error, a bug) ends the trial at once with a
    :class:`TrialFailure` carrying the one-line reason that the table and the MLflow run show.
    """
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdsweep.train.worker import train_fn_per_worker

    trial_id = ray.tune.get_context().get_trial_id()
    exp = trial_experiment(ctx, config)
    train_cfg = exp.teacher_train if ctx.role == "teacher" else exp.train
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = 1
    label = f"{config['row']} s{config.get('seed', 0)}"
    restarts = 0
    while True:
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={
                "experiment": to_dict(exp),
                "role": ctx.role,
                "data": ctx.data,
                "teacher_state": ctx.teacher_state,
                "label": label,
            },
            torch_config=TorchConfig(backend=None),
            scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                         resources_per_worker=resources, placement_strategy=train_cfg.placement_strategy),
            run_config=RunConfig(
                name=f"train-{trial_id}",
                storage_path=ctx.storage_path,
                callbacks=[TuneReportCallback()],
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
            return
        except TrainingFailedError as exc:
            kind, reason = classify_failure(exc)
            if kind == "lost" and restarts < ctx.max_failures:
                restarts += 1
                print(f"[{label}] {reason}; restart {restarts} of {ctx.max_failures} from the last checkpoint", flush=True)
                continue
            note = "not retried" if kind == "fatal" else f"gave up after {restarts} restart(s)"
            raise TrialFailure(f"{reason} ({note})") from None


def run_trials(
    ctx: SweepContext,
    param_space: dict[str, Any],
    *,
    name: str,
    callbacks: list[Any],
    max_concurrent_trials: int,
    num_samples: int = 1,
    search_alg: Any = None,
    scheduler: Any = None,
    metric: str | None = None,
    mode: str | None = None,
    restore: bool = False,
):
    """Run a Tune sweep of ``train_driver_fn`` trials; return the ``ResultGrid``.

    ``restore``: continue the interrupted sweep stored under ``ctx.storage_path/name``
    (``Tuner.restore``): finished trials keep their results and are not run again, unfinished
    and errored ones resume from their last checkpoint. The restored Tuner keeps its pickled
    settings; only the callbacks are replaced by ``callbacks`` (the pickled ones belong to the
    interrupted launcher process).
    """
    from ray import tune

    callbacks = list(callbacks)  # Tune appends its own reporters to the list it is given
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, ctx=ctx), {"cpu": DRIVER_CPU})
    if restore:
        path = experiment_path(ctx, name)
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune state at {path}; start the sweep without --resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        local = tuner._local_tuner  # the public API has no way to swap callbacks on restore
        local.get_run_config().callbacks = list(callbacks)  # the live RunConfig object
        return _fit(tuner)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
            search_alg=search_alg,
            scheduler=scheduler,
            metric=metric if (search_alg or scheduler) else None,
            mode=mode if (search_alg or scheduler) else None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=ctx.storage_path,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    return _fit(tuner)


def _sigint_sentinel(signum: int, frame: Any) -> None:  # pragma: no cover - replaced by Tune's
    raise KeyboardInterrupt


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, noting whether Ctrl-C stopped it.

    Tune catches the first SIGINT itself: it saves the experiment state, stops the trials and
    *returns* (trials it stopped look TERMINATED), after putting back the SIGINT handler it
    found. So a sentinel handler installed here that is back in place afterwards means the run
    was interrupted; :func:`interrupted` reads the flag.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    previous = signal.signal(signal.SIGINT, _sigint_sentinel)
    try:
        results = tuner.fit()
        stopped = signal.getsignal(signal.SIGINT) is _sigint_sentinel
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        results._kdsweep_interrupted = stopped
    except AttributeError:  # pragma: no cover
        pass
    return results


def interrupted(results: Any) -> bool:
    """True when ``tuner.fit()`` returned early (Ctrl-C: Tune saves its state and stops) with
    trials neither finished nor errored; such a sweep continues with ``--resume``."""
    if getattr(results, "_kdsweep_interrupted", False):
        return True
    analysis = getattr(results, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def experiment_path(ctx: SweepContext, name: str) -> str:
    """Where Tune keeps the state of sweep ``name`` (a local path or a URI)."""
    return join_storage(ctx.storage_path, name)


def join_storage(storage: str, name: str) -> str:
    """``storage/name`` for a local path or a URI, keeping a URI's query (e.g.
    ``s3://bucket/runs?endpoint_override=host:9000`` -> ``s3://bucket/runs/name?endpoint_override=...``)."""
    base, sep, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def storage_checkpoint(storage: str, path: str):
    """The ``ray.train.Checkpoint`` at ``path`` as Ray reports it (a path *inside* the storage's
    filesystem, without the scheme: ``bucket/runs/train-x/checkpoint_...`` on S3) under the
    storage ``storage`` (a local path or a URI such as ``s3://bucket/runs``, optionally with
    pyarrow's query options). The filesystem is the storage's own, as Ray builds it
    (``pyarrow.fs.FileSystem.from_uri``), so ``to_directory()`` works for local and remote storage.
    """
    import pyarrow.fs
    from ray.train import Checkpoint

    if "://" in storage:
        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
    else:
        filesystem = pyarrow.fs.LocalFileSystem()
    return Checkpoint(path=path, filesystem=filesystem)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray: ``address`` (``--ray-address``) or ``RAY_ADDRESS`` (set by ``ray job
    submit``); else a Ray instance already running on this machine (``ray start --head``), as
    ``ray.init()`` itself would; else a private local Ray on 127.0.0.1 that ends with the launcher.

    Connecting to the running instance is what a user who started one expects, and the only safe
    choice: a second instance beside it breaks Ray's own helpers, which look their cluster up on
    the machine ("Found multiple active Ray instances") and would leak placement groups.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Keep the job's runtime env (``ray job submit --working-dir``): pass none of our own.
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(address="auto")  # the instance `ray start` left on this machine, if any
    except ConnectionError:
        # The dashboard serves Ray's State API, which Train's controller queries; bind it locally.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
        return
    print(f"kdsweep: using the Ray instance already running on this machine ({ray.get_runtime_context().gcs_address}); "
          "pass --ray-address to use another cluster", flush=True)


def result_rows(results: Any, describe: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per trial: ``describe(config)`` fields, status, error, last metrics."""
    rows = []
    for result in results:
        record = dict(describe(result.config))
        metrics = result.metrics or {}
        record["status"] = "FAILED" if result.error is not None else "FINISHED"
        record["error"] = (summarize_error(str(result.error)) or type(result.error).__name__)[:300] if result.error is not None else ""
        record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        record["checkpoint_path"] = metrics.get("checkpoint_path")
        rows.append(record)
    return rows
