"""The pretraining LightningDataModule.

Batches the methods see, whatever produces the views:
- train: ``(views, labels)`` with ``views`` a list of two ``(B, C, S, S)`` float tensors;
- val loader 0 (the kNN feature bank: train images), val loader 1 (the val split) and, when
  given, val loader 2 (a shifted twin of the val split): ``(images, labels)``.

Two ways to make the views, chosen by ``augment``:
- ``"cpu"``: lightly's PIL transforms in DataLoader workers (any dataset);
- ``"gpu"``: the uint8 image array is uploaded to the device once, the loader yields only
  indices, and batched transforms (``gpu_views``) make the views on the device in
  ``on_after_batch_transfer``. For datasets that fit in memory.
Either way, an optional ``view_hook`` (e.g. denoised views) rewrites the views on the device.
The methods do not know which path ran.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_robust.data.datasets import ArraySource, ImageSource, TransformDataset

AUGMENT = ("cpu", "gpu")


def check_fits_on_device(nbytes: int, free_bytes: int, device: str) -> None:
    """Refuses to upload a training set that would take over half of ``free_bytes``.

    Raises:
        RuntimeError: naming the sizes and ``data.augment=cpu``, the path for such datasets.
    """
    if nbytes > free_bytes // 2:
        gib = 1024**3
        raise RuntimeError(
            f"data.augment=gpu keeps the training images on {device} as uint8: "
            f"{nbytes / gib:.2f} GiB, but only {free_bytes / gib:.2f} GiB are free there and "
            "the model needs at least half of it. Use data.augment=cpu (views made in "
            "DataLoader workers), or a smaller data.image_size."
        )


def upload_images(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` images as one ``(N, C, H, W)`` tensor on ``device``.

    Raises:
        RuntimeError: on a GPU, when the array would take more than half of its free memory
            (:func:`check_fits_on_device`).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        check_fits_on_device(array.nbytes, free, str(device))
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


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
        # Batches of the current epoch already trained (set when resuming mid-epoch).
        self.skip_batches: Callable[[], int] = lambda: 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter((self.epoch, i) for i in torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _SkipFirst:
    """An index sampler whose iteration starts after ``skip()`` batches, asked when iteration
    starts (Lightning creates the iterator before it has settled the restored counters). Its
    length is the full epoch's, which is what Lightning's restored progress counters use."""

    def __init__(self, inner: Iterable[list[Any]], skip: Callable[[], int]) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator[list[Any]]:
        batches = iter(self.inner)
        for _ in range(self.skip()):
            next(batches, None)
        yield from batches

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class _Deferred:
    """An iterator made by ``make()`` at the first ``next``."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make = make
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._make()
        return next(self._it)


class ResumableDataLoader(DataLoader):
    """A DataLoader that starts a resumed epoch at the first batch not yet trained on.

    Its batches are index lists, so the skipped ones load and augment nothing. The count comes
    from the :class:`EpochSeededSampler` (also inside Lightning's DDP sampler wrapper, which keeps
    the original as ``.dataset._sampler``); Lightning re-creates this class unchanged for DDP.
    """

    def __iter__(self) -> Any:
        # Created at the first batch, not when Lightning asks for the iterator: on a resumed
        # fit it does so before it sets the sampler's epoch and settles the restored counters,
        # and worker processes draw their first indices as soon as the iterator exists (with
        # num_workers > 0 a resumed epoch would otherwise replay epoch 0's order).
        return _Deferred(super().__iter__)

    @property
    def _index_sampler(self) -> Any:
        index_sampler = super()._index_sampler
        base = getattr(getattr(self.sampler, "dataset", None), "_sampler", self.sampler)
        if not isinstance(base, EpochSeededSampler) or not self._auto_collation:
            return index_sampler
        return _SkipFirst(index_sampler, base.skip_batches)


def batches_done_this_epoch(trainer: pl.Trainer | None) -> int:
    """Training batches of the current epoch already done: > 0 only in a run resumed from a
    mid-epoch checkpoint (e.g. written on SLURM preemption). Derived from the restored step and
    epoch counters, which every checkpoint holds."""
    if trainer is None or not isinstance(trainer.num_training_batches, int):
        return 0
    n, acc = trainer.num_training_batches, trainer.accumulate_grad_batches
    # Lightning steps after every `acc` batches and after an epoch's last batch: ceil(n / acc)
    # steps an epoch. A checkpoint holds whole steps only (the gradients of a window cut short
    # are lost), so the batches done are those of the steps done this epoch.
    steps_per_epoch = math.ceil(n / acc)
    done = (trainer.global_step - trainer.current_epoch * steps_per_epoch) * acc
    return done if 0 < done < n else 0


_capped_workers_warned = False


def usable_workers(num_workers: int) -> int:
    """``num_workers``, at most the CPUs this process may run on (its affinity: a SLURM task's
    ``--cpus-per-task``, a container's CPU set). A preset made for a GPU node (8 workers) then
    runs on a 2-core laptop without 8 competing processes, which torch warns "might get
    DataLoader running slow or even freeze". Samples are seeded by ``(seed, epoch, index)``,
    so the number of workers never changes the data."""
    global _capped_workers_warned
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    if num_workers <= cpus:
        return num_workers
    if not _capped_workers_warned:
        _capped_workers_warned = True
        rank_zero_warn(
            f"data.num_workers={num_workers} but this process may use {cpus} CPUs: "
            f"loading with {cpus} workers"
        )
    return cpus


def ignore_sigterm(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM.

    Schedulers (SLURM's time limit or ``scancel``, ``timeout``, a shell's ``kill`` of the
    process group) send SIGTERM to every process of a job. A worker that died of it would make
    the main process fail at once with "DataLoader worker ... is killed by signal", before it
    could finish its training step and checkpoint it; the main process shuts its workers down
    itself when it stops (and they exit on their own when it is gone).

    After ``seed_everything(workers=True)`` Lightning gives a loader without a
    ``worker_init_fn`` its own, which seeds the worker's generators; this one runs it too, so
    the workers draw the same numbers as they did without it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)  # its rank: the forked process's rank_zero_only.rank


def worker_options(num_workers: int) -> dict[str, Any]:
    """DataLoader settings of every loader here: ``num_workers`` processes (at most the usable
    CPUs) that survive between epochs (and kNN rounds) instead of restarting each time, and
    pinned batches when a GPU will read them. The sampler runs in the main process and samples
    are seeded by ``(seed, epoch, index)``, so persistent workers keep resumed epochs exact.
    The workers leave SIGTERM to the main process (:func:`ignore_sigterm`)."""
    num_workers = usable_workers(num_workers)
    return {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
        "worker_init_fn": ignore_sigterm if num_workers > 0 else None,
    }


class SpreadOrder(Sampler[int]):
    """Every index once, in one fixed seeded order, for evaluation loaders.

    Metrics over a whole split do not depend on the order, but a limited validation
    (``trainer.limit_val_batches``) reads only the first batches, and ImageFolder trees are
    stored class by class: in file order, a fifth of CIFAR-10's test set is its first two
    classes. In this order any prefix is a uniform sample of the split, the same one every
    epoch and, with the default seed, on every run, so limited validations stay comparable.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.order = np.random.default_rng(seed).permutation(n).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def eval_loader(dataset: Any, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An evaluation loader: the whole split once, in :class:`SpreadOrder` (the same order
    whatever the run's seed), whole batches of ``batch_size`` but the last."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SpreadOrder(len(dataset)),
        **worker_options(num_workers),
    )


def seeded_train_loader(
    module: pl.LightningDataModule, dataset: Any, batch_size: int, seed: int, **kw: Any
) -> ResumableDataLoader:
    """The training loader of every datamodule here: order seeded by ``(seed, epoch)``, full
    batches, and a resumed epoch starting at the first batch ``module.trainer`` has not done."""
    sampler = EpochSeededSampler(len(dataset), seed)
    sampler.skip_batches = lambda: batches_done_this_epoch(module.trainer)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kw
    )


def batch_seed(seed: int, keys: Sequence[tuple[int, int]]) -> int:
    """A seed for a whole batch from its ``(epoch, index)`` keys (for device-side randomness)."""
    first_epoch = keys[0][0]
    state = np.random.SeedSequence([seed, first_epoch, *(i for _, i in keys[:8])])
    return int(state.generate_state(1)[0])


class _Keys(Dataset):
    """The device path's dataset: ``(epoch, index) -> (epoch, index, label)``."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, int]:
        return key[0], key[1], int(self.labels[key[1]])


class _Indices(Dataset):
    """The device path's evaluation dataset: ``index -> {"eval_index": index, "label": y}``
    (the images themselves wait on the device)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, int]:
        return {"eval_index": index, "label": int(self.labels[index])}


class SSLDataModule(pl.LightningDataModule):
    """Two augmented views for training; bank + val splits (and a shifted twin of val) for kNN /
    online-probe monitoring."""

    def __init__(
        self,
        train: ImageSource,
        val: ImageSource,
        train_transform: Callable[[Any], list[torch.Tensor]] | Sequence[nn.Module],
        eval_transform: Callable[[Any], torch.Tensor],
        batch_size: int,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        channels_last: bool = False,
        augment: str = "cpu",
        view_hook: nn.Module | None = None,
        bank: ImageSource | None = None,
        val_shift: ImageSource | None = None,
        device_eval_transform: nn.Module | None = None,
    ) -> None:
        """Args:
        train_transform: for ``augment="cpu"`` a PIL transform returning the list of views;
            for ``"gpu"`` one batched module per view (uint8 (B, C, H, W) -> float views).
        eval_transform: the PIL transform of the validation images.
        device_eval_transform: with ``augment="gpu"``, its batched twin (uint8 (B, C, H, W)
            -> normalised float, ``gpu_views.EvalTransform``). Validation then runs on the
            device too when every split it reads is in memory at the transform's size (no
            resizing, where the two could differ): the images are uploaded once and the
            loaders yield indices, instead of DataLoader workers converting and copying
            every image at every validation.
        view_hook: ``hook(views, generator) -> views`` applied on the device to train batches.
        bank: the labeled images of the kNN feature bank (default: ``train``, which may also
            hold unlabeled images, label -1, that the online probe ignores).
        val_shift: a shifted twin of ``val`` (e.g. corrupted), scored as validation loader 2.
        """
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if augment not in AUGMENT:
            raise ValueError(f"unknown augment {augment!r}; choose from {list(AUGMENT)}")
        if augment == "gpu" and not isinstance(train, ArraySource):
            raise ValueError(
                "augment='gpu' needs the training images in memory (data.in_memory=true)"
            )
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
        self.augment = augment
        self.view_hook = view_hook
        self.bank_source = bank if bank is not None else train
        self.val_shift_source = val_shift
        if (self.bank_source.labels < 0).any():
            raise ValueError("the kNN bank needs labeled images; pass the labeled split as bank")
        self.device_eval_transform = device_eval_transform
        self._device_images: torch.Tensor | None = None
        self._device_eval_images: dict[int, torch.Tensor] = {}
        self._eval_transform_device: torch.device | None = None

    def train_dataloader(self) -> DataLoader:
        if self.augment == "gpu":
            # Only indices travel; the images already live on the device. Pinned, so that their
            # copy (non_blocking, by Lightning) never waits for the device's queued work.
            keys = _Keys(self.train_source.labels)
            return seeded_train_loader(
                self,
                keys,
                self.batch_size,
                self.seed,
                collate_fn=self._collate_keys,
                pin_memory=torch.cuda.is_available(),
            )
        ds = TransformDataset(self.train_source, self.train_transform, seed=self.seed)  # type: ignore[arg-type]
        return seeded_train_loader(
            self,
            ds,
            self.batch_size,
            self.seed,
            collate_fn=self._collate_views,
            **worker_options(self.num_workers),
        )

    def _collate_keys(self, items: list[tuple[int, int, int]]) -> dict[str, Any]:
        keys = [(e, i) for e, i, _ in items]
        return {
            "index": torch.tensor([i for _, i in keys], dtype=torch.long),
            "label": torch.tensor([y for _, _, y in items], dtype=torch.long),
            "seed": batch_seed(self.seed, keys),
        }

    def _collate_views(
        self, items: list[tuple[list[torch.Tensor], int, tuple[int, int]]]
    ) -> dict[str, Any]:
        views = [torch.stack([item[0][v] for item in items]) for v in range(len(items[0][0]))]
        return {
            "views": views,
            "label": torch.tensor([item[1] for item in items], dtype=torch.long),
            "seed": batch_seed(self.seed, [item[2] for item in items]),
        }

    def eval_sources(self) -> list[ImageSource]:
        """What the validation loaders read, in their order: the kNN bank, the val split and,
        when there is one, its shifted twin."""
        shifted = [self.val_shift_source] if self.val_shift_source is not None else []
        return [self.bank_source, self.val_source, *shifted]

    @property
    def device_validation(self) -> bool:
        """Whether validation batches are made on the device (see ``device_eval_transform``)."""
        t = self.device_eval_transform
        if self.augment != "gpu" or t is None:
            return False
        size = (t.input_size, t.input_size)
        return all(
            isinstance(s, ArraySource) and s.images.shape[1:3] == size for s in self.eval_sources()
        )

    def val_dataloader(self) -> list[DataLoader]:
        if self.device_validation:
            # Indices only, in the main process: there is nothing for workers to do.
            return [
                eval_loader(_Indices(s.labels), self.eval_batch_size) for s in self.eval_sources()
            ]
        bank = TransformDataset(self.bank_source, self.eval_transform)
        val = TransformDataset(self.val_source, self.eval_transform)
        loaders = [
            eval_loader(bank, self.eval_batch_size, self.num_workers),
            eval_loader(val, self.eval_batch_size, self.num_workers),
        ]
        if self.val_shift_source is not None:
            shifted = TransformDataset(self.val_shift_source, self.eval_transform)
            loaders.append(eval_loader(shifted, self.eval_batch_size, self.num_workers))
        return loaders

    def images_on(self, device: torch.device) -> torch.Tensor:
        """The training images as one uint8 (N, C, H, W) tensor on ``device`` (uploaded once,
        with the view transforms).

        Raises:
            RuntimeError: when the array would take more than half of the device's free
                memory (the model needs the rest); ``data.augment=cpu`` is the way out.
        """
        if self._device_images is None or self._device_images.device != device:
            self._device_images = upload_images(self.train_source.images, device)  # type: ignore[attr-defined]
            # The view transforms' buffers (normalisation) go along, once: left on the host,
            # they would be copied to the device, blocking, on every batch.
            for t in self.train_transform:  # type: ignore[union-attr]
                t.to(device)
        return self._device_images

    def eval_images_on(self, device: torch.device, dataloader_idx: int) -> torch.Tensor:
        """The images of validation loader ``dataloader_idx`` as uint8 (N, C, H, W) on
        ``device``, uploaded at the first validation. A bank that is the training split shares
        the training images' copy."""
        if self._eval_transform_device != device:
            # The transform's normalisation buffers go along, once: left on the host, they
            # would be copied to the device on every batch.
            self.device_eval_transform.to(device)  # type: ignore[union-attr]
            self._eval_transform_device = device
        source = self.eval_sources()[dataloader_idx]
        if source is self.train_source:
            return self.images_on(device)
        images = self._device_eval_images.get(dataloader_idx)
        if images is None or images.device != device:
            images = upload_images(source.images, device)  # type: ignore[attr-defined]
            self._device_eval_images[dataloader_idx] = images
        return images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "eval_index" in batch:  # a device-path validation batch
            index, labels = batch["eval_index"], batch["label"]
            images = self.eval_images_on(index.device, dataloader_idx)[index]
            x = self.device_eval_transform(images)  # type: ignore[misc]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, labels
        if isinstance(batch, dict):  # a training batch
            labels = batch["label"]
            device = labels.device
            generator = torch.Generator(device=device).manual_seed(batch["seed"])
            if self.augment == "gpu":
                images = self.images_on(device)[batch["index"]]  # (B, C, H, W) uint8
                views = [t(images, generator=generator) for t in self.train_transform]  # type: ignore[union-attr]
            else:
                views = batch["views"]
            if self.view_hook is not None:
                self.view_hook.to(device)
                views = self.view_hook(views, generator=generator)
            if self.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            return views, labels
        if self.channels_last:
            x, y = batch
            return x.contiguous(memory_format=torch.channels_last), y
        return batch
