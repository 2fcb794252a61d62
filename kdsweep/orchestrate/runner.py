"""Ray Tune over Ray Train (V2): the runner every command uses, for teachers and students alike.

Layers (Ray's ``train_tune_interop`` pattern): ``train_fn_per_worker`` (per worker,
:mod:`kdsweep.train.worker`), :func:`train_driver_fn` (per Tune trial: builds the trial's typed
config, fits a ``TorchTrainer`` named from the trial id; ``TuneReportCallback`` forwards rank 0's
metrics to Tune) and the ``Tuner`` of :func:`run_trials`. What every trial of one Tune run shares
travels once, as a :class:`RunPlan`: the typed configs of the rows (or teachers) it trains, the
space's samplers, the data paths, the storage path, and the teachers' weights. The Tune driver
takes a fraction of a CPU so that it never starves its own Train workers on a small machine.

Failures: a run whose workers or nodes were lost is fitted again and resumes from its last
checkpoint; anything else ends the trial at once with its one-line reason (:func:`classify_failure`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.tune
from ray import tune
from ray.exceptions import RayActorError
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from kdsweep.config import ExperimentConfig
from kdsweep.orchestrate.space import Sampler
from kdsweep.orchestrate.scheduling import placement, start_retries
from kdsweep.orchestrate.trials import trial_config
from kdsweep.report.tracking import summarize_error
from kdsweep.train.worker import train_fn_per_worker

DRIVER_CPU = 0.05

__all__ = ["DRIVER_CPU", "RunPlan", "TrialFailure", "can_restore", "classify_failure", "init_ray", "interrupted", "join_storage",
           "latest_checkpoint", "run_trials", "storage_checkpoint", "train_driver_fn", "train_run_name",
           "trial_checkpoint"]


@dataclass(frozen=True)
class RunPlan:
    """What every trial of one Tune run shares (shipped once through the object store).

    Attributes:
        rows: key (a row label, or a teacher's hash) -> its typed config, seed and samples not applied.
        samplers: the space's samplers by dotted path (searches; empty for ablations).
        data: the resolved data paths (absolute).
        storage_path: Ray's storage (a local path or a URI such as ``s3://bucket/prefix``).
        teachers: key -> the ObjectRef of its teacher's weights (rows that distil).
        source: the space file, for error messages.
        max_failures: restarts of a trial whose workers or nodes were lost.
    """

    rows: Mapping[str, ExperimentConfig]
    data: Mapping[str, str]
    storage_path: str
    samplers: Mapping[str, Sampler] = field(default_factory=dict)
    teachers: Mapping[str, Any] = field(default_factory=dict)
    source: str = "space"
    max_failures: int = 2

    def trial(self, config: Mapping[str, Any]) -> ExperimentConfig:
        """The typed config of the trial with Tune config ``config``."""
        return trial_config(self.rows, self.samplers, config, self.source)


class TrialFailure(RuntimeError):
    """A trial that failed for a reason a restart cannot fix; the message is its one-line reason."""


DETERMINISTIC_ERRORS = ("NonFiniteLossError", "TrialOutOfMemoryError", "ConfigError", "DataError")
"""Failures that a restart from the last checkpoint would meet again in exactly the same way."""

LOST_WORKER_ERRORS = ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError")


def _lost_worker(error: BaseException) -> bool:
    """A worker process or its node went away (killed, crashed, preempted, stopped answering)."""
    inner = getattr(error, "health_check_failure", error)
    return isinstance(inner, RayActorError) or type(error).__name__ in LOST_WORKER_ERRORS


def classify_failure(error: BaseException) -> tuple[str, str]:
    """``(kind, reason)`` of a failed ``TorchTrainer.fit()``: kind ``lost`` (a worker or node was
    lost and nothing else went wrong: restart from the last checkpoint) or ``fatal`` (a
    deterministic error such as a non-finite loss, out of memory or a bad config, or any other
    error in the training code: restarting would fail the same way and burn GPU-hours); reason is
    the root cause in one line."""
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


def train_driver_fn(config: dict[str, Any], plan: RunPlan) -> None:
    """Tune trainable: fit one ``TorchTrainer`` for this trial (resumes if its run exists).

    Failures: Ray Train itself retries nothing but preemptions (``FailureConfig(max_failures=0)``)
    and starting the workers, for :data:`~kdsweep.orchestrate.scheduling.PLACEMENT_WAIT_S` in all
    (then the trial ends: the placement cannot be met).
    Here a run whose workers or nodes were lost is fitted again under the same name, so it resumes
    from its last checkpoint, up to ``plan.max_failures`` times; any other failure (a non-finite
    loss, out of memory, a config error, a bug) ends the trial at once with a
    :class:`TrialFailure` carrying the one-line reason that the table and the MLflow run show.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    exp = plan.trial(config)
    train_cfg = exp.train
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = 1
    label = f"{config['row']} s{config.get('seed', train_cfg.seed)}"
    restarts = 0
    retries, waited = start_retries()
    while True:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # again after a lost node
        strategy = placement(train_cfg, nodes)
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={"experiment": exp, "data": dict(plan.data), "teacher_state": plan.teachers.get(config["row"]),
                               "label": label},
            torch_config=TorchConfig(backend=None),
            scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                         resources_per_worker=resources, placement_strategy=strategy),
            run_config=RunConfig(
                name=train_run_name(trial_id),
                storage_path=plan.storage_path,
                callbacks=[TuneReportCallback()],
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=0, controller_failure_limit=retries),
            ),
        )
        try:
            trainer.fit()
            return
        except TrainingFailedError as exc:
            if type(getattr(exc, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
                raise TrialFailure(
                    f"Ray could not place the {train_cfg.num_workers} worker(s) of {resources} ({strategy}) in {waited:.0f} s: "
                    "the cluster never had them free; free them, add a node, or lower --num-workers / "
                    "train.cpus_per_worker (not retried)") from None
            kind, reason = classify_failure(exc)
            if kind == "lost" and restarts < plan.max_failures:
                restarts += 1
                print(f"[{label}] {reason}; restart {restarts} of {plan.max_failures} from the last checkpoint", flush=True)
                continue
            note = "not retried" if kind == "fatal" else f"gave up after {restarts} restart(s)"
            raise TrialFailure(f"{reason} ({note})") from None


def run_trials(
    plan: RunPlan,
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
) -> tuple[Any, bool]:
    """Run a Tune sweep of :func:`train_driver_fn` trials; return ``(ResultGrid, interrupted)``.

    ``restore``: continue the interrupted sweep stored under ``plan.storage_path/name``
    (``Tuner.restore``): finished trials keep their results and are not run again, unfinished
    and errored ones resume from their last checkpoint. The restored Tuner keeps its own
    settings and callbacks, unpickled from its state: kdsweep's MLflow callback reconnects by URI
    (:class:`kdsweep.report.tracking.MLflowTrialCallback`), so nothing needs swapping.
    ``interrupted``: Ctrl-C stopped the sweep (continue with ``--resume``).
    """
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, plan=plan), {"cpu": DRIVER_CPU})
    if restore:
        path = join_storage(plan.storage_path, name)
        if not can_restore(plan.storage_path, name):
            raise FileNotFoundError(f"--resume: no Tune state at {path}; start the sweep without --resume")
        return _fit(tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True))
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
            storage_path=plan.storage_path,
            callbacks=list(callbacks),  # Tune appends its own reporters to the list it is given
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    return _fit(tuner)


def _sigint_sentinel(signum: int, frame: Any) -> None:  # pragma: no cover - replaced by Tune's
    raise KeyboardInterrupt


def _fit(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether Ctrl-C stopped it.

    Tune catches the first SIGINT itself: it saves the experiment state, stops the trials and
    *returns*, after putting back the SIGINT handler it found. So a sentinel handler installed
    here that is back in place afterwards means the run was interrupted; so does a trial left
    neither finished nor errored (:func:`interrupted`).
    """
    if threading.current_thread() is not threading.main_thread():
        results = tuner.fit()
        return results, interrupted(results)
    previous = signal.signal(signal.SIGINT, _sigint_sentinel)
    try:
        results = tuner.fit()
        stopped = signal.getsignal(signal.SIGINT) is _sigint_sentinel
    finally:
        signal.signal(signal.SIGINT, previous)
    return results, stopped or interrupted(results)


def interrupted(results: Any) -> bool:
    """True when some trial of ``results`` (a ``ResultGrid``) neither finished nor errored."""
    return len(results) > results.num_terminated + results.num_errors


def can_restore(storage: str, name: str) -> bool:
    """Whether the Tune run ``name`` under ``storage`` stored a state that ``Tuner.restore`` continues."""
    return tune.Tuner.can_restore(join_storage(storage, name))


def join_storage(storage: str, name: str) -> str:
    """``storage/name`` for a local path or a URI, keeping a URI's query (e.g.
    ``s3://bucket/runs?endpoint_override=host:9000`` -> ``s3://bucket/runs/name?endpoint_override=...``)."""
    base, sep, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def storage_checkpoint(storage: str, path: str) -> Checkpoint:
    """The ``ray.train.Checkpoint`` at ``path`` as Ray reports it (a path *inside* the storage's
    filesystem, without the scheme: ``bucket/runs/train-x/checkpoint_...`` on S3) under the
    storage ``storage`` (a local path or a URI such as ``s3://bucket/runs``, optionally with
    pyarrow's query options). The filesystem is the storage's own, as Ray builds it
    (``pyarrow.fs.FileSystem.from_uri``), so ``to_directory()`` works for local and remote storage.
    """
    filesystem, _ = storage_filesystem(storage)
    return Checkpoint(path=path, filesystem=filesystem)


def storage_filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path inside it)`` of a storage location: a URI (``s3://...``, with pyarrow's
    query options) through ``pyarrow.fs.FileSystem.from_uri``, as Ray builds it, or a local path."""
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), location


def train_run_name(trial_id: str) -> str:
    """The name of the Train run that Tune trial ``trial_id`` fits (:func:`train_driver_fn`): its
    checkpoints are under ``<storage>/<this name>/``."""
    return f"train-{trial_id}"


def trial_checkpoint(storage: str, checkpoint_path: Any, trial_id: str) -> Checkpoint | None:
    """A finished trial's last checkpoint: the one its last result names (``checkpoint_path``,
    a path in ``storage``), else its Train run's newest (a resumed run that had nothing left to
    train ends on a report without one), or None."""
    if isinstance(checkpoint_path, str):
        return storage_checkpoint(storage, checkpoint_path)
    return latest_checkpoint(storage, train_run_name(trial_id))


def latest_checkpoint(storage: str, run_name: str) -> Checkpoint | None:
    """The newest ``checkpoint_<time>`` folder of the Train run ``run_name`` under ``storage``
    (Ray Train V2 names them by their creation time, so the names sort in time), or None. For a
    trial whose last report carried no checkpoint (a resumed run that had nothing left to train)."""
    filesystem, root = storage_filesystem(join_storage(storage, run_name))
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(info.path for info in found
                   if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"))
    return Checkpoint(path=names[-1], filesystem=filesystem) if names else None


def _system_temp_dir() -> str:
    """Ray's base temp dir on Linux: ``RAY_TMPDIR``, else ``TMPDIR``, else /tmp (its default temp
    dir is ``<this>/ray``)."""
    return os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


def ray_start_address() -> str | None:
    """The address of the Ray instance that ``ray start --head`` left on this machine, if its GCS
    answers: Ray writes it to ``ray_current_cluster`` in its default temp dir (``RAY_TMPDIR`` or
    ``TMPDIR``, else /tmp, then ``ray/``) and ``ray stop`` removes it. A private instance that
    another launcher's ``ray.init()`` started is never written there, so it is never joined."""
    base = _system_temp_dir()
    try:
        address = (Path(base) / "ray" / "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None  # a `ray start` that died without `ray stop`


def private_temp_dir() -> str:
    """Root temp dir of a launcher's private Ray: one per user (``/tmp/ray`` may belong to another
    user of the machine), short (Ray's unix socket paths are limited to about 100 bytes)."""
    base = _system_temp_dir()
    path = Path(base) / f"kdsweep-ray-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return str(path)


def ensure_token() -> Path | None:
    """Create Ray's token file (``~/.ray/auth_token``, mode 600) when a private instance will use
    token authentication (``RAY_AUTH_MODE`` unset or ``token``, no ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH``) and there is none yet; returns its path then. Written whole and
    linked into place, so that two launches starting at once agree on one token (Ray's own writer
    could give each its own, and a worker of one instance would then load the other's)."""
    if (os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN")
            or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        return None
    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".auth_token.{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another launch's token came first: both use it
    finally:
        tmp.unlink()
    return path


def _free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_private_api: list[str | None] = [None]  # the State API address this process set for its private instance


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to Ray: ``address`` (``--ray-address``) or ``RAY_ADDRESS`` (set by ``ray job
    submit``); else the instance ``ray start --head`` runs on this machine
    (:func:`ray_start_address`), which outlives the launch; else a private instance that ends
    with the launcher. ``num_cpus``/``num_gpus`` size the private instance (tests: fake GPUs).

    The private instance (``address="local"``: never another launcher's private instance, which
    ends when that launcher ends and takes this launch's trials with it):

    * keeps Ray's token authentication, which Ray 2.60 turns on for a new local instance unless
      ``RAY_AUTH_MODE`` is set (a user's setting is kept). Ray's GCS, raylet and workers listen on
      every interface of the machine whatever node address is asked for; with the token, a client
      without it is refused (``tests/test_runner.py``);
    * has its own temp dir (:func:`private_temp_dir`) and free ports, and its dashboard on
      127.0.0.1 at a port chosen here: ``RAY_API_SERVER_ADDRESS`` names it for every process of
      the instance, so Ray's State API (which Train's controller queries) reaches this instance
      and not another one on the machine ("Found multiple active Ray instances").
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if _private_api[0] and os.environ.get("RAY_API_SERVER_ADDRESS") == _private_api[0]:
        del os.environ["RAY_API_SERVER_ADDRESS"]  # set for an earlier private instance of this process
    if address:
        # Keep the job's runtime env (``ray job submit --working-dir``): pass none of our own.
        ray.init(address=address)
        return
    started = ray_start_address()
    if started:
        ray.init(address=started)
        print(f"kdsweep: using the Ray instance `ray start` runs on this machine ({started}); "
              "pass --ray-address to use another cluster", flush=True)
        return
    ensure_token()
    port = _free_local_port()
    _private_api[0] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # the instance's processes inherit it
    context = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, _node_ip_address="127.0.0.1", _temp_dir=private_temp_dir())
    auth = os.environ.get("RAY_AUTH_MODE", "token")
    print(f"kdsweep: started a private Ray instance for this launch (GCS {context.address_info['gcs_address']}, "
          f"dashboard 127.0.0.1:{port}, authentication: {auth})", flush=True)
