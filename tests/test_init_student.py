"""Issue 24 point 6: init_student (MGD's and FGD's protocol) and the baselines rows' levels and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsweep.config import ConfigError, ExperimentConfig, from_dict, merge, run_hash_dict
from kdsweep.models.detectors import build_detector
from kdsweep.models.init_student import copy_neck_and_head, is_neck_or_head
from kdsweep.orchestrate.space import load_space, parse_space
from kdsweep.orchestrate.trials import row_configs
from kdsweep.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64}


def _detector(seed: int, **over: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_detector(from_dict(ExperimentConfig, {"student": {**SMALL, **over}}).student, 3)


def test_copies_exactly_the_matching_neck_and_head_tensors_not_the_backbone() -> None:
    teacher, student = _detector(0), _detector(1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = copy_neck_and_head(student, teacher)
    after, source = student.state_dict(), teacher.state_dict()
    neck_head = [k for k in after if is_neck_or_head(k)]
    assert any(k.startswith("backbone.fpn.") for k in neck_head) and any(k.startswith("head.") for k in neck_head)
    assert sorted(report.copied) == sorted(neck_head) and not report.skipped
    for name, value in after.items():
        if name in neck_head:
            assert torch.equal(value, source[name]), name
        else:  # the backbone body keeps the student's own weights
            assert name.startswith("backbone.body.")
            assert torch.equal(value, before[name]), name
    changed = [k for k in neck_head if k.endswith("weight") and not torch.equal(before[k], source[k])]
    assert changed  # the two seeds differ, so the copy did something


def test_copies_only_the_tensors_whose_shape_matches() -> None:
    # another class count: the classification logits differ in shape, everything else matches
    teacher = _detector(0)
    torch.manual_seed(1)
    student = build_detector(from_dict(ExperimentConfig, {"student": SMALL}).student, 5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.warns(UserWarning, match="init_student"):
        report = copy_neck_and_head(student, teacher)
    logits = [k for k in before if "cls_logits" in k]
    assert sorted(report.skipped) == sorted(logits)
    for k in logits:
        assert torch.equal(student.state_dict()[k], before[k])
    assert "head.regression_head.bbox_reg.weight" in report.copied


def test_nothing_matching_is_an_error() -> None:
    teacher, student = _detector(0, fpn_channels=32, head_norm=True), _detector(1, fpn_channels=16, head_norm=True)
    with pytest.raises(ConfigError, match="init_student"):
        copy_neck_and_head(student, {"backbone.body.conv1.weight": torch.zeros(1)})
    # widths differ: only biases of the output convs could match; the copy warns about the rest
    with pytest.warns(UserWarning):
        report = copy_neck_and_head(student, teacher)
    assert all(k.endswith("bias") for k in report.copied)


def test_config_field_and_its_checks() -> None:
    kd = [{"loss": "l2"}]
    exp = from_dict(ExperimentConfig, {"kd": kd, "train": {"init_student": True}})
    assert exp.train.init_student is True
    with pytest.raises(ConfigError, match="init_student must be true or false"):
        from_dict(ExperimentConfig, {"kd": kd, "train": {"init_student": "yes"}})
    with pytest.raises(ConfigError, match="needs kd"):
        from_dict(ExperimentConfig, {"train": {"init_student": True}})
    with pytest.raises(ConfigError, match="teacher_train.init_student"):
        from_dict(ExperimentConfig, {"kd": kd, "teacher_train": {"init_student": True}})
    # a stored teacher's hash does not change with the new field at its default
    assert "init_student" not in run_hash_dict(exp.teacher_train)


def _rows(preset: str) -> dict[str, ExperimentConfig]:
    space = load_space(ROOT / "search_spaces" / "ablation_baselines.yaml").for_preset(preset)
    return row_configs(space, merge(PRESETS[preset].experiment, space.preset_experiment(preset)))


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_pkd_and_cwd_rows_distil_p3_to_p6(preset: str) -> None:
    rows = _rows(preset)
    for label in ("pkd", "cwd"):
        (term,) = rows[label].kd
        assert term.levels == ("p3", "p4", "p5", "p6"), (preset, label)


def test_mgd_and_fgd_paper_rows_follow_the_authors_protocol() -> None:
    rows = _rows("paper")
    for label in ("mgd", "fgd"):
        assert rows[label].train.init_student and rows[label].train.grad_clip == 35.0
        assert rows[label].teacher.fpn_channels == rows[label].student.fpn_channels  # where widths match
    assert not rows["pkd"].train.init_student and rows["pkd"].train.grad_clip is None
    assert (rows["mgd"].kd[0].weight, rows["fgd"].kd[0].weight) == (2.0e-5, 1.0)
    space = load_space(ROOT / "search_spaces" / "ablation_baselines.yaml")
    assert "init_student" in space.reproduces("paper")


CPU_RULE = 1 / 100  # ablation_baselines.yaml: weight_cpu = weight_paper / 100


@pytest.mark.parametrize("preset", ["smoke", "quick"])
def test_cpu_mgd_and_fgd_weights_follow_the_stated_rule(preset: str) -> None:
    paper, cpu = _rows("paper"), _rows(preset)
    for label in ("mgd", "fgd"):
        assert cpu[label].kd[0].weight == pytest.approx(paper[label].kd[0].weight * CPU_RULE), (preset, label)
        assert cpu[label].kd[0].params == paper[label].kd[0].params
        assert not cpu[label].train.init_student
    tune = load_space(ROOT / "search_spaces" / "tune_methods.yaml")
    for label in ("mgd", "fgd"):  # the search reaches the CPU weight
        low, high = tune.space[f"kd.{label}.weight"].args
        assert low <= cpu[label].kd[0].weight <= high


def test_element_count_ratio_stated_in_the_yaml() -> None:
    """The YAML's comment gives sum_l C H_l W_l on quick (21,824) and smoke's ratio (425): pin them
    to the presets' real teacher FPN maps at their input size."""
    text = (ROOT / "search_spaces" / "ablation_baselines.yaml").read_text()
    counts = {}
    for preset in ("quick", "smoke"):
        exp = from_dict(ExperimentConfig, PRESETS[preset].experiment)
        teacher = build_detector(exp.teacher, 3).eval()
        with torch.no_grad():
            maps = teacher.backbone(torch.zeros(1, 3, exp.teacher.min_size, exp.teacher.max_size))
        counts[preset] = sum(m[0].numel() for m in maps.values())
    paper = 256 * (100 * 136 + 50 * 68 + 25 * 34 + 13 * 17 + 7 * 9)
    assert f"{paper:,}" in text and f"{counts['quick']:,}" in text
    assert f"{round(paper / counts['quick'])}" in text and f"{round(paper / counts['smoke'])}" in text


def test_one_label_for_rows_of_disjoint_presets() -> None:
    rows = [{"label": "a", "presets": ["paper"]}, {"label": "a", "presets": ["quick"]}]
    space = parse_space({"rows": rows}, "x.yaml")
    assert [r.presets for r in space.for_preset("quick").rows] == [("quick",)]
    for clash in ([{"label": "a", "presets": ["paper"]}, {"label": "a", "presets": ["paper", "quick"]}],
                  [{"label": "a"}, {"label": "a", "presets": ["quick"]}]):
        with pytest.raises(ConfigError, match="used twice"):
            parse_space({"rows": clash}, "x.yaml")
