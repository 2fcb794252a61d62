"""kdsweep sweep: plans, Tune spaces (Optuna constraints, encoded list choices), result tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kdsweep.cli import main
from kdsweep.config import ConfigError
from kdsweep.orchestrate.search import (
    best_index,
    best_so_far,
    make_plan,
    make_scheduler,
    make_search_alg,
    param_space,
    plot_best_so_far,
    plot_param,
    preview,
    sweep_table,
    to_markdown,
)
from kdsweep.orchestrate.space import experiment_dict, load_space, parse_space

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


def test_list_choices_are_encoded_for_optuna_and_decoded_into_the_config() -> None:
    from ray import tune

    space = tune_space()
    sampler = space.space["kd.0.params.dilations"]
    assert sampler.structured and sampler.encoded() == ["[1, 2, 3]", "[1, 2]"]
    ps = param_space(space, make_plan(space, None, None, 2), [0])
    assert ps["row"] == "sdf + csa" and ps["seed"] == 0  # optuna: constants, no grid_search
    assert isinstance(ps["params"]["kd.0.params.dilations"], tune.search.sample.Categorical)
    assert ps["params"]["kd.0.params.dilations"].categories == ["[1, 2, 3]", "[1, 2]"]
    config = experiment_dict({}, space, "sdf + csa", {"kd.0.params.dilations": "[1, 2]", "kd.0.weight": 0.1}, 0)
    assert config["kd"][0]["params"]["dilations"] == [1, 2] and config["kd"][0]["weight"] == 0.1
    with pytest.raises(ConfigError, match="optuna searches one seed"):
        param_space(space, make_plan(space, None, None, 2), [0, 1])


def test_search_objects() -> None:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    space = tune_space()
    plan = make_plan(space, None, None, 2)
    assert isinstance(make_search_alg(plan, "AP", "max"), OptunaSearch)
    asha = make_scheduler(plan, "AP", "max", max_epochs=4)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 4
    plain = make_plan(parse_space({"rows": [{"label": "a"}]}, "p.yaml"), None, None, 2)
    assert make_search_alg(plain, "AP", "max") is None and make_scheduler(plain, "AP", "max", 4) is None


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


def test_preview_enumerates_grids_and_draws_within_bounds() -> None:
    space = parse_space(
        {"rows": [{"label": "a"}], "space": {"kd.0.weight": {"grid": [1, 2]}, "x.y": {"loguniform": [0.01, 1.0]}}},
        "p.yaml",
    )
    plan = make_plan(space, 2, None, 2)
    trials = preview(space, plan, [0], n=10)
    assert len(trials) == 4  # 1 row x 1 seed x 2 grid values x 2 samples
    assert [t["params"]["kd.0.weight"] for t in trials] == [1, 1, 2, 2]
    assert all(0.01 <= t["params"]["x.y"] <= 1.0 for t in trials)


def records() -> list[dict]:
    stats = {"AP50": 1.0, "AP75": 1.0, "AP_S": 1.0, "AP_M": 1.0, "AP_L": 1.0}
    return [
        {"row": "a", "seed": 0, "params": {"w": 0.5, "d": [1, 2]}, "status": "FINISHED", "AP": 3.0, "timestamp": 30, "training_iteration": 4, **stats},
        {"row": "a", "seed": 0, "params": {"w": 2.0, "d": [1, 2, 3]}, "status": "FINISHED", "AP": 5.0, "timestamp": 10, "training_iteration": 1, **stats},
        {"row": "a", "seed": 0, "params": {"w": 1.0, "d": [1]}, "status": "FAILED", "timestamp": 20, "training_iteration": 0},
        {"row": "a", "seed": 0, "params": {"w": 4.0, "d": [1]}, "status": "FINISHED", "AP": 4.0, "timestamp": 40, "training_iteration": 2, **stats},
    ]


def test_table_is_in_completion_order_with_best_and_best_so_far() -> None:
    space = parse_space({"rows": [{"label": "a"}], "space": {"w": {"uniform": [0, 5]}, "d": {"choice": [[1], [1, 2]]}}}, "s.yaml")
    table = sweep_table(records(), space)
    data = table.to_pydict()
    assert data["trial"] == [1, 2, 3, 4] and data["w"] == [2.0, 1.0, 0.5, 4.0]
    assert data["d"] == ["[1, 2, 3]", "[1]", "[1, 2]", "[1]"]
    assert data["epochs"] == [1, 0, 4, 2] and sum(data["epochs"]) == 7  # trial-epochs (ASHA stops early)
    assert math.isnan(data["AP"][1]) and data["status"][1] == "FAILED"
    assert best_index(table, "AP", "max") == 0 and best_index(table, "AP", "min") == 2
    assert best_so_far(table, "AP", "max") == [5.0, 5.0, 5.0, 5.0]
    assert best_so_far(table, "AP", "min") == [5.0, 5.0, 3.0, 3.0]
    md = to_markdown(table, "AP", "max", "title")
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert [line.split(" | ")[0] for line in body] == ["| 1", "| 4", "| 3", "| 2"]  # best first, failed last
    assert body[-1].endswith("FAILED |")


def test_plots_are_written(tmp_path: Path) -> None:
    space = parse_space({"rows": [{"label": "a"}], "space": {"w": {"uniform": [0, 5]}, "d": {"choice": [[1], [1, 2]]}}}, "s.yaml")
    table = sweep_table(records(), space)
    for param in ("w", "d"):
        path = plot_param(table, param, "AP", tmp_path / f"{param}.png")
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_best_so_far(table, "AP", "max", tmp_path / "best.png").stat().st_size > 1000


@pytest.mark.parametrize("name, trials", [("tune_ssim", 16), ("tune_scalekd", 16), ("ablation_scalekd", 7), ("ablation_ssim", 8)])
def test_dry_run_of_every_shipped_space(name: str, trials: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "search_spaces" / f"{name}.yaml"
    assert main(["sweep", str(path), "--dry-run", "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert f"valid. {trials} trial(s)" in out
    first = yaml.safe_load(out.split("--- trial 1\n", 1)[1].split("--- trial 2", 1)[0])
    assert first["row"] == load_space(path).labels[0]


def test_dry_run_rejects_a_bad_space_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"rows": [{"label": "a", "kd": [{"loss": "csa", "params": {"ratios": [1, 2, 3]}}]}]}))
    assert main(["sweep", str(path), "--dry-run", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiple of the number of ratios" in err and "bad.yaml" in err
