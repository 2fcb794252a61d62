"""Full grid vs ASHA on the same search space, in one run: compute used and best AP found.

Both sweeps run the same grid on the smoke-sized task (longer schedule so that ASHA has
milestones to stop at): first every trial to the end (FIFO), then ASHA (grace 1 epoch, reduction
factor 2). Compute is counted in trial-epochs (epochs actually trained, summed over trials).
Printed: both figures, the ratios ASHA/grid, and whether ASHA's best is the grid's best.

The grid is either SSIM loss weights (default) or, with ``--methods``, the methods of
``search_spaces/tune_methods.yaml``: every ``kd.use`` choice of its menu at the papers' default
weights and every level (the continuous and level samplers left out, so that the grid is finite).
Examples::

    python benchmarks/bench_asha.py --epochs 4 --weights 0.5,1,2,4,8,16
    python benchmarks/bench_asha.py --methods --preset quick --epochs 4 --max-iters-per-epoch 25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdsweep.orchestrate.search import run_sweep  # noqa: E402


def methods_space(train: dict, scheduler: str) -> dict:
    """tune_methods.yaml's menu and its ``kd.use`` choices as a grid, nothing else sampled."""
    data = yaml.safe_load((ROOT / "search_spaces" / "tune_methods.yaml").read_text())
    return {
        "name": f"bench_methods_{scheduler}",
        "metric": data["metric"],
        "mode": data["mode"],
        "base": {"train": train},
        "rows": data["rows"],
        "space": {"kd.use": {"grid": data["space"]["kd.use"]["choice"]}},
        "search": {"algorithm": "random", "scheduler": scheduler, "grace_period": 1, "reduction_factor": 2},
    }


def space(weights: list[float], train: dict, scheduler: str) -> dict:
    return {
        "name": f"bench_asha_{scheduler}",
        "metric": "AP",
        "mode": "max",
        "base": {"train": train},
        "rows": [{"label": "ssim", "kd": [{"loss": "ssim", "weight": 1.0, "adapter": True}]}],
        "space": {"kd.0.weight": {"grid": weights}},
        "search": {"algorithm": "random", "scheduler": scheduler, "grace_period": 1, "reduction_factor": 2},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--weights", default="0.5,1,2,4,8,16")
    parser.add_argument("--methods", action="store_true",
                        help="the kd.use grid of search_spaces/tune_methods.yaml instead of SSIM weights")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--max-iters-per-epoch", type=int,
                        help="cap each student epoch at this many steps (e.g. the quick preset's data and teacher with "
                             "short epochs, so that ASHA's rungs come early)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray)")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("fifo", "asha"):
            path = Path(tmp) / f"{scheduler}.yaml"
            train = {"epochs": args.epochs}
            if args.max_iters_per_epoch:
                train["max_iters_per_epoch"] = args.max_iters_per_epoch
            spec = methods_space(train, scheduler) if args.methods else space(weights, train, scheduler)
            path.write_text(yaml.safe_dump(spec))
            summary = Path(tmp) / f"{scheduler}.json"
            argv = [str(path), "--preset", args.preset, "--summary-json", str(summary), "--experiment", "kdsweep-bench-asha"]
            if args.tracking_uri:
                argv += ["--tracking-uri", args.tracking_uri]
            if args.ray_address:
                argv += ["--ray-address", args.ray_address]
            start = time.perf_counter()
            code = run_sweep(argv, prog="bench_asha.py")
            if code != 0:
                sys.exit(f"bench_asha: the {scheduler} sweep failed (exit {code})")
            results[scheduler] = dict(json.loads(summary.read_text()), wall_s=time.perf_counter() - start)
    grid, asha = results["fifo"], results["asha"]
    what = ("the kd.use grid of tune_methods.yaml" if args.methods else f"SSIM weight grid {weights}")
    steps = f" of at most {args.max_iters_per_epoch} steps" if args.max_iters_per_epoch else ""
    print(f"\nsearch space: {what}, {args.epochs} epochs{steps}, preset {args.preset}")
    print(f"{'':12s}{'trials':>8s}{'trial-epochs':>14s}{'best AP':>10s}{'wall s':>9s}")
    for name, r in (("full grid", grid), ("ASHA", asha)):
        print(f"{name:12s}{r['trials']:>8d}{r['trial_epochs']:>14d}{r['best']:>10.2f}{r['wall_s']:>9.0f}")
    print(f"ASHA / grid: compute {asha['trial_epochs'] / grid['trial_epochs']:.2f}x, "
          f"best AP {asha['best'] / grid['best'] if grid['best'] else float('nan'):.2f}x, "
          f"wall time {asha['wall_s'] / grid['wall_s']:.2f}x")
    same = grid.get("best_params") == asha.get("best_params")
    print(f"best configuration: grid {grid.get('best_params')}, ASHA {asha.get('best_params')} "
          f"({'the same' if same else 'different'})")
    survivors = [r.get("kd.use", r) for r in asha.get("last_rung", [])]
    print(f"ASHA's trials that reached the last rung ({args.epochs} epochs): {survivors}")


if __name__ == "__main__":
    main()
