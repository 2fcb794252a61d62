"""Data-parallel scaling on CPU: training images/s of 1 vs 2 Ray Train workers, same threads per worker.

Both runs train the same detector (RetinaNet R18, 128 px, batch 16 per worker) with
``train_fn_per_worker`` under a ``TorchTrainer`` (gloo DDP for 2 workers), one after the other in
one process, for the same number of steps per worker. Throughput is the training images/s of the
whole run (``world_size x`` rank 0's rate: the workers step in lockstep); scaling efficiency is
``rate(2 workers) / (2 x rate(1 worker))``. Target: >= 0.85 (measured here: 0.85 at batch 16,
0.78 at batch 8, where the gloo all-reduce weighs more against a shorter step). Example::

    python benchmarks/bench_scaling.py --iters 30 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdsweep.config import ExperimentConfig, from_dict, teacher_experiment  # noqa: E402
from kdsweep.data.coco import resolve_data  # noqa: E402


def run(workers: int, exp: ExperimentConfig, data: dict[str, str], storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdsweep.train.worker import train_fn_per_worker

    run_exp = teacher_experiment(exp)  # a plain detector run
    cfg = run_exp.train
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"experiment": run_exp, "data": data, "teacher_state": None, "label": f"{workers} worker(s)"},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"scaling-{workers}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error is not None:
        raise SystemExit(f"bench_scaling: the {workers}-worker run failed: {result.error}")
    m = result.metrics
    # train_images_per_s is the whole run's rate (every worker's images)
    return {"rank0_img_s": m["train_images_per_s"] / m["world_size"], "total_img_s": m["train_images_per_s"],
            "world": m["world_size"], "nodes": m["nodes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30, help="training steps per worker")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (the same in both runs)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    images = args.iters * args.batch * 2
    exp = from_dict(ExperimentConfig, {
        "data": {"synth_train": images, "synth_val": 4, "synth_size": args.size, "synth_style": "simple"},
        "teacher": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "min_size": args.size,
                    "max_size": args.size, "anchor_scale": 2.0},
        "teacher_train": {"epochs": 1, "batch_size": args.batch, "optimizer": "adamw", "lr": 1e-3, "warmup_iters": 5,
                          "threads_per_worker": args.threads, "cpus_per_worker": 0.9, "max_iters_per_epoch": args.iters,
                          "eval_batch_size": 4},
    })
    data = resolve_data(exp.data).strings()
    import ray

    from kdsweep.orchestrate.runner import init_ray

    init_ray(num_cpus=2)
    try:
        with tempfile.TemporaryDirectory() as storage:
            one = run(1, exp, data, storage)
            two = run(2, exp, data, storage)
    finally:
        ray.shutdown()
    efficiency = two["total_img_s"] / (2 * one["total_img_s"])
    print(f"\nRetinaNet R18 fpn32, {args.size} px, batch {args.batch} per worker, {args.threads} thread(s) per worker, "
          f"{args.iters} steps per worker, gloo")
    print(f"1 worker : {one['total_img_s']:6.2f} img/s")
    print(f"2 workers: {two['total_img_s']:6.2f} img/s ({two['rank0_img_s']:.2f} per worker)")
    print(f"speed-up {two['total_img_s'] / one['total_img_s']:.2f}x, scaling efficiency {efficiency:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
