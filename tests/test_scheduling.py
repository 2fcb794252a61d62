"""How trials share a cluster (kdsweep.orchestrate.scheduling): trials at once, placement, the
linear scaling rule, and what the GPU presets set (frozen stem, where throughput is measured)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from kdsweep.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, from_dict
from kdsweep.models.detectors import build_detector
from kdsweep.orchestrate.launch import add_arguments, prepare
from kdsweep.orchestrate.preflight import offline_weights
from kdsweep.orchestrate.scheduling import fits, max_concurrent, parse_concurrency, placement, scale_lr, start_retries
from kdsweep.orchestrate.trials import teacher_hash
from kdsweep.presets import PRESETS
from kdsweep.report.throughput import throughput_device

PAPER = PRESETS["paper"].experiment


def _paper_train(**changes) -> TrainConfig:
    return dataclasses.replace(from_dict(TrainConfig, PAPER["train"]), **changes)


def test_concurrency_is_auto_or_a_positive_integer() -> None:
    assert parse_concurrency("auto") == "auto" and parse_concurrency("3") == 3 and parse_concurrency(None) is None
    with pytest.raises(ConfigError, match=r"^--max-concurrent 0 must be >= 1 \(or auto\)$"):
        parse_concurrency("0")
    with pytest.raises(ConfigError, match="'many' is not a number; use an integer >= 1 or auto"):
        parse_concurrency("many")


def test_auto_runs_as_many_trials_as_the_cluster_has_gpus_for() -> None:
    paper = _paper_train()  # 8 GPU workers per trial
    assert max_concurrent("auto", [paper], {"GPU": 32.0, "CPU": 512.0})[0] == 4
    assert max_concurrent("auto", [paper], {"GPU": 36.0, "CPU": 512.0})[0] == 4  # a trial needs all 8
    assert max_concurrent("auto", [paper], {"GPU": 8.0})[0] == 1
    count, why = max_concurrent("auto", [paper], {"GPU": 64.0})
    assert count == 8 and why == "--max-concurrent auto: 8 trial(s) at once (64 GPU(s) in the cluster, 8 per trial)"
    # the largest trial decides: a 4-GPU row beside the 8-GPU ones does not double the count
    assert max_concurrent("auto", [paper, _paper_train(num_workers=4)], {"GPU": 16.0})[0] == 2
    count, why = max_concurrent("auto", [paper], {"CPU": 8.0})
    assert count == 1 and "no GPU in the cluster" in why
    assert max_concurrent(3, [paper], {"GPU": 64.0})[0] == 3  # a number is taken as given


def test_auto_counts_cpu_trials_by_cpus() -> None:
    quick = from_dict(TrainConfig, PRESETS["quick"].experiment["train"])  # 1 worker x 0.9 CPU
    assert max_concurrent("auto", [quick], {"CPU": 2.0})[0] == 2
    assert max_concurrent("auto", [dataclasses.replace(quick, num_workers=2)], {"CPU": 2.0})[0] == 1


def test_auto_placement_never_strict_packs_a_node_whose_cpus_the_workers_take_exactly() -> None:
    """8 workers x 4 CPUs on an 8-GPU, 32-CPU node: the trial's own Tune driver holds 0.05 CPU there
    (or anything else a fraction), so STRICT_PACK could never be met and Ray Train retried forever."""
    paper = _paper_train()
    assert placement(paper, [{"GPU": 8.0, "CPU": 32.0}]) == "PACK"
    assert placement(paper, [{"GPU": 8.0, "CPU": 32.0}, {"GPU": 8.0, "CPU": 33.0}]) == "STRICT_PACK"


def test_a_run_waits_for_its_workers_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDSWEEP_PLACEMENT_WAIT_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert start_retries() == (9, 600.0)  # 10 attempts of Ray Train's 60 s: never -1 (forever)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "7")
    monkeypatch.setenv("KDSWEEP_PLACEMENT_WAIT_S", "20")
    assert start_retries() == (2, 21.0)


def test_a_cluster_too_small_for_a_run_is_said_in_one_line() -> None:
    paper = _paper_train()
    assert fits([paper], {"GPU": 8.0, "CPU": 33.0}) is None
    line = fits([paper], {"GPU": 8.0, "CPU": 32.0})
    assert line == "a run of 8 worker(s) x 4 CPU + 1 GPU needs 32.05 CPU with its trial driver, and the cluster has 32 CPU"
    assert "needs 8 GPU" in fits([paper], {"CPU": 64.0})


def test_auto_placement_packs_a_trial_into_one_node_when_one_node_holds_it() -> None:
    paper = _paper_train()
    assert paper.placement_strategy == "auto"
    assert placement(paper, [{"GPU": 8.0, "CPU": 96.0}]) == "STRICT_PACK"
    assert placement(paper, [{"GPU": 4.0, "CPU": 48.0}, {"GPU": 8.0, "CPU": 96.0}]) == "STRICT_PACK"
    assert placement(paper, [{"GPU": 4.0, "CPU": 48.0}, {"GPU": 4.0, "CPU": 48.0}]) == "PACK"
    assert placement(paper, [{"GPU": 8.0, "CPU": 16.0}]) == "PACK"  # 8 workers x 4 CPUs do not fit
    assert placement(_paper_train(placement_strategy="STRICT_SPREAD"), [{"GPU": 8.0, "CPU": 96.0}]) == "STRICT_SPREAD"


def test_the_linear_scaling_rule_follows_the_global_batch() -> None:
    base = from_dict(ExperimentConfig, PAPER)
    half = dataclasses.replace(base, train=dataclasses.replace(base.train, num_workers=4),
                               teacher_train=dataclasses.replace(base.teacher_train, num_workers=4))
    scaled, notes = scale_lr(half, base)
    assert scaled.train.lr == pytest.approx(0.005) and scaled.teacher_train.lr == pytest.approx(0.005)
    assert notes[0] == "train: global batch 16 -> 8 (4 worker(s) x 2), lr 0.01 -> 0.005 (linear scaling rule)"
    bigger = dataclasses.replace(base, train=dataclasses.replace(base.train, num_workers=16, batch_size=4))
    assert scale_lr(bigger, base)[0].train.lr == pytest.approx(0.01 * 64 / 16)
    assert scale_lr(base, base) == (base, [])  # the preset's own batch: nothing changes


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--space", default="search_spaces/ablation_ssim.yaml")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_num_workers_scales_every_rows_lr_and_gives_the_teacher_its_own_hash() -> None:
    base = prepare(_args("--preset", "paper", "--rows", "baseline,ssim"), with_data=False)
    half = prepare(_args("--preset", "paper", "--rows", "baseline,ssim", "--num-workers", "4"), with_data=False)
    for label, exp in half.rows.items():
        assert exp.train.num_workers == 4 and exp.train.lr == pytest.approx(base.rows[label].train.lr / 2)
        assert exp.teacher_train.lr == pytest.approx(base.rows[label].teacher_train.lr / 2)
    assert any("lr 0.01 -> 0.005" in note for note in half.notes) and base.notes == ()
    data = dict.fromkeys(("train_ann", "val_ann", "train_images", "val_images", "version"), "v")
    assert teacher_hash(half.rows["ssim"], data) != teacher_hash(base.rows["ssim"], data)
    assert half.concurrency(None) == ("auto", "as many at once as the cluster holds (auto)")  # --dry-run
    assert half.concurrency(None, {"GPU": 16.0})[0] == 4  # 4-GPU trials on 16 GPUs
    assert half.concurrency("2", {"GPU": 16.0})[0] == 2


def test_paper_backbones_train_from_the_second_stage_on() -> None:
    """trainable_backbone_layers 3: stem and layer1 frozen, layer2-4 trained (torchvision's
    detection references, mmdetection frozen_stages=1, detectron2 FREEZE_AT=2)."""
    cfg = from_dict(ModelConfig, PAPER["student"])
    with torch.device("meta"), offline_weights():
        model = build_detector(cfg, 80)
    trains = {name.split(".")[0]: p.requires_grad for name, p in model.backbone.body.named_parameters()}
    assert trains == {"conv1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}


def test_throughput_is_measured_where_the_trials_trained_or_left_out() -> None:
    cpu_rows = {"baseline": from_dict(ExperimentConfig, PRESETS["quick"].experiment)}
    gpu_rows = {"baseline": from_dict(ExperimentConfig, PAPER)}
    assert throughput_device(cpu_rows, {"CPU": 2.0})[0] == "cpu"
    assert throughput_device(gpu_rows, {"CPU": 64.0, "GPU": 8.0})[0] == "cuda"
    device, why = throughput_device(gpu_rows, {"CPU": 64.0})
    assert device is None and why.startswith("left out: the trials train on GPUs")
