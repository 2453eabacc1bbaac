"""The pretraining LightningDataModule.

Batches the methods see, whatever produces the views:
- train: ``(views, labels)`` with ``views`` a list of two ``(B, C, S, S)`` float tensors;
- val loader 0 (the kNN feature bank: train images) and val loader 1 (the val split):
  ``(images, labels)``.

The CPU path runs lightly's PIL transforms in DataLoader workers. A device-side path only has to
replace ``train_dataloader`` (yield uint8 batches) and ``on_after_batch_transfer`` (turn them
into views on the device); the methods do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from ssl_robust.data.datasets import ImageSource, TransformDataset


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` in an order seeded by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before each epoch (also through its DDP sampler wrapper, which
    shards these items), and the dataset seeds each sample's augmentation from
    ``(seed, epoch, index)``. Order and views of epoch k are therefore the same in a run
    resumed at epoch k as in an uninterrupted one, whatever the number of workers: the global
    RNG state, which a checkpoint does not hold, plays no part.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter((self.epoch, i) for i in torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _collate_views(
    batch: list[tuple[list[torch.Tensor], int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    views = [torch.stack([item[0][v] for item in batch]) for v in range(len(batch[0][0]))]
    labels = torch.tensor([item[1] for item in batch], dtype=torch.long)
    return views, labels


class SSLDataModule(pl.LightningDataModule):
    """Two augmented views for training; bank + val splits for kNN / online-probe monitoring."""

    def __init__(
        self,
        train: ImageSource,
        val: ImageSource,
        train_transform: Callable[[Any], list[torch.Tensor]],
        eval_transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if len(train) < batch_size:
            raise ValueError(
                f"the training split has {len(train)} images, fewer than one batch of "
                f"{batch_size}; lower data.batch_size"
            )
        self.train_source = train
        self.val_source = val
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.channels_last = channels_last

    def _loader(self, dataset: Any, batch_size: int, **kw: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        ds = TransformDataset(self.train_source, self.train_transform, seed=self.seed)
        return self._loader(
            ds,
            self.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed),
            drop_last=True,
            collate_fn=_collate_views,
        )

    def val_dataloader(self) -> list[DataLoader]:
        bank = TransformDataset(self.train_source, self.eval_transform)
        val = TransformDataset(self.val_source, self.eval_transform)
        return [
            self._loader(bank, self.eval_batch_size, shuffle=False),
            self._loader(val, self.eval_batch_size, shuffle=False),
        ]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.channels_last:
            return batch
        x, y = batch
        if isinstance(x, list):
            return [v.contiguous(memory_format=torch.channels_last) for v in x], y
        return x.contiguous(memory_format=torch.channels_last), y
