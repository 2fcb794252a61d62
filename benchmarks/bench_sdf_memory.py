"""ScaleKD SDF: memory and parameters of shared vs separate dilated branches, side by side.

For each variant the script builds :class:`~kdsweep.methods.scalekd.sdf.SDFLoss` on a backbone embedding
(default 8 x 512 x 16 x 16, a ResNet-18/34 C5 of 512 px images), runs one forward + backward and
reports:

* parameters (and their training footprint: weights + grads + Adam's two moments, 16 bytes each);
* activation memory: bytes of every tensor autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``; storages counted once), the part of peak
  training memory that grows with the number of branches;
* peak = parameters' training footprint + saved activations.

Variants: ``shared`` (one set of bottleneck weights, a flatten MLP per branch: the paper's),
``separate`` (a bottleneck per branch) and ``one MLP`` (shared bottleneck and one MLP for all
branches, ``shared_mlp``). Printed: the three and the ratios. Example::

    python benchmarks/bench_sdf_memory.py --channels 512 --size 16 --dilations 1,2,3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdsweep.methods.scalekd.sdf import SDFLoss  # noqa: E402


def measure(shared: bool, channels: int, size: int, batch: int, dilations: list[int], embed: int,
            shared_mlp: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    loss_fn = SDFLoss(student_channels=channels, teacher_channels=channels, num_levels=1,
                      dilations=dilations, shared=shared, embed=embed, shared_mlp=shared_mlp)
    params = sum(p.numel() for p in loss_fn.parameters())
    student = torch.randn(batch, channels, size, size, requires_grad=True)
    teacher = torch.randn(batch, channels, size, size)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn([student], [teacher])
    loss.backward()
    saved = sum(seen.values())
    train_params = params * 16
    return {"params": params, "param_bytes": train_params, "saved": saved, "peak": train_params + saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dilations", default="1,2,3")
    parser.add_argument("--embed", type=int, default=256)
    args = parser.parse_args()
    dilations = [int(d) for d in args.dilations.split(",")]
    variants = {"shared": (True, False), "separate": (False, False), "one MLP": (True, True)}
    rows = {name: measure(shared, args.channels, args.size, args.batch, dilations, args.embed, shared_mlp=one_mlp)
            for name, (shared, one_mlp) in variants.items()}
    mib = 2**20
    print(f"SDF on {args.batch}x{args.channels}x{args.size}x{args.size}, dilations {dilations}, embed {args.embed}")
    print(f"{'':10s}{'params':>12s}{'params+grads+Adam MiB':>24s}{'saved activations MiB':>24s}{'peak MiB':>11s}")
    for name, r in rows.items():
        print(f"{name:10s}{r['params']:>12,d}{r['param_bytes'] / mib:>24.1f}{r['saved'] / mib:>24.1f}{r['peak'] / mib:>11.1f}")
    s, p = rows["separate"], rows["shared"]
    print(f"separate / shared: params {s['params'] / p['params']:.2f}x, saved activations {s['saved'] / p['saved']:.2f}x, "
          f"peak {s['peak'] / p['peak']:.2f}x")
    o = rows["one MLP"]
    print(f"shared (an MLP per branch, the paper's) / one MLP for all branches: params {p['params'] / o['params']:.2f}x, "
          f"peak {p['peak'] / o['peak']:.2f}x")


if __name__ == "__main__":
    main()
