"""kdsweep.report.throughput: parameter counts and inference timing (no assertions on speed)."""

from __future__ import annotations

import math

import pytest
import torch

from kdsweep.config import ModelConfig
from kdsweep.models.detectors import build_detector
from kdsweep.report.throughput import count_inference_params, count_params, measure_configs, measure_inference

SIZE = 64
RETINA = ModelConfig(backbone="resnet18", fpn_channels=16, min_size=SIZE, max_size=SIZE)
MIMIC = ModelConfig(arch="mimicdet", backbone="resnet18", fpn_channels=16, min_size=SIZE, max_size=SIZE,
                    options={"t_hidden": 64})


@pytest.fixture(scope="module")
def retinanet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(RETINA, 3)


@pytest.fixture(scope="module")
def mimicdet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(MIMIC, 3)


def test_inference_params_retinanet_equal(retinanet: torch.nn.Module) -> None:
    assert count_inference_params(retinanet, SIZE) == count_params(retinanet)


def test_inference_params_mimicdet_exclude_training_parts(mimicdet: torch.nn.Module) -> None:
    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    fpn = mimicdet.backbone.fpn
    # the S-head's regression feature (reg_fc) predicts the boxes: it counts at inference
    training_only = n(mimicdet.t_head) + n(fpn.inner_blocks[0]) + n(fpn.layer_blocks[0])
    assert training_only > 0
    inference = count_inference_params(mimicdet, SIZE)
    assert inference < count_params(mimicdet)
    assert inference == count_params(mimicdet) - training_only
    assert mimicdet.training  # flags restored


def test_measure_inference_restores_state(retinanet: torch.nn.Module) -> None:
    retinanet.train()
    threads = torch.get_num_threads()
    res = measure_inference(retinanet, size=SIZE, batch=1, warmup=0, iters=1, threads=threads + 1)
    assert set(res) == {"images_per_s", "ms_per_image", "params", "inference_params"}
    for key in ("images_per_s", "ms_per_image"):
        assert math.isfinite(res[key]) and res[key] > 0
    assert res["params"] == res["inference_params"] == count_params(retinanet)
    assert retinanet.training and all(m.training for m in retinanet.modules())
    assert torch.get_num_threads() == threads
    retinanet.eval()
    measure_inference(retinanet, size=(SIZE, SIZE + 8), batch=1, warmup=0, iters=1)
    assert not retinanet.training


def test_measure_configs_one_entry_each() -> None:
    configs = {"retina": RETINA, "mimic": MIMIC}
    res = measure_configs(configs, 3, batch=1, warmup=0, iters=1, rounds=2)
    assert list(res) == ["retina", "mimic"]
    assert res["mimic"]["inference_params"] < res["mimic"]["params"]
    assert res["retina"]["inference_params"] == res["retina"]["params"]
    for r in res.values():
        assert math.isfinite(r["ms_per_image"]) and r["ms_per_image"] > 0
