"""Typed row and trial configs (kdsweep.orchestrate.trials): preset <- base <- row <- sampled
values <- seed, built once; validation of every configuration; teacher identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdsweep.config import ConfigError, ExperimentConfig, from_dict, run_hash_dict, teacher_experiment, teacher_model
from kdsweep.orchestrate.preflight import preflight
from kdsweep.orchestrate.space import load_space, parse_space
from kdsweep.orchestrate.trials import apply_sampled, distinct_teachers, row_configs, teacher_hash, trial_config, variants
from kdsweep.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
PRESET = PRESETS["smoke"].experiment
DATA = {"train_ann": "/d/train.json", "val_ann": "/d/val.json", "train_images": "/d/images", "val_images": "/d/images",
        "version": "0123456789abcdef0123"}


def test_ssim_ablation_rows_read_like_the_paper():
    space = load_space(ROOT / "search_spaces" / "ablation_ssim.yaml")
    labels = space.labels
    for label in ("baseline", "l2", "l1", "ssim", "ssim structure-only", "ssim structure+contrast"):
        assert label in labels
    assert sum(label.startswith("ssim window") for label in labels) >= 2
    rows = row_configs(space, PRESET)
    assert list(rows) == labels
    assert rows["baseline"].kd == ()
    assert rows["ssim structure-only"].kd[0].params == {"alpha": 0.0, "beta": 0.0, "gamma": 1.0}
    assert rows["l1"].kd[0].loss == "l1"


def test_rows_override_base_which_overrides_preset_and_the_seed_is_the_trials():
    space = parse_space({"base": {"train": {"epochs": 3}}, "rows": [{"label": "a", "train": {"lr": 0.5}}]}, "x.yaml")
    rows = row_configs(space, PRESET)
    exp = trial_config(rows, {}, {"row": "a", "seed": 7})
    assert exp.train.epochs == 3 and exp.train.lr == 0.5 and exp.train.seed == 7
    assert exp.teacher_train.seed == rows["a"].teacher_train.seed  # the teacher keeps its own
    assert exp.student.min_size == PRESET["student"]["min_size"]


def test_sampled_values_land_on_dotted_paths_including_list_indices_and_are_decoded():
    space = parse_space({"rows": [{"label": "s", "kd": [{"loss": "sdf", "params": {"dilations": [1, 2, 3]}}]}],
                         "space": {"kd.0.params.dilations": {"choice": [[1, 2, 3], [1, 2]]}}}, "x.yaml")
    rows = row_configs(space, PRESET)
    exp = trial_config(rows, space.space, {"row": "s", "params": {"kd.0.params.dilations": "[1, 2]", "kd.0.weight": 4}})
    assert exp.kd[0].params["dilations"] == [1, 2] and exp.kd[0].weight == 4.0  # Tune's JSON choice decoded
    with pytest.raises(ConfigError, match=r"x.yaml: space.kd.1.weight: 'kd.1' does not exist in this row"):
        apply_sampled(rows["s"], {"kd.1.weight": 2.0}, {}, "x.yaml")


def test_every_grid_and_choice_value_is_a_configuration_to_validate():
    samplers = {"kd.0.weight": {"grid": [1, 2]}, "kd.0.params.window_size": {"choice": [5, 7, 9]},
                "kd.0.params.gamma": {"uniform": [0.5, 1.5]}}
    space = parse_space({"rows": [{"label": "a", "kd": [{"loss": "ssim"}]}], "space": samplers}, "x.yaml")
    configs = variants(space, row_configs(space, PRESET))
    assert len(configs) == 2 * 3  # the uniform sampler: its midpoint only
    assert {(e.kd[0].weight, e.kd[0].params["window_size"], e.kd[0].params["gamma"]) for _, e in configs} == \
        {(w, k, 1.0) for w in (1.0, 2.0) for k in (5, 7, 9)}
    two = parse_space({"rows": [{"label": "a", "kd": [{"loss": "ssim"}]}, {"label": "b"}], "space": samplers}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: space.kd.0.weight: 'kd.0' does not exist in this row"):
        variants(two, row_configs(two, PRESET))  # row b has no kd entry for the sampled paths


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
    space = parse_space({"rows": rows}, "bad.yaml")
    with pytest.raises(ConfigError) as info:
        configs = variants(space, row_configs(space, PRESET))  # the configs, then the models
        preflight(configs, 6, space.source)
    assert fragment in str(info.value) and "row 'x'" in str(info.value)


def test_teachers_are_keyed_by_their_own_config():
    space = parse_space({"rows": [{"label": "a", "kd": [{"loss": "l2"}]}, {"label": "b", "kd": [{"loss": "l1"}]},
                                  {"label": "c", "kd": [{"loss": "l2"}], "teacher": {"backbone": "resnet34"}},
                                  {"label": "plain"}]}, "x.yaml")
    rows = row_configs(space, PRESET)
    keys = {label: teacher_hash(exp, DATA) for label, exp in rows.items()}
    assert keys["a"] == keys["b"] != keys["c"]  # the KD terms do not change the teacher; its model does
    assert keys["a"] != teacher_hash(rows["a"], {**DATA, "val_ann": "/other/val.json"})  # nor the data
    teachers = distinct_teachers(rows, DATA)
    assert list(teachers) == [keys["a"], keys["c"]]  # the plain row needs none
    run = teacher_experiment(rows["c"])  # the teacher's own run: the teacher as the student, no KD
    assert run.student == rows["c"].teacher and run.train == rows["c"].teacher_train and run.kd == ()


def test_a_high_resolution_teacher_is_trained_and_run_at_its_resolution_and_is_another_teacher():
    """ScaleKD: "the teacher sees a high-resolution input". The 2x rows' teacher is trained on 2x
    images (not a 1x teacher fed 2x images), so it is not the 1x row's teacher."""
    space = load_space(ROOT / "search_spaces" / "ablation_scalekd.yaml")
    rows = row_configs(space, PRESETS["quick"].experiment)
    at_2x, at_1x = rows["sdf shared + csa"], rows["sdf shared + csa, teacher at student resolution"]
    assert (at_2x.student.min_size, at_2x.teacher_scale, at_1x.teacher_scale) == (128, 2.0, 1.0)
    trained = teacher_experiment(at_2x)  # the teacher's own run
    assert (trained.student.min_size, trained.student.max_size, trained.teacher_scale) == (256, 256, 1.0)
    assert teacher_experiment(at_1x).student.min_size == 128
    assert teacher_hash(at_2x, DATA) != teacher_hash(at_1x, DATA)
    assert list(distinct_teachers(rows, DATA)) == [teacher_hash(at_2x, DATA), teacher_hash(at_1x, DATA)]
    # the 1x teacher is the SSIM ablation's (same preset): trained once, reused across the store
    ssim = row_configs(load_space(ROOT / "search_spaces" / "ablation_ssim.yaml"), PRESETS["quick"].experiment)["ssim"]
    assert teacher_hash(ssim, DATA) == teacher_hash(at_1x, DATA)
    # the distiller runs it at the resolution it was trained at
    from kdsweep.train.model import build_model
    import torch

    with torch.device("meta"):
        teacher = build_model(teacher_experiment(at_2x), 3).student
        distiller = build_model(at_2x, 3, teacher.state_dict())
    assert distiller.teacher.transform.min_size == (256,) and distiller.teacher.transform.max_size == 256
    # Li et al.'s cross-scale mimic: a half-resolution student, a teacher at 2x its resolution, is
    # the full-resolution rows' teacher
    mimic = row_configs(load_space(ROOT / "search_spaces" / "ablation_mimic.yaml"), PRESETS["quick"].experiment)
    assert teacher_model(mimic["cross-scale half-res + deconv mimic"]) == teacher_model(mimic["proposal mimic"])


@pytest.mark.parametrize("path, sampler", [("teacher_scale", {"choice": [1.0, 2.0]}),
                                           ("teacher.backbone", {"choice": ["resnet18", "resnet34"]}),
                                           ("teacher_train.lr", {"loguniform": [0.001, 0.01]}),
                                           ("student.min_size", {"choice": [96, 128]})])
def test_a_sampled_value_that_changes_the_teacher_is_rejected_before_anything_starts(path, sampler):
    """A row's teacher is trained or reused once, before its trials sample: a sampled teacher
    would be silently the row's. Rows may override the teacher; ``space:`` may not."""
    space = parse_space({"rows": [{"label": "a", "kd": [{"loss": "l2"}]}], "space": {path: sampler}}, "x.yaml")
    with pytest.raises(ConfigError, match=rf"x.yaml: space.{path} changes the teacher of row 'a'.*its own row"):
        variants(space, row_configs(space, PRESET))
    # a row without a teacher may sample it, and the KD weight never changes the teacher
    plain = parse_space({"rows": [{"label": "a"}], "space": {path: sampler}}, "x.yaml")
    assert len(variants(plain, row_configs(plain, PRESET))) >= 1
    weight = parse_space({"rows": [{"label": "a", "kd": [{"loss": "l2"}]}], "space": {"kd.0.weight": {"choice": [1, 2]}}}, "x.yaml")
    assert len(variants(weight, row_configs(weight, PRESET))) == 2


def test_loading_and_evaluation_settings_do_not_change_the_teacher_new_fields_only_when_used():
    exp = from_dict(ExperimentConfig, PRESET)
    key = teacher_hash(exp, DATA)

    def with_train(**changes):
        return dataclasses.replace(exp, teacher_train=dataclasses.replace(exp.teacher_train, **changes))

    # how the data is loaded and when it is evaluated: the same weights, the same teacher
    assert teacher_hash(with_train(loader_workers=5, eval_every=0), DATA) == key
    # what is learnt from: another teacher
    assert teacher_hash(with_train(hflip=0.25), DATA) != key and teacher_hash(with_train(lr=0.5), DATA) != key
    # a field added later, at the value that reproduces the earlier behaviour, is not in the hash:
    # a store of an earlier version keeps its teachers (the quick preset's hash did not move)
    legacy = with_train(hflip=0.0, aspect_grouping=0)
    assert "hflip" not in run_hash_dict(legacy.teacher_train) and "aspect_grouping" not in run_hash_dict(legacy.teacher_train)
    assert teacher_hash(with_train(aspect_grouping=3, hflip=0.0), DATA) != teacher_hash(legacy, DATA)


def test_the_quick_and_smoke_teachers_keep_the_hash_of_earlier_versions():
    """Pinned: these hashes name teachers already trained in users' stores (and this repo's
    measured tables); a change of TrainConfig or ModelConfig must not move them by accident."""
    hashes = {name: teacher_hash(from_dict(ExperimentConfig, PRESETS[name].experiment), DATA) for name in ("smoke", "quick")}
    # issue 24 moved them once, on purpose (the data's version and limits joined the hash; before:
    # smoke 97225667c61c, quick e64c77c8db8f with paths alone): every stored teacher retrains once
    assert hashes == {"smoke": "1df45510e881", "quick": "740f49b4a83a"}


MENU = {"rows": [{"label": "methods", "kd": [{"loss": "l2", "weight": 1.0, "adapter": True},
                                            {"loss": "pkd", "weight": 10.0, "adapter": True},
                                            {"loss": "cwd", "weight": 5.0, "adapter": True}]}]}


def test_a_search_over_methods_picks_terms_from_the_rows_menu_then_sets_their_fields():
    space = parse_space(dict(MENU, space={"kd.use": {"choice": [["pkd", "cwd"], ["l2"], []]},
                                          "kd.pkd.weight": {"loguniform": [2.5, 40.0]},
                                          "kd.*.levels": {"choice": [["p3", "p4"], ["p3", "p4", "p5"]]}}), "m.yaml")
    rows = row_configs(space, PRESET)
    sampler = space.space["kd.use"]
    exp = apply_sampled(rows["methods"], {"kd.use": sampler.encoded()[0], "kd.pkd.weight": 3.0,
                                          "kd.*.levels": ["p3", "p4"]}, space.space, "m.yaml")
    assert [(t.loss, t.weight, t.levels) for t in exp.kd] == [("pkd", 3.0, ("p3", "p4")), ("cwd", 5.0, ("p3", "p4"))]
    # a weight sampled for a term the trial did not pick changes nothing
    exp = apply_sampled(rows["methods"], {"kd.use": ["l2"], "kd.pkd.weight": 3.0}, space.space, "m.yaml")
    assert [(t.loss, t.weight) for t in exp.kd] == [("l2", 1.0)]
    assert apply_sampled(rows["methods"], {"kd.use": []}, space.space, "m.yaml").kd == ()
    assert len(variants(space, rows)) == 2 + 2 + 1  # with no term picked, the levels change nothing: listed once


@pytest.mark.parametrize("space, fragment", [
    ({"kd.use": {"choice": [["fgd"]]}}, "'fgd' is not one of the row's kd terms (l2, pkd, cwd)"),
    ({"kd.use": {"choice": [["pkd", "pkd"]]}}, "names a term twice"),
    ({"kd.fgd.weight": {"uniform": [0.1, 1.0]}}, "space.kd.fgd.weight: the row has no kd term 'fgd'"),
    ({"kd.use": {"choice": [["pkd"]]}, "kd.0.weight": {"uniform": [0.1, 1.0]}},
     "space.kd.0.weight: with kd.use the kd list depends on the trial; name the term instead (kd.<loss>.weight)"),
])
def test_a_method_path_the_menu_cannot_serve_is_refused_before_anything_starts(space, fragment):
    parsed = parse_space(dict(MENU, space=space), "m.yaml")
    with pytest.raises(ConfigError) as err:
        variants(parsed, row_configs(parsed, PRESET))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("max_train_images", 50), ("max_val_images", 10)])
def test_a_teacher_trained_on_fewer_images_is_another_teacher(field, value):
    """Issue 24: the limits were not in the hash, so a teacher trained on 50 images was reused for
    a full-data ablation (and the other way round)."""
    exp = from_dict(ExperimentConfig, PRESET)
    limited = dataclasses.replace(exp, data=dataclasses.replace(exp.data, **{field: value}))
    assert teacher_hash(limited, DATA) != teacher_hash(exp, DATA)
    other = dataclasses.replace(exp, data=dataclasses.replace(exp.data, **{field: value + 1}))
    assert teacher_hash(other, DATA) != teacher_hash(limited, DATA)
    assert teacher_hash(limited, {**DATA, "version": "another"}) != teacher_hash(limited, DATA)  # nor the version


def test_a_teacher_is_not_keyed_without_the_datas_version():
    exp = from_dict(ExperimentConfig, PRESET)
    paths_only = {k: v for k, v in DATA.items() if k != "version"}
    with pytest.raises(ValueError, match=r"teacher_hash: the resolved data lacks version; .*data_version"):
        teacher_hash(exp, paths_only)


def test_a_dataset_edited_at_the_same_path_names_another_teacher_at_the_next_launch(tmp_path, monkeypatch):
    """Issue 24, end to end on the driver: ``prepare`` resolves the data once (absolute paths and
    its version, handed down to the workers in ``data``); an annotation file edited in place gives
    the next launch another teacher hash, a byte-identical rewrite the same one."""
    import argparse
    import json

    from kdsweep.data.synthetic import generate
    from kdsweep.orchestrate.launch import add_arguments, prepare

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    root = tmp_path / "ds"
    generate(root, train=8, val=2, size=64, seed=0, progress=False, workers=1)  # the smoke batch: 8 images
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "ablation_ssim.yaml"))
    add_arguments(parser)
    args = parser.parse_args(["--preset", "smoke", "--rows", "ssim", "--data", str(root)])

    def launch_key() -> tuple[str, dict[str, str]]:
        prepared = prepare(args)
        return teacher_hash(prepared.rows["ssim"], prepared.data), prepared.data

    before, data = launch_key()
    text = (root / "train.json").read_text()
    (root / "train.json").write_text(text)  # rewritten, same bytes: the same teacher
    assert launch_key()[0] == before
    edited = json.loads(text)
    edited["annotations"] = edited["annotations"][1:]  # one box dropped, same path
    (root / "train.json").write_text(json.dumps(edited))
    assert launch_key()[0] != before
    assert data["train_ann"] == str(root.resolve() / "train.json") and len(data["version"]) == 20
