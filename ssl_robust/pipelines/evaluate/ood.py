"""OOD detection from the logits and from the encoder's features, and the representation's kNN
accuracy."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor

from ssl_robust.evaluate.cifar_c import _corruption_seed
from ssl_robust.evaluate.metrics import bootstrap_interval
from ssl_robust.evaluate.ood import (
    LOGIT_SCORERS,
    auroc,
    fit_mahalanobis,
    held_out_class_split,
    knn_score,
    mahalanobis_score,
    noise_images,
    ood_metrics,
)
from ssl_robust.evaluate.store import UnitStore
from ssl_robust.launch.progress import RESTORED
from ssl_robust.methods.monitor import knn_accuracy
from ssl_robust.pipelines.evaluate.calibration import group_by_image
from ssl_robust.pipelines.evaluate.setup import SEED_BOOTSTRAP, SEED_OOD, Pipeline
from ssl_robust.pipelines.evaluate.units import nchw, predict_draws


def bank_features(
    bank_set: tuple[np.ndarray, np.ndarray, str],
    model: Pipeline,
    cfg: DictConfig,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
) -> tuple[Tensor, Tensor]:
    """The OOD feature bank's features (M, D) through the whole pipeline (one purification
    each, as the evaluation images' features), and its labels (M,); unit ``features/bank``."""
    stored = cache.get("features/bank")
    task = bar.add_task("OOD feature bank" + (f" {RESTORED}" if stored else ""), total=1)
    if stored is not None:
        feats, labels = stored[1]["features"], stored[1]["labels"]
    else:
        images, labels_np, _ = bank_set
        model.reseed(_corruption_seed(int(cfg.run.seed) + SEED_OOD, "bank", 0), device)
        bs = int(cfg.eval.batch_size)
        _, f = predict_draws(model, nchw(images), 1, bs, device, features=True)
        assert f is not None
        feats, labels = f, torch.from_numpy(labels_np)
        cache.put("features/bank", {}, {"features": feats, "labels": labels})
    bar.advance(task)
    return feats, labels


@dataclass
class OODFeatures:
    """Encoder features of the OOD section's sets, each image's first draw, and the bank."""

    bank: Tensor  # (M, D)
    bank_labels: Tensor  # (M,)
    clean: Tensor  # (N, D)
    shift: Tensor | None  # (corruptions x N, D), the top severity; None without it
    outside: dict[str, Tensor]  # by outside set


def _ood_hist(s_in: Tensor, s_out: Tensor, score: str, bins: int = 20) -> dict[str, list[float]]:
    if score == "msp":
        lo, hi = 0.0, 1.0
    else:
        both = torch.cat([s_in, s_out])
        lo, hi = float(both.min()), float(both.max())
        hi = hi if hi > lo else lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)

    def frac(s: Tensor) -> list[float]:
        counts = torch.histc(s.double().clamp(lo, hi), bins=bins, min=lo, max=hi)
        return (counts / max(1, s.numel())).tolist()

    return {"edges": edges.tolist(), "in": frac(s_in), "out": frac(s_out)}


# The weighted kNN of the pretraining monitor (Wu et al. 2018): the 200 nearest bank features
# by cosine similarity vote with weight exp(similarity / 0.1).
REPR_KNN_K, REPR_KNN_T = 200, 0.1


def representation_section(
    features: OODFeatures,
    y: Tensor,
    shift_labels: Tensor | None,
    num_classes: int,
    metrics: dict[str, float],
    meta: dict[str, Any],
    device: torch.device,
) -> None:
    """Accuracy of a kNN classifier on the encoder's features against the labeled bank, on the
    clean images (``repr/knn_acc``) and on the top-severity corruptions (``repr/shift/knn_acc``):
    beside the head's accuracy, whether a shift costs the representation or the linear head."""
    bank, bank_labels = features.bank, features.bank_labels
    k = min(REPR_KNN_K, len(bank))
    meta["repr_knn"] = {"k": k, "t": REPR_KNN_T, "bank": len(bank)}

    def acc(query: Tensor, labels: Tensor) -> float:
        return knn_accuracy(
            query, labels, bank, bank_labels, num_classes, k, REPR_KNN_T, device=device
        )

    metrics["repr/knn_acc"] = acc(features.clean, y)
    if features.shift is not None and shift_labels is not None:
        metrics["repr/shift/knn_acc"] = acc(features.shift, shift_labels)


def ood_section(
    cfg: DictConfig,
    model: Pipeline,
    clean_logits: Tensor,
    y: Tensor,
    shift_logits: Tensor | None,
    outside_logits: dict[str, Tensor],
    features: OODFeatures | None,
    image_shape: tuple[int, ...],
    device: torch.device,
    report: dict[str, Any],
) -> None:
    """OOD detection from the clean logits (draws, N, classes) against noise images (purified
    as many times as the clean images), the held-out classes, the top-severity corruptions
    (shift_logits, (draws, M, classes)) and the outside datasets (``outside_logits``, by set).
    Behind a stochastic purifier, the scores of every draw are pooled on each side: the AUROC
    of the randomised detector. With ``features``, the feature scores of ``ood.feature_scores``
    score each set's first draw against the bank."""
    o = cfg.ood
    seed = int(cfg.run.seed)
    metrics = report["metrics"]
    _, h, w, c = image_shape
    n_noise = int(o.num_noise) or len(y)
    draws = clean_logits.shape[0]
    feature_scorers = (
        _feature_scorers(cfg, features, report, device) if features is not None else {}
    )

    def score(logits: Tensor, feats: Tensor | None) -> dict[str, Tensor]:
        """Every score of a set, by name: (draws, images) for the logit scores, (1, images)
        for the feature scores (one draw; none without the set's features)."""
        out = {
            k: fn(logits.flatten(0, 1)).view(logits.shape[:2]) for k, fn in LOGIT_SCORERS.items()
        }
        if feats is not None:
            out |= {k: fn(feats)[None] for k, fn in feature_scorers.items()}
        return out

    def images(scores: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {k: v[:, mask] for k, v in scores.items()}

    clean = score(clean_logits, features.clean if features is not None else None)
    # The in-distribution side of every set: the clean images, less the held-out classes (the
    # classifier was fine-tuned without them, so their images are OOD, not in-distribution).
    inside_mask = torch.ones(len(y), dtype=torch.bool)
    # name -> (in-distribution, OOD) scores, by score name
    sets: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    if o.held_out_classes:
        in_mask, out_mask = held_out_class_split(y, list(o.held_out_classes))
        if in_mask.any() and out_mask.any():
            inside_mask = in_mask
            sets["held_out"] = (images(clean, in_mask), images(clean, out_mask))
        else:
            report["notes"].append("OOD held-out set skipped: a side of the split is empty.")
    inside = images(clean, inside_mask)
    noise_sets: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    bs = int(cfg.eval.batch_size)
    for kind in o.noise_kinds:
        # Streams of its own (images and purifications): a noise set's numbers do not depend
        # on which kinds come before it.
        kind_seed = _corruption_seed(seed + SEED_OOD, f"noise_{kind}", 0)
        gen = torch.Generator().manual_seed(kind_seed)
        model.reseed(kind_seed, device)
        noise = noise_images(n_noise, (c, h, w), kind, generator=gen)
        logits, f = predict_draws(model, noise, draws, bs, device, features is not None)
        noise_sets[f"noise_{kind}"] = (inside, score(logits, f))
    sets = noise_sets | sets  # the noise sets first, as the report has always listed them
    if o.shift and shift_logits is not None:
        top = max(int(s) for s in cfg.shift.severities)
        shifted = score(shift_logits, features.shift if features is not None else None)
        # (draws, corruptions x N) -> (draws x corruptions, N): an image's corruptions beside
        # each other, so the bootstrap resamples images (less the held-out classes).
        by_image = {
            k: group_by_image(v, None, len(cfg.shift.corruptions))[0] for k, v in shifted.items()
        }
        same = all(v.shape[1] == len(y) for v in by_image.values())
        sets[f"shift_s{top}"] = (inside, images(by_image, inside_mask) if same else by_image)
    for name, logits in outside_logits.items():
        f_out = features.outside.get(name) if features is not None else None
        sets[name] = (inside, score(logits, f_out))
    hist: dict[str, dict[str, Any]] = {}
    for name, (scores_in, scores_out) in sets.items():
        hist[name] = {}
        for score_name, s_out in scores_out.items():
            s_in = scores_in[score_name]  # scores per (draw, image); the metrics pool the draws
            key = f"ood/{name}/{score_name}/"
            for k, v in ood_metrics(s_in.flatten(), s_out.flatten()).items():
                metrics[key + k] = v
            if cfg.eval.bootstrap > 0:
                # The corrupted set holds the clean images' corruptions: one side, so that an
                # image's clean and corrupted scores are resampled together.
                paired = name.startswith("shift_s") and s_in.shape[1] == s_out.shape[1]
                sides = [(s_in, s_out)] if paired else [(s_in,), (s_out,)]
                metrics[key + "auroc_low"], metrics[key + "auroc_high"] = bootstrap_interval(
                    auroc, sides, int(cfg.eval.bootstrap), seed + SEED_BOOTSTRAP, bounds=(0.0, 1.0)
                )
            hist[name][score_name] = _ood_hist(s_in.flatten(), s_out.flatten(), score_name)
    # Each score's mean over the sets it scored: one number per detector to compare runs by.
    for score_name in dict.fromkeys(k for _, out in sets.values() for k in out):
        for k in ("auroc", "fpr95"):
            values = [metrics[f"ood/{name}/{score_name}/{k}"] for name in sets
                      if f"ood/{name}/{score_name}/{k}" in metrics]  # fmt: skip
            metrics[f"ood/mean/{score_name}/{k}"] = float(np.mean(values))
    report["meta"]["ood_sets"] = list(sets)
    report["ood_hist"] = hist


def knn_neighbour(k: int, bank_size: int) -> int:
    """The kNN score's neighbour: ``k``, or for 0 Sun et al.'s ratio of 50 per 50,000 bank
    images (at least 1); never beyond the bank."""
    return min(bank_size, k if k > 0 else max(1, round(50 * bank_size / 50_000)))


def _feature_scorers(
    cfg: DictConfig, features: OODFeatures, report: dict[str, Any], device: torch.device
) -> dict[str, Callable[[Tensor], Tensor]]:
    """The feature scores of ``ood.feature_scores``, each fitted to the bank: features (M, D)
    -> scores (M,), higher = more in-distribution, computed on ``device``."""
    out: dict[str, Callable[[Tensor], Tensor]] = {}
    bank, bank_labels = features.bank, features.bank_labels
    report["meta"]["ood_feature_scores"] = list(cfg.ood.feature_scores)
    for score in cfg.ood.feature_scores:
        if score == "knn":
            k = knn_neighbour(int(cfg.ood.knn_k), len(bank))
            report["meta"]["ood_knn_k"] = k
            out["knn"] = functools.partial(knn_score, bank, k=k, device=device)
        elif score == "mahalanobis":
            means, precision = fit_mahalanobis(bank, bank_labels)
            out["mahalanobis"] = functools.partial(
                mahalanobis_score, means=means, precision=precision, device=device
            )
    return out
