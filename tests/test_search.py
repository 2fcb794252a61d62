"""kdsweep sweep (kdsweep.orchestrate.search): plans, Tune spaces (Optuna constraints, encoded list
choices), the search block's errors, --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdsweep.cli import main
from kdsweep.config import ConfigError
from kdsweep.orchestrate.search import make_plan, param_space
from kdsweep.orchestrate.space import load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent


def tune_space(**search):
    return parse_space(
        {
            "name": "t",
            "rows": [{"label": "sdf + csa", "kd": [{"loss": "sdf", "params": {"dilations": [1, 2, 3]}}]}],
            "space": {
                "kd.0.weight": {"loguniform": [0.001, 1.0]},
                "kd.0.params.dilations": {"choice": [[1, 2, 3], [1, 2]]},
            },
            "search": {"algorithm": "optuna", "scheduler": "asha", "num_samples": 5, **search},
        },
        "t.yaml",
    )


def test_plan_takes_the_file_then_the_command_line() -> None:
    space = tune_space(grace_period=2, reduction_factor=3)
    plan = make_plan(space, None, None, preset_concurrent=2)
    assert (plan.algorithm, plan.scheduler, plan.num_samples, plan.grace_period, plan.reduction_factor) == ("optuna", "asha", 5, 2, 3)
    assert make_plan(space, 9, 4, 2).num_samples == 9 and make_plan(space, 9, 4, 2).max_concurrent == 4
    with pytest.raises(ConfigError, match="--num-samples"):
        make_plan(space, 0, None, 2)


def test_asha_counts_the_reported_epoch_not_tunes_report_count() -> None:
    """training_iteration counts reports: it restarts at 1 for a trial resumed from its Train
    checkpoint, and counts the checkpoint's replayed epoch (kdsweep.names.REPLAYED)."""
    from kdsweep.orchestrate.search import make_scheduler

    plan = make_plan(tune_space(grace_period=1), None, None, preset_concurrent=1)
    scheduler = make_scheduler(plan, 4)
    assert scheduler._time_attr == "epoch" and scheduler._max_t == 4


def test_list_choices_are_encoded_for_optuna_and_decoded_into_the_config() -> None:
    from ray import tune

    space = tune_space()
    sampler = space.space["kd.0.params.dilations"]
    assert sampler.structured and sampler.encoded() == ["[1, 2, 3]", "[1, 2]"]
    ps = param_space(space, make_plan(space, None, None, 2), [0])
    assert ps["row"] == "sdf + csa" and ps["seed"] == 0  # optuna: constants, no grid_search
    assert isinstance(ps["params"]["kd.0.params.dilations"], tune.search.sample.Categorical)
    assert ps["params"]["kd.0.params.dilations"].categories == ["[1, 2, 3]", "[1, 2]"]
    with pytest.raises(ConfigError, match="optuna searches one seed"):
        param_space(space, make_plan(space, None, None, 2), [0, 1])


def test_search_block_errors_name_the_file_and_field() -> None:
    base = {"rows": [{"label": "a"}], "space": {"kd.0.weight": {"uniform": [0, 1]}}}
    bad = [
        ({"algorithm": "hyperopt"}, "search.algorithm must be random or optuna"),
        ({"scheduler": "pbt"}, "search.scheduler must be fifo or asha"),
        ({"num_samples": 0}, "search.num_samples must be an integer >= 1"),
        ({"reduction_factor": 1}, "search.reduction_factor must be an integer >= 2"),
        ({"grace": 1}, "search.grace is unknown"),
    ]
    for search, message in bad:
        with pytest.raises(ConfigError, match=f"^x.yaml: {message}"):
            parse_space({**base, "search": search}, "x.yaml")
    with pytest.raises(ConfigError, match="optuna searches one configuration"):
        parse_space({"rows": [{"label": "a"}, {"label": "b"}], "search": {"algorithm": "optuna"}}, "x.yaml")


@pytest.mark.parametrize("name, trials", [("tune_ssim", 16), ("tune_scalekd", 16), ("ablation_scalekd", 8), ("ablation_ssim", 8),
                                         ("tune_methods", 24), ("ablation_baselines", 8)])
def test_dry_run_of_every_shipped_space(name: str, trials: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "search_spaces" / f"{name}.yaml"
    space = load_space(path).for_preset("smoke")  # the rows that exist in this preset
    assert main(["sweep", str(path), "--dry-run", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"valid. {trials} trial(s)" in out[0]
    assert out[1].startswith("  data: synthetic")
    rows = [line.split(":")[0].strip() for line in out[2:] if not line.startswith(("  space:", "  ("))]
    assert rows == space.labels  # one line per row: its teacher and student as the trials build them
    searched = [line for line in out if line.startswith("  space: ")]
    assert [line.split()[1] for line in searched] == list(space.space)  # what is searched, and how


def test_dry_run_rejects_a_bad_space_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"rows": [{"label": "a", "kd": [{"loss": "csa", "params": {"ratios": [1, 2, 3]}}]}]}))
    assert main(["sweep", str(path), "--dry-run", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiple of the number of ratios" in err and "bad.yaml" in err


@pytest.mark.slow
def test_a_small_optuna_asha_search_whose_best_config_reproduces_its_best_trial(tmp_path: Path) -> None:
    """A real search (Optuna TPE, ASHA after each epoch) on the smoke task writes best_config.yaml:
    the whole config of its best trial, as that trial's worker got it; launched again as a one-row
    ablation it reproduces the trial (same teacher, same seed: the same AP, bit for bit)."""
    import os
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    from kdsweep.config import ExperimentConfig, from_dict

    space = {"name": "tiny_sweep", "base": {"train": {"epochs": 2}},
             "rows": [{"label": "ssim", "kd": [{"loss": "ssim", "weight": 3.0, "adapter": True}]}],
             "space": {"kd.0.weight": {"loguniform": [0.5, 8.0]}, "kd.0.params.window_size": {"choice": [5, 7]}},
             "search": {"algorithm": "optuna", "scheduler": "asha", "num_samples": 3, "grace_period": 1,
                        "reduction_factor": 2, "seed": 0}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), str(tmp_path / "tiny.yaml"), "--preset",
                           "smoke", "--tracking-uri", uri, "--experiment", "search", "--summary-json",
                           str(tmp_path / "summary.json")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["failed"] == 0 and 3 <= summary["trial_epochs"] <= 6
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kdsweep.role") == "sweep")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.md", "sweep.parquet", "best_config.yaml", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/AP_vs_kd_0_weight.png", "plots/AP_vs_kd_0_params_window_size.png", "plots/best_so_far.png"}
    best_yaml = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))))
    students = [r for r in runs if r.data.tags.get("kdsweep.role") == "student"]
    best = max((r for r in students if r.info.status == "FINISHED"), key=lambda r: r.data.metrics["AP"])
    assert best.data.metrics["AP"] == pytest.approx(summary["best"])
    trial_config = json.load(open(client.download_artifacts(best.info.run_id, "config.json", str(tmp_path / "c"))))
    assert from_dict(ExperimentConfig, best_yaml) == from_dict(ExperimentConfig, trial_config)

    rerun = {"name": "rerun", "base": best_yaml, "rows": [{"label": "best"}]}
    (tmp_path / "rerun.yaml").write_text(yaml.safe_dump(rerun))
    again = subprocess.run([sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--space", str(tmp_path / "rerun.yaml"),
                            "--preset", "smoke", "--tracking-uri", uri, "--experiment", "rerun", "--no-throughput"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "reusing teacher run" in again.stdout
    [child] = [r for r in client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
               if r.data.tags.get("kdsweep.role") == "student"]
    first_epoch = {m.step: m.value for m in client.get_metric_history(best.info.run_id, "AP")}[1]
    assert {m.step: m.value for m in client.get_metric_history(child.info.run_id, "AP")}[1] == first_epoch


def test_a_sweep_evaluates_every_epoch_whatever_the_rows_say() -> None:
    """ASHA and the searchers read the metric at every report: a paper row's eval_every 0 becomes 1,
    with a note; a row that already evaluates every epoch is left alone."""
    import argparse

    from kdsweep.orchestrate.launch import add_arguments, prepare
    from kdsweep.orchestrate.search import evaluate_every_epoch

    parser = argparse.ArgumentParser()
    parser.add_argument("space")
    add_arguments(parser)
    for preset, changed in (("paper", True), ("smoke", False)):
        args = parser.parse_args([str(ROOT / "search_spaces" / "tune_ssim.yaml"), "--preset", preset])
        prepared = prepare(args, with_data=False)
        notes = evaluate_every_epoch(prepared)
        assert all(exp.train.eval_every == 1 for exp in prepared.rows.values())
        assert bool(notes) == changed and all("eval_every 0 -> 1" in n for n in notes)
