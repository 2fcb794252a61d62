"""Search-space YAML (kdsweep.orchestrate.space): rows, samplers, strict errors, the Tune mapping."""

from pathlib import Path

import pytest
from ray import tune

from kdsweep.config import ConfigError
from kdsweep.orchestrate.space import load_space, parse_space
from kdsweep.orchestrate.trials import count_trials, tune_param_space

ROOT = Path(__file__).resolve().parents[1]


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
    assert count_trials(space, seeds=2) == 4


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
