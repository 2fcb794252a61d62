"""Inference throughput of teacher, students and MimicDet, measured side by side on this machine.

Rows (random weights, ``--classes`` classes, batches of ``--batch`` random images):

* ``teacher``: RetinaNet ``--teacher-backbone`` (ResNet-34) FPN ``--teacher-fpn`` (64) at ``--size`` (128 px);
* ``student``: RetinaNet ``--student-backbone`` (ResNet-18) FPN ``--student-fpn`` (32) at ``--size``;
* ``student half-res``: the same student at ``--size // 2`` (64 px), the cross-scale mimic student;
* ``mimicdet``: MimicDet on the student's backbone and FPN width at ``--size`` (default options:
  T-head with ``t_hidden`` 1024 built, but only P3..P7, the refinement module and the S-head run
  at inference). Its reference is the ``student`` row: a RetinaNet of the same backbone, FPN width
  and size.

All rows are measured interleaved by :func:`kdsweep.report.throughput.measure_configs` (``--rounds``
rounds of ``--iters`` batches each, after ``--warmup`` batches; median per row) with
``--threads`` intra-op threads. Printed: images/s, ms/image, parameters (all, and those used at
inference) and the ratios student/teacher speed-up, half-res student/teacher speed-up and
MimicDet/RetinaNet inference cost (ms/image ratio)::

    python benchmarks/bench_inference.py --size 128 --batch 4 --iters 5 --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from kdsweep.config import ModelConfig
from kdsweep.report.throughput import measure_configs


def build_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """The four rows' model configs (``min_size == max_size ==`` the row's resolution)."""
    full, half = args.size, max(1, args.size // 2)

    def cfg(arch: str, backbone: str, fpn: int, size: int) -> ModelConfig:
        return ModelConfig(arch=arch, backbone=backbone, fpn_channels=fpn, min_size=size, max_size=size,
                           anchor_scale=args.anchor_scale)

    return {
        "teacher": cfg("retinanet", args.teacher_backbone, args.teacher_fpn, full),
        "student": cfg("retinanet", args.student_backbone, args.student_fpn, full),
        "student half-res": cfg("retinanet", args.student_backbone, args.student_fpn, half),
        "mimicdet": cfg("mimicdet", args.student_backbone, args.student_fpn, full),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="full resolution in px (half-res student: size // 2)")
    parser.add_argument("--batch", type=int, default=4, help="images per forward")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--classes", type=int, default=6, help="object classes without background")
    parser.add_argument("--teacher-backbone", default="resnet34")
    parser.add_argument("--teacher-fpn", type=int, default=64)
    parser.add_argument("--student-backbone", default="resnet18")
    parser.add_argument("--student-fpn", type=int, default=32)
    parser.add_argument("--anchor-scale", type=float, default=4.0)
    args = parser.parse_args()

    configs = build_configs(args)
    res = measure_configs(configs, args.classes, batch=args.batch, warmup=args.warmup, iters=args.iters,
                          threads=args.threads, rounds=args.rounds)
    print(
        f"inference, batch {args.batch}, median of {args.rounds} rounds x {args.iters} batches, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    header = f"{'model':<18} {'arch':<10} {'backbone':<9} {'fpn':>4} {'px':>4} {'img/s':>8} {'ms/img':>8} " \
             f"{'params':>11} {'infer params':>13}"
    print(header)
    print("-" * len(header))
    for name, cfg in configs.items():
        r = res[name]
        print(
            f"{name:<18} {cfg.arch:<10} {cfg.backbone:<9} {cfg.fpn_channels:>4} {cfg.min_size:>4} "
            f"{r['images_per_s']:>8.1f} {r['ms_per_image']:>8.2f} {r['params']:>11,} {r['inference_params']:>13,}"
        )
    t, s, h, m = (res[k] for k in ("teacher", "student", "student half-res", "mimicdet"))
    print()
    print(f"student / teacher speed-up:          {s['images_per_s'] / t['images_per_s']:.2f}x "
          f"(params {s['params'] / t['params']:.2f}x)")
    print(f"half-res student / teacher speed-up: {h['images_per_s'] / t['images_per_s']:.2f}x "
          f"(params {h['params'] / t['params']:.2f}x)")
    print(f"MimicDet / RetinaNet (student row) inference cost: {m['ms_per_image'] / s['ms_per_image']:.2f}x ms/image "
          f"(inference params {m['inference_params'] / s['inference_params']:.2f}x; "
          f"all params {m['params'] / s['params']:.2f}x)")


if __name__ == "__main__":
    main()
