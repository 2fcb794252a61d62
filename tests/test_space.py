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


@pytest.mark.parametrize("value, tag", [("!!python/object/apply:os.system ['echo hacked']", "!!python/object/apply:os.system"),
                                        ("!!python/object:os.system {}", "!!python/object:os.system"),
                                        ("!custom 1", "!custom"),
                                        ("!!int x", "!!int"),  # safe_load: a ValueError traceback
                                        ("!!timestamp soon", "!!timestamp")])  # safe_load: an AttributeError
def test_yaml_tags_are_not_executed_and_the_line_says_tags_are_not_allowed(tmp_path, value, tag):
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"rows:\n  - label: a\nname: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_space(bad)
    assert str(info.value) == (f"{bad}: the YAML tag {tag} at line 3 is not allowed: a search-space file holds plain data "
                               "(mappings, lists, strings, numbers); remove the tag")


@pytest.mark.parametrize("data, source, shown, suggestion", [
    ({"name": "it's mine"}, "x.yaml", "name \"it's mine\"", "'it_s_mine'"),  # --resume's MLflow filter quotes with '
    ({"name": "../../etc"}, "x.yaml", "name '../../etc'", "'etc'"),  # the Tune folder, the experiment's artifacts
    ({"name": "a/b"}, "x.yaml", "name 'a/b'", "'a_b'"),
    ({}, "/spaces/my space.yaml", "name (taken from the file name; set name:) 'my space'", "'my_space'"),
])
def test_a_space_name_that_would_break_paths_or_mlflow_filters_is_refused_in_one_line(data, source, shown, suggestion):
    with pytest.raises(ConfigError) as info:
        parse_space({**data, "rows": [{"label": "a"}]}, source)
    assert str(info.value) == (f"{source}: {shown} may hold only letters, digits, '_', '-' and '.', starting with a letter "
                               f"or digit (it names folders and MLflow queries); use e.g. {suggestion}")


def test_every_shipped_space_name_is_a_valid_name():
    for path in sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")):
        assert load_space(path).name == path.stem
    assert parse_space({"name": "v1.2_ssim-tune", "rows": [{"label": "a"}]}, "x.yaml").name == "v1.2_ssim-tune"


# ------------------------------------------------------------------- each ablation's own paper setting
def _prepared(space: str, preset: str):
    import argparse

    from kdsweep.orchestrate.launch import add_arguments, prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("space")
    add_arguments(parser)
    root = Path(__file__).resolve().parents[1]
    return prepare(parser.parse_args([str(root / "search_spaces" / f"{space}.yaml"), "--preset", preset]), with_data=False)


def test_each_ablation_states_its_papers_setting_and_number_beside_its_rows():
    scalekd = _prepared("ablation_scalekd", "paper")
    # ScaleKD: the backbone frozen for 10k and the assistant joining at 30k of 90k iterations
    assert {exp.train.freeze_backbone for exp in scalekd.rows.values()} == {0.11}
    assert {t.params["start"] for exp in scalekd.rows.values() for t in exp.kd if t.loss == "csa"} == {0.33}
    assert "37.4 AP / 20.0 AP_S" in scalekd.space.reproduces("paper")
    quick = _prepared("ablation_scalekd", "quick")  # the file's paper setting stays in paper
    assert {exp.train.freeze_backbone for exp in quick.rows.values()} == {0.0} and quick.space.reproduces("quick") == ""
    mimic = _prepared("ablation_mimic", "paper")  # Li et al.: the small network from random initialisation
    scratch = {label: (exp.student.weights, exp.student.trainable_backbone_layers) for label, exp in mimic.rows.items()}
    assert scratch.pop("baseline from ImageNet backbone")[0].startswith("torchvision:ResNet50")  # and its ImageNet baseline
    assert set(scratch.values()) == {(None, 5)}
    assert "baseline from ImageNet backbone" not in _prepared("ablation_mimic", "quick").rows  # nothing to download there
    assert _prepared("ablation_ssim", "paper").rows["ssim"].student.weights.startswith("torchvision:ResNet50")
    for space in ("ablation_ssim", "ablation_scalekd", "ablation_mimic", "ablation_mimicdet"):
        assert load_space(Path(__file__).resolve().parents[1] / "search_spaces" / f"{space}.yaml").reproduces("paper")


@pytest.mark.parametrize("presets, fragment", [
    ({"papr": {}}, "presets.papr is not a preset; use one of smoke, quick, paper"),
    ({"paper": {"experiment": {}, "note": 1}}, "presets.paper.note is unknown; known keys: reproduces, experiment"),
    ({"paper": {"experiment": [1]}}, "presets.paper.experiment must be a mapping"),
    ({"paper": {"reproduces": 40.1}}, "presets.paper.reproduces must be a string"),
])
def test_bad_presets_blocks_fail_with_one_line(presets, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_space({"rows": [{"label": "a"}], "presets": presets}, "x.yaml")


def test_the_dry_run_prints_the_papers_number_of_the_preset(capsys):
    from kdsweep.orchestrate.ablation import run_ablation

    root = Path(__file__).resolve().parents[1]
    assert run_ablation(root / "search_spaces" / "ablation_ssim.yaml", ["--preset", "paper", "--dry-run"]) == 0
    assert "the paper reports (paper setting): COCO 2017 1x, RetinaNet R101 -> R50: baseline 36.4 AP" in capsys.readouterr().out


def test_a_row_may_exist_in_named_presets_only():
    """The SSIM write-up's adapter-off row needs equal FPN widths: the paper setting has them, the
    CPU presets' students are narrower than their teachers."""
    ssim = _prepared("ablation_ssim", "paper")
    assert "ssim without adapter" in ssim.rows and not ssim.rows["ssim without adapter"].kd[0].adapter
    assert ssim.rows["ssim without adapter"].student.fpn_channels == ssim.rows["ssim without adapter"].teacher.fpn_channels
    assert "ssim without adapter" not in _prepared("ablation_ssim", "quick").rows
    assert {t.params.get("normalize") for exp in ssim.rows.values() for t in exp.kd if t.loss in ("l1", "l2")} == {"minmax"}
    with pytest.raises(ConfigError, match=r"rows\[0\] \('a'\) presets must be a non-empty list of smoke, quick, paper"):
        parse_space({"rows": [{"label": "a", "presets": ["big"]}]}, "x.yaml")
