"""ProbeSet: seeded, rank-sharded sample choice; collation like the DataLoader; no effect on the global RNGs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_hessian.probe import ProbeSet, isolated_rng, shard_indices


@pytest.mark.parametrize(("n", "p", "world"), [(10, 4, 1), (31, 12, 2), (31, 31, 2), (17, 100, 3), (9, 7, 4)])
def test_shards_are_disjoint_balanced_and_cover_when_full(n, p, world):
    parts = [shard_indices(n, p, seed=3, rank=r, world_size=world) for r in range(world)]
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))  # disjoint
    assert all(i % world == r for r, part in enumerate(parts) for i in part)  # each rank inside its own shard
    if p >= n:
        assert sorted(flat) == list(range(n))  # the probe set is exactly the data set
    else:
        assert len(flat) == p
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # split evenly
    assert parts == [shard_indices(n, p, seed=3, rank=r, world_size=world) for r in range(world)]  # seeded


def test_seed_changes_choice_and_invalid_input_raises():
    assert shard_indices(100, 10, seed=0) != shard_indices(100, 10, seed=1)
    with pytest.raises(ValueError, match="num_samples"):
        shard_indices(10, 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 3, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        shard_indices(0, 3, seed=0)


class Noisy(Dataset):
    """Items read global RNGs, like a random augmentation."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]) + 0 * torch.rand(1) + 0 * np.random.rand() + 0 * random.random(), i


def test_from_dataloader_collates_and_leaves_global_rngs_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    loader = DataLoader(Noisy(), batch_size=3, shuffle=True)
    probe = ProbeSet.from_dataloader(loader, 8, seed=4, transfer=lambda b: (b[0].double(), b[1]))
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert probe.num_samples == 8 and [len(b[1]) for b in probe.batches] == [3, 3, 2]
    got = torch.cat([b[1] for b in probe.batches]).tolist()
    assert got == probe.indices == shard_indices(20, 8, seed=4)
    x = torch.cat([b[0] for b in probe.batches])
    assert x.dtype == torch.float64 and x.squeeze(1).tolist() == [float(i) for i in got]


def test_isolated_rng_restores_state_after_draws():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with isolated_rng():
        torch.rand(100)
        np.random.rand(5)
    assert torch.equal(torch.rand(3), expected)


class Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.tensor([float(i)]), i) for i in range(10))


def test_iterable_dataset_takes_the_first_samples():
    probe = ProbeSet.from_dataloader(DataLoader(Stream(), batch_size=4), 6)
    assert probe.indices is None and probe.num_samples == 6
    assert torch.cat([b[1] for b in probe.batches]).tolist() == [0, 1, 2, 3, 4, 5]


def test_whole_dataset_probe_equals_dataset():
    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    probe = ProbeSet.from_dataloader(DataLoader(data, batch_size=4), 1000, batch_size=5)
    assert [len(b[1]) for b in probe.batches] == [5, 5]
    assert torch.cat([b[1] for b in probe.batches]).tolist() == list(range(10))
