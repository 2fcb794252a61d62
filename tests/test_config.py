"""Strict typed configuration: unknown keys and wrong types fail with one clear line."""

import pytest

from kdsweep.config import (
    ConfigError,
    ExperimentConfig,
    KDTermConfig,
    ModelConfig,
    config_hash,
    from_dict,
    merge,
    to_dict,
)


def test_round_trip_preserves_every_field():
    cfg = from_dict(
        ExperimentConfig,
        {"student": {"backbone": "resnet34"}, "kd": [{"loss": "ssim", "weight": 2, "levels": ["p3"], "params": {"alpha": 0.5}}]},
    )
    assert cfg.student.backbone == "resnet34"
    assert cfg.kd[0] == KDTermConfig(loss="ssim", weight=2.0, levels=("p3",), params={"alpha": 0.5})
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"student": {"backbon": "resnet18"}}, "config.student.backbon is unknown"),
        ({"student": {"backbone": "vgg"}}, "model.backbone 'vgg' is unknown"),
        ({"student": {"arch": "yolo"}}, "model.arch 'yolo' is unknown"),
        ({"train": {"epochs": "four"}}, "config.train.epochs must be an integer"),
        ({"train": {"lr": -1}}, "train.lr -1.0 must be > 0"),
        ({"train": {"use_gpu": "yes"}}, "must be true or false"),
        ({"kd": [{"weight": 1}]}, "config.kd[0]"),
        ({"kd": [{"loss": "l2", "weight": -1}]}, "negative"),
        ({"kd": {"loss": "l2"}}, "config.kd must be a list"),
        ({"teacher_scale": 0}, "teacher_scale"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(ExperimentConfig, data)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_int_accepts_integral_float_and_float_accepts_int():
    cfg = from_dict(ModelConfig, {"fpn_channels": 32.0, "anchor_scale": 2})
    assert cfg.fpn_channels == 32 and isinstance(cfg.fpn_channels, int)
    assert cfg.anchor_scale == 2.0 and isinstance(cfg.anchor_scale, float)


def test_merge_is_recursive_and_lists_replace():
    base = {"train": {"epochs": 2, "lr": 0.1}, "kd": [{"loss": "l1"}]}
    out = merge(base, {"train": {"epochs": 5}, "kd": []})
    assert out == {"train": {"epochs": 5, "lr": 0.1}, "kd": []}
    assert base["train"]["epochs"] == 2  # input untouched


def test_config_hash_is_stable_and_sensitive():
    a = from_dict(ExperimentConfig, {})
    b = from_dict(ExperimentConfig, {"teacher": {"fpn_channels": 128}})
    assert config_hash(a) == config_hash(from_dict(ExperimentConfig, {}))
    assert config_hash(a) != config_hash(b)
    assert len(config_hash(a)) == 12
