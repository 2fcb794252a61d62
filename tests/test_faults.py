"""Faults: a Ray Train worker killed mid-epoch, a sweep interrupted and resumed. Real Ray, real
MLflow (SQLite), tiny models."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray import tune

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64, "anchor_scale": 2.0}
pytestmark = pytest.mark.slow


def _preset(epochs: int, train_images: int) -> dict:
    train = {"epochs": epochs, "batch_size": 2, "optimizer": "adamw", "lr": 1e-3, "warmup_iters": 1,
             "num_workers": 1, "threads_per_worker": 1, "cpus_per_worker": 0.5}
    return {"data": {"synth_train": train_images, "synth_val": 6, "synth_size": 64},
            "teacher": TINY, "student": TINY, "train": train, "teacher_train": train}


class KillWorkersOnReport(tune.Callback):
    """Kills (SIGKILL) the Ray Train workers of this driver's job the moment Tune receives the
    report of epoch ``epoch``, on that event rather than after a sleep: the workers then die in
    the next epoch, before its report, so the restarted run resumes from epoch ``epoch``'s
    checkpoint. ``killed``: the PIDs; ``checkpoints``: the checkpoints on the storage then."""

    def __init__(self, epoch: int, job_id: str, storage: Path) -> None:
        self.epoch, self.job_id, self.storage = epoch, job_id, storage
        self.killed: list[int] = []
        self.checkpoints: list[str] = []

    def on_trial_result(self, iteration: int, trials: list, trial: object, result: dict, **info: object) -> None:
        from ray.util.state import list_actors

        if self.killed or result.get("epoch") != self.epoch:
            return
        self.checkpoints = glob.glob(str(self.storage / "train-*" / "checkpoint_*"))
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"),
                                       ("job_id", "=", self.job_id)])  # this test's workers only
        for actor in workers:
            os.kill(actor.pid, signal.SIGKILL)
            self.killed.append(actor.pid)


def test_killed_worker_restarts_from_its_checkpoint_in_the_same_mlflow_run(tmp_path, monkeypatch):
    import ray

    from kdsweep.config import ExperimentConfig, from_dict
    from kdsweep.data.coco import resolve_data
    from kdsweep.orchestrate.runner import RunPlan, init_ray, run_trials
    from kdsweep.orchestrate.space import parse_space
    from kdsweep.orchestrate.trials import row_configs, tune_param_space
    from kdsweep.report.tables import trial_frame
    from kdsweep.report.tracking import MLflowTrialCallback, Tracker

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    preset = _preset(epochs=3, train_images=96)
    space = parse_space({"name": "faults", "rows": [{"label": "baseline"}]}, "faults.yaml")
    data = {k: str(v) for k, v in resolve_data(from_dict(ExperimentConfig, preset).data).__dict__.items()}
    storage = tmp_path / "ray"
    plan = RunPlan(rows=row_configs(space, preset), data=data, storage_path=str(storage), max_failures=2)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "faults")
    parent = tracker.start_run("parent")
    callback = MLflowTrialCallback(tracker.uri, tracker.experiment_id, parent, lambda c: (c["row"], {"row": c["row"]}, {}, {}))
    init_ray(num_cpus=2)
    try:
        # after the MLflow callback, so that epoch 1 is logged before its workers die
        killer = KillWorkersOnReport(epoch=1, job_id=ray.get_runtime_context().get_job_id(), storage=storage)
        results, _ = run_trials(plan, tune_param_space(space, [0]), name="faults", callbacks=[callback, killer],
                                max_concurrent_trials=1)
    finally:
        ray.shutdown()
    killed = killer.killed
    assert killed, "no worker was running when epoch 1 was reported"
    assert killer.checkpoints, "epoch 1's checkpoint was not on the storage when its report arrived"
    [record] = trial_frame(results).to_dict("records")
    assert record["status"] == "FINISHED" and record["epoch"] == 3
    assert record["start_epoch"] == 2  # the restarted worker resumed after epoch 1, not from scratch
    tracker.end_run(parent)
    [child] = tracker.children(parent)
    assert child.info.status == "FINISHED"
    steps = [m.step for m in tracker.client.get_metric_history(child.info.run_id, "AP")]
    assert sorted(steps) == [1, 2, 3]  # one history, each epoch once


def test_a_nan_trial_fails_once_with_its_reason_and_is_not_retried(tmp_path, monkeypatch):
    """A deterministic failure (here a KD weight that overflows float32: the loss is inf at step 0)
    ends the trial at once, with its one-line reason in the record and in the MLflow run."""
    import ray

    from kdsweep.config import ExperimentConfig, from_dict
    from kdsweep.data.coco import resolve_data
    from kdsweep.orchestrate.runner import RunPlan, init_ray, run_trials
    from kdsweep.orchestrate.space import parse_space
    from kdsweep.orchestrate.trials import row_configs, tune_param_space
    from kdsweep.report.tables import trial_frame
    from kdsweep.report.tracking import TAG_REASON, MLflowTrialCallback, Tracker

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    preset = _preset(epochs=2, train_images=16)
    space = parse_space({"name": "nan", "rows": [{"label": "overflow", "kd": [{"loss": "l2", "weight": 1e39}]}]}, "nan.yaml")
    data = {k: str(v) for k, v in resolve_data(from_dict(ExperimentConfig, preset).data).__dict__.items()}
    teacher = {k: v.clone() for k, v in _tiny_state().items()}
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "nan")
    parent = tracker.start_run("parent")
    callback = MLflowTrialCallback(tracker.uri, tracker.experiment_id, parent, lambda c: (c["row"], {"row": c["row"]}, {}, {}))
    init_ray(num_cpus=2)
    try:
        plan = RunPlan(rows=row_configs(space, preset), data=data, storage_path=str(tmp_path / "ray"),
                       teachers={"overflow": ray.put(teacher)}, max_failures=2)
        results, _ = run_trials(plan, tune_param_space(space, [0]), name="nan", callbacks=[callback],
                                max_concurrent_trials=1)
    finally:
        ray.shutdown()
    [record] = trial_frame(results).to_dict("records")
    assert record["status"] == "FAILED"
    assert "non-finite loss at epoch 1 step 0" in record["error"] and "(not retried)" in record["error"]
    [child] = tracker.children(parent)
    assert child.info.status == "FAILED"
    reason = child.data.tags[TAG_REASON]
    assert "non-finite loss at epoch 1 step 0" in reason and "(not retried)" in reason
    assert "\n" not in reason


def _tiny_state() -> dict:
    from kdsweep.config import ModelConfig
    from kdsweep.data.synthetic import CLASSES
    from kdsweep.models.detectors import build_detector

    return build_detector(ModelConfig(**TINY), len(CLASSES)).state_dict()


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    space_file = tmp_path / "resume.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "resume",
        "rows": [{"label": "baseline", "kd": []}, {"label": "l2", "kd": [{"loss": "l2", "adapter": True}]},
                 {"label": "l1", "kd": [{"loss": "l1", "adapter": True}]}],
    }))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--space", str(space_file), "--preset", "smoke",
           "--tracking-uri", uri, "--experiment", "resume", "--max-concurrent", "1", "--no-throughput"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline and proc.poll() is None:
        _, runs = _runs(uri, "resume")
        finished = [r for r in runs if r.data.tags.get("kdsweep.role") == "student" and r.info.status == "FINISHED"]
        if finished:
            break
        time.sleep(1)
    assert finished, "no student trial finished before the deadline"
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C (the launcher only; Tune saves its state and stops)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    client, runs = _runs(uri, "resume")
    [parent] = [r for r in runs if r.data.tags.get("kdsweep.role") == "ablation"]
    assert parent.info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    done_before = {r.info.run_id: r.info.end_time for r in runs if r.data.tags.get("kdsweep.role") == "student" and r.info.status == "FINISHED"}

    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming" in again.stdout
    client, runs = _runs(uri, "resume")
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.data.tags.get("kdsweep.role") == "student"]
    assert sorted(r.data.tags["kdsweep.row"] for r in children) == ["baseline", "l1", "l2"]  # one child per trial
    assert len({r.data.tags["kdsweep.trial_id"] for r in children}) == 3
    assert all(r.info.status == "FINISHED" for r in children)
    for run_id, end_time in done_before.items():  # finished trials were not run again
        run = client.get_run(run_id)
        assert run.info.end_time == end_time and "kdsweep.resumed" not in run.data.tags
    names = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "ablation.parquet" in names and "ablation.md" in names
