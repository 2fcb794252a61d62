"""Named experiment presets: ``smoke`` (CI, < 5 min on 2 CPU cores), ``quick`` (< 30 min on
2 CPU cores, the baseline reaches a meaningful AP) and ``paper`` (COCO on a GPU cluster: de Rijk &
Schneider's RetinaNet R101 -> R50 1x setting; documented, not run here). Each ablation's YAML
states its own paper's setting on top of it in its ``presets:`` block (ScaleKD's freeze, Li et
al.'s from-scratch student) and the paper's number it should reproduce
(:mod:`kdsweep.orchestrate.space`).

A preset is an ExperimentConfig override dict (data only) plus run settings for the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdsweep.config import ConfigError


@dataclass(frozen=True)
class Preset:
    """Experiment overrides plus how the launcher schedules trials."""

    name: str
    experiment: dict[str, Any]
    seeds: int = 1
    max_concurrent_trials: int | str = 2  # or "auto": what the cluster holds (kdsweep.orchestrate.scheduling)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# The CPU presets train on square synthetic images without flips, as kdsweep always did there:
# their tables and stored teachers (keyed by config hash) stay what they were. Aspect grouping
# would be a no-op on square images anyway.
_CPU_TRAIN = {"num_workers": 1, "cpus_per_worker": 0.9, "threads_per_worker": 1, "use_gpu": False,
              "hflip": 0.0, "aspect_grouping": 0}

# The paper presets' training (teacher and students alike):
# - the base of the linear scaling rule: 8 workers x 2 images = 16 at lr 0.01 (mmdetection's
#   RetinaNet 1x); --num-workers scales lr with the global batch (kdsweep.orchestrate.scheduling);
# - grad_clip None: mmdetection's retinanet_r50_fpn_1x_coco.py keeps schedule_1x.py's
#   optimizer_config grad_clip=None;
# - hflip 0.5 and aspect grouping (k=3) as every paper's and torchvision's references' pipeline;
#   3 loader processes per GPU (4 CPUs - 1);
# - COCO-evaluated after the last epoch only (eval_every 0: 5k images, no waiting GPUs), by
#   faster-coco-eval (pycocotools' numbers, 8x faster: benchmarks/bench_eval.py).
_GPU_TRAIN = {"epochs": 12, "batch_size": 2, "lr": 0.01, "lr_schedule": "step", "warmup_iters": 500, "grad_clip": None,
              "num_workers": 8, "use_gpu": True, "amp": True, "cpus_per_worker": 4, "threads_per_worker": 4,
              "placement_strategy": "auto", "hflip": 0.5, "aspect_grouping": 3, "loader_workers": "auto", "eval_every": 0,
              "evaluator": "faster-coco-eval"}

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="seconds per trial: wiring check for CI, AP is not meaningful",
        experiment={
            "data": {"synth_train": 48, "synth_val": 16, "synth_size": 128},
            "teacher": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "min_size": 128, "max_size": 128, "anchor_scale": 2.0},
            "student": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "min_size": 128, "max_size": 128, "anchor_scale": 2.0},
            "teacher_train": dict(_CPU_TRAIN, epochs=1, batch_size=8, optimizer="adamw", lr=0.002, warmup_iters=2,
                                  cpus_per_worker=1.8, threads_per_worker=2),
            "train": dict(_CPU_TRAIN, epochs=1, batch_size=8, optimizer="adamw", lr=0.002, warmup_iters=2),
        },
        max_concurrent_trials=2,
    ),
    "quick": Preset(
        name="quick",
        description="under 30 min on 2 CPU cores: RetinaNet R34 -> R18 (GroupNorm heads) at 128 px on 1400 simple synthetic images",
        experiment={
            "data": {"synth_train": 1400, "synth_val": 120, "synth_size": 128, "synth_style": "simple"},
            "teacher": {"arch": "retinanet", "backbone": "resnet34", "fpn_channels": 64, "min_size": 128, "max_size": 128,
                        "anchor_scale": 2.0, "head_norm": True, "rpn_proposals": 300, "roi_samples": 128},
            "student": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "min_size": 128, "max_size": 128,
                        "anchor_scale": 2.0, "head_norm": True, "rpn_proposals": 300, "roi_samples": 128},
            "teacher_train": dict(_CPU_TRAIN, epochs=4, batch_size=8, optimizer="adamw", lr=0.002, warmup_iters=30,
                                  cpus_per_worker=1.8, threads_per_worker=2),
            "train": dict(_CPU_TRAIN, epochs=2, batch_size=8, optimizer="adamw", lr=0.002, warmup_iters=30),
        },
        max_concurrent_trials=2,
    ),
    "paper": Preset(
        name="paper",
        description="COCO 2017, RetinaNet R101 -> R50 from ImageNet backbones (downloaded), 1x schedule, 8 GPUs per trial (de Rijk 2022)",
        experiment={
            # trainable_backbone_layers 3: the stem and the first stage stay frozen, as torchvision's
            # detection references, mmdetection (frozen_stages=1) and detectron2 (FREEZE_AT=2) train
            # ImageNet backbones
            "teacher": {"arch": "retinanet", "backbone": "resnet101", "fpn_channels": 256, "min_size": 800, "max_size": 1333, "anchor_scale": 4.0,
                        "weights": "torchvision:ResNet101_Weights.IMAGENET1K_V1", "trainable_backbone_layers": 3},
            "student": {"arch": "retinanet", "backbone": "resnet50", "fpn_channels": 256, "min_size": 800, "max_size": 1333, "anchor_scale": 4.0,
                        "weights": "torchvision:ResNet50_Weights.IMAGENET1K_V1", "trainable_backbone_layers": 3},
            "teacher_train": dict(_GPU_TRAIN),
            "train": dict(_GPU_TRAIN),
        },
        seeds=1,
        max_concurrent_trials="auto",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"--preset '{name}' is unknown; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
