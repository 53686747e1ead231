"""Data order and randomness that do not depend on workers, world size or resumption: per-sample
seeds, resumable (batch) samplers, the masking noise of each micro-step."""
from __future__ import annotations

import random
from typing import List

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

# ------------------------------------------------------------------------------------ seeds
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (splitmix64 rounds)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, rank r takes every world-th index)
    that yields ``(index, sample_seed)``, stops after ``limit`` samples per epoch (the batches
    that make whole optimizer steps) and can start ``start`` samples into the epoch (resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start, self.limit = 0, self.num_samples

    def __iter__(self):
        indices = list(super().__iter__())[self.start:self.limit]
        return iter([(i, mix_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return max(0, self.limit - self.start)

    def resume_at(self, micro_batches: int, batch_size: int) -> None:
        """Start the epoch after ``micro_batches`` batches of ``batch_size`` samples."""
        self.start = micro_batches * batch_size


class ResumableBatchSampler(torch.utils.data.Sampler):
    """The batch-sampler counterpart of ``ResumableSampler``, for variable-size batches.

    ``plan``: an iterable of batches (lists of dataset indices) covering the *global* epoch,
    deterministic given its ``set_epoch(epoch)`` (called here when it has one). Each epoch the
    plan is cut to a multiple of ``num_replicas`` batches and rank r takes batches r::world, so
    every rank runs the same number of micro-steps. Yields lists of ``(index, sample_seed)``
    (seeds as ``ResumableSampler``'s), from batch ``start`` up to ``limit`` (resume)."""

    def __init__(self, plan, num_replicas: int, rank: int, seed: int):
        self.plan, self.num_replicas, self.rank, self.seed = plan, num_replicas, rank, seed
        self.epoch, self.start = 0, 0
        first = self._global()
        self.num_batches = len(first) // num_replicas  # per rank, epoch 0
        kept = first[:self.num_batches * num_replicas]
        # mean images per (global) batch: the nominal batch size for the lr rule and the logs
        self.mean_batch_size = sum(len(b) for b in kept) / max(1, len(kept))
        self.limit = self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global(self) -> List[List[int]]:
        if hasattr(self.plan, "set_epoch"):
            self.plan.set_epoch(self.epoch)
        return [[int(i) for i in b] for b in self.plan]

    def batches(self) -> List[List[int]]:
        """This rank's batches of the current epoch (before ``start`` / ``limit``)."""
        bins = self._global()
        n = len(bins) // self.num_replicas
        return bins[:n * self.num_replicas][self.rank::self.num_replicas]

    def __iter__(self):
        mine = self.batches()
        if len(mine) < self.limit:
            raise RuntimeError(f"the batch plan of epoch {self.epoch} has {len(mine)} batches per process, "
                               f"fewer than the {self.limit} of epoch 0 the schedule was sized with")
        return iter([[(i, mix_seed(self.seed, self.epoch, i)) for i in b]
                     for b in mine[self.start:self.limit]])

    def __len__(self) -> int:
        return max(0, self.limit - self.start)

    def resume_at(self, micro_batches: int, batch_size: int) -> None:
        self.start = micro_batches


class SeededSamples(Dataset):
    """``ds[(index, seed)]`` = the wrapped ``ds[index]`` computed with torch / numpy / python
    RNGs seeded from ``seed`` (restored afterwards), so random augmentation is a function of the
    sample and the epoch only."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state(legacy=False)  # the dict: half the cost
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a reseed of every CUDA / XPU
            # generator, recording a stack trace each time (about 1 ms a sample), and leave them changed
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def masking_noise(seed: int, step: int, micro: int, global_batch: int, num_patches: int,
                  rank: int, world: int) -> torch.Tensor:
    """[global_batch / world, L] uniform noise: rows rank::world of the global batch's noise."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x6E6F697365, step, micro))
    return torch.rand(global_batch, num_patches, generator=g)[rank::world]
