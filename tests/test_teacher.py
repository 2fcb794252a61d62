"""Teacher reuse from the MLflow store (no Ray): a corrupt ``teacher/model.pt``, in the store or in the
local cache, is never used; the next intact FINISHED run of the hash is, else the teacher retrains."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch

from kdsweep import paths
from kdsweep.orchestrate.teacher import reuse_teacher
from kdsweep.report.tracking import TAG_HASH, TAG_ROLE, TAG_UNREADABLE, Tracker

KEY = "abc123"


@pytest.fixture()
def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tracker:
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


def weights_bytes(seed: int) -> tuple[dict[str, torch.Tensor], bytes]:
    """A tiny state dict and its ``model.pt`` bytes, as :func:`kdsweep.train.checkpoint.save_checkpoint` writes them."""
    torch.manual_seed(seed)
    state = torch.nn.Linear(3, 2).state_dict()
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    return state, buffer.getvalue()


def teacher_run(tracker: Tracker, tmp_path: Path, content: bytes, age_s: int) -> str:
    """A FINISHED teacher run of hash :data:`KEY` started ``age_s`` seconds ago, holding ``content``
    as its ``teacher/model.pt``."""
    run = tracker.client.create_run(tracker.experiment_id, run_name="teacher", start_time=int((time.time() - age_s) * 1000),
                                    tags={TAG_ROLE: "teacher", TAG_HASH: KEY}).info.run_id
    folder = tmp_path / "upload" / run
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(content)
    tracker.log_artifact(run, folder / "model.pt", "teacher")
    tracker.log_metrics(run, {"AP": float(age_s)}, step=1)
    tracker.end_run(run, "FINISHED")
    return run


def warnings(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """kdsweep's lines on stderr (MLflow logs there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdsweep:")]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_newest_teacher_falls_back_to_an_older_intact_one(tracker, tmp_path, capsys):
    good_state, good = weights_bytes(0)
    old = teacher_run(tracker, tmp_path, good, age_s=100)
    bad = teacher_run(tracker, tmp_path, good[: len(good) // 2], age_s=10)
    record, state = reuse_teacher(tracker, KEY)
    assert record["run_id"] == old and record["AP"] == 100.0
    assert same(state, good_state)
    [line] = warnings(capsys)
    assert line.startswith(f"kdsweep: warning: teacher run {bad} (hash {KEY}): teacher/model.pt is unreadable (")
    assert "PytorchStreamReader" in line and line.endswith(f"trying teacher run {old}")
    assert TAG_UNREADABLE in tracker.client.get_run(bad).data.tags
    assert [a.path for a in tracker.client.list_artifacts(bad, "teacher")] == ["teacher/model.pt"]  # kept
    record, state = reuse_teacher(tracker, KEY)  # next launch: the tagged run is passed over, silently
    assert record["run_id"] == old and same(state, good_state)
    assert warnings(capsys) == []


def test_only_a_corrupt_teacher_means_training_it_again(tracker, tmp_path, capsys):
    _, good = weights_bytes(0)
    bad = teacher_run(tracker, tmp_path, good[:-100], age_s=10)
    assert reuse_teacher(tracker, KEY) is None
    [line] = warnings(capsys)
    assert line.startswith(f"kdsweep: warning: teacher run {bad} (hash {KEY}): teacher/model.pt is unreadable (")
    assert line.endswith("training it again")


def test_a_corrupt_local_copy_never_wins_over_the_intact_artifact(tracker, tmp_path, capsys):
    good_state, good = weights_bytes(1)
    run = teacher_run(tracker, tmp_path, good, age_s=10)
    cached = paths.home() / "teachers" / KEY / run / "model.pt"  # where MLflow puts the file it downloads
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good[: len(good) // 3])  # an earlier, interrupted copy
    record, state = reuse_teacher(tracker, KEY)
    assert record["run_id"] == run and same(state, good_state)
    assert cached.read_bytes() == good
    assert warnings(capsys) == [] and TAG_UNREADABLE not in tracker.client.get_run(run).data.tags


def test_another_launchers_download_in_progress_is_never_read(tracker, tmp_path, capsys, monkeypatch):
    """Two launchers reusing one teacher at once: the other's copy into the shared cache file is
    half done when this one reads; the intact weights are used and the good run is not tagged."""
    good_state, good = weights_bytes(2)
    run = teacher_run(tracker, tmp_path, good, age_s=10)
    shared = paths.home() / "teachers" / KEY / run / "model.pt"
    download = Tracker.download

    def racing(self: Tracker, run_id: str, artifact: str, dest: str | Path) -> Path:
        path = download(self, run_id, artifact, dest)
        shared.parent.mkdir(parents=True, exist_ok=True)
        shared.write_bytes(good[: len(good) // 2])  # the other launcher's copy, half written
        return path

    monkeypatch.setattr(Tracker, "download", racing)
    record, state = reuse_teacher(tracker, KEY)
    assert record["run_id"] == run and same(state, good_state)
    assert warnings(capsys) == [] and TAG_UNREADABLE not in tracker.client.get_run(run).data.tags


def test_a_trained_teacher_keeps_its_weights_alone_not_the_optimizer_state(tmp_path: Path) -> None:
    """The teacher's local copy (``KDSWEEP_HOME/teachers/<hash>/<run>/``) and the weights a finished
    student logs are the checkpoint's ``model.pt`` alone: its ``state.pt`` (optimizer state, about
    twice the weights) is never copied out of the storage."""
    from ray.train import Checkpoint

    from kdsweep.orchestrate.teacher import checkpoint_weights, copy_weights

    state, content = weights_bytes(0)
    source = tmp_path / "storage" / "checkpoint_0"
    source.mkdir(parents=True)
    (source / "model.pt").write_bytes(content)
    (source / "state.pt").write_bytes(b"optimizer state" * 1000)
    checkpoint = Checkpoint.from_directory(str(source))
    local = copy_weights(checkpoint, tmp_path / "home" / "teachers" / KEY / "run")
    assert sorted(p.name for p in local.parent.iterdir()) == ["model.pt"]
    assert local.read_bytes() == content
    assert same(checkpoint_weights(checkpoint), state)
    (source / "model.pt").unlink()
    with pytest.raises(OSError):
        copy_weights(checkpoint, tmp_path / "other")


def test_a_resumed_teacher_whose_last_epoch_was_saved_takes_its_train_runs_newest_checkpoint(
        tracker: Tracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after its workers saved the last epoch, a teacher's resumed Tune trial has nothing left
    to train: it ends on the replayed report (kdsweep.names.REPLAYED), which carries no checkpoint.
    The teacher's weights then come from its Train run's newest checkpoint, and the flag is not a
    metric of its record. (Before: "teacher training failed: no checkpoint".)"""
    import pandas as pd

    from kdsweep.config import ExperimentConfig, from_dict, teacher_experiment
    from kdsweep.names import REPLAYED
    from kdsweep.orchestrate import teacher as teacher_module
    from kdsweep.orchestrate.launch import Session
    from kdsweep.report.tracking import TAG_TRIAL

    tiny = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64}
    config = teacher_experiment(from_dict(ExperimentConfig, {"teacher": tiny, "student": tiny}))
    parent = tracker.start_run("ablation")
    child = tracker.start_run("teacher", parent=parent, tags={TAG_TRIAL: "t1", TAG_ROLE: "teacher", TAG_HASH: KEY})
    state, content = weights_bytes(3)
    newest = tmp_path / "ray" / "train-t1" / "checkpoint_2026-12-06_10-00-02.000000"
    for folder, data in ((tmp_path / "ray" / "train-t1" / "checkpoint_2026-12-06_10-00-01.000000", weights_bytes(2)[1]),
                         (newest, content)):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(data)
        (folder / "state.pt").write_bytes(b"optimizer")
    record = {"row": KEY, "trial_id": "t1", "status": "FINISHED", "error": "", "epoch": 2, "AP": 5.0, REPLAYED: 1,
              "checkpoint_path": None}
    monkeypatch.setattr(teacher_module, "run_trials", lambda *a, **k: (None, False))
    monkeypatch.setattr(teacher_module, "trial_frame", lambda results: pd.DataFrame([record]))
    session = Session(tracker=tracker, parent=parent, tune_name="t", resumed=False, storage=str(tmp_path / "ray"))
    out = teacher_module.train_teachers(session, {KEY: config}, {}, max_concurrent=1)
    [(got, weights)] = out.values()
    assert same(weights, state)  # the newest checkpoint's, not the older one's
    assert got["run_id"] == child and got["AP"] == 5.0 and REPLAYED not in got
    assert tracker.client.get_run(child).info.status == "FINISHED"
    assert sorted(p.name for p in (paths.home() / "teachers" / KEY / child).iterdir()) == ["model.pt"]
