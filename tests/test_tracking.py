"""MLflow tracking on SQLite: parent/child runs, statuses, teacher reuse lookup."""

from types import SimpleNamespace

import pytest

from kdsweep.report.tracking import PARENT_TAG, TAG_HASH, TAG_REASON, TAG_ROLE, Tracker, flatten, summarize_error, tune_callback


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_callback_creates_one_child_per_trial_and_ends_each(tracker):
    parent = tracker.start_run("parent")
    describe = lambda config: (f"{config['row']}", {"row": config["row"]}, {"kdsweep.row": config["row"]}, {"cfg": 1})
    cb = tune_callback(tracker, parent, describe)
    ok = SimpleNamespace(trial_id="t1", config={"row": "ssim"})
    bad = SimpleNamespace(trial_id="t2", config={"row": "l2"}, get_error=lambda: RuntimeError("Traceback...\nNonFiniteLossError: non-finite loss at epoch 1"), error_file=None)
    hung = SimpleNamespace(trial_id="t3", config={"row": "l1"})
    for trial in (ok, bad, hung):
        cb.on_trial_start(0, [], trial)
    cb.on_trial_start(0, [], ok)  # a restart does not create a second run
    cb.on_trial_result(0, [], ok, {"epoch": 1, "AP": 12.5, "loss/kd_ssim": 0.2, "name": "x", "nan": float("nan")})
    cb.on_trial_result(0, [], ok, {"epoch": 2, "AP": 15.0})
    cb.on_trial_complete(0, [], ok)
    cb.on_trial_error(0, [], bad)
    cb.kill_open_runs("interrupted")
    children = {r.data.tags["kdsweep.row"]: r for r in tracker.children(parent)}
    assert set(children) == {"ssim", "l2", "l1"}
    assert children["ssim"].info.status == "FINISHED"
    assert children["l2"].info.status == "FAILED"
    assert "NonFiniteLossError" in children["l2"].data.tags[TAG_REASON]
    assert children["l1"].info.status == "KILLED"
    history = tracker.client.get_metric_history(children["ssim"].info.run_id, "AP")
    assert [(m.step, m.value) for m in history] == [(1, 12.5), (2, 15.0)]
    assert "nan" not in children["ssim"].data.metrics
    assert children["ssim"].data.params["row"] == "ssim"
    assert children["ssim"].data.tags[PARENT_TAG] == parent
    assert cb.finished == [children["ssim"].info.run_id]


def test_find_teacher_needs_finished_run_with_weights(tracker, tmp_path):
    run = tracker.start_run("teacher", tags={TAG_ROLE: "teacher", TAG_HASH: "abc"})
    assert tracker.find_teacher("abc") is None  # running, no weights
    tracker.end_run(run)
    assert tracker.find_teacher("abc") is None  # finished, still no weights
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"x")
    tracker.log_artifact(run, weights, "teacher")
    assert tracker.find_teacher("abc").info.run_id == run
    assert tracker.find_teacher("other") is None
    local = tracker.download(run, "teacher/model.pt", tmp_path / "dl")
    assert local.read_bytes() == b"x"


def test_find_teacher_reuses_a_teacher_from_another_experiment(tracker, tmp_path):
    run = tracker.start_run("teacher", tags={TAG_ROLE: "teacher", TAG_HASH: "abc"})
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"x")
    tracker.log_artifact(run, weights, "teacher")
    tracker.end_run(run)
    other = Tracker(tracker.uri, "another ablation")
    assert other.experiment_id != tracker.experiment_id
    assert other.find_teacher("abc").info.run_id == run
    assert other.find_teacher("other") is None


def test_summarize_error_picks_the_root_cause():
    text = "Traceback (most recent call last):\n  File x\nray.exceptions.RayTaskError: boom\nNonFiniteLossError: non-finite loss at epoch 3\n"
    assert summarize_error(text).startswith("NonFiniteLossError")
    assert summarize_error("") == ""
