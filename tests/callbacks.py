"""Lightning callbacks the tests use: to interrupt runs the ways real runs get interrupted,
and to count what a fit ran."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from tests.helpers import host_syncs


class StopAfterEpoch(pl.Callback):
    """Simulates a crash or preemption right after epoch ``k`` was checkpointed."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.k:
            trainer.should_stop = True


class CheckpointMidEpoch(pl.Callback):
    """Writes a checkpoint after the k-th training step and stops: SLURM preemption's path."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, out: Any, b: Any, i: int
    ) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt")
            raise SystemExit(0)


class CountBatches(pl.Callback):
    """Counts the training and validation batches a fit runs."""

    def __init__(self) -> None:
        self.train = 0
        self.val = 0

    def on_train_batch_start(self, *args: object) -> None:
        self.train += 1

    def on_validation_batch_start(self, *args: object) -> None:
        self.val += 1


class RecordHostSyncs(pl.Callback):
    """Records the host-synchronising operations (``tests.helpers.host_syncs``) of each training
    step, from its batch start to the next one's (for the epoch's last, to its batch end: the
    validation loader's start draws a seed with a host tensor's .item()): training_step,
    backward, the optimizer step, Lightning's per-step metric handling, and the next batch's
    transfer and views."""

    def __init__(self) -> None:
        self.per_step: list[list[tuple[str, str]]] = []
        self._stack = ExitStack()

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        self._stack.close()
        self.per_step.append(self._stack.enter_context(host_syncs()))  # filled as they happen

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, out: Any, b: Any, i: int
    ) -> None:
        if i + 1 >= trainer.num_training_batches:
            self._stack.close()
