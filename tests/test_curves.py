"""Training curves: the CSV logs of every (re)start stitched into one history, and its plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.launch import curves
from ssl_robust.launch.curves import CURVES_FILE, plot_training_curves, read_history
from ssl_robust.launch.trainer import TrainingCurves


def _write_log(run: Path, version: int, rows: list[dict[str, float | int]]) -> None:
    """A CSVLogger-shaped file: one column per metric, empty where a row lacks it."""
    folder = run / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    columns = sorted({k for r in rows for k in r})
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in columns})


def test_history_stitches_a_resumed_run(tmp_path: Path) -> None:
    # version_0 trains to step 9 and crashes; its last checkpoint was at step 6, so version_1
    # logs again from step 6 (with other values) to step 12.
    v0 = [{"step": s, "epoch": s // 5, "train/loss": 10.0 - s} for s in range(10)]
    v0 += [{"step": 4, "epoch": 0, "val/acc": 0.5}, {"step": 9, "epoch": 1, "val/acc": 0.6}]
    v0 += [{"step": 6, "epoch": 1, "val/knn": 0.3}]  # before the checkpoint at step 6
    v1 = [{"step": s, "epoch": s // 5, "train/loss": 100.0 + s} for s in range(6, 13)]
    v1 += [{"step": 9, "epoch": 1, "val/acc": 0.7}, {"step": 12, "epoch": 2, "lr-SGD/x": 0.1}]
    _write_log(tmp_path, 0, v0)
    _write_log(tmp_path, 10, v1)  # versions sort by number, not as text ("10" < "2")
    h = read_history(tmp_path)
    steps, loss = h["train/loss"]
    assert steps.tolist() == list(range(13))
    assert loss.tolist() == [10.0 - s for s in range(6)] + [100.0 + s for s in range(6, 13)]
    assert h["val/acc"][0].tolist() == [4, 9] and h["val/acc"][1].tolist() == [0.5, 0.7]
    assert h["lr-SGD/x"][1].tolist() == [0.1]
    assert h["val/knn"][0].tolist() == [6]  # logged at the resume step, not again after it
    # Started over: the new version begins at step 0 and replaces the old history.
    _write_log(tmp_path, 11, [{"step": s, "train/loss": -float(s)} for s in range(3)])
    h = read_history(tmp_path)
    assert h["train/loss"][1].tolist() == [0.0, -1.0, -2.0] and set(h) == {"train/loss"}
    assert "step" not in h and "epoch" not in h


def test_plot_draws_the_curves_and_skips_constants(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows: list[dict[str, float | int]] = [
        {"step": s, "train/loss": float(5 * np.exp(-s / 40) + rng.normal(0, 0.1))}
        for s in range(200)  # dense: drawn with a moving average
    ]
    rows += [{"step": s, "val/knn_acc": 0.1 + s / 400} for s in range(0, 200, 20)]
    rows += [{"step": s, f"lr-SGD/{g}": 0.1 * (1 - s / 200)} for s in range(200) for g in "ab"]
    rows += [{"step": 0, "optim/global_batch": 64.0}, {"step": 199, "optim/global_batch": 64.0}]
    _write_log(tmp_path, 0, rows)
    path = plot_training_curves(tmp_path, "a run")
    assert path == tmp_path / CURVES_FILE
    with Image.open(path) as img:
        # Three panels (loss, kNN accuracy, the two learning rates together) in one row of
        # three 4.2 x 3.0 in panels at 100 dpi; the constant global batch is not drawn.
        assert img.format == "PNG" and img.size == (1260, 300)
        pixels = np.asarray(img.convert("L"))
    assert (pixels < 128).mean() > 0.01  # something was drawn
    # Nothing varies, nothing to draw: no file.
    empty = tmp_path / "empty"
    _write_log(empty, 0, [{"step": s, "optim/lr": 0.1} for s in range(5)])
    assert plot_training_curves(empty) is None and not (empty / CURVES_FILE).exists()


def test_no_logs_no_history(tmp_path: Path) -> None:
    assert read_history(tmp_path) == {}
    assert plot_training_curves(tmp_path) is None


@pytest.mark.parametrize("panels", [4, 7])
def test_panels_wrap_into_rows_of_three(tmp_path: Path, panels: int) -> None:
    rows: list[dict[str, float | int]] = [
        {"step": s, f"val/m{i}": float(s * (i + 1))} for s in range(3) for i in range(panels)
    ]
    _write_log(tmp_path, 0, rows)
    path = plot_training_curves(tmp_path)
    assert path is not None
    with Image.open(path) as img:
        assert img.size == (1260, 300 * -(-panels // 3))


def test_only_noisy_series_are_smoothed() -> None:
    from ssl_robust.launch.curves import _noisy

    t = np.linspace(0, 1, 400)
    schedule = 0.1 * (1 + np.cos(np.pi * t)) / 2  # a cosine learning rate: drawn as it is
    loss = 5 * np.exp(-3 * t) + np.random.default_rng(0).normal(0, 0.1, t.size)
    assert not _noisy(schedule) and _noisy(loss)


class _Regression(pl.LightningModule):
    """A linear fit that logs its loss every step and can fail at a given step."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.fail_at = fail_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    run: Path, callback: TrainingCurves, fail_at: int | None = None, *extra: pl.Callback
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(
        default_root_dir=run,
        max_epochs=3,
        logger=CSVLogger(save_dir=str(run), name="logs"),
        callbacks=[*extra, callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(_Regression(fail_at), data)


@pytest.fixture
def titles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The titles of the figures the callback draws (each drawn for real)."""
    drawn: list[str] = []

    def spy(run_dir: Path, title: str | None = None) -> Path | None:
        drawn.append(str(title))
        return plot_training_curves(run_dir, title)

    monkeypatch.setattr(curves, "plot_training_curves", spy)
    return drawn


def test_curves_are_redrawn_while_a_fit_runs(tmp_path: Path, titles: list[str]) -> None:
    callback = TrainingCurves(tmp_path, every_s=1e-6, max_share=1.0)
    _fit(tmp_path, callback)
    # Every epoch's end (after the first log flush): the figure follows the run.
    assert [t.split(": ", 1)[1] for t in titles] == [
        f"running, {k} of 3 epochs done" for k in (1, 2, 3)
    ]
    assert callback.drawn == 3
    history = read_history(tmp_path)
    assert history["train/loss"][0].tolist() == list(range(24))
    Image.open(tmp_path / CURVES_FILE).verify()


class _Clock(pl.Callback):
    """Stands for the ``time`` module of :mod:`ssl_robust.launch.trainer`: ``monotonic`` moves
    ``step_s`` per training batch and ``draw_s`` per drawing, and nothing else."""

    def __init__(self, step_s: float, draw_s: float) -> None:
        self.now = 100.0
        self.step_s = step_s
        self.draw_s = draw_s

    def monotonic(self) -> float:
        return self.now

    def on_train_batch_end(self, *args: object) -> None:
        self.now += self.step_s


def test_curves_wait_between_drawings(
    tmp_path: Path, titles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_robust.launch import trainer as trainer_mod

    clock = _Clock(step_s=0.25, draw_s=1.0)  # an epoch (8 batches) lasts 2 s
    monkeypatch.setattr(trainer_mod, "time", clock)
    _fit(tmp_path, TrainingCurves(tmp_path, every_s=6.5), None, clock)  # 6 s in all
    _fit(tmp_path / "off", TrainingCurves(tmp_path / "off", every_s=0), None, clock)
    assert titles == []
    assert not (tmp_path / CURVES_FILE).exists()
    # Drawing may take at most max_share of the time: after a drawing of 1 s at a share of 1/4,
    # the next waits 1 x (1 - 1/4) / (1/4) = 3 s, however short every_s. Drawn after epoch 1
    # (t = 2, then 3), not after epoch 2 (t = 5: 2 s since), again after epoch 3 (t = 7: 4 s
    # since).
    clock.now = 0.0
    real = curves.plot_training_curves  # the titles fixture's spy

    def slow(run_dir: Path, title: str | None = None) -> Path | None:
        clock.now += clock.draw_s
        return real(run_dir, title)

    monkeypatch.setattr(curves, "plot_training_curves", slow)
    callback = TrainingCurves(tmp_path, every_s=1e-6, max_share=0.25)
    _fit(tmp_path, callback, None, clock)
    assert [t.split(": ", 1)[1] for t in titles] == [
        f"running, {k} of 3 epochs done" for k in (1, 3)
    ]
    assert callback.drawn == 2 and callback.wait_s == 3.0
    assert clock.now == 3 * 2.0 + 2 * 1.0


def test_a_crashed_fit_keeps_its_curves(tmp_path: Path, titles: list[str]) -> None:
    callback = TrainingCurves(tmp_path, every_s=0)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, callback, fail_at=13)
    assert titles == [f"{tmp_path.name}: stopped by RuntimeError in epoch 2 of 3 (step 13)"]
    # The CSV logs were flushed first: the figure has every step logged before the crash.
    assert read_history(tmp_path)["train/loss"][0].tolist() == list(range(13))
    Image.open(tmp_path / CURVES_FILE).verify()


def test_a_requeued_fit_says_so(tmp_path: Path, titles: list[str]) -> None:
    class Requeue(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == 5:
                raise SystemExit(0)  # what SlurmRequeue does once the job is requeued

    callback = TrainingCurves(tmp_path, every_s=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=CSVLogger(save_dir=str(tmp_path), name="logs"),
        callbacks=[Requeue(), callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.raises(SystemExit):
        trainer.fit(_Regression(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=8))
    assert titles == [f"{tmp_path.name}: stopped to be requeued in epoch 1 of 2 (step 5)"]


def test_a_failed_drawing_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(run_dir: Path, title: str | None = None) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(curves, "plot_training_curves", broken)
    callback = TrainingCurves(tmp_path, every_s=1e-6, max_share=1.0)
    with pytest.warns(UserWarning, match="training curves not drawn.*disk full"):
        _fit(tmp_path, callback)
    assert callback.drawn == 0
    assert read_history(tmp_path)["train/loss"][0].tolist() == list(range(24))
    with pytest.raises(ValueError, match="every_s must be >= 0"):
        TrainingCurves(tmp_path, every_s=-1)
    with pytest.raises(ValueError, match="max_share must be in"):
        TrainingCurves(tmp_path, max_share=0)


def test_a_shifted_val_metric_is_drawn_beside_its_clean_one() -> None:
    steps = np.arange(3)
    history = {
        "val/knn_acc": (steps, np.array([0.5, 0.6, 0.7])),
        "val/knn_acc_shift": (steps, np.array([0.4, 0.45, 0.5])),
        "val/online_acc_shift": (steps, np.array([0.3, 0.35, 0.4])),  # its clean one constant
        "val/online_acc": (steps, np.array([0.5, 0.5, 0.5])),
    }
    assert curves._panels(history) == {
        "val/knn_acc": ["val/knn_acc", "val/knn_acc_shift"],
        "val/online_acc": ["val/online_acc_shift"],  # labelled: not what the title names
    }
