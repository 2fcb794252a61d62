"""benchmarks/cost_model.py: its FLOP counts and the direction of every change it models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost_model  # noqa: E402
from kdsweep.config import ModelConfig  # noqa: E402


def test_flops_follow_the_architecture_and_the_pixels():
    r50 = ModelConfig(arch="retinanet", backbone="resnet50", fpn_channels=256, min_size=800, max_size=1333)
    r101 = ModelConfig(arch="retinanet", backbone="resnet101", fpn_channels=256, min_size=800, max_size=1333)
    assert cost_model.input_size(r50) == (800, 1067)  # COCO's 640x480 at 800/1333
    f50 = cost_model.forward_flops(r50, (800, 1067))
    # mmdetection's get_flops: 239 GMACs for RetinaNet R50 at 1280x800; per pixel the same here (2 FLOPs a MAC)
    assert f50 / (800 * 1088) == pytest.approx(2 * 239e9 / (1280 * 800), rel=0.03)
    assert cost_model.forward_flops(r101, (800, 1067)) > f50
    assert cost_model.forward_flops(r50, (400, 533)) == pytest.approx(f50 / 4, rel=0.05)


def test_the_model_charges_padding_decoding_and_evaluation_before_and_not_after():
    row = cost_model.Row("r", train_flops=3e12, eval_flops=1e12, teacher=False)
    args = {"decode_ms": 4.1, "cocoeval_s": (52.0, 6.3)}
    before = cost_model.trial_hours(row, 2e13, before=True, **args)
    after = cost_model.trial_hours(row, 2e13, before=False, **args)
    steps = cost_model.EPOCHS * (cost_model.TRAIN_IMAGES // 16)
    pure = steps * 2 * 3e12 / 2e13 / 3600  # every GPU's 2 images per step, nothing else
    assert pure < after < before
    assert after == pytest.approx(pure / (1 - cost_model.PAD_AFTER) + (cost_model.VAL_IMAGES / 8 * 1e12 / (1 - cost_model.PAD_AFTER) / 2e13 + 6.3) / 3600)


def test_the_speed_is_an_estimate_until_a_gpu_run_calibrates_it_and_then_names_that_gpu(tmp_path):
    import json

    r50 = ModelConfig(arch="retinanet", backbone="resnet50", fpn_channels=256, min_size=800, max_size=1333)
    coco = cost_model.input_size(r50)
    ref = cost_model.forward_flops(r50, coco)
    speed, source = cost_model.device_speed(ref, 16.0, None, r50, coco)
    assert speed == pytest.approx(3 * ref * 16) and source.startswith("ESTIMATE")
    gpu = {"device": "NVIDIA H100 80GB HBM3", "quick": False,
           "sections": {"paper_step": {"paper_loader": {"ms_per_step": 250.0}}}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    r101 = cost_model.forward_flops(ModelConfig(arch="retinanet", backbone="resnet101", fpn_channels=256, min_size=800,
                                                max_size=1333), coco)
    speed, source = cost_model.device_speed(ref, 16.0, str(tmp_path / "gpu.json"), r50, coco)
    assert speed == pytest.approx((3 * ref + r101) * 2 / 0.25) and "measured on NVIDIA H100 80GB HBM3" in source
    (tmp_path / "cpu.json").write_text(json.dumps({**gpu, "device": "cpu", "quick": True}))
    with pytest.raises(SystemExit, match="CPU or --quick run of gpu_check"):
        cost_model.device_speed(ref, 16.0, str(tmp_path / "cpu.json"), r50, coco)
