"""Training curves: the CSV logs of every (re)start stitched into one history, and its plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_robust.launch.curves import CURVES_FILE, plot_training_curves, read_history


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
