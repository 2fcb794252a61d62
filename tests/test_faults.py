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
    data = resolve_data(from_dict(ExperimentConfig, preset).data).strings()
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
    data = resolve_data(from_dict(ExperimentConfig, preset).data).strings()
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


# --- issue 21: placements that can never be met, launches at once, a launcher killed -------------
PLACE = """
import os, sys
from kdsweep.config import ExperimentConfig, from_dict
from kdsweep.data.coco import resolve_data
from kdsweep.orchestrate.runner import RunPlan, init_ray, run_trials
from kdsweep.orchestrate.space import parse_space
from kdsweep.orchestrate.trials import row_configs, tune_param_space
from kdsweep.report.tables import trial_frame
import json, ray
preset = json.loads(sys.argv[1])
space = parse_space({"name": "place", "rows": [{"label": "baseline"}]}, "place.yaml")
data = resolve_data(from_dict(ExperimentConfig, preset).data).strings()
init_ray(num_cpus=2, num_gpus=8)  # one node: 8 (fake) GPUs, 2 CPUs
plan = RunPlan(rows=row_configs(space, preset), data=data, storage_path=sys.argv[2])
results, _ = run_trials(plan, tune_param_space(space, [0]), name="place", callbacks=[], max_concurrent_trials=1)
[record] = trial_frame(results).to_dict("records")
print("RESULT", json.dumps({"status": record["status"], "error": record.get("error") or ""}), flush=True)
ray.shutdown()
"""


def test_a_placement_that_can_never_be_met_ends_the_trial_with_its_reason(tmp_path):
    """8 GPU workers x 0.25 CPU on a node of 8 GPUs and 2 CPUs, whose Tune driver holds 0.05 CPU:
    no placement ever fits. Ray Train used to retry starting the workers forever (here: the
    test's timeout); now the trial ends after the placement wait, with a one-line reason."""
    import json

    preset = _preset(epochs=1, train_images=16)
    preset["train"] = dict(preset["train"], num_workers=8, cpus_per_worker=0.25, use_gpu=True, placement_strategy="auto")
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5", KDSWEEP_PLACEMENT_WAIT_S="10")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", PLACE, json.dumps(preset), str(tmp_path / "ray")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the trial still waited for its workers after 300 s:\n" + out[-2000:])
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-3000:]
    record = json.loads(lines[-1][len("RESULT "):])
    assert record["status"] == "FAILED"
    assert "Ray could not place the 8 worker(s)" in record["error"] and "in 10 s" in record["error"]
    assert "lower --num-workers" in record["error"] and "\n" not in record["error"]


TWO_ROWS = {"name": "together", "rows": [{"label": "baseline", "kd": []}, {"label": "l2", "kd": [{"loss": "l2", "adapter": True}]}]}


def _store_runs(home: Path):
    """Every run of the embedded MLflow store under ``home``, in every experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


def test_two_launches_at_once_train_their_teacher_once_and_both_finish(tmp_path):
    """Two launches of one smoke ablation at once, into one KDSWEEP_HOME: each runs on a Ray of its
    own (neither joins the other's, which would end with it), one trains the teacher and the other
    waits for it and reuses it; both exit 0 and no run is left RUNNING."""
    import tempfile

    space_file = tmp_path / "together.yaml"
    space_file.write_text(yaml.safe_dump(TWO_ROWS))
    # Ray's default, token authentication, with a HOME of the test's own (the token goes there)
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), HOME=tempfile.mkdtemp(prefix="h", dir="/tmp"),
               RAY_USAGE_STATS_ENABLED="0")
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--space", str(space_file), "--preset", "smoke",
           "--max-concurrent", "1", "--no-throughput"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=1500)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    runs = _store_runs(tmp_path / "home")
    teachers = [r for r in runs if r.data.tags.get("kdsweep.role") == "teacher"]
    assert [r.info.status for r in teachers] == ["FINISHED"], "\n=====\n".join(
        "\n".join(line for line in out.splitlines() if line.startswith("kdsweep")) for out in outs)  # trained once
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sum("reusing teacher run" in out for out in outs) == 1
    assert sum("started a private Ray instance" in out and "authentication: token" in out for out in outs) == 2
    parents = [r for r in runs if r.data.tags.get("kdsweep.role") == "ablation"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]


def test_a_launcher_killed_while_its_teacher_trains_resumes_to_its_table(tmp_path):
    """SIGKILL to the launcher (nothing runs its handlers) while the teacher trains; the same
    command with --resume continues from there (the teacher's Tune run from its checkpoint, or
    anew without one), runs the students and prints the table; nothing is left RUNNING."""
    space_file = tmp_path / "killed.yaml"
    # a teacher of 3 epochs, killed after the first: --resume continues it from that checkpoint
    space_file.write_text(yaml.safe_dump(dict(TWO_ROWS, name="killed", base={"teacher_train": {"epochs": 3}})))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--space", str(space_file), "--preset", "smoke",
           "--tracking-uri", uri, "--experiment", "killed", "--max-concurrent", "1", "--no-throughput"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        teacher = None
        while time.time() < deadline and proc.poll() is None and teacher is None:
            client, runs = _runs(uri, "killed")
            started = [r for r in runs if r.data.tags.get("kdsweep.role") == "teacher" and r.info.status == "RUNNING"]
            teacher = started[0] if started and "epoch" in client.get_run(started[0].info.run_id).data.metrics else None
            time.sleep(0.5)
        assert teacher is not None, "the teacher did not report an epoch before the deadline"
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
        proc.wait(timeout=60)
        time.sleep(5)  # Ray's reaper ends the launcher's private instance
        again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=1200)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "| baseline |" in again.stdout and "| l2 |" in again.stdout  # the table
    assert "FileNotFoundError" not in out
    assert "continuing the interrupted launch's teacher training from its last checkpoint" in again.stdout
    client, runs = _runs(uri, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    [parent] = [r for r in runs if r.data.tags.get("kdsweep.role") == "ablation"]
    assert parent.info.status == "FINISHED"
    teachers = [r for r in runs if r.data.tags.get("kdsweep.role") == "teacher"]
    assert [r.info.run_id for r in teachers] == [teacher.info.run_id]  # the killed run, continued and FINISHED
    assert teachers[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(teacher.info.run_id, "AP"))
    assert steps == [1, 2, 3]  # epoch 1 was not trained again
    assert "launcher failed" not in str([r.data.tags for r in runs])  # no misleading FAILED reason
