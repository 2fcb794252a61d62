"""Forward+backward time of the SSIM feature loss: kdsweep vs pytorch_msssim vs kornia.

Inputs are FPN-like feature maps ``4 x 256 x S x S`` (S = 64, 32, 16); the student requires
grad, the teacher does not. After warm-up, every repeat runs all methods on all sizes in a
rotating order (no method always follows the same one); the reported time is the median over
repeats, with the default ``torch.get_num_threads()``. Run it on an otherwise idle machine: the
script reports how busy the CPU was just before it started. kdsweep uses no ``torch.compile``,
so there is no one-time compile cost.

* kdsweep: ``ssim_feature_loss(x, y, normalize=None)`` (same map as pytorch_msssim).
* pytorch_msssim: ``1 - ssim(x, y, data_range=1, win_size=11, win_sigma=1.5)``.
* kornia: ``ssim_loss(x, y, 11, max_val=1.0, padding="valid")`` (the same valid map; kornia
  reports ``(1 - ssim) / 2``, which does not change the work).
* kdsweep minmax: the default ``normalize="minmax"`` (information only).

Run: ``python benchmarks/bench_ssim.py [--repeats N] [--warmup N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Callable

import torch

from kdsweep.methods.ssim import ssim_feature_loss

SIZES = (64, 32, 16)
TARGET = 1.5


def _methods() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from pytorch_msssim import ssim

    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "kdsweep": lambda x, y: ssim_feature_loss(x, y, normalize=None),
        "pytorch_msssim": lambda x, y: 1 - ssim(x, y, data_range=1, win_size=11, win_sigma=1.5),
    }
    try:
        import kornia

        methods["kornia"] = lambda x, y: kornia.losses.ssim_loss(x, y, 11, max_val=1.0, padding="valid")
    except ImportError:  # pragma: no cover - kornia is a test dependency
        print("kornia not installed: skipped")
    methods["kdsweep minmax"] = lambda x, y: ssim_feature_loss(x, y)
    return methods


def _time_once(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    x.grad = None
    start = time.perf_counter()
    fn(x, y).backward()
    return time.perf_counter() - start


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of CPU time used by anything while this process sleeps (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            a = [int(v) for v in f.readline().split()[1:]]
        time.sleep(seconds)
        with open("/proc/stat") as f:
            b = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    delta = [j - i for i, j in zip(a, b)]
    idle = delta[3] + delta[4]  # idle + iowait
    return 1.0 - idle / max(sum(delta), 1)


def _check_agreement(x: torch.Tensor, y: torch.Tensor) -> float:
    from pytorch_msssim import ssim

    with torch.no_grad():
        ours = ssim_feature_loss(x, y, normalize=None)
        ref = 1 - ssim(x, y, data_range=1, win_size=11, win_sigma=1.5)
    return float((ours - ref).abs())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per method and size (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs per method and size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=256)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    methods = _methods()
    names = list(methods)
    shapes = {s: (args.batch, args.channels, s, s) for s in SIZES}
    data = {s: (torch.rand(*shape, requires_grad=True), torch.rand(*shape)) for s, shape in shapes.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    busy = _cpu_busy()
    if busy is not None:
        print(f"CPU busy (other processes, 1 s before start): {busy:.0%}")
        if busy > 0.1:
            print("warning: other processes are using the CPU; timings and ratios are unreliable")
    for s, (x, y) in data.items():
        print(f"check {args.batch}x{args.channels}x{s}x{s}: |kdsweep - pytorch_msssim| = {_check_agreement(x, y):.2e}")

    for _ in range(args.warmup):
        for s, (x, y) in data.items():
            for name in names:
                _time_once(methods[name], x, y)
    times: dict[tuple[str, int], list[float]] = {(n, s): [] for n in names for s in SIZES}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for s, (x, y) in data.items():
            for name in order:
                times[(name, s)].append(_time_once(methods[name], x, y))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    print(f"\nforward+backward, median of {args.repeats} repeats (ms)")
    header = f"{'size':>16} " + " ".join(f"{n:>15}" for n in names) + f" {'msssim/ours':>12} {'kornia/ours':>12}"
    print(header)
    for s in SIZES:
        row = f"{f'{args.batch}x{args.channels}x{s}x{s}':>16} " + " ".join(f"{med[(n, s)]:>15.2f}" for n in names)
        row += f" {med[('pytorch_msssim', s)] / med[('kdsweep', s)]:>11.2f}x"
        if "kornia" in names:
            row += f" {med[('kornia', s)] / med[('kdsweep', s)]:>11.2f}x"
        print(row)
    total = {n: sum(med[(n, s)] for s in SIZES) for n in names}
    row = f"{'total':>16} " + " ".join(f"{total[n]:>15.2f}" for n in names)
    row += f" {total['pytorch_msssim'] / total['kdsweep']:>11.2f}x"
    if "kornia" in names:
        row += f" {total['kornia'] / total['kdsweep']:>11.2f}x"
    print(row)

    ratio = total["pytorch_msssim"] / total["kdsweep"]
    per_size = [med[("pytorch_msssim", s)] / med[("kdsweep", s)] for s in SIZES]
    print(f"\nratio pytorch_msssim/kdsweep: {ratio:.2f}x (target >= {TARGET}x) {'PASS' if ratio >= TARGET else 'FAIL'}")
    print("per size: " + ", ".join(f"{s}: {r:.2f}x" for s, r in zip(SIZES, per_size)))
    if "kornia" in names:
        print(f"ratio kornia/kdsweep: {total['kornia'] / total['kdsweep']:.2f}x")
    print("kdsweep uses no torch.compile: no one-time compile cost.")


if __name__ == "__main__":
    main()
