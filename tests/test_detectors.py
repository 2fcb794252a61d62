"""Detector builders: every arch x two backbones trains and predicts; levels, anchors, weights."""

from __future__ import annotations


import pytest
import torch
from torchvision.models import ResNet18_Weights

from kdsweep.config import ConfigError, ModelConfig
from kdsweep.models.detectors import (
    build_detector,
    level_names,
    level_strides,
    parse_weights,
)

K = 3  # object classes, labels 1..K
LOSS_KEYS = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}
LEVELS = {
    "retinanet": {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128},
    "fcos": {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128},
    "fasterrcnn": {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64},
}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(arch="retinanet", backbone="resnet18", fpn_channels=16, min_size=64, max_size=96)
    return ModelConfig(**{**base, **kw})


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([1, 2])},
    ]
    return images, targets


def num_outputs(model: torch.nn.Module, arch: str) -> int:
    if arch == "fasterrcnn":
        return model.roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_train_step_and_eval(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = build_detector(tiny_cfg(arch=arch, backbone=backbone), K)
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS[arch]
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None for p in model.backbone.body.parameters())
    assert num_outputs(model, arch) == K + 1  # labels 1..K for every arch
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert all(int(label) <= K for o in out for label in o["labels"])
    assert level_strides(model) == LEVELS[arch]


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_level_names_and_fpn_width(arch: str) -> None:
    model = build_detector(tiny_cfg(arch=arch, fpn_channels=24), K)
    names = level_names(model)
    expected_keys = ["0", "1", "2", "p6", "p7"] if arch == "retinanet" else ["0", "1", "2", "3", "pool"]
    assert list(names) == expected_keys
    assert list(names.values()) == list(LEVELS[arch])
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert all(f.shape[1] == 24 for f in feats.values())
    assert [f.shape[-1] for f in feats.values()] == [-(-64 // s) for s in LEVELS[arch].values()]


def test_anchor_sizes_follow_anchor_scale() -> None:
    retina = build_detector(tiny_cfg(anchor_scale=2.0), K)
    sizes = retina.anchor_generator.sizes
    assert sizes[0][0] == pytest.approx(16.0) and sizes[-1][0] == pytest.approx(2.0 * 128)
    assert len(sizes[0]) == 3 and retina.anchor_generator.num_anchors_per_location()[0] == 9
    rcnn = build_detector(tiny_cfg(arch="fasterrcnn"), K)
    assert [s[0] for s in rcnn.rpn.anchor_generator.sizes] == [16.0, 32.0, 64.0, 128.0, 256.0]
    assert rcnn.rpn.anchor_generator.num_anchors_per_location()[0] == 3
    fcos = build_detector(tiny_cfg(arch="fcos"), K)  # default anchor_scale 4 = torchvision's FCOS
    assert [s[0] for s in fcos.anchor_generator.sizes] == [8.0, 16.0, 32.0, 64.0, 128.0]


def test_input_size_and_class_count_from_config() -> None:
    model = build_detector(tiny_cfg(min_size=80, max_size=112, num_classes=5), K)
    assert model.transform.min_size == (80,) and model.transform.max_size == 112
    assert num_outputs(model, "retinanet") == 6
    with pytest.raises(ConfigError, match="num_classes"):
        build_detector(tiny_cfg(), 0)


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    source = build_detector(tiny_cfg(), K)
    raw, wrapped = tmp_path / "raw.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), raw)
    torch.save({"model": source.state_dict(), "epoch": 3}, wrapped)
    frozen_bn = tmp_path / "frozen_bn.pt"  # FrozenBatchNorm2d checkpoints lack BN counters
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, frozen_bn)
    for path in (raw, wrapped, frozen_bn):
        torch.manual_seed(1)
        loaded = build_detector(tiny_cfg(weights=str(path)), K)
        for key, value in source.state_dict().items():
            if path != frozen_bn or "num_batches_tracked" not in key:
                assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatching_checkpoint_is_one_line_config_error(tmp_path) -> None:
    path = tmp_path / "fpn16.pt"
    torch.save(build_detector(tiny_cfg(), K).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_detector(tiny_cfg(fpn_channels=32, weights=str(path)), K)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "backbone.fpn" in message
    with pytest.raises(ConfigError, match="not a file"):
        build_detector(tiny_cfg(weights=str(tmp_path / "missing.pt")), K)


def test_trainable_layers_apply_to_pretrained_weights_only(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(build_detector(tiny_cfg(), K).state_dict(), path)
    scratch = build_detector(tiny_cfg(trainable_backbone_layers=2), K)  # random init: all train
    assert all(p.requires_grad for p in scratch.backbone.body.parameters())
    tuned = build_detector(tiny_cfg(trainable_backbone_layers=2, weights=str(path)), K)
    body = tuned.backbone.body
    assert not body.conv1.weight.requires_grad and not body.layer2[0].conv1.weight.requires_grad
    assert body.layer3[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    with pytest.raises(ConfigError, match="trainable_backbone_layers"):
        build_detector(tiny_cfg(trainable_backbone_layers=7, weights=str(path)), K)


def test_unknown_arch_is_config_error() -> None:
    with pytest.raises(ConfigError, match="arch"):
        build_detector(ModelConfig(arch="yolo"), K)
    cfg = tiny_cfg()
    object.__setattr__(cfg, "arch", "yolo")  # bypass the config's own check
    with pytest.raises(ConfigError, match="yolo"):
        build_detector(cfg, K)


def test_torchvision_weight_names_resolve_without_download() -> None:
    src = parse_weights(tiny_cfg(weights="torchvision:ResNet18_Weights.IMAGENET1K_V1"))
    assert src.backbone is ResNet18_Weights.IMAGENET1K_V1 and src.detector is None
    src = parse_weights(tiny_cfg(weights="torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"))
    assert src.detector is not None and src.backbone is None
    with pytest.raises(ConfigError, match="torchvision weights name"):
        parse_weights(tiny_cfg(weights="torchvision:NoSuch_Weights.V1"))
    assert not parse_weights(tiny_cfg()).pretrained



def test_unreadable_checkpoint_is_one_line_config_error(tmp_path) -> None:
    path = tmp_path / "junk.pt"
    path.write_text("not a checkpoint\nsecond line")
    with pytest.raises(ConfigError, match="could not be read") as err:
        build_detector(tiny_cfg(weights=str(path)), K)
    assert "\n" not in str(err.value)


def test_head_norm_puts_groupnorm_in_retinanet_head_towers() -> None:
    from torch import nn

    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector

    plain = build_detector(ModelConfig(fpn_channels=16, min_size=64, max_size=64), 3)
    normed = build_detector(ModelConfig(fpn_channels=16, min_size=64, max_size=64, head_norm=True), 3)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.head.modules())
    norms = [m for m in normed.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 8 for m in norms)  # 4 convs x 2 towers, >= 2 channels per group


def test_head_groups_keep_two_channels_per_group_and_single_image_eval_works() -> None:
    import torch

    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector, head_groups

    assert [head_groups(c) for c in (256, 64, 32, 16, 24, 2)] == [32, 32, 16, 8, 12, 1]
    for arch in ("retinanet", "fcos"):
        model = build_detector(ModelConfig(arch=arch, fpn_channels=32, min_size=128, max_size=128, head_norm=True), 3)
        model.eval()
        with torch.no_grad():
            out = model([torch.rand(3, 128, 128)])  # P7 is 1x1 for one 128 px image
        assert out[0]["boxes"].shape[1] == 4


def test_fasterrcnn_proposal_and_roi_sample_counts_come_from_the_config() -> None:
    light = build_detector(ModelConfig(arch="fasterrcnn", fpn_channels=16, min_size=64, max_size=64, rpn_proposals=50, roi_samples=32), 3)
    assert light.rpn._post_nms_top_n == {"training": 50, "testing": 50}
    assert light.rpn._pre_nms_top_n == {"training": 100, "testing": 100}
    assert light.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    default = build_detector(ModelConfig(arch="fasterrcnn", fpn_channels=16, min_size=64, max_size=64), 3)
    assert default.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    light.train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
    batch, targets = light.transform(images, targets)
    proposals, _ = light.rpn(batch, light.backbone(batch.tensors), targets)
    assert 0 < proposals[0].shape[0] <= 50


def test_fasterrcnn_counts_below_one_are_rejected() -> None:
    with pytest.raises(ConfigError, match="model.rpn_proposals 0 must be >= 1"):
        ModelConfig(arch="fasterrcnn", rpn_proposals=0)
