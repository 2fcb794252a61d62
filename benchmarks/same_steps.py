"""Do two checkouts train a row identically? The first steps of one row's student, bit for bit.

Builds the row's trial exactly as a Ray Train worker does (same seed, same data order, one worker,
one thread, no Ray, no MLflow), takes ``--steps`` training steps and prints the mean loss and the
sum of the student's parameters with every digit. Run it under each checkout and compare the
lines: equal lines mean the code change did not change what the row learns in those steps.

    PYTHONPATH=/path/to/old/checkout python benchmarks/same_steps.py --space search_spaces/ablation_ssim.yaml --row baseline
    PYTHONPATH=/path/to/new/checkout python benchmarks/same_steps.py --space search_spaces/ablation_ssim.yaml --row baseline

Give each run its own ``KDSWEEP_HOME`` when the two checkouts' caches may differ in format, and the
same ``--data`` folder (the synthetic data a launch generated) so that both read the same images.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from kdsweep.data.loader import build_loaders
    from kdsweep.orchestrate.launch import add_arguments, prepare
    from kdsweep.orchestrate.trials import with_seed
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.model import build_model
    from kdsweep.train.optim import build_optimization
    from kdsweep.train.worker import seed_everything

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="the ablation YAML whose row to train")
    parser.add_argument("--row", required=True, help="the row's label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    add_arguments(parser)  # --preset, --data, ...
    args = parser.parse_args(argv)
    args.rows = args.row
    prepared = prepare(args)
    exp = with_seed(prepared.rows[args.row], args.seed)
    if exp.kd:
        print("same_steps: rows with kd terms need their teacher; use a baseline-like row", file=sys.stderr)
        return 2
    cfg = exp.train
    torch.set_num_threads(1)
    seed_everything(cfg.seed * 1000)  # rank 0, as the worker seeds it
    data = {key: prepared.data[key] for key in ("train_ann", "train_images", "val_ann", "val_images")}
    loaders = build_loaders(data, exp, cfg, 0, 1, "cpu")
    distiller = build_model(exp, loaders.val_set.num_classes, None)
    distiller.to("cpu")
    distiller.wrap(lambda module: module)  # one worker: no DDP
    device = torch.device("cpu")
    optimization = build_optimization(distiller.trainable, distiller.student, cfg, device, len(loaders.train))
    loaders.sampler.set_epoch(1)
    metrics = train_one_epoch(distiller, optimization, loaders.train, device=device, epoch=1, max_iters=args.steps)
    total = sum(p.double().sum().item() for p in distiller.student.parameters())
    print(f"row {args.row!r} seed {args.seed}, {args.steps} steps: loss {metrics['loss']!r} parameter sum {total!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
