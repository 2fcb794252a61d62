"""Aspect-ratio grouped batching: each batch holds images of one aspect-ratio bin.

A detector pads the images of a batch to the largest height and width among them; a portrait
image beside a landscape one (COCO: 480x640 and 640x480, resized to 800x1067 and 1067x800) pads
both to 1067x1067, a third of the pixels wasted. torchvision's detection references group images
by aspect ratio (``references/detection/group_by_aspect_ratio.py``); this is the same binning
written against our dataset, with a tail that keeps the step count of plain batching.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["GroupedBatchSampler", "aspect_ratio_groups", "padding_ratio"]


def aspect_ratio_groups(aspect_ratios: Sequence[float], k: int) -> list[int]:
    """Bin index of each width / height ratio: ``2k + 1`` bin edges ``2 ** linspace(-1, 1, 2k + 1)``
    (torchvision's references, ``--aspect-ratio-group-factor k``, 3 by default); ``k = 0`` puts
    every image in one group. Returns one group id per image, ``0 .. 2k + 1``."""
    edges = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return [bisect.bisect_right(edges, float(ratio)) for ratio in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices of one group, in the order ``sampler`` yields them.

    A batch is emitted as soon as its group has ``batch_size`` indices. The indices left over at
    the end (fewer than ``batch_size`` per group) are batched together, group after group, and an
    incomplete last batch is dropped: so there are exactly ``len(sampler) // batch_size`` batches,
    as with plain ``drop_last`` batching, and every DDP rank takes the same number of steps.
    With a single group it is plain batching, index for index.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()
        rest = [i for group in sorted(buffers) for i in buffers[group]]
        for start in range(0, len(rest) - self.batch_size + 1, self.batch_size):
            yield rest[start:start + self.batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]


def padding_ratio(sizes: Sequence[tuple[int, int]], batches: Sequence[Sequence[int]], divisor: int = 1) -> float:
    """Share of the padded pixels that are padding: ``1 - sum(h * w) / sum(batch * H * W)`` over
    ``batches`` (lists of indices into ``sizes``, ``(height, width)`` of each image as the detector
    sees it), where ``H``, ``W`` are the batch's largest height and width rounded up to a multiple
    of ``divisor`` (torchvision's detectors pad a batch to a multiple of 32)."""
    real = padded = 0
    for batch in batches:
        hs = [sizes[i][0] for i in batch]
        ws = [sizes[i][1] for i in batch]
        real += sum(h * w for h, w in zip(hs, ws))
        padded += len(batch) * math.ceil(max(hs) / divisor) * divisor * math.ceil(max(ws) / divisor) * divisor
    return 1.0 - real / padded if padded else 0.0
