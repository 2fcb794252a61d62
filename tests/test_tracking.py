"""MLflow tracking on SQLite: parent/child runs, statuses, teacher reuse lookup."""

import pickle
from types import SimpleNamespace

import cloudpickle
import pytest

from kdsweep.report.tracking import (
    PARENT_TAG,
    TAG_HASH,
    TAG_REASON,
    TAG_ROLE,
    TAG_TRIAL,
    MLflowTrialCallback,
    Tracker,
    flatten,
    summarize_error,
)


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_callback_creates_one_child_per_trial_and_ends_each(tracker):
    parent = tracker.start_run("parent")
    describe = lambda config: (f"{config['row']}", {"row": config["row"]}, {"kdsweep.row": config["row"]}, {"cfg": 1})
    cb = MLflowTrialCallback(tracker.uri, tracker.experiment_id, parent, describe)
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
    tracker.end_running_children(parent, "KILLED", "interrupted")  # what the launcher does on Ctrl-C
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


def test_a_resumed_sweep_continues_each_trial_in_its_own_run(tracker):
    """Tune pickles the callback into the experiment state (cloudpickle); the copy a --resume
    unpickles in another process reconnects by URI and reopens the trials' runs."""
    parent = tracker.start_run("parent")
    describe = lambda config: (config["row"], {}, {"kdsweep.row": config["row"]}, {})  # noqa: E731
    cb = MLflowTrialCallback(tracker.uri, tracker.experiment_id, parent, describe)
    trial = SimpleNamespace(trial_id="t1", config={"row": "ssim"})
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"epoch": 1, "AP": 1.0})
    tracker.end_running_children(parent, "KILLED", "interrupted")
    copy = pickle.loads(cloudpickle.dumps(cb))  # as Tuner.restore gets it back
    assert copy.runs == {} and copy._tracker is None
    copy.on_trial_start(0, [], trial)
    copy.on_trial_result(0, [], trial, {"epoch": 2, "AP": 2.0})
    copy.on_trial_complete(0, [], trial)
    [child] = tracker.children(parent)
    assert child.info.status == "FINISHED" and child.data.tags[TAG_TRIAL] == "t1"
    assert child.data.tags["kdsweep.resumed"] == "true"
    history = tracker.client.get_metric_history(child.info.run_id, "AP")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]  # one run, one history


def test_a_replayed_checkpoint_epoch_is_logged_only_where_the_run_lacks_it(tracker):
    """A resumed worker reports its checkpoint's epoch again (REPLAYED). The launcher may have been
    killed after the workers saved epoch 2 but before epoch 2's report reached MLflow: the replay
    fills that gap. Where the epoch did arrive (epoch 1 below), it is not logged twice."""
    from kdsweep.names import REPLAYED

    parent = tracker.start_run("parent")
    describe = lambda config: (config["row"], {}, {}, {})  # noqa: E731
    cb = MLflowTrialCallback(tracker.uri, tracker.experiment_id, parent, describe)
    trial = SimpleNamespace(trial_id="t1", config={"row": "teacher"})
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"epoch": 1, "AP": 1.0})
    tracker.end_running_children(parent, "KILLED", "interrupted")  # epoch 2 was saved, never reported
    copy = pickle.loads(cloudpickle.dumps(cb))
    copy.on_trial_start(0, [], trial)
    copy.on_trial_result(0, [], trial, {"epoch": 1, "AP": 1.0, REPLAYED: 1})  # a restart from epoch 1's checkpoint
    copy.on_trial_result(0, [], trial, {"epoch": 2, "AP": 2.0, REPLAYED: 1})  # the one that never arrived
    copy.on_trial_result(0, [], trial, {"epoch": 3, "AP": 3.0})
    copy.on_trial_complete(0, [], trial)
    [child] = tracker.children(parent)
    history = tracker.client.get_metric_history(child.info.run_id, "AP")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert REPLAYED not in child.data.metrics


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


def test_experiments_open_on_their_runs_and_the_parent_shows_its_table(tracker):
    """MLflow 3 opens an experiment of kind custom_model_development on its runs, not on the GenAI
    overview; an experiment created before this tag gets it when reused."""
    from kdsweep.report.tracking import EXPERIMENT_KIND, MODEL_TRAINING, NOTE

    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    old = tracker.client.create_experiment("made by an older kdsweep")
    assert EXPERIMENT_KIND not in tracker.client.get_experiment(old).tags
    again = Tracker(tracker.uri, "made by an older kdsweep")
    assert again.client.get_experiment(old).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    run = tracker.start_run("parent")
    tracker.set_note(run, "| row | AP |\n|---|---|\n| ssim | 6.5 |\n", "ablation.md")
    assert tracker.client.get_run(run).data.tags[NOTE].startswith("| row | AP |")
    tracker.set_note(run, "| a | b |\n" * 2000, "ablation.md")
    note = tracker.client.get_run(run).data.tags[NOTE]
    assert len(note) < 8000 and note.rstrip().endswith("(cut here; the whole table is the artifact ablation.md)")


def test_child_runs_are_named_row_and_seed_with_flat_kd_params():
    from kdsweep.config import ExperimentConfig, KDTermConfig
    from kdsweep.orchestrate.launch import TrialDescriber

    exp = ExperimentConfig(kd=(KDTermConfig("ssim", weight=3.0, params={"alpha": 0.5}), KDTermConfig("l2")))
    name, params, tags, _ = TrialDescriber(rows={"ssim": exp}, samplers={}, role="student")({"row": "ssim", "seed": 2})
    assert name == "ssim / seed 2" and tags["kdsweep.row"] == "ssim" and tags["kdsweep.seed"] == "2"
    assert params["kd.ssim.weight"] == 3.0 and params["kd.ssim.alpha"] == 0.5 and params["kd.l2.weight"] == 1.0


def _open_store(uri: str) -> str:
    from kdsweep.report.tracking import Tracker

    try:
        return Tracker(uri, "together").experiment_id
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"


def test_launches_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path):
    """Two launches into one fresh KDSWEEP_HOME: MLflow creates the SQLite store's tables on first
    use, and processes doing that together failed ("Online migration expected to match one row")."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_open_store, [uri] * 4)
    assert len(set(ids)) == 1 and ids[0].isdigit(), ids


def test_a_resumed_run_that_finishes_no_longer_reads_interrupted(tracker):
    """The parent of a launch stopped with Ctrl-C ends KILLED with "interrupted"; resumed and
    finished, its failure reason is gone (kept as the previous one), not left on a FINISHED run."""
    from kdsweep.report.tracking import TAG_PREVIOUS_REASON, TAG_REASON

    run_id = tracker.start_run("ablation")
    tracker.end_run(run_id, "KILLED", reason="interrupted (Ctrl-C or SIGTERM)")
    tracker.reopen(run_id)
    tracker.end_run(run_id, "FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and TAG_REASON not in run.data.tags
    assert run.data.tags[TAG_PREVIOUS_REASON] == "interrupted (Ctrl-C or SIGTERM)" and run.data.tags["kdsweep.resumed"] == "true"
