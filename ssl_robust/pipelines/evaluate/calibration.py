"""Calibration: pooled reliability with bootstrap intervals, temperature scaling, selective
prediction."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from ssl_robust.evaluate.metrics import (
    TEMPERATURE_BOUNDS,
    bootstrap_interval,
    calibration_report,
    cross_fit_temperatures,
    ece,
    fit_temperature,
    fold_of,
    refit_scaled_ece,
    reliability_bins,
    selective_curves,
    selective_report,
)
from ssl_robust.pipelines.evaluate.setup import SEED_BOOTSTRAP, SEED_TEMPERATURE


def calibration_metrics(
    cfg: DictConfig,
    prefix: str,
    per_draw: Tensor,
    labels: Tensor,
    seed: int,
    metrics: dict,
    refit: list[tuple[Tensor, ...]] | None = None,
) -> dict[str, list[float]]:
    """ECE (with its bootstrap interval), NLL and Brier score of a calibration set's logits
    (draws, N, classes), pooled over the draws, as ``<prefix>ece`` etc. in ``metrics``; the
    accuracy too, unless they are temperature-scaled (``ts_``: a temperature changes no
    prediction). With ``refit`` (temperature-scaled logits: ``TemperatureFit.bootstrap_sides``),
    each bootstrap resample refits the temperatures on its clean images. Returns the set's
    reliability bins."""
    n_bins = int(cfg.calib.n_bins)
    logits, labels_t = _pooled(per_draw, labels)
    for k, v in calibration_report(logits, labels_t, n_bins).items():
        if not (k == "acc" and prefix.endswith("ts_")):
            metrics[f"{prefix}{k}"] = v
    if cfg.eval.bootstrap > 0:
        statistic: Callable[..., float]
        if refit is not None:
            sides = refit
            statistic = functools.partial(refit_scaled_ece, n_bins=n_bins)
        else:
            sides = [(per_draw, labels.expand(per_draw.shape[:2]))]
            statistic = lambda lg, lb: ece(lg.float().softmax(1), lb, n_bins)  # noqa: E731
        low, high = bootstrap_interval(
            statistic, sides, int(cfg.eval.bootstrap), seed + SEED_BOOTSTRAP, bounds=(0.0, 1.0)
        )
        metrics[f"{prefix}ece_low"], metrics[f"{prefix}ece_high"] = low, high
    bins = reliability_bins(logits.float().softmax(1), labels_t, n_bins)
    return {k: v.tolist() for k, v in bins.items()}


def severity_calibration(
    cell_eces: dict[tuple[str, int], tuple[float, float | None]],
    corruptions: Sequence[str],
    severities: Sequence[int],
    run_dir: Path,
    metrics: dict[str, float],
    report: dict[str, Any],
    notes: list[str],
) -> None:
    """The corruption cells' ECEs (:func:`cell_ece`) as the mean over the corruptions per
    severity (``calib/severity/<s>/ece``, ``ts_ece``), and every cell's in
    ``report["calib_severity"]`` for the plot: how calibration decays as the shift grows, and
    how much of that a temperature fit on clean data undoes (Ovadia et al. 2019, Fig. 2). A
    severity some of whose cells came from a store without their logits is left out, with a
    note."""
    complete = [s for s in severities if all((c, s) in cell_eces for c in corruptions)]
    if len(complete) < len(severities):
        missing = [s for s in severities if s not in complete]
        notes.append(
            f"Calibration per severity left out for severities {missing}: their stored "
            "corruption cells (from an earlier run, or one with calib.enabled=false) kept no "
            f"logits. Delete {run_dir / 'partial' / 'shift'} (or rerun with run.resume=false) "
            "to compute them."
        )
    if not complete:
        return
    scaled = all(cell_eces[c, s][1] is not None for c in corruptions for s in complete)
    out: dict[str, Any] = {
        "severities": complete,
        "ece": {c: [cell_eces[c, s][0] for s in complete] for c in corruptions},
    }
    if scaled:
        out["ts_ece"] = {c: [cell_eces[c, s][1] for s in complete] for c in corruptions}
    for i, sev in enumerate(complete):
        metrics[f"calib/severity/{sev}/ece"] = float(np.mean([v[i] for v in out["ece"].values()]))
        if scaled:
            values = [v[i] for v in out["ts_ece"].values()]
            metrics[f"calib/severity/{sev}/ts_ece"] = float(np.mean(values))
    report["calib_severity"] = out


def selective_metrics(
    name: str, per_draw: Tensor, labels: Tensor, metrics: dict[str, float], points: int = 100
) -> dict[str, list[float]]:
    """Selective prediction on a calibration set's logits (draws, N, classes), pooled over the
    draws: ``selective/<name>/aurc`` etc. in ``metrics``; returns its risk-coverage curve, and
    that of the best ranking of the same predictions, at ``points`` coverages."""
    risk, best = selective_curves(*_pooled(per_draw, labels))
    for k, v in selective_report(risk, best).items():
        metrics[f"selective/{name}/{k}"] = v
    n = len(risk)
    points = min(points, n)  # fewer predictions: every one of them
    coverage = [(i + 1) / points for i in range(points)]
    at = [max(1, -(-(i + 1) * n // points)) - 1 for i in range(points)]  # ceil, in integers
    return {
        "coverage": coverage,
        "risk": risk[at].tolist(),
        "best": best[at].tolist(),
    }


@dataclass
class TemperatureFit:
    """Temperature scaling fit on the clean images: ``per_image`` (N,), each clean image's
    cross-fitted temperature (fit on the other folds), and ``overall``, fit on all of them."""

    per_image: Tensor
    overall: float
    fold: Tensor  # (N,) each clean image's fold
    clean: Tensor  # (draws, N, classes) the logits the temperatures were fit on
    y: Tensor  # (N,) their labels

    def _holds_clean(self, per_draw: Tensor, labels: Tensor, same_images: bool) -> bool:
        """Whether a set that may hold the clean images (``same_images``) does: the same
        count and labels."""
        n = per_draw.shape[1]
        return same_images and n == len(self.y) and bool(torch.equal(labels.cpu(), self.y.cpu()))

    def scale(self, per_draw: Tensor, labels: Tensor, same_images: bool) -> Tensor:
        """A set's logits (draws, n, classes) divided by its images' temperatures (float32):
        cross-fitted when it holds the clean images, else ``overall``."""
        n = per_draw.shape[1]
        if self._holds_clean(per_draw, labels, same_images):
            t = self.per_image
        else:
            t = torch.full((n,), self.overall, dtype=torch.float64)
        return per_draw.float() / t.to(per_draw.device).float()[None, :, None]

    def bootstrap_sides(
        self, per_draw: Tensor, labels: Tensor, same_images: bool
    ) -> list[tuple[Tensor, ...]]:
        """The bootstrap sides of a set's scaled ECE that refits the temperatures in every
        resample (the arguments of ``refit_scaled_ece``, each (draws, images)): one side with
        the clean images when the set holds them (an image's fold, its clean and its scaled
        logits resampled together), else the set and the clean images as two sides."""
        d, n = per_draw.shape[:2]
        shape = self.clean.shape[:2]
        clean = (self.clean, self.y.expand(shape), self.fold.expand(shape))
        if self._holds_clean(per_draw, labels, same_images):
            return [(per_draw, labels.expand(d, n), self.fold.expand(d, n), *clean)]
        overall = torch.full((d, n), -1, dtype=torch.long)
        return [(per_draw, labels.expand(d, n), overall), clean]


def temperature_scaling(
    cfg: DictConfig,
    clean: Tensor,
    y: Tensor,
    metrics: dict[str, float],
    meta: dict[str, Any],
    notes: list[str],
) -> TemperatureFit | None:
    """Temperature scaling fit on the clean logits ``clean`` (draws, N, classes), reported as
    ``calib/temperature`` (all images) and the fold fits in ``meta``; None (with a note) when
    the images are too few for the folds."""
    folds = int(cfg.calib.temperature_folds)
    if len(y) < 2 * folds:
        notes.append(
            f"Temperature scaling skipped: {len(y)} clean images cannot be split into {folds} "
            "folds of at least 2 (calib.temperature_folds)."
        )
        return None
    seed = int(cfg.run.seed) + SEED_TEMPERATURE
    per_image, fits = cross_fit_temperatures(clean, y, folds, seed)
    t_all = fit_temperature(*_pooled(clean, y))
    low, high = TEMPERATURE_BOUNDS
    if any(t in (low, high) for t in [*fits, t_all]):
        notes.append(
            f"Temperature scaling: a fit reached the bound of its range [{low:g}, {high:g}] "
            f"(all images: {t_all:.3g}; folds: {', '.join(f'{t:.3g}' for t in fits)}): every "
            f"prediction of the images it was fit on right ({low:g}) or wrong ({high:g}). The "
            "scaled numbers of the images it scores are those of an extreme temperature; more "
            "images (eval.max_images) give a steadier fit."
        )
    metrics["calib/temperature"] = t_all
    meta["calib_temperature"] = {"folds": folds, "fold_fits": fits}
    return TemperatureFit(per_image, t_all, fold_of(len(y), folds, seed), clean, y)


def cell_ece(
    cfg: DictConfig, per_draw: Tensor, labels: Tensor, temp: TemperatureFit | None
) -> tuple[float, float | None]:
    """A corruption cell's ECE (draws pooled), and after temperature scaling (None without
    it); a cell of the clean images scales each by its cross-fitted temperature."""
    n_bins = int(cfg.calib.n_bins)
    per_draw = per_draw.float()
    logits, labels_t = _pooled(per_draw, labels)
    raw = ece(logits.softmax(1), labels_t, n_bins)
    if temp is None:
        return raw, None
    scaled, _ = _pooled(temp.scale(per_draw, labels, same_images=True), labels)
    return raw, ece(scaled.softmax(1), labels_t, n_bins)


def group_by_image(
    logits: Tensor, labels: Tensor | None, groups: int
) -> tuple[Tensor, Tensor | None]:
    """The shift set's logits (draws, groups x N, classes), its ``groups`` corruptions one after
    another over the same N images, as (draws x groups, N, classes): an image's corrupted
    versions with its draws, so that a bootstrap resamples images, not (corruption, image)
    pairs; labels (groups x N,) -> (N,). Unchanged where the corruptions do not share images
    (the labels differ between them, or N is not a whole number)."""
    d, m = logits.shape[:2]
    if groups <= 1 or m % groups:
        return logits, labels
    n = m // groups
    if labels is not None:
        per_group = labels.view(groups, n)
        if not bool((per_group == per_group[0]).all()):
            return logits, labels
        labels = per_group[0]
    return logits.reshape(d, groups, n, *logits.shape[2:]).flatten(0, 1), labels


def _pooled(draws: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The (draws, N, classes) logits of several purifications as draws x N predictions, each
    with its image's label."""
    return draws.flatten(0, 1), labels.repeat(draws.shape[0])
