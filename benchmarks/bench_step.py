"""Cost of distillation per training step, measured side by side on this machine.

Student: RetinaNet ResNet-18 FPN-64 at 192 px, 6 classes; teacher: RetinaNet ResNet-50 FPN-64.
A batch of 4 random images with a few boxes. Each variant times forward + backward + SGD step:

* ``plain``: the student alone (the baseline row);
* ``kd terms only``: student + KD loss terms fed precomputed teacher features (loss overhead);
* ``with teacher forward``: the full Distiller step, teacher forward included.

Variants run round-robin (one step each per round) so drifts hit all alike; the median of
``--repeats`` rounds after ``--warmup`` rounds is reported as a ratio to ``plain``::

    python benchmarks/bench_step.py --repeats 10 --loss l2 --loss ssim
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from kdsweep.config import KDTermConfig, ModelConfig
from kdsweep.methods import build_term as build_kd_term
from kdsweep.models.detectors import build_detector
from kdsweep.train.distiller import Distiller

NUM_CLASSES = 6
SIZE = 192
LEVELS = ("p3", "p4", "p5", "p6", "p7")


def build_term(name: str, student: nn.Module, teacher: nn.Module) -> nn.Module | None:
    """The ``name`` KD term of the registry on every FPN level, or None (reported) if it cannot be built."""
    try:
        return build_kd_term(KDTermConfig(name), name=name, levels=LEVELS, student=student, teacher=teacher)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other losses
        print(f"skipping {name}: {type(exc).__name__}: {exc}")
        return None


def make_batch(n: int = 4) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * (SIZE - 48)
        wh = 8 + torch.rand(3, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (3,), generator=g)})
    return images, targets


def step_fn(module: nn.Module, run: Callable[[], dict[str, Tensor]]) -> Callable[[], None]:
    """One SGD step of ``module``'s trainable parameters on the losses ``run()`` returns."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        losses = run()
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, variants interleaved per round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--loss", action="append", help="KD loss name (repeatable); default l2 and ssim")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    losses = args.loss or ["l2", "ssim"]

    torch.manual_seed(0)
    student = build_detector(ModelConfig(backbone="resnet18", fpn_channels=64, min_size=SIZE, max_size=SIZE), NUM_CLASSES)
    teacher = build_detector(ModelConfig(backbone="resnet50", fpn_channels=64, min_size=SIZE, max_size=SIZE), NUM_CLASSES)
    images, targets = make_batch(args.batch)
    plain = Distiller(student)
    steps = {"plain": step_fn(plain.trainable, lambda: plain(images, targets))}
    for name in losses:
        term = build_term(name, student, teacher)
        if term is None:
            continue
        kd = Distiller(student, teacher, {name: (1.0, term)})
        feats = kd.teacher_features(images)
        steps[f"{name}/terms"] = step_fn(kd.trainable, lambda kd=kd, feats=feats: kd.trainable(images, targets, feats))
        steps[f"{name}/teacher"] = step_fn(kd.trainable, lambda kd=kd: kd(images, targets))

    medians = time_round_robin(steps, args.warmup, args.repeats)
    base = medians["plain"]
    print(
        f"plain student step: {1000 * base:.1f} ms (median of {args.repeats}, batch {args.batch} x {SIZE} px, "
        f"{torch.get_num_threads()} threads)"
    )
    for name in losses:
        if f"{name}/terms" in medians:
            print(
                f"{name}: kd terms only: {medians[f'{name}/terms'] / base:.2f}x plain; "
                f"with teacher forward: {medians[f'{name}/teacher'] / base:.2f}x plain"
            )


if __name__ == "__main__":
    main()
