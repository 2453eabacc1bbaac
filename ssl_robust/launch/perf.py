"""Training throughput per epoch, measured inside the real training loop.

Lightning's ``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` after every batch, which
takes away the host's run-ahead exactly where we want to see whether the device is kept busy
(a 512-image CIFAR step on an H200 lasts about 20 ms). This callback synchronises twice per
epoch and once around each validation, so the figure costs nothing and excludes the kNN
monitor's time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.autograd import DeviceType

from ssl_robust.benchmarking import sync


def batch_length(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor, found depth first.

    Works for ``(views, labels)``, ``(x, y)`` and dicts of tensors without touching device
    memory (``shape`` needs no synchronisation).
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        for item in batch:
            n = batch_length(item)
            if n:
                return n
    return 0


def steady_throughput(per_epoch: Sequence[float]) -> float:
    """Median images/s over the epochs after the first (which pays for compilation and
    warm-up); the only value when there is one epoch, 0 when there is none."""
    if not per_epoch:
        return 0.0
    steady = per_epoch[1:] or per_epoch
    return float(statistics.median(steady))


class FitClock(pl.Callback):
    """Seconds spent in ``fit`` over all the pieces of a run (``total_s``), kept in its
    checkpoints: a resumed or requeued piece adds its own to those of the pieces before it (up
    to their last checkpoint; what they trained after it is trained again and counted then)."""

    def __init__(self) -> None:
        self.before_s = 0.0  # the earlier pieces', restored from the checkpoint
        self.total_s = 0.0
        self._start: float | None = None

    def _now_s(self) -> float:
        return self.before_s + (time.perf_counter() - self._start if self._start else 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_s = self._now_s()

    def state_dict(self) -> dict[str, float]:
        return {"fit_s": self._now_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before_s = float(state_dict.get("fit_s", 0.0))


class EpochThroughput(pl.Callback):
    """Logs ``perf/train_images_per_s`` and ``perf/epoch_s`` once per training epoch.

    ``perf/train_images_per_s`` counts the samples of every rank (global images per second of
    training steps, validation excluded); ``perf/epoch_s`` is the whole epoch's wall time,
    validation included. The per-epoch values are kept in ``images_per_s`` for the caller
    (see :func:`steady_throughput`).
    """

    def __init__(self) -> None:
        self.images_per_s: list[float] = []
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_s = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(trainer.strategy.root_device)
        self._epoch_start = time.perf_counter()
        self._val_s = 0.0
        self._samples = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._samples += batch_length(batch)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside a fit epoch
            sync(trainer.strategy.root_device)
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            sync(trainer.strategy.root_device)
            self._val_s += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync(trainer.strategy.root_device)
        epoch_s = time.perf_counter() - self._epoch_start
        train_s = max(epoch_s - self._val_s, 1e-9)
        if self._samples == 0:
            return
        ips = self._samples * trainer.world_size / train_s
        self.images_per_s.append(ips)
        if trainer.is_global_zero:
            metrics = {"perf/train_images_per_s": ips, "perf/epoch_s": epoch_s}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


class StepProfiler(pl.Callback):
    """Profiles ``steps`` training steps with ``torch.profiler`` and writes a text report to
    ``path``: the steps' wall time, how much of it the device was busy, and the operators that
    took the most host and device time. Rank 0 only.

    The steps are whole, from the end of the step before (or the epoch's start) to their own
    end, so each holds its batch's transfer and views, and they never take in a validation.
    They come after the piece's first epoch when it trains more than one (compilation and
    cuDNN's algorithm search happen in the first), else as late in its only epoch as they fit.
    Whether a loop is bound by the host or by the device shows here: a busy share well under
    1 with host operators filling the step means the device waits for the host.
    """

    def __init__(self, path: str | Path, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.path = Path(path)
        self.steps = steps
        self._start_at = -1  # the piece's step count after which profiling starts
        self._seen = 0  # steps of this piece so far
        self._profile: torch.profiler.profile | None = None
        self._t0 = 0.0
        self._written = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = int(trainer.num_training_batches)
        epochs_left = (trainer.max_epochs or 1) - trainer.current_epoch
        self._start_at = per_epoch if epochs_left > 1 else max(0, per_epoch - self.steps)
        self._seen = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seen == self._start_at:
            self._start(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._seen += 1
        if self._profile is not None and self._seen == self._start_at + self.steps:
            self._finish(trainer, self.steps)
        elif self._seen == self._start_at and batch_idx + 1 < trainer.num_training_batches:
            self._start(trainer)  # mid-epoch; at an epoch's end, when the next one starts

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profile is not None and trainer.state.fn == TrainerFn.FITTING:
            self._finish(trainer, self._seen - self._start_at)  # the epoch ended first

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profile is not None:  # the run ended first
            self._finish(trainer, self._seen - self._start_at)
        elif trainer.global_rank == 0 and not self._written:
            self._write(
                f"not profiled: this piece of the run trained {self._seen} steps and profiling "
                f"starts after {self._start_at} (after the first epoch of a longer run)\n"
            )

    def _start(self, trainer: pl.Trainer) -> None:
        if trainer.global_rank != 0 or self._profile is not None or self._written:
            return
        device = trainer.strategy.root_device
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        sync(device)
        try:
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()
        except Exception as err:  # a profiler that cannot start must not cost the run
            self._profile = None
            self._write(f"profiling failed to start: {err!r}\n")
            return
        self._t0 = time.perf_counter()

    def _finish(self, trainer: pl.Trainer, steps: int) -> None:
        assert self._profile is not None
        device = trainer.strategy.root_device
        sync(device)
        wall_s = time.perf_counter() - self._t0
        profile, self._profile = self._profile, None
        try:
            profile.__exit__(None, None, None)
            report = profile_report(profile.key_averages(), steps, wall_s, device.type == "cuda")
        except Exception as err:  # as above: the report is lost, not the run
            report = f"profiling failed: {err!r}\n"
        self._write(report)

    def _write(self, text: str) -> None:
        self._written = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)


def profile_report(events: Any, steps: int, wall_s: float, on_device: bool) -> str:
    """The text of :class:`StepProfiler`'s report from ``torch.profiler``'s ``key_averages()``."""
    lines = [
        f"{steps} training steps profiled: {wall_s * 1e3:.1f} ms wall, "
        f"{wall_s * 1e3 / max(steps, 1):.2f} ms per step"
    ]
    tables = [("host (CPU) time", "self_cpu_time_total")]
    if on_device:
        # The device's own events (kernels, copies) only: a host operator's device time is
        # that of the kernels it launched, which are also events (as torch.profiler's totals).
        busy_s = (
            sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6
        )
        share = busy_s / max(wall_s, 1e-9)
        lines.append(
            f"device busy {busy_s * 1e3:.1f} ms = {share:.0%} of the wall time "
            "(kernels and copies; well under 100 %: the device waits for the host)"
        )
        tables.insert(0, ("device time", "self_device_time_total"))
    else:
        lines.append("no device: the host ran every operator (a CPU run)")
    for title, key in tables:
        lines += ["", f"top operators by {title}:"]
        lines.append(events.table(sort_by=key, row_limit=25, max_name_column_width=60))
    return "\n".join(lines) + "\n"
