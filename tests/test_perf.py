"""Per-epoch training throughput: sample counting, validation excluded, logged per epoch."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.autograd import DeviceType
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.launch.perf import (
    EpochThroughput,
    StepProfiler,
    batch_length,
    profile_report,
    steady_throughput,
)


def test_batch_length_finds_the_leading_size() -> None:
    views = [torch.zeros(7, 3, 4, 4), torch.zeros(7, 3, 4, 4)]
    assert batch_length((views, torch.zeros(7))) == 7
    assert batch_length((torch.zeros(5, 2), torch.zeros(5))) == 5
    assert batch_length({"index": torch.zeros(9), "seed": 3}) == 9
    assert batch_length(torch.tensor(2.0)) == 1
    assert batch_length(("text", 3)) == 0


def test_steady_throughput_skips_the_warm_up_epoch() -> None:
    assert steady_throughput([10.0, 100.0, 300.0, 200.0]) == 200.0
    assert steady_throughput([42.0]) == 42.0
    assert steady_throughput([]) == 0.0


class _FakeClock:
    """Stands for the ``time`` module of :mod:`ssl_robust.launch.perf`: its ``perf_counter``
    moves only when a step says so, so the callback's figures are known exactly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _TimedSteps(pl.LightningModule):
    """Linear regression whose training steps take ``train_s`` and validation steps ``val_s``
    seconds of a fake clock."""

    def __init__(self, clock: _FakeClock, train_s: float, val_s: float) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.clock = clock
        self.train_s = train_s
        self.val_s = val_s

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        self.clock.now += self.train_s
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(1), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.clock.now += self.val_s

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_throughput_counts_samples_and_excludes_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl_robust.launch.perf as perf

    # 100 samples in batches of 16: six full batches and a last one of 4.
    n, batch, epochs, val_batches = 100, 16, 3, 2
    train_s, val_s = 0.5, 4.0  # per step, on the fake clock (exact in binary)
    clock = _FakeClock()
    monkeypatch.setattr(perf, "time", clock)
    data = TensorDataset(torch.randn(n, 4), torch.randn(n))
    callback = EpochThroughput()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=val_batches,
    )
    trainer.fit(
        _TimedSteps(clock, train_s, val_s),
        DataLoader(data, batch_size=batch),
        DataLoader(data, batch_size=batch),
    )
    steps = 7  # batches per epoch
    # Every sample counted (the short last batch too), over the training steps' time only.
    assert callback.images_per_s == [n / (steps * train_s)] * epochs
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = [r for r in rows if r.get("perf/train_images_per_s")]
    assert [float(r["perf/train_images_per_s"]) for r in logged] == callback.images_per_s
    # The epoch's time includes its validation.
    assert [float(r["perf/epoch_s"]) for r in logged] == [steps * train_s + val_batches * val_s] * 3
    assert [int(r["step"]) for r in logged] == [steps * (e + 1) for e in range(epochs)]


@pytest.mark.parametrize(
    ("cudnn_benchmark", "deterministic", "expected"),
    [(True, False, True), (False, False, False), (True, True, False)],
)
def test_trainer_sets_cudnn_autotuning_unless_deterministic(
    cudnn_benchmark: bool, deterministic: bool, expected: bool, tmp_path: Path
) -> None:
    from ssl_robust.config.common import TrainerConfig
    from ssl_robust.launch.trainer import build_trainer

    saved = torch.backends.cudnn.benchmark
    try:
        tcfg = TrainerConfig(
            accelerator="cpu", cudnn_benchmark=cudnn_benchmark, deterministic=deterministic
        )
        build_trainer(tcfg, tmp_path, loggers=[], callbacks=[])  # type: ignore[arg-type]
        assert torch.backends.cudnn.benchmark is expected
    finally:
        torch.backends.cudnn.benchmark = saved


class _LoggedLoss(pl.LightningModule):
    """A linear layer that logs its step loss as the methods do (not prog_bar=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_progress_bar_shows_the_logged_metrics_without_the_log_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ssl_robust.config.common import TrainerConfig
    from ssl_robust.launch.trainer import ProgressBar, build_trainer

    tcfg = TrainerConfig(accelerator="cpu", max_epochs=1, limit_train_batches=2)

    module = _LoggedLoss()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(tcfg, tmp_path, loggers=[CSVLogger(str(tmp_path))], callbacks=[])
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    bar = trainer.progress_bar_callback
    assert isinstance(bar, ProgressBar)
    items = bar.get_metrics(trainer, module)
    assert "train/loss" in items and "v_num" not in items
    # Lightning's noise is gone; its useful lines stay.
    said = [r.getMessage() for r in caplog.records]
    assert any("GPU available" in m for m in said), said
    assert not any("Tip" in m or "was configured so 100%" in m for m in said), said
    assert not any("LeafSpec" in str(w.message) for w in caught)


def test_progress_bar_reads_the_step_loss_at_most_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The methods log train/loss without prog_bar=True (Lightning would read it back from the
    device after every step); the bar reads it itself, throttled."""
    import ssl_robust.launch.trainer as launch
    from ssl_robust.config.common import TrainerConfig

    tcfg = TrainerConfig(accelerator="cpu", max_epochs=1)
    trainer = launch.build_trainer(tcfg, tmp_path, loggers=[], callbacks=[])
    module = _LoggedLoss()
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    assert "train/loss" not in trainer.progress_bar_metrics  # not Lightning's bar metric
    bar = trainer.progress_bar_callback
    assert isinstance(bar, launch.ProgressBar)
    clock = [100.0]
    monkeypatch.setattr(launch.time, "monotonic", lambda: clock[0])
    bar._read_at = None
    first = bar.get_metrics(trainer, module)["train/loss"]
    assert first == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    trainer.callback_metrics["train/loss"] = torch.tensor(5.0)
    clock[0] = 100.5
    assert bar.get_metrics(trainer, module)["train/loss"] == first  # read 0.5 s ago
    clock[0] = 101.0
    assert bar.get_metrics(trainer, module)["train/loss"] == 5.0


class _ProfiledSteps(_TimedSteps):
    """Records (epoch, batch, whether torch.profiler was on) for every training step."""

    def __init__(self, clock: _FakeClock, train_s: float) -> None:
        super().__init__(clock, train_s, 0.0)
        self.seen: list[tuple[int, int, bool]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        on = bool(torch.autograd.profiler._is_profiler_enabled)
        self.seen.append((self.current_epoch, i, on))
        return super().training_step(batch, i)


def _profiled_fit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    epochs: int,
    steps: int,
    val_s: float | None = None,
    callbacks: tuple[pl.Callback, ...] = (),
) -> tuple[list[tuple[int, int]], str]:
    import ssl_robust.launch.perf as perf

    clock = _FakeClock()
    monkeypatch.setattr(perf, "time", clock)
    data = TensorDataset(torch.randn(100, 4), torch.randn(100))  # 7 batches of 16
    module = _ProfiledSteps(clock, train_s=0.5)
    module.val_s = val_s or 0.0
    val = DataLoader(data, batch_size=50) if val_s is not None else None  # 2 batches
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[StepProfiler(tmp_path / "profile.txt", steps), *callbacks],
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    ).fit(module, DataLoader(data, batch_size=16), val)
    profiled = [(epoch, i) for epoch, i, on in module.seen if on]
    return profiled, (tmp_path / "profile.txt").read_text()


def test_step_profiler_profiles_steps_after_the_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profiled, report = _profiled_fit(tmp_path, monkeypatch, epochs=3, steps=2)
    assert profiled == [(1, 0), (1, 1)]  # the first epoch compiles and warms up
    # Wall time from the fake clock: 2 steps of 0.5 s.
    assert report.splitlines()[0] == "2 training steps profiled: 1000.0 ms wall, 500.00 ms per step"
    assert "no device" in report and "top operators by host (CPU) time" in report
    assert "aten::mse_loss" in report and "Optimizer.step" in report


def test_step_profiler_takes_what_a_single_epoch_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profiled, report = _profiled_fit(tmp_path, monkeypatch, epochs=1, steps=3)
    assert profiled == [(0, 4), (0, 5), (0, 6)]  # the epoch's last three
    profiled, report = _profiled_fit(tmp_path, monkeypatch, epochs=1, steps=10)
    assert profiled == [(0, i) for i in range(7)]  # fewer steps than asked: all of them
    assert report.startswith("7 training steps profiled: 3500.0 ms wall")


def test_step_profiler_stops_before_a_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 steps asked from the second epoch's start, which has 7: the 2 validation batches of
    # 4 s each (fake clock) after them are not profiled.
    profiled, report = _profiled_fit(tmp_path, monkeypatch, epochs=3, steps=10, val_s=4.0)
    assert profiled == [(1, i) for i in range(7)]
    assert report.startswith("7 training steps profiled: 3500.0 ms wall, 500.00 ms per step")


def test_step_profiler_says_when_the_run_ended_before_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class StopFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            trainer.should_stop = True

    profiled, report = _profiled_fit(
        tmp_path, monkeypatch, epochs=3, steps=2, callbacks=(StopFirstEpoch(),)
    )
    assert profiled == []
    assert report == (
        "not profiled: this piece of the run trained 7 steps and profiling starts after 7 "
        "(after the first epoch of a longer run)\n"
    )


def test_profile_report_gives_the_device_busy_share() -> None:
    class _Events(list):  # key_averages(): events with device times (us) and a table
        def table(self, sort_by: str, **kw: object) -> str:
            return f"<table by {sort_by}>"

    class _Event:
        def __init__(self, device_us: float, on_host: bool = False) -> None:
            self.self_device_time_total = device_us
            self.device_type = DeviceType.CPU if on_host else DeviceType.CUDA

    # Two kernels, and the host operator that launched one of them (its time counted once).
    events = _Events([_Event(3000.0), _Event(2000.0), _Event(2000.0, on_host=True)])
    report = profile_report(events, 4, 0.02, on_device=True)
    lines = report.splitlines()
    assert lines[0] == "4 training steps profiled: 20.0 ms wall, 5.00 ms per step"
    assert lines[1].startswith("device busy 5.0 ms = 25% of the wall time")
    # Device time first, then host time.
    assert report.index("by self_device_time_total") < report.index("by self_cpu_time_total")


def test_trainer_profile_steps_writes_profile_txt(tiny_pretrain_cfg: Any) -> None:
    from ssl_robust.pipelines import pretrain

    cfg = tiny_pretrain_cfg("trainer.profile_steps=2")
    pretrain(cfg)
    report = (Path(cfg.run.dir) / "profile.txt").read_text()
    assert report.startswith("2 training steps profiled:")
    assert "aten::convolution" in report


def test_step_profiler_failure_costs_the_report_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    profiled, report = _profiled_fit(tmp_path, monkeypatch, epochs=2, steps=2)
    assert profiled == []
    assert report == "profiling failed to start: RuntimeError('CUPTI unavailable')\n"
