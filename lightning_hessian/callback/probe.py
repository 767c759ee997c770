r"""Probe set: a fixed, seeded subset of the training data on which the callback evaluates the Hessian.

The probe set is chosen once with the callback's own :class:`torch.Generator`, never with the global RNGs, and is
collated and moved to the device exactly as Lightning's training loop moves a batch
(``precision_plugin.convert_input`` -> ``on_before_batch_transfer`` -> ``strategy.batch_to_device``).

Sharding under DDP: rank :math:`r` of :math:`W` owns the strided shard :math:`\{i : i \equiv r \pmod W\}` of the
``N`` samples (the assignment of an unshuffled :class:`~torch.utils.data.DistributedSampler`, without its padding
duplicates) and takes :math:`n_r = \lfloor P/W \rfloor + [r < P \bmod W]` of them, so the ranks' shares of the
``P = probe_samples`` samples are disjoint and differ in size by at most one. When ``P >= N`` every rank takes its whole
shard and the union of the ranks' probe sets is exactly the data set.

Training data as the loader defines it: the probe draws only from the indices the train loader's sampler can yield
(:func:`sampler_pool`): a ``SubsetRandomSampler``'s indices, a ``WeightedRandomSampler``'s positive-weight indices, the
full range for sequential and random samplers (without the tail a ``drop_last`` batch sampler never yields when the
order is sequential), this rank's shard of a ``DistributedSampler`` (Lightning's, or its wrapper of a custom sampler;
padding duplicates removed), and for any other sampler the indices one pass of it yields (its generator's state is
restored). A pool that is already rank-local (a distributed sampler) is used as it is; otherwise rank :math:`r` takes
the strided shard ``pool[r::W]`` as above. A mapping or sequence of train loaders (or a ``CombinedLoader``) is probed
through all of them: batch ``j`` holds the ``j``-th probe chunk of every loader in the same structure as the training
batch (as many batches as the shortest loader's probe set).

RNG isolation: reading a map-style data set item may run random transforms, and merely *starting* a DataLoader
iterator draws a base seed from the global torch RNG. Everything here runs inside :func:`isolated_rng`, which restores
the torch (CPU and the probe device), numpy and Python RNG states afterwards, so probing leaves training bit-for-bit
unchanged.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_hessian.operators import batch_size as count_samples

__all__ = ["ProbeSet", "isolated_rng", "pool_indices", "resolve_train_loader", "sampler_pool", "shard_indices"]


@contextlib.contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block without any lasting effect on the global RNG streams.

    Saves and restores the torch CPU generator, the generator of ``device`` when it is a CUDA device, numpy's legacy
    global ``RandomState`` and Python's :mod:`random` state.

    Args:
        device: the device whose generator must also be preserved (CPU needs nothing extra).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices: list[int] = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def shard_indices(num_items: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    r"""Seeded probe indices of rank ``rank`` among ``world_size`` ranks.

    Rank :math:`r` owns :math:`S_r = \{i < N : i \equiv r \pmod W\}` and draws
    :math:`n_r = \lfloor P/W \rfloor + [r < P \bmod W]` of them without replacement, with a generator seeded by
    ``seed`` (the RNGs of the process are not touched). When ``num_samples >= num_items`` the whole shard is returned.

    Args:
        num_items: size ``N`` of the data set.
        num_samples: global probe size ``P`` (all ranks together).
        seed: seed of the private generator.
        rank: this process's global rank.
        world_size: number of processes.

    Returns:
        Sorted list of data set indices for this rank.

    Raises:
        ValueError: if a size is not positive or ``rank`` is outside ``[0, world_size)``.
    """
    if num_items < 1:
        raise ValueError(f"The training data set is empty (num_items={num_items}); the probe needs at least 1 sample.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    shard = torch.arange(rank, num_items, world_size)
    if num_samples >= num_items:
        return shard.tolist()
    count = num_samples // world_size + int(rank < num_samples % world_size)
    count = min(count, shard.numel())
    generator = torch.Generator().manual_seed(int(seed))
    chosen = shard[torch.randperm(shard.numel(), generator=generator)[:count]]
    return sorted(chosen.tolist())


def pool_indices(
    pool: Sequence[int], num_samples: int, seed: int, rank: int = 0, world_size: int = 1, rank_local: bool = False
) -> list[int]:
    """Seeded probe indices of rank ``rank`` drawn from ``pool`` (the indices the train sampler yields).

    With ``rank_local`` the pool is already this rank's shard; otherwise the rank takes ``sorted(pool)[rank::W]``.
    The rank draws ``floor(P/W) + [rank < P mod W]`` of its shard (all of it when that is smaller), as
    :func:`shard_indices` does for ``pool = range(N)``.

    Raises:
        ValueError: if the pool is empty or ``num_samples < 1``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    ordered = sorted(set(int(i) for i in pool))
    if not ordered:
        raise ValueError("The train sampler yields no sample; the probe needs at least 1 sample.")
    shard = torch.tensor(ordered if rank_local else ordered[rank::world_size], dtype=torch.long)
    count = num_samples // world_size + int(rank < num_samples % world_size)
    if count >= shard.numel():
        return shard.tolist()
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(shard[torch.randperm(shard.numel(), generator=generator)[:count]].tolist())


def sampler_pool(loader: DataLoader, num_items: int) -> tuple[list[int], bool]:
    """The data set indices ``loader``'s sampler can yield, and whether they are already rank-local.

    Args:
        loader: a map-style DataLoader.
        num_items: ``len(loader.dataset)``.

    Returns:
        ``(indices, rank_local)``; see the module docstring for the rule per sampler type.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or loader.sampler
    drop_last = bool(getattr(batch_sampler, "drop_last", False))
    size = getattr(batch_sampler, "batch_size", None)
    if isinstance(sampler, DistributedSampler):
        order = [int(i) for i in _one_pass(sampler)]
        if drop_last and size:
            order = order[: len(order) // size * size]
        real = len(sampler.dataset)  # positions >= real are DistributedSampler's padding duplicates
        return [i for k, i in enumerate(order) if sampler.rank + k * sampler.num_replicas < real], True
    if isinstance(sampler, WeightedRandomSampler):
        return torch.nonzero(torch.as_tensor(sampler.weights) > 0).flatten().tolist(), False
    if isinstance(sampler, SubsetRandomSampler):
        return [int(i) for i in sampler.indices], False
    if isinstance(sampler, SequentialSampler):
        stop = num_items // size * size if drop_last and size else num_items
        return list(range(stop)), False
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples >= num_items:
        return list(range(num_items)), False
    return [int(i) for i in _one_pass(batch_sampler if batch_sampler is not None else sampler, flat=True)], False


def _one_pass(sampler: Any, flat: bool = False) -> list[int]:
    """Run one pass over a sampler and restore every generator it holds (the caller isolates the global RNGs)."""
    generators = [
        g
        for g in (getattr(sampler, "generator", None), getattr(getattr(sampler, "sampler", None), "generator", None))
        if isinstance(g, torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    try:
        out: list[int] = []
        for item in sampler:
            if flat and isinstance(item, (list, tuple)):
                out.extend(int(i) for i in item)
            elif isinstance(item, Tensor) and item.dim() > 0:
                out.extend(item.tolist())
            else:
                out.append(int(item))
        return out
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def _slice_batch(batch: Any, stop: int) -> Any:
    """The first ``stop`` samples of a batch (tensors sliced on dim 0 inside dicts, lists and tuples)."""
    if isinstance(batch, Tensor):
        return batch[:stop]
    if isinstance(batch, dict):
        return type(batch)((k, _slice_batch(v, stop)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice_batch(v, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(v, stop) for v in batch)
    return batch


class ProbeSet:
    """A fixed list of device-ready probe batches (this rank's share) and the indices they hold.

    Build it with :meth:`from_dataloader` (or :meth:`from_trainer` inside a Lightning hook); the batches are cached,
    so every probe evaluates the Hessian of the same loss.

    Attributes:
        batches: the collated, device-ready batches of this rank.
        indices: data set indices of this rank's samples (``None`` for an iterable data set).
        num_samples: number of samples on this rank.
    """

    def __init__(self, batches: Sequence[Any], indices: list[int] | None, num_samples: int) -> None:
        self.batches = list(batches)
        self.indices = indices
        self.num_samples = num_samples

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    @classmethod
    def from_dataloader(
        cls,
        loader: DataLoader,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        transfer: Any = None,
        device: torch.device | None = None,
    ) -> ProbeSet:
        """Select, collate and transfer this rank's probe samples of ``loader``'s data set.

        Map-style data sets: the indices come from :func:`pool_indices` over :func:`sampler_pool`; items are read
        with ``dataset[i]`` and
        collated with ``loader.collate_fn`` in chunks of ``batch_size`` (default: the loader's batch size). Iterable
        data sets have no indices: the first ``num_samples // world_size`` samples the (already rank-sharded) loader
        yields are taken instead, still with the RNG isolated.

        Args:
            loader: the training DataLoader (rank-local under DDP for iterable data sets).
            num_samples: global probe size, split evenly across ranks.
            seed: seed of the index generator.
            rank: global rank of this process.
            world_size: number of processes.
            batch_size: samples per probe batch; ``None`` uses ``loader.batch_size`` (or everything in one batch).
            transfer: ``batch -> batch`` applied to every collated batch (precision conversion and device move).
            device: device whose RNG must be preserved too.

        Returns:
            The probe set of this rank.

        Raises:
            ValueError: if the data set is empty or a size is invalid.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
        transfer = transfer if transfer is not None else (lambda b: b)
        dataset = loader.dataset
        with isolated_rng(device):
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                return cls._from_iterable(loader, max(1, num_samples // world_size), transfer)
            if len(dataset) < 1:
                raise ValueError("The training data set is empty; the probe needs at least 1 sample.")
            pool, rank_local = sampler_pool(loader, len(dataset))
            indices = pool_indices(pool, num_samples, seed, rank, world_size, rank_local)
            chunk = batch_size or loader.batch_size or len(indices)
            collate = loader.collate_fn
            batches = [
                transfer(collate([dataset[i] for i in indices[start : start + chunk]]))
                for start in range(0, len(indices), chunk)
            ]
        return cls(batches, indices, len(indices))

    @classmethod
    def _from_iterable(cls, loader: DataLoader, count: int, transfer: Any) -> ProbeSet:
        batches, taken = [], 0
        for batch in loader:
            size = count_samples(batch)
            if taken + size > count:
                batch, size = _slice_batch(batch, count - taken), count - taken
            batches.append(transfer(batch))
            taken += size
            if taken >= count:
                break
        if taken == 0:
            raise ValueError("The training DataLoader yielded no samples; the probe needs at least 1 sample.")
        return cls(batches, None, taken)

    @classmethod
    def from_trainer(
        cls,
        trainer: Any,
        pl_module: Any,
        num_samples: int,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        fallback: Any = None,
    ) -> ProbeSet:
        """Probe set from ``trainer.train_dataloader``, moved to ``pl_module``'s device as the training loop does.

        The transfer is ``trainer.precision_plugin.convert_input`` (casts inputs for ``*-true`` precisions), then the
        module's ``on_before_batch_transfer`` hook, then ``trainer.strategy.batch_to_device``
        (``transfer_batch_to_device`` and ``on_after_batch_transfer``), the sequence of Lightning's training epoch loop.

        Args:
            trainer: a ``lightning.pytorch.Trainer`` whose train dataloader is set up (from ``on_train_start`` on).
            pl_module: the (unwrapped) LightningModule.
            num_samples: global probe size.
            seed: seed of the index generator.
            batch_size: samples per probe batch (``None``: the loader's batch size).
            fallback: the train loader(s) of an earlier ``fit`` (used when the trainer has none, e.g. under
                ``trainer.validate()``).

        Returns:
            This rank's probe set.

        Raises:
            ValueError: if no training data can be found, or it is not made of torch DataLoaders.
        """
        loader = resolve_train_loader(trainer, pl_module, fallback)

        def transfer(batch: Any) -> Any:
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=0)

        def build(one: DataLoader) -> ProbeSet:
            return cls.from_dataloader(
                one,
                num_samples,
                seed=seed,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                batch_size=batch_size,
                transfer=lambda b: b,
                device=pl_module.device,
            )

        if isinstance(loader, DataLoader):
            single = build(loader)
            return cls([transfer(b) for b in single.batches], single.indices, single.num_samples)
        # a mapping / sequence of loaders: batch j holds every loader's j-th chunk, in the training batch structure
        parts = {k: build(v) for k, v in loader.items()} if isinstance(loader, Mapping) else None
        seq = None if parts is not None else [build(v) for v in loader]
        sets = list(parts.values()) if parts is not None else seq
        length = min(len(p) for p in sets)
        if parts is not None:
            batches = [type(loader)((k, p.batches[j]) for k, p in parts.items()) for j in range(length)]
        else:
            batches = [type(loader)(p.batches[j] for p in seq) for j in range(length)]
        first = sets[0]
        count = sum(count_samples(b) for b in first.batches[:length])
        return cls([transfer(b) for b in batches], first.indices, count)


def resolve_train_loader(trainer: Any, pl_module: Any, fallback: Any = None) -> Any:
    """The training data of ``trainer``: a DataLoader, or a mapping/sequence of DataLoaders.

    Order: ``trainer.train_dataloader`` (during fit), then ``fallback`` (an earlier fit's loaders, e.g. under
    ``trainer.validate()``), then the datamodule's or module's ``train_dataloader()`` when it is defined. A
    ``CombinedLoader`` is unwrapped to its iterables.

    Raises:
        ValueError: saying what to provide when there is no training data or it is not made of DataLoaders.
    """
    from lightning.pytorch.utilities import CombinedLoader
    from lightning.pytorch.utilities.model_helpers import is_overridden

    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        loader = fallback
    if loader is None:
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None and is_overridden("train_dataloader", datamodule) else None
        if source is None and is_overridden("train_dataloader", pl_module):
            source = pl_module
        if source is None:
            raise ValueError(
                "HessianSpectrum needs the training data, but this run has none: outside fit (trainer.validate()), "
                "run trainer.fit first with the same callback, or define train_dataloader() on the LightningModule "
                "or the LightningDataModule."
            )
        loader = source.train_dataloader()
    if isinstance(loader, CombinedLoader):
        loader = loader.iterables
    loaders = list(loader.values()) if isinstance(loader, Mapping) else loader
    if isinstance(loaders, DataLoader) or (
        isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders)
    ):
        return loader
    raise ValueError(
        "HessianSpectrum needs the training data as a torch DataLoader, a mapping or sequence of DataLoaders, or a "
        f"CombinedLoader of them; got {type(loader).__name__}. Wrap the data in a DataLoader."
    )
