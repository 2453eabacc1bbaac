"""Training curves of a run directory, read from its CSV logs and drawn as one PNG.

Every training job (pretraining, denoiser, fine-tuning) logs to ``<run dir>/logs/version_<k>/
metrics.csv``, one version per (re)start. :func:`read_history` stitches the versions into one
history per metric; :func:`plot_training_curves` draws it to ``<run dir>/curves.png``, so a run
without wandb still has its loss and accuracy curves to look at. The trainer's
``TrainingCurves`` callback (``ssl_robust.launch.trainer``) redraws it while a fit runs and when
it stops on an error, an interrupt or a SLURM requeue; the pipelines draw it a last time when the
fit ends. This module does not import Lightning, so ``compare`` stays quick to start.

    from ssl_robust.launch.curves import plot_training_curves
    plot_training_curves("runs/pretrain-simclr-digits")   # -> runs/.../curves.png
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from ssl_robust.plotting import pyplot, save_figure

__all__ = ["CURVES_FILE", "plot_training_curves", "read_history"]

CURVES_FILE = "curves.png"
_INDEX_COLUMNS = ("step", "epoch")
_MAX_PANELS = 12


def _versions(log_dir: Path) -> list[Path]:
    found = []
    for path in log_dir.glob("version_*/metrics.csv"):
        k = path.parent.name.removeprefix("version_")
        if k.isdigit():
            found.append((int(k), path))
    return [p for _, p in sorted(found)]


_Point = tuple[int, float, float]  # step, epoch (nan when the row has none), value


def _read_csv(path: Path) -> dict[str, list[_Point]]:
    series: dict[str, list[_Point]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            try:
                epoch = float(row.get("epoch") or "nan")
            except ValueError:
                epoch = math.nan
            for key, text in row.items():
                if key in _INDEX_COLUMNS or key is None or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, epoch, value))
    return series


def read_history(run_dir: str | Path, x: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every metric logged in ``<run_dir>/logs``: ``name -> (xs, values)`` in step order.

    ``x``: ``"step"`` (the global step of each row) or ``"epoch"`` (the epochs completed when
    the row was logged, for end-of-epoch metrics such as validation; rows without an epoch
    are left out), to compare runs of different batch sizes.

    The versions are read in order. A resumed run restarts at its checkpoint's step, so a
    version replaces what the earlier ones logged after its own first step (the interrupted
    run's steps after its last checkpoint were trained again), and at that step the metrics
    it logs again. A run started over (``run.resume=false``) starts at step 0 and so
    replaces everything before it.
    """
    if x not in ("step", "epoch"):
        raise ValueError(f"x must be 'step' or 'epoch', got {x!r}")
    merged: dict[str, list[_Point]] = {}
    for path in _versions(Path(run_dir) / "logs"):
        series = _read_csv(path)
        steps = [p[0] for points in series.values() for p in points]
        if not steps:
            continue
        start = min(steps)
        again = {key for key, points in series.items() if any(p[0] == start for p in points)}
        for key in merged:
            # At the resume step itself, what the earlier run logged (e.g. the validation
            # before its checkpoint) stays unless this version logs the same metric there.
            merged[key] = [
                p for p in merged[key] if p[0] < start or (p[0] == start and key not in again)
            ]
        for key, points in series.items():
            merged.setdefault(key, []).extend(points)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, points in merged.items():
        points.sort(key=lambda p: p[0])
        if x == "epoch":
            points = [(s, e + 1, v) for s, e, v in points if not math.isnan(e)]
        if points:
            xs = [p[0] if x == "step" else p[1] for p in points]
            out[key] = (
                np.array(xs, dtype=np.int64 if x == "step" else np.float64),
                np.array([p[2] for p in points], dtype=np.float64),
            )
    return out


def _panel(name: str) -> str:
    """Metrics drawn together: the learning rates of every parameter group, the denoiser's
    per-timestep validation errors, and a val metric with its shifted twin's."""
    if name.startswith("lr-"):
        return "learning rate"
    if re.fullmatch(r"val/mse_t\d+-\d+", name):
        return "val/mse by timestep"
    if name.startswith("val/") and name.endswith("_shift"):  # beside the clean val metric
        return name.removesuffix("_shift")
    return name


def _panels(history: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, list[str]]:
    """Panel title -> metric names; constants and single points are not curves."""
    panels: dict[str, list[str]] = {}
    for name in sorted(history):
        values = history[name][1]
        if len(values) < 2 or np.ptp(values) == 0:
            continue
        panels.setdefault(_panel(name), []).append(name)

    # Losses first, then the validation and training metrics, then the rest (rates, timings).
    def order(title: str) -> tuple[int, str]:
        prefix = title.split("/")[0]
        rank = 0 if "loss" in title else {"val": 1, "train": 2}.get(prefix, 3)
        return rank, title

    return {t: panels[t] for t in sorted(panels, key=order)[:_MAX_PANELS]}


def _noisy(values: np.ndarray) -> bool:
    """Step-to-step jitter beyond 2 % of the range (a loss, an online accuracy), as opposed to a
    schedule such as the learning rate, which is drawn as it is."""
    return float(np.diff(values).std()) > 0.02 * float(np.ptp(values))


def plot_training_curves(run_dir: str | Path, title: str | None = None) -> Path | None:
    """Draw every logged metric of ``run_dir`` against the training step into
    ``<run_dir>/curves.png``; returns the path, or None when nothing was logged twice.

    Dense, noisy series also get a moving average; the learning rates share a panel, as do a
    denoiser's per-timestep errors.
    """
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    panels = _panels(history)
    if not panels:
        return None
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels.items(), strict=False):
        for name in names:
            steps, values = history[name]
            # Labelled when the panel holds several, or one not named by the panel's title.
            label = name.removeprefix("lr-") if len(names) > 1 or name != panel else None
            if len(values) >= 50 and _noisy(values):
                window = max(5, len(values) // 25)
                kernel = np.ones(window) / window
                smooth = np.convolve(values, kernel, mode="valid")  # centred on its window
                (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                mid = steps[(window - 1) // 2 :][: len(smooth)]
                ax.plot(mid, smooth, color=raw.get_color(), label=label)
            else:
                ax.plot(steps, values, marker="o" if len(values) <= 30 else None, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel.endswith("loss") or panel == "val/mse by timestep":
            positive = all((history[n][1] > 0).all() for n in names)
            if positive and max(history[n][1].max() / history[n][1].min() for n in names) > 20:
                ax.set_yscale("log")
        if len(names) > 1 or names[0] != panel:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title or run_dir.resolve().name, fontsize=11)
    return save_figure(fig, run_dir / CURVES_FILE, dpi=100)
