"""Faster R-CNN training-step cost: torchvision's proposal counts against the ``quick`` preset's.

torchvision keeps 2000 RPN proposals per image after NMS in training and samples 512 of them for
the R-CNN head's loss; the ``quick`` preset sets ``rpn_proposals: 300`` and ``roi_samples: 128``
(128 px images with 2-8 objects each). One Faster R-CNN (ResNet-34, FPN-64, the quick teacher) is
built with each setting through ``ModelConfig`` (the same weights in both) and timed for
forward + backward + SGD step on a batch of random images with three boxes each, round-robin
(one step each per round) so that drifts hit both alike; the median of
``--repeats`` rounds after one warm-up round is printed, and the ratio::

    python benchmarks/bench_frcnn_proposals.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdsweep.config import ModelConfig
from kdsweep.models.detectors import build_detector

SETTINGS = {"torchvision default (2000 / 512)": {}, "quick preset (300 / 128)": {"rpn_proposals": 300, "roi_samples": 128}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    models = {}
    for name, counts in SETTINGS.items():  # one architecture, so both get the same weights
        cfg = ModelConfig(arch="fasterrcnn", backbone=args.backbone, fpn_channels=64, min_size=args.size,
                          max_size=args.size, anchor_scale=2.0, **counts)
        models[name] = build_detector(cfg, 6).train()
    first = next(iter(models.values()))
    for model in models.values():
        model.load_state_dict(first.state_dict())
    images = [torch.rand(3, args.size, args.size) for _ in range(args.batch)]
    s = args.size / 128
    boxes = torch.tensor([[10.0, 10, 30, 30], [50, 50, 60, 64], [80, 20, 120, 70]]) * s
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3])} for _ in images]
    opts = {name: torch.optim.SGD(model.parameters(), lr=1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
        print(f"round {round_}/{args.repeats} done", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, sec in medians.items():
        print(f"{name:34s} {sec * 1000:8.0f} ms/step  {args.batch / sec:6.1f} img/s")
    default, quick = medians.values()
    print(f"quick preset step is {default / quick:.2f}x faster than torchvision's default")


if __name__ == "__main__":
    main()
