"""The evaluation report: ``report.json``, ``report.md``, PNG plots and their wandb twins.

A report is a plain dict, so it can be written, read back and re-rendered without the models:

- ``metrics``: every number under a hierarchical name (the names of :data:`METRIC_DOCS`);
- ``meta``: what was evaluated and how (runs, data, grid, threat models, attack protocol);
- ``sanity``: the sanity checks per norm, ``{"passed": bool, "values": ...}``;
- ``cert``: each certified image's radius and whether the smoothed classifier was right;
- ``reliability``: reliability-diagram bins per calibration set (``reliability_scaled``: after
  temperature scaling);
- ``calib_severity``: every corruption cell's ECE (and after temperature scaling) by severity;
- ``risk_coverage``: per calibration set, its risk-coverage curve and the best ranking's;
- ``ood_hist``: score histograms (in-distribution vs each OOD set);
- ``notes``: protocol deviations and skipped parts, in words.

The Markdown and wandb tables come from the same :func:`report_tables`, so the two never
disagree. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_robust.evaluate.corruptions import CORRUPTION_GROUPS
from ssl_robust.evaluate.metrics import accuracy_interval, certified_radii, interval_bars
from ssl_robust.evaluate.ood import FEATURE_SCORES, LOGIT_SCORES
from ssl_robust.files import write_text_atomic
from ssl_robust.plotting import pyplot, save_figure

__all__ = [
    "ANCHORS",
    "METRIC_DOCS",
    "OOD_SCORES",
    "SANITY_CHECKS",
    "Table",
    "describe_metric",
    "expected_metric_keys",
    "group_of",
    "log_to_wandb",
    "make_plots",
    "render_markdown",
    "report_tables",
    "threat_name",
    "write_report",
]

# The documented metric names. ``{...}`` fields are filled by expected_metric_keys; every key
# a report holds matches exactly one template (tests check both directions).
METRIC_DOCS: dict[str, str] = {
    "test/acc": "Clean top-1 accuracy of the evaluated pipeline (behind a stochastic purifier: "
    "the mean over clean.draws purifications per image).",
    "test/acc_std": "Standard deviation of the clean accuracy over the purification draws.",
    "test/acc_worst": "Lowest clean accuracy over the purification draws.",
    "test/draws": "Purifications per image behind the clean accuracy (clean.draws).",
    "test/acc_unpurified": "Clean accuracy of the classifier alone (runs with a purifier).",
    "test/n": "Number of evaluation images.",
    "shift/{corruption}/{severity}/acc": "Accuracy on one corruption at one severity.",
    "shift/mean_acc": "Mean accuracy over the corruption x severity grid (RobustBench; behind "
    "a stochastic purifier, each cell is the mean over shift.draws purifications per image).",
    "shift/mean_acc_std": "Standard deviation of the grid's mean accuracy over the purification "
    "draws.",
    "shift/mean_acc_worst": "Lowest grid mean accuracy over the purification draws.",
    "shift/draws": "Purifications per image behind every corruption cell (shift.draws).",
    "shift/group/{group}/acc": "Mean over the group's corruptions in the grid, all severities.",
    "shift/severity/{severity}/acc": "Mean over the grid's corruptions at one severity.",
    "shift/severity5_acc": "Mean over the grid's corruptions at severity 5.",
    "shift/n": "Images in every corruption cell.",
    "shift/mean_acc_se": "Standard error of shift/mean_acc over the images: each image's "
    "accuracy averaged over the grid (and the draws) is one independent score; the 95% "
    "interval is +-1.96 se.",
    "shift/severity/{severity}/acc_se": "Standard error over the images of one severity's mean.",
    "shift/group/{group}/acc_se": "Standard error over the images of one group's mean.",
    "shift/{corruption}/ce": "Corruption error against shift.ce_reference: this pipeline's "
    "top-1 error summed over the severities over the reference's (1 = the reference's error).",
    "shift/{corruption}/relative_ce": "Relative corruption error: the error added by the "
    "corruption (over the clean error), summed over the severities, over the reference's.",
    "shift/mce": "Mean corruption error over the grid's corruptions against shift.ce_reference "
    "(Hendrycks & Dietterich 2019; lower is better, 1 = the reference).",
    "shift/relative_mce": "Mean relative corruption error over the grid's corruptions.",
    "natural/{set}/acc": "Accuracy on a labeled natural-shift set of natural.sets (e.g. "
    "CIFAR-10.1; behind a stochastic purifier, the mean over clean.draws purifications).",
    "natural/{set}/n": "Images of the natural-shift set.",
    "adv/{threat}/acc": "PGD(-EOT) robust accuracy, mean over re-scoring purifications.",
    "adv/{threat}/acc_worst": "Fraction of attacked images correct in every re-scoring draw.",
    "adv/{threat}/clean_acc": "Accuracy of the attacked subset before the attack.",
    "adv/{threat}/n": "Number of attacked images.",
    "adv/{threat}/steps": "PGD steps.",
    "adv/{threat}/eot": "Gradient draws averaged per PGD step (EOT).",
    "adv/{threat}/rescore_draws": "Independent pipeline calls scoring each adversarial image.",
    "adv/{threat}/attack_calls_per_image": "Pipeline calls made by the attack per image.",
    "adv/{threat}/pipeline_calls_per_image": "All pipeline calls per image: attack + scoring.",
    "adv/{threat}/nfe_per_image": "Network evaluations per image of the attack "
    "(denoiser calls + one classifier call per pipeline call).",
    "adv/{threat}/wall_s": "Wall time of the attack and its scoring, seconds.",
    "adv/{threat}/autoattack_acc": "AutoAttack robust accuracy (deterministic pipelines).",
    "adv/{threat}/autoattack_wall_s": "Wall time of AutoAttack, seconds.",
    "adv/sanity/{norm}/{check}": "1 if the sanity check passed (Carlini et al. 2019), else 0.",
    "adv/sanity/{norm}/passed": "1 if every sanity check of the norm passed.",
    "cert/sigma": "Std of the smoothing noise on [0, 1] images (behind a purifier: the noise its "
    "diffusion to t* adds).",
    "cert/n": "Number of certified images.",
    "cert/samples": "Noise draws bounding each image's top-class probability (cert.samples).",
    "cert/n0": "Noise draws guessing each image's top class.",
    "cert/alpha": "Failure probability of each certificate.",
    "cert/acc": "Accuracy of the smoothed classifier (abstentions count as wrong).",
    "cert/abstain": "Fraction of images the smoothed classifier abstains on.",
    "cert/acr": "Average certified radius: the mean over images of the certified L2 radius, 0 "
    "where wrong or abstaining.",
    "cert/radius/{radius}/acc": "Certified accuracy at an L2 radius: right, with a certified "
    "radius at least that (Cohen et al. 2019).",
    "cert/nfe_per_image": "Network evaluations per certified image (noise draws x (denoiser "
    "calls + 1)).",
    "cert/wall_s": "Wall time of the certification, seconds.",
    "calib/{set}/ece": "Expected calibration error, calib.n_bins equal-width bins (Guo et al. "
    "2017; behind a stochastic purifier, over the predictions of every purification pooled).",
    "calib/{set}/nll": "Mean negative log-likelihood.",
    "calib/{set}/brier": "Multi-class Brier score.",
    "calib/{set}/acc": "Accuracy of the calibration set.",
    "calib/{set}/ece_low": "Lower end of the ECE's 95% bootstrap interval over the images "
    "(eval.bootstrap resamples).",
    "calib/{set}/ece_high": "Upper end of the ECE's 95% bootstrap interval over the images.",
    "selective/{set}/aurc": "Area under the risk-coverage curve of a calibration set: the error "
    "rate among the k most confident predictions (top softmax probability), averaged over k "
    "(Geifman & El-Yaniv 2017; lower is better).",
    "selective/{set}/eaurc": "Excess AURC: the AURC less that of the best ranking of the same "
    "predictions (every right one first); 0 when confidence orders errors last.",
    "selective/{set}/risk_c50": "Error rate of the 50% most confident predictions.",
    "selective/{set}/risk_c80": "Error rate of the 80% most confident predictions.",
    "calib/severity/{severity}/ece": "ECE of each corruption cell at a severity (purifications "
    "pooled), averaged over the grid's corruptions.",
    "calib/severity/{severity}/ts_ece": "The same after temperature scaling (calib/temperature; "
    "cross-fitted per image where the cells hold the clean images).",
    "calib/temperature": "Temperature fit by NLL on every clean image's logits (Guo et al. "
    "2017; calib.temperature).",
    "calib/{set}/ts_ece": "ECE after temperature scaling; each image of the clean set (and of "
    "the shift set when it holds the same images) scaled by the temperature fit on the other "
    "folds (calib.temperature_folds), the other sets by calib/temperature. Its bootstrap "
    "interval refits the temperatures on each resample's clean images, so it holds the "
    "fit's own uncertainty.",
    "calib/{set}/ts_nll": "NLL after temperature scaling.",
    "calib/{set}/ts_brier": "Brier score after temperature scaling.",
    "calib/{set}/ts_ece_low": "Lower end of the temperature-scaled ECE's 95% bootstrap interval.",
    "calib/{set}/ts_ece_high": "Upper end of the temperature-scaled ECE's 95% bootstrap interval.",
    "repr/knn_acc": "Weighted-kNN accuracy (k = 200, or the bank's size when smaller; t = 0.1) "
    "of the encoder's features of the clean images (each one's first purification) against "
    "the labeled bank of the OOD feature scores (ood.feature_scores). Images of held-out "
    "classes count, and are never right (the bank has none of them).",
    "repr/shift/knn_acc": "The same on the top-severity corruptions, pooled (with ood.shift).",
    "ood/mean/{score}/auroc": "Mean of a score's AUROC over the run's OOD sets (the sets "
    "depend on the config: compare runs evaluated alike).",
    "ood/mean/{score}/fpr95": "Mean of a score's FPR@95 over the run's OOD sets.",
    "ood/{set}/{score}/auroc": "AUROC, in-distribution as positives (behind a stochastic "
    "purifier, the scores of every purification pooled on each side).",
    "ood/{set}/{score}/fpr95": "False-positive rate at 95% true-positive rate.",
    "ood/{set}/{score}/aupr_in": "Area under the precision-recall curve (average precision), "
    "in-distribution as positives; chance is their share of the images.",
    "ood/{set}/{score}/aupr_out": "The same with the OOD images as positives (scores negated).",
    "ood/{set}/{score}/auroc_low": "Lower end of the AUROC's 95% bootstrap interval over the "
    "images of both sets (eval.bootstrap resamples).",
    "ood/{set}/{score}/auroc_high": "Upper end of the AUROC's 95% bootstrap interval.",
    "perf/latency_ms": "Classifier latency at batch 1, median ms.",
    "perf/throughput_ips": "Classifier throughput at perf.batch_size, images/s.",
    "perf/purified_latency_ms": "Purifier + classifier latency at batch 1, median ms.",
    "perf/purified_throughput_ips": "Purifier + classifier throughput, images/s.",
    "perf/purifier_nfe": "Denoiser evaluations per purification.",
    "perf/batch_size": "Batch size of the throughput measurement.",
    "perf/eval_wall_s": "Wall time of the whole evaluation, seconds.",
}

# Logit scores, then feature scores (ood.feature_scores).
OOD_SCORES = (*LOGIT_SCORES, *FEATURE_SCORES)
SANITY_CHECKS = (
    "eps_monotone",
    "large_eps",
    "more_steps",
    "more_eot",
    "black_box",
    "nonzero_gradients",
)

# Published numbers to read ours against (RobustBench entries; CIFAR-10, accuracies in %).
ANCHORS: list[dict[str, str]] = [
    {
        "model": "Standard WRN-28-10",
        "clean": "94.78",
        "measure": "CIFAR-10-C mean 73.46 "
        "(sev 1..5: 86.9 / 81.3 / 74.9 / 67.6 / 56.5); AutoAttack Linf 8/255: 0.0",
    },
    {"model": "AugMix WRN-40-2", "clean": "95.08", "measure": "CIFAR-10-C mean 88.82"},
    {"model": "best CIFAR-10-C entries", "clean": "~96.6", "measure": "CIFAR-10-C mean 92.78"},
    {
        "model": "Sehwag2021 ResNet-18 (adv. trained)",
        "clean": "84.59",
        "measure": "AutoAttack Linf 8/255: 55.54",
    },
    {
        "model": "DiffPure WRN-28-10 (as published)",
        "clean": "89.0",
        "measure": "Linf 8/255: 70.6 claimed; full-gradient re-evaluations ~46-47",
    },
]


def threat_name(norm: str, eps: float) -> str:
    """``linf_8`` (eps in units of 1/255) or ``l2_0.5`` (eps on [0, 1] images).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: The radius in the metric-name unit: 1/255 for Linf, plain for L2.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; choose from ['linf', 'l2']")
    return f"{norm}_{eps:g}"


def group_of(corruption: str) -> str:
    """The CIFAR-10-C group of a corruption (noise, blur, weather, digital) or ``extra``."""
    return next((g for g, names in CORRUPTION_GROUPS.items() if corruption in names), "extra")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[a-z]+\}", template)
    return re.compile("^" + "[^/]+".join(re.escape(p) for p in parts) + "$")


# Most specific first: "shift/group/noise/acc" is a group mean, not the cell of a corruption
# called "group" at severity "noise".
_TEMPLATES = sorted(((t, _template_regex(t)) for t in METRIC_DOCS), key=lambda p: p[0].count("{"))


def describe_metric(key: str) -> str | None:
    """The documentation of a metric name, or None when no template matches it."""
    return next((METRIC_DOCS[t] for t, regex in _TEMPLATES if regex.match(key)), None)


def expected_metric_keys(
    *,
    clean: bool = True,
    purified: bool = False,
    clean_draws: int = 1,
    shift_draws: int = 1,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (),
    threats: Sequence[str] = (),
    autoattack: bool = False,
    sanity_norms: Sequence[str] = (),
    sanity_eot: bool = False,
    calib_sets: Sequence[str] = (),
    ood_sets: Sequence[str] = (),
    perf: bool = False,
    cert_radii: Sequence[float] = (),
    ce_reference: bool = False,
    natural_sets: Sequence[str] = (),
    bootstrap: bool = False,
    temperature: bool = False,
    ood_scores: Sequence[str] = LOGIT_SCORES,
    knn_sets: Sequence[str] = (),
) -> set[str]:
    """Every metric name a report of this shape holds.

    Args:
        clean: The clean section ran.
        purified: A purifier sat in front of the classifier.
        clean_draws: Purifications per image of the clean accuracy (> 1: a stochastic
            purifier scored over several draws).
        shift_draws: Purifications per image of every corruption cell (> 1: likewise).
        corruptions: The corruption grid (empty: the shift section did not run).
        severities: Its severities.
        threats: Threat names (:func:`threat_name`) attacked.
        autoattack: AutoAttack ran for every threat.
        sanity_norms: Norms whose sanity checks ran.
        sanity_eot: Their checks include ``more_eot`` (a stochastic pipeline; for a
            deterministic one more EOT passes repeat the same gradient and the check is skipped).
        calib_sets: Calibration sets (``clean``, ``shift``).
        ood_sets: OOD sets.
        perf: The latency section ran.
        cert_radii: The radii of a certification that ran (empty: none ran).
        ce_reference: Corruption errors against a reference were computed (with ``clean``,
            the relative ones too), and all were defined.
        natural_sets: Names of the natural-shift sets evaluated.
        bootstrap: The ECEs and AUROCs have bootstrap intervals (eval.bootstrap > 0).
        temperature: The calibration sets were scored after temperature scaling too.
        ood_scores: The OOD scores of every OOD set (the logit scores, and the feature scores
            of ``ood.feature_scores``).
        knn_sets: The sets the representation's kNN accuracy was measured on (``clean``,
            ``shift``; with the feature scores' bank).
    """
    keys: set[str] = {"perf/eval_wall_s"}
    if clean:
        keys |= {"test/acc", "test/n"}
        if purified:
            keys.add("test/acc_unpurified")
        if clean_draws > 1:
            keys |= {"test/acc_std", "test/acc_worst", "test/draws"}
    if corruptions and severities:
        keys.add("shift/mean_acc")
        keys |= {f"shift/{c}/{s}/acc" for c in corruptions for s in severities}
        keys |= {f"shift/group/{group_of(c)}/acc" for c in corruptions}
        keys |= {f"shift/severity/{s}/acc" for s in severities}
        keys |= {"shift/n", "shift/mean_acc_se"}
        keys |= {f"shift/severity/{s}/acc_se" for s in severities}
        keys |= {f"shift/group/{group_of(c)}/acc_se" for c in corruptions}
        if 5 in severities:
            keys.add("shift/severity5_acc")
        if shift_draws > 1:
            keys |= {"shift/mean_acc_std", "shift/mean_acc_worst", "shift/draws"}
        if ce_reference:
            kinds = ["ce", "relative_ce"] if clean else ["ce"]
            keys |= {f"shift/{c}/{k}" for c in corruptions for k in kinds}
            keys |= {"shift/mce", "shift/relative_mce"} if clean else {"shift/mce"}
    keys |= {f"natural/{name}/{k}" for name in natural_sets for k in ("acc", "n")}
    per_threat = [
        "acc",
        "acc_worst",
        "clean_acc",
        "n",
        "steps",
        "eot",
        "rescore_draws",
        "attack_calls_per_image",
        "pipeline_calls_per_image",
        "nfe_per_image",
        "wall_s",
    ]
    if autoattack:
        per_threat += ["autoattack_acc", "autoattack_wall_s"]
    keys |= {f"adv/{t}/{m}" for t in threats for m in per_threat}
    for norm in sanity_norms:
        keys |= {f"adv/sanity/{norm}/{c}" for c in SANITY_CHECKS if sanity_eot or c != "more_eot"}
        keys.add(f"adv/sanity/{norm}/passed")
    if cert_radii:
        keys |= {
            f"cert/{k}" for k in ("sigma", "n", "samples", "n0", "alpha", "acc", "abstain", "acr")
        }
        keys |= {"cert/nfe_per_image", "cert/wall_s"}
        keys |= {f"cert/radius/{r:g}/acc" for r in cert_radii}
    calib = ["ece", "nll", "brier", "acc", *(["ece_low", "ece_high"] if bootstrap else [])]
    keys |= {f"calib/{s}/{m}" for s in calib_sets for m in calib}
    keys |= {
        f"selective/{s}/{m}" for s in calib_sets for m in ("aurc", "eaurc", "risk_c50", "risk_c80")
    }
    if "shift" in calib_sets and corruptions:
        per_severity = ["ece", "ts_ece"] if temperature else ["ece"]
        keys |= {f"calib/severity/{s}/{m}" for s in severities for m in per_severity}
    if temperature and calib_sets:
        keys.add("calib/temperature")
        scaled = ["ts_ece", "ts_nll", "ts_brier"]
        scaled += ["ts_ece_low", "ts_ece_high"] if bootstrap else []
        keys |= {f"calib/{s}/{m}" for s in calib_sets for m in scaled}
    ood = ["auroc", "fpr95", "aupr_in", "aupr_out"]
    ood += ["auroc_low", "auroc_high"] if bootstrap else []
    keys |= {f"ood/{s}/{sc}/{m}" for s in ood_sets for sc in ood_scores for m in ood}
    if ood_sets:
        keys |= {f"ood/mean/{sc}/{m}" for sc in ood_scores for m in ("auroc", "fpr95")}
    keys |= {"repr/knn_acc" if s == "clean" else f"repr/{s}/knn_acc" for s in knn_sets}
    if perf:
        keys |= {"perf/latency_ms", "perf/throughput_ips", "perf/batch_size"}
        if purified:
            keys |= {
                "perf/purified_latency_ms",
                "perf/purified_throughput_ips",
                "perf/purifier_nfe",
            }
    return keys


# ---------------------------------------------------------------------------------------------
# Tables (shared by the Markdown and wandb)
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A titled table; ``formats`` per column: ``str``, ``pct`` (fraction shown in %),
    ``f4``, ``f2``, ``f1`` or ``int``."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    formats: list[str]
    # Markdown under the table (what its rows mean); not part of the wandb table.
    note: str = ""


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if kind == "str" or isinstance(value, str):
        return str(value)
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "int":
        return f"{round(value)}"
    digits = {"f4": 4, "f2": 2, "f1": 1}.get(kind, 4)
    return f"{value:.{digits}f}"


def _ci95(m: dict[str, float], key: str) -> str:
    """The 95 % interval over the images of the accuracy ``m[key]`` (``accuracy_interval``:
    Wilson over its images, or +-1.96 se for a corruption mean), in percent; "–" without one."""
    bounds = accuracy_interval(m, key)
    if bounds is None:
        return "–"
    return f"{100 * bounds[0]:.1f}–{100 * bounds[1]:.1f}"


def _markdown_table(table: Table) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    align = "| " + " | ".join("---" if f == "str" else "---:" for f in table.formats) + " |"
    body = [
        "| " + " | ".join(_fmt(v, f) for v, f in zip(row, table.formats)) + " |"
        for row in table.rows
    ]
    return "\n".join([head, align, *body])


def _grid(report: dict[str, Any]) -> tuple[list[str], list[int]]:
    grid = report.get("meta", {}).get("grid") or {}
    return list(grid.get("corruptions", [])), [int(s) for s in grid.get("severities", [])]


def _threats(report: dict[str, Any]) -> list[dict[str, Any]]:
    return list(report.get("meta", {}).get("threats", []))


def _compact(values: Any) -> str:
    """A short rendering of a sanity check's values, for a check this module does not know."""

    def short(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.4g}")
        if isinstance(v, list):
            return [short(x) for x in v]
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        return v

    return json.dumps(short(values), separators=(", ", ": "))


def _eps_text(norm: str, eps: float | Sequence[float]) -> str:
    """Radii as the threats name them: Linf in units of 1/255 (``0, 2/255``), L2 plain."""
    values = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if norm == "linf":
        return ", ".join(f"{round(255 * e, 2):g}/255" if e else "0" for e in values)
    return ", ".join(f"{round(e, 2):g}" for e in values)


def _pcts(values: Sequence[float]) -> str:
    return ", ".join(f"{100 * v:.1f}" for v in values) + "%"


def _sanity_measured(norm: str, check: str, v: Any) -> str:
    """What a sanity check measured, in words, with eps in the threats' units."""
    try:
        if check == "eps_monotone":
            return f"eps {_eps_text(norm, v['eps'])}: accuracy {_pcts(v['acc'])}"
        if check == "large_eps":
            eps = float(v["eps"])
            whole = ""
            if norm == "linf" and eps >= 1:
                whole = " (the whole [0, 1] image box)"
            elif norm == "l2" and abs(eps**2 - round(eps**2)) < 1e-3:
                whole = f" (= sqrt({round(eps**2)}), the whole [0, 1] image box)"
            return f"eps {_eps_text(norm, eps)}{whole}: accuracy {_pcts([v['acc']])}"
        if check == "more_steps":
            (a, b), (acc_a, acc_b) = v["steps"], v["acc"]
            return (
                f"eps {_eps_text(norm, v['eps'])}: {a} steps {_pcts([acc_a])}, "
                f"{b} steps {_pcts([acc_b])}"
            )
        if check == "more_eot":
            (a, b), (acc_a, acc_b) = v["eot"], v["acc"]
            return (
                f"eps {_eps_text(norm, v['eps'])}: EOT {a} {_pcts([acc_a])}, "
                f"EOT {b} {_pcts([acc_b])}"
            )
        if check == "black_box":
            return (
                f"eps {_eps_text(norm, v['eps'])}: PGD {_pcts(v['white_box_acc'])}; "
                f"random search ({v['queries']} queries) {_pcts(v['black_box_acc'])}"
            )
        if check == "nonzero_gradients":
            return f"images with an all-zero input gradient: {_pcts([v['zero_grad_fraction']])}"
    except (KeyError, TypeError, ValueError):
        pass
    return _compact(v)


def _large_eps_max_acc() -> float:
    """The accuracy the unbounded-eps check accepts as ~0 (sanity_checks' default)."""
    import inspect

    from ssl_robust.evaluate.attacks import sanity_checks

    return float(inspect.signature(sanity_checks).parameters["large_eps_max_acc"].default)


def _sanity_note(sanity: dict[str, dict[str, Any]]) -> str:
    """What each sanity check that ran asks of the attack, one bullet each."""
    ran = {c for checks in sanity.values() for c in checks}
    says = {
        "eps_monotone": "accuracy must not rise (beyond a small tolerance) as eps grows: a "
        "larger ball holds every smaller one, so a rise means the attack is failing to find "
        "adversarial images it could reach.",
        "large_eps": "PGD with an eps so large that the ball holds every image (Linf 255/255; "
        "L2 the square root of the number of pixel values) can turn any image into one of "
        f"another class, so accuracy should reach ~0 (at most {100 * _large_eps_max_acc():g}%). "
        "Accuracy left there means the gradients do not lead anywhere (gradient masking), not "
        "robustness.",
        "more_steps": "more PGD steps (both counts measured are shown), at the eps of the "
        "sweep whose accuracy is nearest half the clean accuracy, must not raise accuracy "
        "(beyond the tolerance): a stronger attack can only do better, so more steps "
        "helping the model means the attack is broken.",
        "more_eot": "likewise with more EOT gradient draws per step.",
        "black_box": "a gradient-free random search with the stated queries must not beat PGD "
        "(its accuracy must not be lower than PGD's) at any eps of the sweep: if it does, the "
        "gradients mislead PGD.",
        "nonzero_gradients": "no image may have an all-zero input gradient of the logit margin "
        "(shattered gradients; Athalye et al. 2018).",
    }
    lines = [f"- {c}: {says[c]}" for c in SANITY_CHECKS if c in ran and c in says]
    if not lines:
        return ""
    return (
        "Accuracies in % of the sanity images; Linf eps in units of 1/255 like the threats, L2 "
        "eps on [0, 1] images. Each check:\n\n" + "\n".join(lines)
    )


def _calib_sets(report: dict[str, Any]) -> list[str]:
    """The calibration sets the report holds an ECE for, in the order they ran."""
    m = report.get("metrics", {})
    return [s for s in report.get("reliability") or ("clean", "shift") if f"calib/{s}/ece" in m]


def _ece_ci(m: dict[str, float], name: str, prefix: str = "") -> str:
    """A calibration set's ECE bootstrap interval, as the ECE is shown (``prefix`` "ts_": after
    temperature scaling); "–" without one."""
    low, high = m.get(f"calib/{name}/{prefix}ece_low"), m.get(f"calib/{name}/{prefix}ece_high")
    return "–" if low is None or high is None else f"{low:.4f}–{high:.4f}"


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """The headline numbers of every section that ran, one row each: (measure, value, 95% CI
    over the images where there is one)."""
    m: dict[str, float] = report.get("metrics", {})
    meta = report.get("meta", {})
    rows: list[list[str]] = []

    def pct(key: str) -> str:
        return f"{100 * m[key]:.2f}%"

    def add(label: str, key: str) -> None:
        if key in m:
            rows.append([label, pct(key), _ci95(m, key)])

    add("clean accuracy", "test/acc")
    corruptions, severities = _grid(report)
    add(f"corruption accuracy, mean of {len(corruptions)} x {len(severities)}", "shift/mean_acc")
    if "shift/mce" in m:
        ref = (meta.get("ce_reference") or {}).get("title", "the reference")
        value = pct("shift/mce")
        if "shift/relative_mce" in m:
            value += f" / {pct('shift/relative_mce')}"
        label = "mCE" + (" / relative mCE" if "shift/relative_mce" in m else "")
        rows.append([f"{label} against {ref} (lower is better)", value, "–"])
    for key in sorted(k for k in m if k.startswith("natural/") and k.endswith("/acc")):
        add(f"natural shift, {key.split('/')[1]}", key)
    for t in _threats(report):
        pgd = "PGD, mean over draws" if meta.get("stochastic", True) else "PGD"
        add(f"robust accuracy, {t['name']} ({pgd})", f"adv/{t['name']}/acc")
        add(f"robust accuracy, {t['name']} (AutoAttack)", f"adv/{t['name']}/autoattack_acc")
    for r, key in certified_radii(m):
        if r > 0:
            add(f"certified accuracy, L2 radius {r:g}", key)
    for name in _calib_sets(report):
        rows.append([f"ECE, {name}", f"{m[f'calib/{name}/ece']:.4f}", _ece_ci(m, name)])
    if "calib/temperature" in m:
        for name in _calib_sets(report):
            if f"calib/{name}/ts_ece" in m:
                rows.append(
                    [
                        f"ECE after temperature scaling, {name}",
                        f"{m[f'calib/{name}/ts_ece']:.4f}",
                        _ece_ci(m, name, "ts_"),
                    ]
                )
    if "repr/knn_acc" in m:
        shifted = m.get("repr/shift/knn_acc")
        rows.append(
            [
                "kNN on the encoder's features, clean / top severity",
                f"{100 * m['repr/knn_acc']:.2f}%"
                + (f" / {100 * shifted:.2f}%" if shifted is not None else ""),
                "–",
            ]
        )
    for score in ("msp", "knn"):  # the usual logit score, and the feature score beside it
        aurocs = {
            s: m[f"ood/{s}/{score}/auroc"]
            for s in meta.get("ood_sets", [])
            if f"ood/{s}/{score}/auroc" in m
        }
        if aurocs:
            worst = min(aurocs, key=lambda s: aurocs[s])
            mean = float(np.mean(list(aurocs.values())))
            rows.append(
                [
                    f"OOD AUROC ({score}), mean of {len(aurocs)} sets / worst ({worst})",
                    f"{100 * mean:.2f}% / {100 * aurocs[worst]:.2f}%",
                    "–",
                ]
            )
    sanity: dict[str, dict[str, dict[str, Any]]] = report.get("sanity", {})
    if sanity:
        failed = [f"{n}/{c}" for n, checks in sanity.items() for c, r in checks.items()
                  if not r.get("passed")]  # fmt: skip
        rows.append(["attack sanity checks", "all passed" if not failed else "FAILED: "
                     + ", ".join(failed), "–"])  # fmt: skip
    return rows


def report_tables(report: dict[str, Any]) -> dict[str, Table]:
    """The report's tables by key (those whose section ran), in reading order."""
    m: dict[str, float] = report.get("metrics", {})
    tables: dict[str, Table] = {}
    headline = _summary_rows(report)
    if headline:
        tables["summary"] = Table(
            "Summary", ["measure", "value", "95% CI"], headline, ["str", "str", "str"]
        )

    if "test/acc" in m:
        name = "pipeline"
        if "test/draws" in m:
            name = (
                f"pipeline, mean of {m['test/draws']:.0f} purifications "
                f"(std {100 * m['test/acc_std']:.2f}, worst {100 * m['test/acc_worst']:.2f})"
            )
        n = m.get("test/n")
        rows: list[list[Any]] = [[name, m["test/acc"], _ci95(m, "test/acc"), n]]
        if "test/acc_unpurified" in m:
            acc = m["test/acc_unpurified"]
            rows.append(["classifier alone (no purifier)", acc, _ci95(m, "test/acc_unpurified"), n])
        tables["clean"] = Table(
            "Clean accuracy (%)",
            ["model", "acc", "95% CI", "images"],
            rows,
            ["str", "pct", "str", "int"],
        )

    corruptions, severities = _grid(report)
    if "shift/mean_acc" in m:
        grid_name = "mean over the grid"
        if "shift/draws" in m:
            grid_name += (
                f", mean of {m['shift/draws']:.0f} purifications "
                f"(std {100 * m['shift/mean_acc_std']:.2f}, "
                f"worst {100 * m['shift/mean_acc_worst']:.2f})"
            )
        summary = [[grid_name, m["shift/mean_acc"], _ci95(m, "shift/mean_acc")]]
        if "shift/severity5_acc" in m:
            summary.append(
                ["severity 5", m["shift/severity5_acc"], _ci95(m, "shift/severity/5/acc")]
            )
        if "test/acc" in m:
            summary.insert(0, ["clean", m["test/acc"], _ci95(m, "test/acc")])
        tables["shift_summary"] = Table(
            "Corruption accuracy (%)", ["set", "acc", "95% CI"], summary, ["str", "pct", "str"]
        )
        groups = [g for g in [*CORRUPTION_GROUPS, "extra"] if f"shift/group/{g}/acc" in m]
        tables["shift_groups"] = Table(
            "Per group (%)",
            ["group", "acc", "95% CI"],
            [[g, m[f"shift/group/{g}/acc"], _ci95(m, f"shift/group/{g}/acc")] for g in groups],
            ["str", "pct", "str"],
        )
        tables["shift_severities"] = Table(
            "Per severity (%)",
            ["severity", "acc", "95% CI"],
            [
                [str(s), m[f"shift/severity/{s}/acc"], _ci95(m, f"shift/severity/{s}/acc")]
                for s in severities
            ],
            ["str", "pct", "str"],
        )
        grid_rows = []
        for c in corruptions:
            cells = [m.get(f"shift/{c}/{s}/acc") for s in severities]
            valid = [v for v in cells if v is not None]
            grid_rows.append([c, group_of(c), *cells, sum(valid) / len(valid) if valid else None])
        grid_rows.append(
            [
                "mean",
                "",
                *[m.get(f"shift/severity/{s}/acc") for s in severities],
                m["shift/mean_acc"],
            ]
        )
        tables["shift_grid"] = Table(
            "Corruption x severity (%)",
            ["corruption", "group", *[f"s{s}" for s in severities], "mean"],
            grid_rows,
            ["str", "str", *["pct"] * len(severities), "pct"],
        )
        ce_rows = [
            [c, m.get(f"shift/{c}/ce"), m.get(f"shift/{c}/relative_ce")]
            for c in corruptions
            if f"shift/{c}/ce" in m or f"shift/{c}/relative_ce" in m
        ]
        if ce_rows:
            ce_rows.append(["mean (mCE)", m.get("shift/mce"), m.get("shift/relative_mce")])
            tables["shift_ce"] = Table(
                "Corruption error against the reference (%; 100 = the reference, lower is better)",
                ["corruption", "CE", "relative CE"],
                ce_rows,
                ["str", "pct", "pct"],
            )

    if "repr/knn_acc" in m:
        top = (report.get("meta", {}).get("grid") or {}).get("severities") or [5]
        head_shift = m.get(f"shift/severity/{max(top)}/acc")
        repr_rows = [["clean", m["repr/knn_acc"], m.get("test/acc")]]
        if "repr/shift/knn_acc" in m:
            repr_rows.append(
                [f"corruptions, severity {max(top)}", m["repr/shift/knn_acc"], head_shift]
            )
        tables["repr"] = Table(
            "kNN on the encoder's features vs the classifier's head (%)",
            ["set", "kNN", "head"],
            repr_rows,
            ["str", "pct", "pct"],
        )

    natural = [k.split("/")[1] for k in m if k.startswith("natural/") and k.endswith("/acc")]
    if natural:
        clean_acc = m.get("test/acc")
        tables["natural"] = Table(
            "Natural distribution shift (%)",
            ["set", "images", "acc", "95% CI", "drop from clean"],
            [
                [
                    name,
                    m.get(f"natural/{name}/n"),
                    m[f"natural/{name}/acc"],
                    _ci95(m, f"natural/{name}/acc"),
                    None if clean_acc is None else clean_acc - m[f"natural/{name}/acc"],
                ]
                for name in natural
            ],
            ["str", "int", "pct", "str", "pct"],
        )

    per_class = report.get("per_class") or {}
    if per_class.get("classes"):
        shift = per_class.get("shift")
        rows = []
        for k, name in enumerate(per_class["classes"]):
            clean = per_class["clean"][k]
            row = [name, per_class["images"][k], clean]
            if shift is not None:
                hurt = None if clean is None or shift[k] is None else clean - shift[k]
                row += [shift[k], hurt]
            rows.append(row)
        if shift is not None:  # the classes the shift hurts most first
            rows.sort(key=lambda r: math.inf if r[4] is None else -r[4])
        tables["per_class"] = Table(
            "Per class (%)",
            ["class", "images", "clean", *(["shift", "drop"] if shift is not None else [])],
            rows,
            ["str", "int", "pct", *(["pct", "pct"] if shift is not None else [])],
        )

    threats = [t for t in _threats(report) if f"adv/{t['name']}/acc" in m]
    if threats:
        rows = []
        for t in threats:
            p = f"adv/{t['name']}/"
            rows.append(
                [
                    t["name"],
                    t.get("eps_label", ""),
                    m[p + "clean_acc"],
                    m[p + "acc"],
                    _ci95(m, p + "acc"),
                    m[p + "acc_worst"],
                    m.get(p + "autoattack_acc"),
                    m[p + "n"],
                    m[p + "nfe_per_image"],
                    m[p + "wall_s"],
                ]
            )
        tables["adv"] = Table(
            "Robust accuracy (%)",
            [
                "threat",
                "eps",
                "clean",
                "PGD mean",
                "95% CI",
                "PGD worst",
                "AutoAttack",
                "images",
                "NFE / image",
                "wall s",
            ],
            rows,
            ["str", "str", "pct", "pct", "str", "pct", "pct", "int", "int", "f2"],
        )

    radii = certified_radii(m)
    if radii:
        tables["cert"] = Table(
            "Certified accuracy (%)",
            ["L2 radius", "certified acc", "95% CI", "images"],
            [[f"{r:g}", m[k], _ci95(m, k), m["cert/n"]] for r, k in radii],
            ["str", "pct", "str", "int"],
        )

    sanity: dict[str, dict[str, dict[str, Any]]] = report.get("sanity", {})
    if sanity:
        rows = [
            [
                norm,
                check,
                bool(result.get("passed")),
                _sanity_measured(norm, check, result.get("values")),
            ]
            for norm, checks in sanity.items()
            for check, result in checks.items()
        ]
        tables["sanity"] = Table(
            "Sanity checks (against gradient masking and weak attacks; Carlini et al. 2019)",
            ["norm", "check", "passed", "measured"],
            rows,
            ["str", "str", "str", "str"],
            note=_sanity_note(sanity),
        )

    calib_sets = _calib_sets(report)
    if calib_sets:
        scaled = "calib/temperature" in m
        tables["calib"] = Table(
            "Calibration" + (" (T: after temperature scaling)" if scaled else ""),
            ["set", "acc (%)", "ECE", "ECE 95% CI", "NLL", "Brier"]
            + (["ECE (T)", "ECE (T) 95% CI", "NLL (T)", "Brier (T)"] if scaled else []),
            [
                [
                    s,
                    m[f"calib/{s}/acc"],
                    m[f"calib/{s}/ece"],
                    _ece_ci(m, s),
                    m[f"calib/{s}/nll"],
                    m[f"calib/{s}/brier"],
                ]
                + (
                    [
                        m.get(f"calib/{s}/ts_ece"),
                        _ece_ci(m, s, "ts_"),
                        m.get(f"calib/{s}/ts_nll"),
                        m.get(f"calib/{s}/ts_brier"),
                    ]
                    if scaled
                    else []
                )
                for s in calib_sets
            ],
            ["str", "pct", "f4", "str", "f4", "f4"] + (["f4", "str", "f4", "f4"] if scaled else []),
        )

    by_severity = report.get("calib_severity") or {}
    if by_severity and "calib/clean/ece" in m:
        scaled = "ts_ece" in by_severity
        rows = [
            ["clean", m.get("test/acc", m["calib/clean/acc"]), m["calib/clean/ece"]]
            + ([m.get("calib/clean/ts_ece")] if scaled else [])
        ]
        for sev in by_severity["severities"]:
            rows.append(
                [
                    f"severity {sev}",
                    m.get(f"shift/severity/{sev}/acc"),
                    m[f"calib/severity/{sev}/ece"],
                ]
                + ([m.get(f"calib/severity/{sev}/ts_ece")] if scaled else [])
            )
        tables["calib_severity"] = Table(
            "Calibration as the shift grows (ECE: mean over the corruptions)",
            ["images", "acc (%)", "ECE"] + (["ECE (T)"] if scaled else []),
            rows,
            ["str", "pct", "f4"] + (["f4"] if scaled else []),
        )

    selective = [s for s in calib_sets if f"selective/{s}/aurc" in m]
    if selective:
        tables["selective"] = Table(
            "Selective prediction (by the top softmax probability)",
            ["set", "error (%)", "AURC", "E-AURC", "error at 80% coverage (%)", "at 50% (%)"],
            [
                [
                    s,
                    1 - m[f"calib/{s}/acc"],
                    m[f"selective/{s}/aurc"],
                    m[f"selective/{s}/eaurc"],
                    m[f"selective/{s}/risk_c80"],
                    m[f"selective/{s}/risk_c50"],
                ]
                for s in selective
            ],
            ["str", "pct", "f4", "f4", "pct", "pct"],
        )

    ood_sets = report.get("meta", {}).get("ood_sets", [])
    ood_rows = [
        [
            s,
            score,
            m[f"ood/{s}/{score}/auroc"],
            _ci95(m, f"ood/{s}/{score}/auroc"),
            m[f"ood/{s}/{score}/fpr95"],
            m.get(f"ood/{s}/{score}/aupr_in"),  # reports written before AUPR: "–"
            m.get(f"ood/{s}/{score}/aupr_out"),
        ]
        for s in ood_sets
        for score in OOD_SCORES
        if f"ood/{s}/{score}/auroc" in m
    ]
    if ood_rows:
        tables["ood"] = Table(
            "OOD detection (in-distribution = positives)",
            [
                "set",
                "score",
                "AUROC (%)",
                "AUROC 95% CI",
                "FPR@95 (%)",
                "AUPR-In (%)",
                "AUPR-Out (%)",
            ],
            ood_rows,
            ["str", "str", "pct", "str", "pct", "pct", "pct"],
        )

    if "perf/latency_ms" in m:
        rows = [
            ["classifier", m["perf/latency_ms"], m["perf/throughput_ips"]],
        ]
        if "perf/purified_latency_ms" in m:
            rows.append(
                [
                    f"purifier ({m['perf/purifier_nfe']:.0f} NFE) + classifier",
                    m["perf/purified_latency_ms"],
                    m["perf/purified_throughput_ips"],
                ]
            )
        batch = m.get("perf/batch_size", float("nan"))
        tables["perf"] = Table(
            "Latency and throughput",
            ["pipeline", "latency batch 1 (ms)", f"throughput batch {batch:.0f} (img/s)"],
            rows,
            ["str", "f2", "f1"],
        )
    return tables


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _anchors_md() -> str:
    table = Table(
        "Anchors",
        ["model", "clean (%)", "measure (%)"],
        [[a["model"], a["clean"], a["measure"]] for a in ANCHORS],
        ["str", "str", "str"],
    )
    return _markdown_table(table)


def render_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The human-readable report: the tables of :func:`report_tables` plus context.

    Args:
        report: The report dict (see the module docstring).
        plots: Plot name -> path relative to the Markdown file, embedded where they belong.
    """
    plots = plots or {}
    meta: dict[str, Any] = report.get("meta", {})
    m: dict[str, float] = report.get("metrics", {})
    tables = report_tables(report)
    out: list[str] = [f"# Evaluation report: {meta.get('title', 'classifier')}", ""]
    info = [
        ["classifier run", meta.get("classifier", "")],
        ["purifier", meta.get("purifier") or "none"],
        ["data", _data_text(meta)],
        ["evaluation images", meta.get("num_images", "")],
        ["device", meta.get("device", "")],
        ["seed", meta.get("seed", "")],
        ["wall time (s)", f"{m['perf/eval_wall_s']:.1f}" if "perf/eval_wall_s" in m else ""],
        ["created", meta.get("created", "")],
    ]
    out += [_markdown_table(Table("", ["", ""], info, ["str", "str"])), ""]
    if "summary" in tables:
        out += ["## Summary", "", _markdown_table(tables["summary"]), ""]
    notes = report.get("notes", [])
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]

    def section(
        title: str, keys: Sequence[str], text: str = "", plot: str | Sequence[str] = ""
    ) -> None:
        present = [k for k in keys if k in tables]
        if not present:
            return
        out.extend([f"## {title}", ""])
        if text:
            out.extend([text, ""])
        for k in present:
            t = tables[k]
            if len(present) > 1 or k not in ("clean",):
                out.extend([f"**{t.title}**", ""])
            out.extend([_markdown_table(t), ""])
            if t.note:
                out.extend([t.note, ""])
        for name in [plot] if isinstance(plot, str) else plot:
            if name and name in plots:
                out.extend([f"![{name}]({plots[name]})", ""])

    section(
        "Clean accuracy",
        ["clean"],
        "95% CI: the Wilson score interval of an accuracy over that many images (the noise of "
        "the image sample; conservative for a mean over several purifications).",
    )
    figures = report.get("figures") or {}

    def figure(name: str) -> None:
        if name in figures and name in plots:
            out.extend([figures[name].get("text", ""), "", f"![{name}]({plots[name]})", ""])

    if "examples" in figures and "examples" in plots:
        out.extend(["## Examples", ""])
        figure("examples")
    grid = meta.get("grid") or {}
    section(
        "Common corruptions",
        ["shift_summary", "shift_groups", "shift_severities", "shift_grid"],
        f"CIFAR-10-C corruptions, source: {grid.get('source', 'generated on the fly')}. "
        "The mean is over the whole corruption x severity grid (RobustBench convention). "
        "95% CI over the images: Wilson for the clean accuracy; for a mean over cells, which "
        "share their images, mean +- 1.96 standard errors of each image's accuracy averaged "
        "over those cells.",
        "shift_severity",
    )
    if "shift_summary" in tables:
        figure("corruption_examples")
    section("Corruption error", ["shift_ce"], _ce_text(report), "corruption_error")
    sources = meta.get("natural") or {}
    section(
        "Natural distribution shift",
        ["natural"],
        "Accuracy on labeled test sets of the same classes collected apart from the training "
        "data (natural.sets), with its 95% Wilson interval and the drop from the clean "
        "accuracy: " + "; ".join(f"{k}: {v}" for k, v in sources.items()) + ".",
    )
    shift_set = meta.get("calib_shift_set", "the highest-severity corruptions")
    section(
        "Per class",
        ["per_class"],
        (
            f"Accuracy of each class on the clean images and on the shift set ({shift_set}), "
            "the classes the shift hurts most first"
            if (report.get("per_class") or {}).get("shift") is not None
            else "Accuracy of each class on the clean images"
        )
        + ("; the purifier's draws are pooled." if meta.get("stochastic") else ".")
        + " The confusion matrices show where each true class's images go (% of its row).",
        "confusion",
    )
    knn = meta.get("repr_knn") or {}
    section(
        "Representation",
        ["repr"],
        f"A weighted kNN classifier (k = {knn.get('k')}, votes exp(cosine / {knn.get('t')}); "
        "Wu et al. 2018, as the pretraining monitor) on the encoder's features against the "
        f"{knn.get('bank')} labeled images of the OOD feature bank, beside the classifier's "
        "own head on the same images: a shift that costs the head more than the kNN is one "
        "the representation weathers better than the head fitted on it.",
    )
    attack = meta.get("attack") or {}
    protocol = ""
    if attack:
        protocol = (
            f"PGD-{attack.get('steps')} ({attack.get('loss')} loss, step "
            f"{attack.get('step_size_rule', '2.5 eps / steps')}, random start: "
            f"{_yes_no(attack.get('random_start'))}) on the whole pipeline x in [0, 1] -> "
            f"{'purifier -> ' if meta.get('purifier') else ''}classifier; "
            + (
                f"EOT {attack.get('eot')} gradient draws per step, each adversarial image "
                f"re-scored over {attack.get('rescore_draws')} independent calls (mean and "
                "worst case). "
                if meta.get("stochastic", True)
                else "the pipeline is deterministic, so one gradient per step and one scoring "
                "call per image (more EOT draws or scoring calls would repeat the same "
                "computation). "
            )
            + f"Gradients: {attack.get('gradients', 'exact')}."
        )
        if attack.get("shards", 1) > 1:
            protocol += (
                f" PGD ran in {attack['shards']} blocks of the attacked images (adv.shards), each "
                "from random streams of its own; its wall time is their sum."
            )
    section("Adversarial robustness", ["adv", "sanity"], protocol, "robust_eps")
    section(
        "Certified robustness (randomized smoothing)", ["cert"], _cert_text(report), "certified"
    )
    section(
        "Calibration",
        ["calib", "calib_severity", "selective"],
        f"ECE with {meta.get('calib_bins', 15)} equal-width confidence bins; NLL; multi-class "
        "Brier score. The shift set "
        f"pools {meta.get('calib_shift_set', 'the highest-severity corruptions')}."
        + _temperature_text(report)
        + _severity_text(report)
        + _selective_text(report)
        + (
            " Reliability diagrams: a bar is the accuracy of a confidence bin, its hatched "
            "outline the gap to the bin's mean confidence: above the bar, over-confident; "
            "inside it, under-confident."
            if "reliability" in plots
            else ""
        ),
        ["reliability", "calib_severity", "risk_coverage"],
    )
    section("Out-of-distribution detection", ["ood"], _ood_text(report), "ood_hist")
    section("Latency and throughput", ["perf"])
    if _is_cifar10(meta, report):  # published CIFAR-10 numbers: no yardstick for other data
        out += ["## Anchors for context (CIFAR-10; RobustBench entries)", "", _anchors_md(), ""]
    return "\n".join(out)


def _yes_no(value: Any) -> str:
    """A flag as the report writes it: yes / no (unknown: "–")."""
    return "–" if value is None else ("yes" if value else "no")


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")  # fmt: skip


def _is_cifar10(meta: dict[str, Any], report: dict[str, Any]) -> bool:
    """CIFAR-10 by name, or an image folder of its ten classes (the *_cifar10_folder presets'
    JPEG tree)."""
    classes = tuple((report.get("per_class") or {}).get("classes") or ())
    return _dataset(meta) == "cifar10" or classes == CIFAR10_CLASSES


def _dataset(meta: dict[str, Any]) -> str | None:
    """The evaluation data's name (``data_config``, else the first word of ``data``)."""
    name = (meta.get("data_config") or {}).get("name")
    if name:
        return str(name)
    words = str(meta.get("data", "")).split()
    return words[0] if words else None


def _data_text(meta: dict[str, Any]) -> str:
    """The evaluation images, in words: the dataset, which split and where it was read from."""
    data = meta.get("data_config") or {}
    name = data.get("name")
    if not name:
        return str(meta.get("data", ""))
    size = data.get("image_size")
    px = f", {size} x {size} px" if size else ""
    root = data.get("root", "")
    if name == "digits":
        frac = data.get("val_fraction")
        held = f"{100 * float(frac):g}% " if frac is not None else ""
        where = (
            "scikit-learn's 8 x 8 handwritten digits, upsampled; the validation split is the "
            f"{held}held out from training (class-balanced, seed {data.get('seed', 0)})"
        )
    elif name in ("cifar10", "cifar100", "stl10"):
        where = f"the official test split, read from the folder {root}"
    else:
        where = (
            f"the test (or val) folder of the image tree {root}, or, without one, the "
            f"{100 * float(data.get('val_fraction', 0.2)):g}% held out from it"
        )
    return f"{name}{px}: {where}"


def _temperature_text(report: dict[str, Any]) -> str:
    """How the temperature-scaled calibration was measured; "" when it was not."""
    t = report.get("metrics", {}).get("calib/temperature")
    if t is None:
        return ""
    fit = report.get("meta", {}).get("calib_temperature") or {}
    folds = fit.get("folds", 2)
    fits = ", ".join(f"{v:.3f}" for v in fit.get("fold_fits", []))
    return (
        f" Temperature scaling (Guo et al. 2017) divides the logits by one temperature fit by "
        f"NLL on the clean images: T = {t:.3f} on all of them. The clean images, and the shift "
        f"set's when they are the same images, are scored by cross-fitting: each with the T fit "
        f"on the other folds of a seeded {folds}-fold split ({fits}), so that no label "
        "calibrates its own prediction; the other sets with T. A temperature fit on clean data "
        "need not hold under shift (Ovadia et al. 2019): compare the ECE (T) of the shifted sets "
        "with the clean one's. The reliability diagrams draw the scaled bins as a line."
    )


def _severity_text(report: dict[str, Any]) -> str:
    """What the calibration-by-severity table averages; "" without one."""
    if not report.get("calib_severity"):
        return ""
    return (
        " The table by severity averages each corruption's own ECE over the corruptions (the "
        "shift row above pools the predictions of all of them instead, so the two differ "
        "a little); its ECE (T) scales each image as above."
    )


def _selective_text(report: dict[str, Any]) -> str:
    """What the selective-prediction table shows; "" without one."""
    if not report.get("risk_coverage"):
        return ""
    return (
        " Selective prediction: answering only the most confident predictions, the error rate "
        "among those kept (the risk) against the fraction kept (the coverage; Geifman & "
        "El-Yaniv 2017). AURC is the area under that curve; E-AURC its excess over the best "
        "ranking of the same predictions, which puts every error last (0 = confidence ranks "
        "every error below every right answer), so it compares sets of different accuracy."
    )


def _ce_text(report: dict[str, Any]) -> str:
    """What the corruption errors were measured against."""
    ref = report.get("meta", {}).get("ce_reference") or {}
    if not ref:
        return ""
    clean, mean = ref.get("clean"), ref.get("mean_acc")
    accs = ", ".join(
        f"{name} {100 * v:.2f}%" for name, v in (("clean", clean), ("corruptions", mean)) if v
    )
    return (
        f"Against the reference evaluation `{ref.get('run')}` ({ref.get('title')}"
        f"{'; ' + accs if accs else ''}), Hendrycks & Dietterich (2019) with it in place of "
        "AlexNet: CE = this pipeline's error summed over the severities / the reference's; "
        "relative CE = the error the corruption adds to the clean error, summed over the "
        "severities / the reference's. mCE and relative mCE are their means over the "
        "corruptions."
    )


def _cert_text(report: dict[str, Any]) -> str:
    """How the certificates were made, and what they cost."""
    m = report.get("metrics", {})
    c = report.get("meta", {}).get("cert") or {}
    if "cert/sigma" not in m:
        return ""
    return (
        f"CERTIFY (Cohen et al. 2019) on the smoothed pipeline: Gaussian noise of std "
        f"{m['cert/sigma']:.4g} on [0, 1] images ({c.get('noise', 'cert.sigma')}), the class "
        f"guessed from {m['cert/n0']:.0f} draws and its probability bounded from "
        f"{m['cert/samples']:.0f} more (Clopper-Pearson, each certificate wrong with "
        f"probability at most {m['cert/alpha']:g}). Smoothed accuracy "
        f"{100 * m['cert/acc']:.2f}%, abstaining on {100 * m['cert/abstain']:.1f}% of the images; "
        f"average certified radius {m['cert/acr']:.3f}; {m['cert/nfe_per_image']:.0f} NFE and "
        f"{m['cert/wall_s']:.1f} s for {m['cert/n']:.0f} images. A certificate holds for the "
        "smoothed classifier, whatever the attack."
    )


def _ood_text(report: dict[str, Any]) -> str:
    """What the OOD scores are, and which sets the classifier is more confident on than on its
    own test images (AUROC below chance: the score flags in-distribution images first)."""
    m = report.get("metrics", {})
    text = (
        "Scores: msp, the largest softmax probability (Hendrycks & Gimpel 2017); energy, the "
        "logsumexp of the logits (Liu et al. 2020)"
    )
    meta = report.get("meta", {})
    described = {
        "knn": "knn, minus the distance to the k-th nearest normalised bank feature, "
        f"k = {meta.get('ood_knn_k')} (Sun et al. 2022)",
        "mahalanobis": "mahalanobis, minus the squared Mahalanobis distance to the nearest "
        "class mean under one shared covariance (Lee et al. 2018)",
    }
    feature_scores = [described[f] for f in meta.get("ood_feature_scores", []) if f in described]
    if feature_scores:
        text += (
            f"; on the encoder's features, against a bank of {meta.get('ood_bank')} passed "
            "through the same pipeline: " + "; ".join(feature_scores)
        )
    text += ". Each should be higher on the in-distribution test images; an AUROC of 50% is chance."
    if meta.get("stochastic") and feature_scores:
        text += " The feature scores use each image's first purification."
    outside = report.get("meta", {}).get("ood_datasets") or {}
    if outside:
        text += " Outside datasets: " + "; ".join(f"{k}, {v}" for k, v in outside.items()) + "."
    below = [
        f"{s} ({score})"
        for s in report.get("meta", {}).get("ood_sets", [])
        for score in OOD_SCORES
        if m.get(f"ood/{s}/{score}/auroc", 1.0) < 0.5
    ]
    if below:
        text += (
            f" Below chance: {', '.join(below)}. Those images score as more in-distribution than "
            "the test images themselves (for msp and energy: the classifier is more confident on "
            "them), so that score would flag the test images first."
        )
    return text


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


_DPI = 110


def _plot_shift(report: dict[str, Any], path: Path) -> Path | None:
    m = report.get("metrics", {})
    corruptions, severities = _grid(report)
    if "shift/mean_acc" not in m or not severities:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = ([0] if "test/acc" in m else []) + severities
    groups: dict[str, list[str]] = {}
    for c in corruptions:
        groups.setdefault(group_of(c), []).append(c)
    for group, names in groups.items():
        ys = [sum(m[f"shift/{c}/{s}/acc"] for c in names) / len(names) for s in severities]
        ys = ([m["test/acc"]] if "test/acc" in m else []) + ys
        ax.plot(xs, [100 * y for y in ys], marker="o", label=group)
    keys = (["test/acc"] if "test/acc" in m else []) + [
        f"shift/severity/{s}/acc" for s in severities
    ]
    ax.plot(xs, [100 * m[k] for k in keys], "k--", marker="s", label="mean")
    # The mean's 95 % interval over the images, where the evaluation recorded it.
    bounds = [accuracy_interval(m, k) for k in keys]
    if all(b is not None for b in bounds):
        ax.fill_between(
            xs, [100 * b[0] for b in bounds], [100 * b[1] for b in bounds],  # type: ignore[index]
            color="k", alpha=0.12, label="mean, 95% CI over the images",
        )  # fmt: skip
    ax.set_xticks(xs)
    ax.set_xticklabels(["clean" if x == 0 else str(x) for x in xs])
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs corruption severity")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=_DPI)


def _plot_corruption_error(report: dict[str, Any], path: Path) -> Path | None:
    """Each corruption's error (and relative error) against the reference, 100 % its own."""
    m = report.get("metrics", {})
    corruptions, _ = _grid(report)
    kinds = [
        (k, label)
        for k, label in (("ce", "CE"), ("relative_ce", "relative CE"))
        if any(f"shift/{c}/{k}" in m for c in corruptions)
    ]
    if not kinds:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.3 * len(corruptions) + 1.8))
    height = 0.8 / len(kinds)
    for i, (k, label) in enumerate(kinds):
        values = [100 * m.get(f"shift/{c}/{k}", math.nan) for c in corruptions]
        ys = [j + (i - (len(kinds) - 1) / 2) * height for j in range(len(corruptions))]
        mean = m.get("shift/mce" if k == "ce" else "shift/relative_mce")
        ax.barh(
            ys, values, height=height, label=label + (f" (mean {100 * mean:.1f})" if mean else "")
        )
    ax.axvline(100, color="k", linestyle="--", linewidth=1, label="the reference")
    ax.set_yticks(range(len(corruptions)))
    ax.set_yticklabels(corruptions)
    ax.invert_yaxis()
    ax.set_xlabel("error relative to the reference (%)")
    ax.set_title("Corruption error (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, path, dpi=_DPI)


def _panels(n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels of ``width`` x ``height`` inches, in rows of at most four, and
    its first ``n`` axes (the rest hidden)."""
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _plot_reliability(report: dict[str, Any], path: Path) -> Path | None:
    """Reliability diagrams: each bin's accuracy as a bar, its gap to the bin's mean confidence
    as a hatched outline (above the bar: over-confident; inside it: under-confident), the
    temperature-scaled bins as a line; the legend under the panels, clear of every bar."""
    bins_by_set: dict[str, dict[str, list[Any]]] = report.get("reliability", {})
    if not bins_by_set:
        return None
    fig, axes = _panels(len(bins_by_set), 4.0, 4.0)
    m = report.get("metrics", {})
    for ax, (name, bins) in zip(axes, bins_by_set.items()):
        # Empty bins (count 0) have no accuracy or confidence: draw nothing there.
        full = [i for i, c in enumerate(bins["count"]) if c]
        lower = [bins["lower"][i] for i in full]
        widths = [bins["upper"][i] - bins["lower"][i] for i in full]
        acc = [bins["accuracy"][i] for i in full]
        conf = [bins["confidence"][i] for i in full]
        ax.bar(lower, acc, width=widths, align="edge", color="C0", edgecolor="k", alpha=0.7,
               label="accuracy of the bin")  # fmt: skip
        # Outlines, not a translucent fill: no blend colour where a gap overlaps its bar.
        ax.bar(
            lower,
            [c - a for c, a in zip(conf, acc)],
            bottom=acc,
            width=widths,
            align="edge",
            fill=False,
            edgecolor="C3",
            hatch="///",
            linewidth=1,
            label="gap to its mean confidence (hatched)",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        scaled = (report.get("reliability_scaled") or {}).get(name)
        if scaled is not None:
            used = [i for i, c in enumerate(scaled["count"]) if c]
            ts_ece = m.get(f"calib/{name}/ts_ece")
            ax.plot(
                [scaled["confidence"][i] for i in used],
                [scaled["accuracy"][i] for i in used],
                "o-",
                color="C2",
                markersize=3,
                label="temperature-scaled" + (f", ECE {ts_ece:.4f}" if ts_ece is not None else ""),
            )
        ece = m.get(f"calib/{name}/ece")
        ax.set_title(f"{name}" + (f" (ECE {ece:.4f})" if ece is not None else ""))
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    return save_figure(fig, path, dpi=_DPI)


def _plot_calib_severity(report: dict[str, Any], path: Path) -> Path | None:
    """ECE against severity, a box over the corruptions at each, before and after temperature
    scaling; the clean ECE at severity 0 (Ovadia et al. 2019, Fig. 2)."""
    data = report.get("calib_severity") or {}
    m = report.get("metrics", {})
    if not data or "calib/clean/ece" not in m:
        return None
    severities = list(data["severities"])
    kinds = [("ece", "before", "C0")]
    if "ts_ece" in data:
        kinds.append(("ts_ece", "after temperature scaling", "C2"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    width = 0.35 if len(kinds) > 1 else 0.5
    for j, (key, label, color) in enumerate(kinds):
        offset = (j - (len(kinds) - 1) / 2) * width
        # A cell's ECE may be missing (NaN written as null): the box is over the others.
        per_severity = [
            [v for v in (cells[i] for cells in data[key].values()) if v is not None]
            for i in range(len(severities))
        ]
        clean = m.get(f"calib/clean/{key}")
        if clean is not None:
            ax.plot([offset], [clean], "D", color=color, markersize=6)
        for s, values in zip(severities, per_severity):  # every corruption's own ECE
            ax.plot([s + offset] * len(values), values, ".", color=color, markersize=4)
        ax.boxplot(
            per_severity,
            positions=[s + offset for s in severities],
            widths=width * 0.9,
            patch_artist=True,
            boxprops={"facecolor": color, "alpha": 0.5},
            medianprops={"color": "k"},
            manage_ticks=False,
        )
        ax.plot([], [], "s", color=color, alpha=0.5, label=label)
    ax.set_xticks([0, *severities])
    ax.set_xticklabels(["clean", *[str(s) for s in severities]])
    ax.set_xlabel("corruption severity (box: the corruptions of the grid)")
    ax.set_ylabel("ECE")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=_DPI)


def _plot_risk_coverage(report: dict[str, Any], path: Path) -> Path | None:
    """Risk against coverage per calibration set, with the best ranking's curve dotted."""
    curves: dict[str, dict[str, list[float]]] = report.get("risk_coverage") or {}
    if not curves:
        return None
    m = report.get("metrics", {})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        aurc = m.get(f"selective/{name}/aurc")
        label = name + (f" (AURC {aurc:.4f})" if aurc is not None else "")
        ax.plot(c["coverage"], [100 * r for r in c["risk"]], color=color, label=label)
        ax.plot(c["coverage"], [100 * r for r in c["best"]], ":", color=color, linewidth=1)
    ax.plot([], [], "k:", linewidth=1, label="best ranking (errors last)")
    ax.set_xlabel("coverage (fraction of predictions kept, most confident first)")
    ax.set_ylabel("error among those kept (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=_DPI)


def _plot_robust(report: dict[str, Any], path: Path) -> Path | None:
    """Robust accuracy against eps, one panel per norm: the sanity sweep, the unbounded-eps
    check and every threat, each a marker where it was measured. Only the sweep's points are
    joined (dashed); the threats, often far apart (8/255 and 128/255), are not, and a wide
    span of radii gets a symmetric-log axis ticked at the radii measured."""
    m = report.get("metrics", {})
    threats = [t for t in _threats(report) if f"adv/{t['name']}/acc" in m]
    sanity = report.get("sanity", {})
    norms = sorted({t["norm"] for t in threats} | set(sanity))
    if not norms:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(norms), figsize=(4.8 * len(norms), 4.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        scale = 255.0 if norm == "linf" else 1.0  # plot Linf radii in units of 1/255
        xs_seen: list[float] = []
        checks = sanity.get(norm, {})
        curve = checks.get("eps_monotone", {}).get("values")
        if curve:
            xs = [scale * e for e in curve["eps"]]
            xs_seen += xs
            ax.plot(xs, [100 * a for a in curve["acc"]], "o--", color="gray", linewidth=1,
                    label="sanity sweep (PGD)")  # fmt: skip
        large = checks.get("large_eps", {}).get("values")
        if large and isinstance(large.get("eps"), (int, float)) and large.get("acc") is not None:
            xs_seen.append(scale * large["eps"])
            ax.plot(
                [scale * large["eps"]],
                [100 * large["acc"]],
                "D",
                color="gray",
                markerfacecolor="none",
                label="sanity: whole image box (should be ~0)",
            )
        mine = sorted((t for t in threats if t["norm"] == norm), key=lambda t: t["eps"])
        if mine:
            xs = [scale * t["eps"] for t in mine]
            xs_seen += xs
            keys = [f"adv/{t['name']}/acc" for t in mine]
            ax.errorbar(
                xs,
                [100 * m[k] for k in keys],
                yerr=100 * interval_bars(m, keys),
                fmt="s",
                color="C0",
                markersize=7,
                capsize=3,
                label="threat: PGD mean (95% CI)",
            )
            # Over the mean's square (the two often coincide), small enough to leave it seen.
            ax.plot(xs, [100 * m[f"adv/{t['name']}/acc_worst"] for t in mine], "v",
                    color="C1", markersize=5, zorder=3, label="threat: PGD worst")  # fmt: skip
            if any(f"adv/{t['name']}/autoattack_acc" in m for t in mine):
                aa = [
                    (scale * t["eps"], 100 * m[f"adv/{t['name']}/autoattack_acc"])
                    for t in mine
                    if f"adv/{t['name']}/autoattack_acc" in m
                ]
                ax.plot(*zip(*aa), "x", color="C3", markersize=9, label="threat: AutoAttack")
        positive = sorted({round(x, 6) for x in xs_seen if x > 0})
        if len(positive) > 1 and positive[-1] / positive[0] > 8:
            # Radii spanning decades: log-like spacing (linear below the smallest, so 0 shows).
            ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
            ax.set_xticks([0.0, *positive] if min(xs_seen) <= 0 else positive)
            ax.set_xticklabels([f"{x:.4g}" for x in ax.get_xticks()], fontsize=8)
            ax.minorticks_off()
            ax.set_xlim(-0.3 * positive[0] if min(xs_seen) <= 0 else None, positive[-1] * 1.5)
        elif positive:  # from 0, so that a lone radius is not centred on a zoomed-in axis
            ax.set_xlim(-0.05 * positive[-1], 1.1 * positive[-1])
        unit = "eps (x 1/255)" if norm == "linf" else "eps (L2, on [0, 1] images)"
        ax.set_xlabel(unit + (", symmetric-log axis" if ax.get_xscale() == "symlog" else ""))
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Robust accuracy, {norm}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8,
                  frameon=False)  # fmt: skip
    return save_figure(fig, path, dpi=_DPI)


_SCORE_AXIS = {
    "msp": "max softmax probability",
    "energy": "energy (logsumexp of the logits)",
    "knn": "minus the distance to the k-th nearest bank feature",
    "mahalanobis": "minus the squared Mahalanobis distance",
}


def _plot_ood(report: dict[str, Any], path: Path) -> Path | None:
    """Score histograms, in-distribution against each OOD set (columns): MSP, and under it the
    kNN feature score when it was computed."""
    hists: dict[str, dict[str, dict[str, list[float]]]] = report.get("ood_hist", {})
    if not hists:
        return None
    sets = list(hists)
    scores = ["msp"] + (["knn"] if any("knn" in h for h in hists.values()) else [])
    plt = pyplot()
    width = min(4.0, 24.0 / len(sets))  # many sets: narrower panels, not a wider figure
    fig, grid = plt.subplots(
        len(scores), len(sets), figsize=(width * len(sets), 3.5 * len(scores)), squeeze=False
    )
    m = report.get("metrics", {})
    for row, score in zip(grid, scores):
        for ax, name in zip(row, sets):
            h = hists[name].get(score)
            if h is None:
                ax.set_visible(False)
                continue
            edges = h["edges"]
            widths = [b - a for a, b in itertools.pairwise(edges)]
            ax.bar(edges[:-1], h["in"], width=widths, align="edge", alpha=0.6, label="in-dist.")
            # An outline over the filled in-distribution bars: no blend colour where they meet.
            ax.stairs(h["out"], edges, color="C1", linewidth=1.5, label=name)
            auroc = m.get(f"ood/{name}/{score}/auroc")
            title = f"{score}: {name}" + (
                f" (AUROC {100 * auroc:.2f}%)" if auroc is not None else ""
            )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(_SCORE_AXIS.get(score, score), fontsize=8)
            ax.set_ylabel("fraction")
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=_DPI)


def _plot_confusion(report: dict[str, Any], path: Path) -> Path | None:
    """Row-normalised confusion matrices (each true class's predictions), clean and shifted."""
    sets: dict[str, list[list[int]]] = report.get("confusion") or {}
    if not sets:
        return None
    k = len(next(iter(sets.values())))
    names = (report.get("per_class") or {}).get("classes") or [str(c) for c in range(k)]
    shift_set = report.get("meta", {}).get("calib_shift_set", "corrupted")
    side = 4.2 if k <= 20 else 6.0
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sets), figsize=(side * len(sets), side), squeeze=False)
    for ax, (name, counts) in zip(axes[0], sets.items()):
        c = np.asarray(counts, dtype=float)
        totals = c.sum(1, keepdims=True)
        pct = 100 * np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)
        im = ax.imshow(pct, vmin=0, vmax=100, cmap="Blues")
        if k <= 20:
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            ax.set_xticklabels(names, rotation=90, fontsize=7)
            ax.set_yticklabels(names, fontsize=7)
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    if c[i, j]:
                        white = pct[i, j] > 50
                        ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center",
                                fontsize=6, color="white" if white else "black")  # fmt: skip
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title("clean" if name == "clean" else f"{name}: {shift_set}", fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("% of the true class's images", fontsize=8)
    return save_figure(fig, path, dpi=_DPI)


def _plot_certified(report: dict[str, Any], path: Path) -> Path | None:
    """Certified accuracy against the L2 radius, from every image's certified radius."""
    cert = report.get("cert") or {}
    if not cert.get("radius"):
        return None
    m = report.get("metrics", {})
    radius = np.asarray(cert["radius"], dtype=float)
    right = np.asarray(cert["correct"], dtype=bool)
    reported = certified_radii(m)
    top = max(float(radius.max()), *(r for r, _ in reported))
    xs = np.linspace(0, max(top, 1e-3) * 1.05, 200)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(xs, [100 * float((right & (radius >= r)).mean()) for r in xs], "-", label="certified")
    if reported:
        keys = [k for _, k in reported]
        ax.errorbar(
            [r for r, _ in reported], [100 * m[k] for k in keys],
            yerr=100 * interval_bars(m, keys), fmt="o", capsize=3, label="reported radii (95% CI)",
        )  # fmt: skip
    ax.set_xlabel("L2 radius (on [0, 1] images)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    sigma = m.get("cert/sigma")
    ax.set_title("Certified accuracy" + (f", sigma {sigma:.3g}" if sigma is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=_DPI)


_PLOTTERS = {
    "shift_severity": _plot_shift,
    "corruption_error": _plot_corruption_error,
    "confusion": _plot_confusion,
    "reliability": _plot_reliability,
    "calib_severity": _plot_calib_severity,
    "risk_coverage": _plot_risk_coverage,
    "robust_eps": _plot_robust,
    "certified": _plot_certified,
    "ood_hist": _plot_ood,
}


def make_plots(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write the PNG plots whose data the report holds; returns name -> path."""
    folder = Path(folder)
    written: dict[str, Path] = {}
    for name, plot in _PLOTTERS.items():
        try:
            path = plot(report, folder / f"{name}.png")
        except Exception as err:  # a figure must not cost the report its numbers
            warnings.warn(f"plot {name} not drawn: {err!r}", stacklevel=2)
            continue
        if path is not None:
            written[name] = path
    return written


# ---------------------------------------------------------------------------------------------
# Files and wandb
# ---------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``plots/*.png`` and ``report.md`` into ``folder``.

    Returns:
        Name -> path of everything written (``json``, ``markdown`` and one entry per plot).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = _json_safe(report)
    paths: dict[str, Path] = {"json": folder / "report.json"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2, sort_keys=False) + "\n")
    plots = make_plots(report, folder / "plots")
    # Figures drawn by the job itself (their images are not in the report): kept while present.
    for name, figure in (report.get("figures") or {}).items():
        if (folder / figure["path"]).is_file():
            plots[name] = folder / figure["path"]
    rel = {k: str(p.relative_to(folder)) for k, p in plots.items()}
    paths["markdown"] = folder / "report.md"
    write_text_atomic(paths["markdown"], render_markdown(report, rel))
    return {**paths, **plots}


def log_to_wandb(run: Any, report: dict[str, Any], plots: dict[str, Path]) -> None:
    """Log the report's numbers, tables and plots to a wandb run.

    Args:
        run: A ``wandb.init`` run (anything with ``log`` and ``summary.update``).
        report: The report dict.
        plots: Plot name -> PNG path (from :func:`make_plots`).
    """
    import wandb

    metrics = report.get("metrics", {})
    payload: dict[str, Any] = dict(metrics)
    for key, table in report_tables(report).items():
        rows = [
            [v if v is None or isinstance(v, (int, float, str)) else str(v) for v in row]
            for row in table.rows
        ]
        payload[f"tables/{key}"] = wandb.Table(columns=list[Any](table.columns), data=rows)
    for name, path in plots.items():
        payload[f"plots/{name}"] = wandb.Image(str(path))
    run.log(payload)
    run.summary.update(metrics)
