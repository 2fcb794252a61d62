"""Search-space YAML: rows, samplers, strict errors, Tune mapping."""

from pathlib import Path

import pytest
from ray import tune

from kdsweep.config import ConfigError
from kdsweep.presets import PRESETS
from kdsweep.orchestrate.space import (
    build_experiment,
    count_grid_trials,
    load_space,
    parse_space,
    tune_param_space,
    validate_space,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET = PRESETS["smoke"].experiment


def test_ssim_ablation_rows_read_like_the_paper():
    space = load_space(ROOT / "search_spaces" / "ablation_ssim.yaml")
    labels = space.labels
    for label in ("baseline", "l2", "l1", "ssim", "ssim structure-only", "ssim structure+contrast"):
        assert label in labels
    assert sum(label.startswith("ssim window") for label in labels) >= 2
    configs = validate_space(space, PRESET)
    assert [label for label, _ in configs] == labels
    by_label = dict(configs)
    assert by_label["baseline"].kd == ()
    assert by_label["ssim structure-only"].kd[0].params == {"alpha": 0.0, "beta": 0.0, "gamma": 1.0}
    assert by_label["l1"].kd[0].loss == "l1"


def test_rows_override_base_which_overrides_preset():
    space = parse_space({"base": {"train": {"epochs": 3}}, "rows": [{"label": "a", "train": {"lr": 0.5}}]}, "x.yaml")
    exp = build_experiment(PRESET, space, "a", {}, seed=7)
    assert exp.train.epochs == 3 and exp.train.lr == 0.5 and exp.train.seed == 7
    assert exp.student.min_size == PRESET["student"]["min_size"]


def test_sampled_values_land_on_dotted_paths_including_list_indices():
    space = parse_space({"rows": [{"label": "s", "kd": [{"loss": "ssim"}]}], "space": {"kd.0.params.gamma": {"uniform": [0.5, 1.0]}}}, "x.yaml")
    exp = build_experiment(PRESET, space, "s", {"kd.0.params.gamma": 0.75, "kd.0.weight": 4}, seed=None)
    assert exp.kd[0].params["gamma"] == 0.75 and exp.kd[0].weight == 4.0


def test_samplers_map_to_tune():
    space = parse_space(
        {
            "space": {
                "a": {"grid": [1, 2]},
                "b": {"choice": ["x", "y"]},
                "c": {"uniform": [0, 1]},
                "d": {"loguniform": [0.01, 1]},
                "e": {"randint": [1, 4]},
            }
        },
        "x.yaml",
    )
    ps = tune_param_space(space, seeds=[0, 1])
    assert ps["row"] == {"grid_search": ["default"]}
    assert ps["seed"] == {"grid_search": [0, 1]}
    assert ps["params"]["a"] == {"grid_search": [1, 2]}
    assert isinstance(ps["params"]["b"], tune.search.sample.Categorical)
    assert isinstance(ps["params"]["c"], tune.search.sample.Float)
    assert ps["params"]["d"].lower == 0.01 and ps["params"]["d"].upper == 1
    assert isinstance(ps["params"]["e"], tune.search.sample.Integer)
    assert count_grid_trials(space, seeds=2) == 4


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"rowz": []}, "key 'rowz' is unknown"),
        ({"space": {"a": {"normal": [0, 1]}}}, "sampler 'normal' is unknown"),
        ({"space": {"a": {"uniform": [1]}}}, "needs two numbers"),
        ({"space": {"a": {"grid": []}}}, "is empty"),
        ({"space": {"a": {"uniform": [2, 1]}}}, "need low < high"),
        ({"space": {"a": {"loguniform": [0, 1]}}}, "must be > 0"),
        ({"space": {"a": {"randint": [0.5, 3]}}}, "must be integers"),
        ({"rows": [{"kd": []}]}, "needs a non-empty 'label'"),
        ({"rows": [{"label": "a"}, {"label": "a"}]}, "used twice"),
        ({"search": {"algorithm": "optuna"}, "space": {"a": {"grid": [1]}}}, "optuna cannot search a grid"),
        ({"search": {"algorithm": "hyperopt"}}, "search.algorithm"),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_bad_space_files_fail_with_one_line(data, fragment):
    with pytest.raises(ConfigError) as info:
        parse_space(data, "bad.yaml")
    assert fragment in str(info.value) and str(info.value).startswith("bad.yaml")


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"label": "x", "kd": [{"loss": "ssimm"}]}], "kd[0].loss 'ssimm' is unknown"),
        ([{"label": "x", "kd": [{"loss": "ssim", "params": {"alfa": 1}}]}], "alfa"),
        ([{"label": "x", "kd": [{"loss": "l2", "weight": -2}]}], "negative"),
        ([{"label": "x", "student": {"backbone": "vgg16"}}], "vgg16"),
    ],
)
def test_validation_catches_bad_rows_before_anything_starts(rows, fragment):
    from kdsweep.orchestrate.preflight import preflight

    space = parse_space({"rows": rows}, "bad.yaml")
    with pytest.raises(ConfigError) as info:
        preflight(validate_space(space, PRESET), 6, space.source)  # the configs, then the models
    assert fragment in str(info.value) and "row 'x'" in str(info.value)


def test_non_yaml_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [\n  - {label: a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)
    with pytest.raises(ConfigError, match="no such search-space file"):
        load_space(tmp_path / "missing.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)
