"""Layer batches: the "dataset" of both DiDi stages is the set of decomposed matrices.

A global batch is a set of matrices; under DDP every process takes a disjoint share of each global batch
(possibly empty), so every process runs the same number of steps and no matrix is counted twice — unlike
`DistributedSampler`, which pads with duplicates. Items are already collated per step.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import lightning as L
from torch.utils.data import DataLoader, IterableDataset


def _identity(x):
    return x


def split_batches(n: int, batch_size: int | None, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive global batches of matrix indices (one batch of everything when batch_size is None)."""
    bs = n if not batch_size else batch_size
    return [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]


class LayerBatches(IterableDataset):
    """Yields, per global batch, `load(indices)` for this process's share of it."""

    def __init__(self, batches: list[list[int]], load: Callable[[list[int]], object]) -> None:
        self.batches = batches
        self.load = load
        self.rank, self.world = 0, 1

    def set_distributed(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        for b in self.batches:
            yield self.load(b[self.rank :: self.world])


class LayerBatchDataModule(L.LightningDataModule):
    """Wraps `LayerBatches` for a Trainer; the process share is set when the Trainer knows its rank."""

    def __init__(
        self, n_matrices: int, load: Callable[[list[int]], object], batch_size: int | None = None
    ) -> None:
        super().__init__()
        self.dataset = LayerBatches(split_batches(n_matrices, batch_size), load)

    @property
    def num_batches(self) -> int:
        return len(self.dataset)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.dataset.set_distributed(self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, collate_fn=_identity, num_workers=0)
