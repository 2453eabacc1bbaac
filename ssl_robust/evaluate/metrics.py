"""Accuracy and calibration metrics: ECE, NLL, multi-class Brier score, reliability bins,
temperature scaling, selective prediction (risk-coverage), and the uncertainty of an accuracy
measured on few images (Wilson interval).

Definitions: ECE with 15 equal-width bins over the top-1 confidence
(Guo et al. 2017, Eq. 3) computed by torchmetrics from probabilities; NLL; and the
multi-class Brier score (Brier 1950), the squared error summed over classes and averaged
over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _check_scores(scores: Tensor, labels: Tensor) -> None:
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected scores (N, K) and labels (N,), got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no samples")


def _check_probs(probs: Tensor, labels: Tensor) -> None:
    _check_scores(probs, labels)
    if (
        probs.min() < 0
        or probs.max() > 1
        or not torch.allclose(probs.sum(dim=1), torch.ones_like(probs[:, 0]), atol=1e-4)
    ):
        raise ValueError("probs must be probabilities (rows in [0, 1] summing to 1), not logits")


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of logits (or probabilities) (N, K) against labels (N,)."""
    _check_scores(logits, labels)
    return (logits.argmax(dim=1) == labels).float().mean().item()


def _draws_first(logits: Tensor, labels: Tensor) -> Tensor:
    """(draws, N, K) from logits (N, K) or (draws, N, K) of the N images of ``labels``."""
    if logits.dim() == 2:
        logits = logits[None]
    if logits.dim() != 3 or logits.shape[1] != labels.shape[0]:
        raise ValueError(
            f"expected logits (N, K) or (draws, N, K) and labels (N,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits


def per_class_accuracy(
    logits: Tensor, labels: Tensor, num_classes: int
) -> tuple[list[float | None], list[int]]:
    """The accuracy of each class (``None`` for a class without images) and its image count.

    ``logits``: (N, K), or (draws, N, K) for several purifications of the same N images, whose
    predictions are pooled (each image counted once per draw in the accuracy, once in the
    count). ``labels``: (N,).
    """
    logits = _draws_first(logits, labels)
    correct = (logits.argmax(-1) == labels).float().mean(0).cpu()  # (N,), over draws
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    sums = torch.zeros(num_classes).index_add_(0, labels, correct)
    acc = [float(sums[k] / counts[k]) if counts[k] else None for k in range(num_classes)]
    return acc, [int(c) for c in counts]


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts (K, K), row = true class, column = predicted class.

    ``logits``: (N, K), or (draws, N, K) for several purifications of the same N images, whose
    predictions are pooled (each image counted once per draw). ``labels``: (N,).
    """
    # Imported here, like the calibration error: torchmetrics takes seconds to import.
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    logits = _draws_first(logits, labels)
    preds = logits.argmax(-1).flatten().cpu()
    target = labels.cpu().repeat(logits.shape[0])
    return multiclass_confusion_matrix(preds, target, num_classes=num_classes)


def wilson_interval(acc: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of an accuracy ``acc`` measured on ``n`` images:
    ``(low, high)``, 95 % by default (``z`` standard normal quantile).

    Unlike acc +- z * sqrt(acc (1 - acc) / n), it stays inside [0, 1] and does not shrink to a
    point at 0 % or 100 %, which robust accuracies on a few hundred images often reach. An
    accuracy averaged over several purifications of the same images varies less than one of
    ``n`` independent images, so there the interval is conservative. Closed form: torchmetrics
    and scikit-learn have none, and statsmodels would be a dependency for four lines.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"acc must be in [0, 1], got {acc}")
    z2 = z * z
    centre = (acc + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(acc * (1 - acc) / n + z2 / (4 * n * n))
    # At acc = 0 (or 1) centre - half (centre + half) is 0 (1) up to rounding, which must not
    # put the bound on the wrong side of the accuracy (a negative error bar).
    return min(acc, max(0.0, centre - half)), max(acc, min(1.0, centre + half))


def standard_error(scores: Any) -> float:
    """Standard error of the mean of per-image ``scores`` (N,): ``std(ddof=1) / sqrt(N)``.

    For a mean over a corruption grid, each image's score is its accuracy averaged over the
    grid's cells (and purification draws). The cells share the images, so their accuracies are
    not independent, but the images are: the grid mean is a mean of N independent per-image
    scores, and mean +- 1.96 se is its 95 % interval over the image sample (the score is not
    0/1 here, so the Wilson interval does not apply).
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size < 2:
        raise ValueError(f"need at least 2 per-image scores, got {values.size}")
    return float(values.std(ddof=1) / math.sqrt(values.size))


def normal_interval(mean: float, se: float, z: float = 1.959964) -> tuple[float, float]:
    """``mean +- z se``, clipped to [0, 1]: the 95 % interval of a mean accuracy by default."""
    return max(0.0, mean - z * se), min(1.0, mean + z * se)


def images_key(metric: str) -> str:
    """The metric holding how many images an accuracy was measured on (``test/acc`` ->
    ``test/n``, ``adv/linf_8/acc_worst`` and ``adv/linf_8/autoattack_acc`` ->
    ``adv/linf_8/n``); "" for other metrics."""
    prefix, _, last = metric.rpartition("/")
    if metric.startswith("cert/") and last.startswith("acc"):
        return "cert/n"  # every certified accuracy is over the same certified images
    if metric.startswith("adv/") and last.endswith("_acc"):
        return f"{prefix}/n"  # a threat's clean and AutoAttack accuracies: its attacked images
    return f"{prefix}/n" if prefix and last.startswith("acc") else ""


def certified_radii(metrics: dict[str, float]) -> list[tuple[float, str]]:
    """The radii a certification reported an accuracy at (``cert/radius/<r>/acc``), sorted,
    each with its metric name."""
    found = []
    for key in metrics:
        parts = key.split("/")
        if len(parts) == 4 and parts[:2] == ["cert", "radius"] and parts[3] == "acc":
            found.append((float(parts[2]), key))
    return sorted(found)


def accuracy_interval(metrics: dict[str, float], key: str) -> tuple[float, float] | None:
    """The 95 % interval over the images of the accuracy (or other fraction) ``metrics[key]``:
    ``<key>_low`` to ``<key>_high`` where recorded (a bootstrap interval: ECE, AUROC), +-1.96
    standard errors where ``<key>_se`` is (a mean over corruption cells, which share their
    images), else the Wilson interval over the ``images_key(key)`` images; None without any
    (or without a value in [0, 1])."""
    value = metrics.get(key)
    if value is None or not 0 <= value <= 1:
        return None
    if f"{key}_low" in metrics and f"{key}_high" in metrics:  # a recorded (bootstrap) interval
        return metrics[f"{key}_low"], metrics[f"{key}_high"]
    se = metrics.get(f"{key}_se")
    if se is not None:
        return normal_interval(value, se)
    n = metrics.get(images_key(key))
    if n is not None and n > 0:
        return wilson_interval(value, n)
    return None


def interval_bars(metrics: dict[str, float], keys: list[str]) -> np.ndarray:
    """Error bars (2, len(keys)) of the accuracies ``metrics[key]``: the distances down and up
    to their :func:`accuracy_interval`, 0 where there is none."""
    bars = np.zeros((2, len(keys)))
    for i, key in enumerate(keys):
        bounds = accuracy_interval(metrics, key)
        if bounds is not None:
            bars[:, i] = [metrics[key] - bounds[0], bounds[1] - metrics[key]]
    return np.maximum(bars, 0.0)  # matplotlib refuses negative bars, even of -1e-17


def grid_accuracies(metrics: dict[str, float]) -> dict[tuple[str, int], float]:
    """The corruption cells' accuracies in ``metrics`` (``shift/<corruption>/<severity>/acc``),
    keyed by (corruption, severity)."""
    cells = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if (
            len(parts) == 4
            and parts[0] == "shift"
            and parts[3] == "acc"
            and parts[1] not in ("group", "severity")
            and parts[2].isdigit()
        ):
            cells[parts[1], int(parts[2])] = float(value)
    return cells


def corruption_errors(
    acc: dict[tuple[str, int], float],
    ref_acc: dict[tuple[str, int], float],
    clean_acc: float | None = None,
    ref_clean_acc: float | None = None,
) -> dict[str, float]:
    """Corruption errors of a model against a reference model on the same grid (Hendrycks &
    Dietterich 2019, Sec. 4, with an in-project reference in place of AlexNet).

    With E the top-1 error: ``CE_c = sum_s E_{c,s} / sum_s E^ref_{c,s}`` and the relative
    ``rCE_c = sum_s (E_{c,s} - E_clean) / sum_s (E^ref_{c,s} - E^ref_clean)``; mCE and relative
    mCE are their means over the corruptions. 1 is the reference's error, lower is better.

    Args:
        acc: Accuracy per (corruption, severity) cell.
        ref_acc: The reference's accuracies; must hold every cell of ``acc``.
        clean_acc: Clean accuracy; with ``ref_clean_acc``, adds the relative errors.
        ref_clean_acc: The reference's clean accuracy.

    Returns:
        ``shift/<corruption>/ce`` and ``shift/mce``, plus ``shift/<corruption>/relative_ce``
        and ``shift/relative_mce`` with both clean accuracies. A ratio whose reference
        denominator is not positive (the reference lost nothing there) is undefined and left
        out, and so is the mean over corruptions it belongs to.
    """
    missing = sorted(set(acc) - set(ref_acc))
    if missing:
        raise ValueError(f"the reference has no accuracy for the cells {missing}")
    corruptions = list(dict.fromkeys(c for c, _ in acc))
    relative = clean_acc is not None and ref_clean_acc is not None
    out: dict[str, float] = {}
    ce: list[float] = []
    rce: list[float] = []
    for c in corruptions:
        sevs = [s for cc, s in acc if cc == c]
        err = sum(1.0 - acc[c, s] for s in sevs)
        ref = sum(1.0 - ref_acc[c, s] for s in sevs)
        if ref > 0:
            ce.append(err / ref)
            out[f"shift/{c}/ce"] = ce[-1]
        if relative:
            assert clean_acc is not None and ref_clean_acc is not None
            gap = err - len(sevs) * (1.0 - clean_acc)
            ref_gap = ref - len(sevs) * (1.0 - ref_clean_acc)
            if ref_gap > 0:
                rce.append(gap / ref_gap)
                out[f"shift/{c}/relative_ce"] = rce[-1]
    if corruptions and len(ce) == len(corruptions):
        out["shift/mce"] = float(np.mean(ce))
    if relative and corruptions and len(rce) == len(corruptions):
        out["shift/relative_mce"] = float(np.mean(rce))
    return out


def bootstrap_interval(
    statistic: Callable[..., float],
    sides: Sequence[Sequence[Tensor]],
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[float, float]:
    """Basic (reverse-percentile) bootstrap interval over the images of a statistic of one or
    more image sets: ``2 t - q_high`` to ``2 t - q_low``, with t the statistic of the data and
    q the quantiles of its resampled values, widened to hold t and clipped to ``bounds``.

    The basic interval, not the percentile one, because an ECE is biased upwards and resampling
    (which duplicates images) biases it further: the percentile interval would sit above the
    estimate, the basic one corrects that shift (Davison & Hinkley 1997, Sec. 5.2).

    Each side is a group of tensors shaped (draws, images, ...), the draws may differ between
    them, whose images are resampled together, with replacement (a purifier's draws of one
    image stay together: they are not independent samples; so do an image's clean and
    corrupted scores, put in one side); the sides are resampled independently (an
    in-distribution set and an OOD set of other images). ``statistic`` gets every tensor with
    its draws and images flattened, side after side, in order.

    Args:
        statistic: E.g. ``lambda s_in, s_out: auroc(s_in, s_out)``.
        sides: E.g. ``[(scores_in,), (scores_out,)]`` or ``[(logits, labels)]`` (labels
            expanded to (draws, images)).
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.
        level: Coverage of the interval.
        bounds: The statistic's range (``(0, 1)`` for an ECE or AUROC).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    for side in sides:
        if len({t.shape[1] for t in side}) != 1:
            raise ValueError("the tensors of a side must share their images (dimension 1)")
    estimate = statistic(*[t.flatten(0, 1) for side in sides for t in side])
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        args = []
        for side in sides:
            n = side[0].shape[1]
            idx = torch.randint(n, (n,), generator=gen)
            args += [t[:, idx].flatten(0, 1) for t in side]
        values.append(statistic(*args))
    tail = (1 - level) / 2
    q_low, q_high = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1 - tail])
    low, high = 2 * estimate - q_high, 2 * estimate - q_low
    # Widened to hold the estimate: where the bias correction moves the whole interval past it
    # (an ECE near 0), the report should not show an estimate outside its own interval.
    low, high = min(low, estimate), max(high, estimate)
    return float(max(bounds[0], low)), float(min(bounds[1], high))


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error, L1, equal-width bins over the top-1 confidence.

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| (Guo et al. 2017, Eq. 3), computed by
    torchmetrics' ``MulticlassCalibrationError(norm="l1")`` (its functional form).

    Args:
        probs: Predicted probabilities (N, K), not logits.
        labels: Integer labels (N,).
        n_bins: Number of confidence bins over [0, 1].
    """
    _check_probs(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    # Imported here: torchmetrics takes seconds to import, and the report (and compare) only
    # need this module's closed forms.
    from torchmetrics.functional.classification import multiclass_calibration_error

    value = multiclass_calibration_error(
        probs.float(), labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
    )
    return float(value.item())


def nll(scores: Tensor, labels: Tensor, from_probs: bool = False) -> float:
    """Mean negative log-likelihood of the true labels.

    Args:
        scores: Logits (N, K), or probabilities when ``from_probs``.
        labels: Integer labels (N,).
        from_probs: Treat ``scores`` as probabilities (clamped at 1e-12 before the log, so a
            zero probability on the true class costs ~27.6 nats instead of infinity).
    """
    if from_probs:
        _check_probs(scores, labels)
        p_true = scores.gather(1, labels[:, None]).squeeze(1)  # (N,)
        return (-p_true.clamp_min(1e-12).log()).mean().item()
    _check_scores(scores, labels)
    return F.cross_entropy(scores.float(), labels).item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - 1[k = y])^2, in [0, 2]."""
    _check_probs(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1]).to(probs)  # (N, K)
    return ((probs - onehot) ** 2).sum(dim=1).mean().item()


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Per-bin confidence, accuracy and count for a reliability diagram (Guo et al. 2017, Fig. 1).

    Bins are equal-width and left-closed like torchmetrics' (``[lo, hi)``); a confidence of
    exactly 1.0 joins the last bin here, whereas torchmetrics keeps it in a bin of its own, so
    ``sum(count / N * |accuracy - confidence|)`` equals :func:`ece` whenever no confidence is
    exactly 1.

    Args:
        probs: Predicted probabilities (N, K).
        labels: Integer labels (N,).
        n_bins: Number of bins over [0, 1].

    Returns:
        ``lower``, ``upper`` (bin edges), ``confidence`` and ``accuracy`` (means within the
        bin, NaN for empty bins) and ``count``, each of shape (n_bins,).
    """
    _check_probs(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.double()
    conf, pred = probs.max(dim=1)  # (N,), (N,)
    correct = (pred == labels).double()  # (N,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)  # (N,)
    count = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device)
    count.scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).scatter_add_(0, idx, correct)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "confidence": conf_sum / count,  # 0 / 0 = NaN marks empty bins
        "accuracy": acc_sum / count,
        "count": count,
    }


def risk_coverage(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Selective classification (Geifman & El-Yaniv 2017): answer only the k most confident of
    N predictions. Returns the coverage k / N and the risk (the error rate among those k) for
    k = 1..N. Tied confidences are taken in random order: a tied prediction adds its group's
    mean error, so the curve does not depend on how a sort breaks ties (one constant
    confidence gives the overall error rate at every coverage).

    Args:
        confidence: (N,) scores, higher = more confident (e.g. the top softmax probability).
        correct: (N,) whether each prediction is right (bool or 0/1).
    """
    if confidence.dim() != 1 or correct.shape != confidence.shape or confidence.numel() == 0:
        raise ValueError(
            f"expected confidence (N,) and correct (N,), N >= 1, got {tuple(confidence.shape)} "
            f"and {tuple(correct.shape)}"
        )
    err = 1 - correct.detach().cpu().double()
    _, inverse, counts = torch.unique(
        confidence.detach().cpu().double(), sorted=True, return_inverse=True, return_counts=True
    )  # distinct values ascending
    groups = len(counts)
    group_err = torch.zeros(groups, dtype=torch.float64).scatter_add_(0, inverse, err)
    group_err, counts = group_err.flip(0), counts.flip(0)  # most confident first
    err_before = group_err.cumsum(0) - group_err
    n_before = counts.cumsum(0) - counts
    g = torch.repeat_interleave(torch.arange(groups), counts)  # each rank's group
    k = torch.arange(1, len(err) + 1, dtype=torch.float64)
    expected_errors = err_before[g] + (k - n_before[g]) * group_err[g] / counts[g]
    return k / len(err), expected_errors / k


def selective_curves(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The risk at k = 1..N (:func:`risk_coverage`) of predictions ranked by their top softmax
    probability, and that of the best ranking of the same predictions (every right one
    first): two (N,) tensors."""
    _check_scores(logits, labels)
    # Ranked by the top log-probability in float64: in float32 the top probability of every
    # prediction whose logit leads by more than ~17 rounds to exactly 1, and those would tie.
    log_probs = logits.detach().cpu().double().log_softmax(1)
    confidence, pred = log_probs.max(1)
    correct = pred == labels.cpu()
    return risk_coverage(confidence, correct)[1], risk_coverage(correct.double(), correct)[1]


def selective_report(risk: Tensor, best: Tensor) -> dict[str, float]:
    """Selective prediction from :func:`selective_curves`: ``aurc``, the area under the
    risk-coverage curve (the mean risk over k = 1..N); ``eaurc``, its excess over the best
    ranking (Geifman et al. 2019), which removes the part set by the accuracy alone; and
    ``risk_c50``, ``risk_c80``: the error rate of the 50 % and 80 % most confident
    predictions."""
    n = len(risk)
    return {
        "aurc": float(risk.mean()),
        "eaurc": float(risk.mean() - best.mean()),
        # The ceil(c N) most confident, in integers: 0.8 * 15 is 12.000000000000002 in floats.
        "risk_c50": float(risk[max(1, -(-5 * n // 10)) - 1]),
        "risk_c80": float(risk[max(1, -(-8 * n // 10)) - 1]),
    }


TEMPERATURE_BOUNDS = (0.01, 100.0)


def fit_temperature(
    logits: Tensor, labels: Tensor, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T): temperature scaling
    (Guo et al. 2017, Sec. 4.2), which rescales confidence without changing a prediction.

    The NLL is convex in the inverse temperature b = 1 / T (a log-sum-exp of terms linear in b,
    minus one linear in b), so its slope mean_i(E_softmax(b z_i)[z] - z_i,y_i) never decreases
    in b, and bisection on its sign finds the minimiser exactly and deterministically. Written
    here, not taken from a calibration package: it is ten lines of closed form, where a general
    optimiser (LBFGS) brings a line search to tune and a tolerance to trust.

    Args:
        logits: (N, K) logits.
        labels: (N,) integer labels.
        bounds: The range of T; a minimiser beyond it (e.g. T -> 0 on data every prediction
            gets right) is clipped to it. 1.0 when every T fits alike (constant logits).
    """
    _check_scores(logits, labels)
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z = logits.double()
    z_true = z.gather(1, labels[:, None]).squeeze(1)

    def slope(log_b: float) -> float:
        zb = z * math.exp(log_b)
        return float(((zb.softmax(1) * z).sum(1) - z_true).mean())

    if bool((z == z[:, :1]).all()):  # every T gives the uniform distribution
        return 1.0
    lo, hi = -math.log(bounds[1]), -math.log(bounds[0])  # log b over [1 / high, 1 / low]
    at_lo, at_hi = slope(lo), slope(hi)
    if at_lo >= 0:
        return bounds[1]
    if at_hi <= 0:
        return bounds[0]
    for _ in range(60):  # |log b| error below 1e-17: exact in float64
        mid = (lo + hi) / 2
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return math.exp(-(lo + hi) / 2)


def fold_of(n: int, folds: int, seed: int = 0) -> Tensor:
    """The fold (0 to ``folds`` - 1) of each of ``n`` images in a seeded random partition into
    folds whose sizes differ by at most one."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(n, dtype=torch.long)
    fold[order] = torch.arange(n) % folds
    return fold


def cross_fit_temperatures(
    logits: Tensor, labels: Tensor, folds: int = 2, seed: int = 0
) -> tuple[Tensor, list[float]]:
    """Per image, the temperature fit (:func:`fit_temperature`) on the images of the other
    folds: cross-fitting, so that no image's label calibrates its own prediction and a scaled
    ECE measured on the same images is not flattered.

    Args:
        logits: (N, K) logits, or (draws, N, K) of a stochastic pipeline; an image's draws
            stay in its fold and are pooled for the fit.
        labels: (N,) integer labels.
        folds: Folds of a seeded random partition of the images (>= 2; :func:`fold_of`).
        seed: Seed of the partition.

    Returns:
        The temperatures (N,) and the fit of each fold, in fold order.
    """
    logits = _draws_first(logits, labels)
    n = labels.shape[0]
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if n < 2 * folds:
        raise ValueError(f"{n} images cannot be split into {folds} folds of at least 2")
    fold = fold_of(n, folds, seed)
    temps = torch.empty(n, dtype=torch.float64)
    fits = []
    for k in range(folds):
        rest = fold != k
        draws = logits[:, rest]
        t = fit_temperature(draws.flatten(0, 1), labels[rest].repeat(draws.shape[0]))
        temps[fold == k] = t
        fits.append(t)
    return temps, fits


def refit_scaled_ece(
    logits: Tensor,
    labels: Tensor,
    folds: Tensor,
    clean_logits: Tensor,
    clean_labels: Tensor,
    clean_folds: Tensor,
    n_bins: int = 15,
) -> float:
    """ECE of predictions (N, K) after temperature scaling fit afresh on clean predictions
    (M, K): a row of fold k >= 0 is scaled by the temperature fit on the clean rows of the
    other folds (cross-fitting), a row of fold -1 by the one fit on every clean row. Refitting
    inside each bootstrap resample puts the fit's own uncertainty into the interval of a
    temperature-scaled ECE (:func:`bootstrap_interval`). A fold with no clean rows of other
    folds to fit on (a resample of a few images may draw one fold only) stays unscaled."""
    temps = torch.empty(len(labels), dtype=torch.float64)
    for k in torch.unique(folds).tolist():
        rest = clean_folds != k if k >= 0 else torch.ones_like(clean_folds, dtype=torch.bool)
        fit = bool(rest.any())
        temps[folds == k] = fit_temperature(clean_logits[rest], clean_labels[rest]) if fit else 1.0
    scaled = logits.double() / temps[:, None].to(logits.device)
    return ece(scaled.float().softmax(1), labels, n_bins)


def calibration_report(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{"ece", "nll", "brier", "acc"}`` of logits (N, K) against labels (N,)."""
    _check_scores(logits, labels)
    probs = logits.float().softmax(dim=1)
    return {
        "ece": ece(probs, labels, n_bins),
        "nll": nll(logits, labels),
        "brier": brier(probs, labels),
        "acc": accuracy(logits, labels),
    }


# Accuracies are clipped this far inside (0, 1) before the probit: an accuracy of 0 or 1 has
# no finite probit, and one image in ten thousand is below what any evaluation here resolves.
PROBIT_CLIP = 1e-4


def probit(accuracy: Sequence[float] | np.ndarray) -> np.ndarray:
    """The inverse standard-normal CDF of accuracies, clipped to [PROBIT_CLIP, 1 - PROBIT_CLIP]."""
    from scipy.stats import norm

    acc = np.clip(np.asarray(accuracy, dtype=np.float64), PROBIT_CLIP, 1 - PROBIT_CLIP)
    return np.asarray(norm.ppf(acc), dtype=np.float64)


def fit_accuracy_line(clean: Sequence[float], shifted: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (probit(clean), probit(shifted)):
    the linear trend of shifted against clean accuracy that models share in probit space
    ("accuracy on the line", Miller et al. 2021). Needs two distinct clean accuracies."""
    x, y = probit(clean), probit(shifted)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"need as many clean as shifted accuracies, at least 2, got {len(x)}, {len(y)}"
        )
    if np.ptp(x) == 0:
        raise ValueError("the clean accuracies are all the same: no line through them")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def effective_robustness(
    clean: Sequence[float] | np.ndarray,
    shifted: Sequence[float] | np.ndarray,
    line: tuple[float, float],
) -> np.ndarray:
    """Accuracy under shift above what the line (:func:`fit_accuracy_line`) predicts from the
    clean accuracy, in accuracy units (Taori et al. 2020): > 0 is robustness beyond what the
    clean accuracy alone buys."""
    from scipy.stats import norm

    slope, intercept = line
    predicted = norm.cdf(slope * probit(clean) + intercept)
    return np.asarray(shifted, dtype=np.float64) - predicted
