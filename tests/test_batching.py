"""Aspect-ratio grouped batching: torchvision's binning, one group per batch, plain batching's step count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from kdsweep.data.batching import GroupedBatchSampler, aspect_ratio_groups, padding_ratio


def test_binning_follows_torchvision_references_edges():
    # k = 3: edges 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    ratios = [0.4, 0.5, 0.6, 0.75, 0.99, 1.0, 1.2, 1.5, 1.9, 2.0, 3.0]
    assert aspect_ratio_groups(ratios, 3) == [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7]
    assert aspect_ratio_groups(ratios, 0) == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # one edge at 1.0: portrait vs landscape
    assert aspect_ratio_groups([4 / 3, 3 / 4], 3) == [5, 2]  # COCO's landscape and portrait images


class _Order(torch.utils.data.Sampler[int]):
    def __init__(self, order):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_batches_hold_one_group_and_keep_plain_batchings_count(batch_size):
    rng = np.random.default_rng(0)
    n = 53
    groups = rng.integers(0, 4, n).tolist()
    order = rng.permutation(n).tolist()
    batches = list(GroupedBatchSampler(_Order(order), groups, batch_size))
    assert len(batches) == n // batch_size == len(GroupedBatchSampler(_Order(order), groups, batch_size))
    assert all(len(b) == batch_size for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)  # no index twice
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 3  # only the tail batches of leftovers (at most one per group boundary) mix groups
    if batch_size > 1:
        assert batches[0] == [i for i in order if groups[i] == groups[batches[0][0]]][:batch_size]


def test_a_single_group_is_plain_batching_index_for_index():
    sampler = DistributedSampler(range(50), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(2)
    grouped = list(GroupedBatchSampler(sampler, [0] * 50, 4))
    plain = list(BatchSampler(sampler, 4, drop_last=True))
    assert grouped == plain


def test_grouping_removes_the_padding_of_mixed_orientations():
    rng = np.random.default_rng(1)
    sizes = [(800, 1067) if rng.random() < 0.7 else (1067, 800) for _ in range(400)]  # (h, w) after resizing
    ratios = [w / h for h, w in sizes]
    order = _Order(rng.permutation(400).tolist())
    plain = list(BatchSampler(order, 2, drop_last=True))
    grouped = list(GroupedBatchSampler(order, aspect_ratio_groups(ratios, 3), 2))
    assert padding_ratio(sizes, grouped) < 0.01 < 0.1 < padding_ratio(sizes, plain)
    assert padding_ratio([(10, 10), (10, 10)], [[0, 1]]) == 0.0
    assert padding_ratio([(10, 20), (20, 10)], [[0, 1]]) == pytest.approx(0.5)
    assert padding_ratio([(10, 20), (20, 10)], [[0, 1]], divisor=32) == pytest.approx(1 - 400 / (2 * 32 * 32))
