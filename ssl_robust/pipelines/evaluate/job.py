"""The evaluation job: every section in order, then the report."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from ssl_robust.config import ConfigError, save_config, to_dict
from ssl_robust.evaluate.cifar_c import write_cifar_c
from ssl_robust.evaluate.latency import measure_latency
from ssl_robust.evaluate.metrics import confusion_matrix, per_class_accuracy
from ssl_robust.evaluate.report import log_to_wandb, write_report
from ssl_robust.evaluate.store import UnitStore
from ssl_robust.finetune.export import load_classifier
from ssl_robust.launch.distributed import requeue_on_signal, stop_on_sigterm
from ssl_robust.launch.trainer import resume_requested, wandb_run_id, write_json
from ssl_robust.pipelines.common import console, print_summary
from ssl_robust.pipelines.evaluate.adversarial import adv_section, cert_section, shard_worker
from ssl_robust.pipelines.evaluate.calibration import (
    TemperatureFit,
    calibration_metrics,
    cell_ece,
    group_by_image,
    selective_metrics,
    severity_calibration,
    temperature_scaling,
)
from ssl_robust.pipelines.evaluate.examples import examples_section
from ssl_robust.pipelines.evaluate.ood import (
    OODFeatures,
    bank_features,
    ood_section,
    representation_section,
)
from ssl_robust.pipelines.evaluate.setup import (
    SEED_CLEAN,
    SEED_OOD,
    SEED_PERF,
    Pipeline,
    bank_images,
    build_purifier,
    check_config,
    check_shards,
    eval_data,
    images_digest,
    natural_sets,
    outside_sets,
    resolve_device,
    resolve_run_dir,
    threat_specs,
)
from ssl_robust.pipelines.evaluate.shift import (
    ce_section,
    load_ce_reference,
    natural_section,
    set_logits,
    shift_section,
)
from ssl_robust.pipelines.evaluate.units import (
    nchw,
    predict,
    predict_draws,
    progress_bars,
    run_fingerprint,
    stochastic_note,
    to_float,
    unit_kind,
    unit_specs,
)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a fine-tuned classifier, optionally behind a diffusion purifier.

    Writes into the run directory (``run.dir``, default ``runs/evaluate-<classifier run>``
    with ``-purified`` appended when a purifier is used): ``config.yaml``, ``report.json``
    (every number under hierarchical names, plus the sanity checks, reliability bins, OOD
    histograms and notes), ``report.md``, ``plots/*.png`` and ``metrics.json`` (the report's
    numbers, like every other job). Logs the same to wandb unless ``wandb.mode=disabled``.

    Resuming: each finished unit of expensive work (the clean logits, each corruption x
    severity cell, each threat's PGD and AutoAttack result, the sanity checks of each norm) is
    stored at once, atomically, in ``partial/`` of the run directory, keyed by a fingerprint
    of everything it depends on (pipeline weights, purifier settings, evaluation images, seed,
    device type, batch size, and the unit's own shift or attack settings). Rerunning the same
    config in the same directory (after a crash or a preemption) reads those units back and
    computes only the rest, with the same numbers as an uninterrupted run: every unit draws
    from its own seeded random streams. Units stored under another fingerprint are recomputed
    and replaced, and say so. ``partial/`` is kept after the report is written, so a rerun
    that adds a threat or a corruption computes only the new units; ``run.resume=false``
    deletes it first and recomputes everything. Calibration, OOD and latency are recomputed
    on every run (they reuse the stored logits).

    Under SLURM, ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@90 --requeue``) requeues the job and
    stops it; the requeued job resumes from the stored units. SIGTERM stops it
    (:func:`~ssl_robust.launch.distributed.stop_on_sigterm`); a rerun resumes the same way.

    Returns:
        The metrics (names documented in :data:`ssl_robust.evaluate.report.METRIC_DOCS`).
    """
    with requeue_on_signal(), stop_on_sigterm():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, float]:
    start_wall = time.perf_counter()
    # Everything that can fail on bad input comes before any file is written.
    check_config(cfg)
    device = resolve_device(cfg.eval.device)
    classifier, clf_meta = load_classifier(cfg.classifier.run)
    images, labels, data, splits = eval_data(cfg, clf_meta)
    if len(labels) == 0:
        raise ConfigError("the evaluation split is empty")
    check_shards(cfg, len(labels))  # once the attacked images are known
    purifier, denoiser_desc = build_purifier(cfg, int(data["image_size"]))
    num_classes = classifier.num_classes
    held_out = list(cfg.ood.held_out_classes) if cfg.ood.enabled else []
    for c in held_out:
        if not 0 <= c < num_classes:
            raise ConfigError(
                f"ood.held_out_classes holds {c}; the classifier has classes 0..{num_classes - 1}"
            )
    if labels.size and labels.max() >= num_classes:
        raise ConfigError(
            f"the evaluation data has labels up to {labels.max()} but the classifier has "
            f"{num_classes} classes; check eval.data"
        )
    threats = threat_specs(cfg) if cfg.adv.enabled else []
    corruptions = list(cfg.shift.corruptions) if cfg.shift.enabled else []
    severities = sorted({int(s) for s in cfg.shift.severities}) if cfg.shift.enabled else []
    worker = bool(cfg.adv.enabled) and int(cfg.adv.shard) >= 1  # one block of the attacks only
    # The report's own inputs (a worker writes no report: the merging run loads them).
    outside: dict[str, tuple[np.ndarray, str]] = {}
    natural: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    bank_set: tuple[np.ndarray, np.ndarray, str] | None = None
    ce_reference = None
    if not worker:
        outside = outside_sets(cfg, data, len(labels))
        if cfg.ood.enabled and cfg.ood.feature_scores:
            bank_set = bank_images(cfg, splits.train, held_out)
        class_names = [str(c) for c in clf_meta.get("classes") or range(num_classes)]
        natural = natural_sets(cfg, class_names, int(data["image_size"]))
        if corruptions and cfg.shift.ce_reference:
            ce_reference = load_ce_reference(cfg.shift.ce_reference, corruptions, severities, data)

    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    model = Pipeline(classifier.eval().requires_grad_(False), purifier).eval()
    seed = int(cfg.run.seed)
    bs = int(cfg.eval.batch_size)
    x_u8 = nchw(images)  # (N, 3, H, W) uint8 on the CPU
    y = torch.from_numpy(labels)
    n = len(y)
    metrics: dict[str, float] = {}
    notes: list[str] = []
    stochastic = model.stochastic

    # -- finished units of an earlier, interrupted run -----------------------------------------
    if corruptions and cfg.shift.cifar_c_dir and cfg.shift.write_cifar_c and not worker:
        # Before the units are keyed: the cells read from the folder are keyed by its files.
        write_cifar_c(
            Path(cfg.shift.cifar_c_dir),
            images,
            labels,
            corruptions,
            seed=seed,
            batch_size=int(cfg.shift.batch_size),
            device=device,
            frost_textures=str(cfg.shift.frost),
        )
    fingerprint = run_fingerprint(cfg, model, clf_meta, denoiser_desc, images, labels, device)
    need_clean = bool(cfg.clean.enabled or cfg.calib.enabled or cfg.ood.enabled)
    clean_draws = int(cfg.clean.draws) if stochastic and cfg.clean.enabled else 1
    shift_draws = int(cfg.shift.draws) if stochastic and corruptions else 1
    specs = unit_specs(
        cfg,
        clean=need_clean,
        bare=bool(cfg.clean.enabled) and purifier is not None,
        clean_draws=clean_draws,
        shift_draws=shift_draws,
        corruptions=corruptions,
        severities=severities,
        threats=threats,
        stochastic=stochastic,
        outside={k: images_digest(v[0]) for k, v in outside.items()} if need_clean else {},
        natural={k: images_digest(v[0], v[1]) for k, v in natural.items()},
        bank=images_digest(bank_set[0], bank_set[1]) if bank_set is not None else None,
    )
    if worker:  # its PGD blocks only: reading the other units' tensors would be wasted
        specs = {k: v for k, v in specs.items() if k.startswith("adv/") and "/pgd" in k}
    discard = None  # run.resume=false: the whole partial/ folder
    if int(cfg.adv.shards) > 1 and cfg.adv.enabled:
        # The PGD shards are the array tasks' own: each discards its own block only, and the
        # merging run keeps them all (it is started after them, to merge them).
        own = f"/shard-{int(cfg.adv.shard)}-of-"
        discard = [k for k in specs if (own in k if worker else "/shard-" not in k)]
    cache = UnitStore(
        run_dir / "partial",
        fingerprint,
        specs,
        resume=resume_requested(bool(cfg.run.resume)),
        describe=unit_kind,
        discard=discard,
    )
    for line in cache.messages():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    model = model.to(device)
    if worker:
        return shard_worker(cfg, model, x_u8, y, threats, device, cache, run_dir)
    purifier_desc = None
    if purifier is not None:
        purifier_desc = (
            f"{cfg.purifier.run} ({purifier.sampler}, t*={purifier.t_star}, "
            f"{purifier.nfe} NFE, {'fixed noise' if purifier.fixed_noise else 'fresh noise'})"
        )
    meta: dict[str, Any] = {
        "title": Path(cfg.classifier.run).resolve().name + (" + purifier" if purifier else ""),
        "classifier": str(cfg.classifier.run),
        "purifier": purifier_desc,
        "stochastic": stochastic,
        "data": f"{data['name']} validation split ({data.get('root', '')}), "
        f"{data['image_size']} px",
        "data_config": data,
        "classes": list(clf_meta.get("classes", [])),
        "num_images": n,
        "device": str(device),
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ood_sets": [],
    }
    report: dict[str, Any] = {"metrics": metrics, "meta": meta, "notes": notes}

    # -- clean -----------------------------------------------------------------------------
    draw_logits: Tensor | None = None  # (draws, N, classes)
    bare: Tensor | None = None
    feats = bank_set is not None  # the OOD feature scores' units keep their features
    clean_feats: Tensor | None = None  # (N, D), the first draw's
    if need_clean:
        stored = cache.get("clean")
        if stored is not None:
            draw_logits, bare = stored[1]["logits"], stored[1].get("bare")
            clean_feats = stored[1].get("features")
        else:
            # One stream for all draws: the unit is stored whole, so a resume replays it.
            model.reseed(seed + SEED_CLEAN, device)
            draw_logits, clean_feats = predict_draws(
                model, x_u8, clean_draws, bs, device, feats, cfg.eval.progress, "clean passes"
            )
            if specs["clean"]["bare"]:
                bare = predict(model.classifier, x_u8, bs, device)
            kept = {"logits": draw_logits} | ({"bare": bare} if bare is not None else {})
            if clean_feats is not None:
                kept["features"] = clean_feats
            cache.put("clean", {}, kept)
    if cfg.clean.enabled:
        assert draw_logits is not None
        accs = (draw_logits.argmax(2) == y).float().mean(1)  # (draws,)
        metrics["test/acc"] = accs.mean().item()
        metrics["test/n"] = float(n)
        if clean_draws > 1:
            metrics["test/acc_std"] = accs.std().item()
            metrics["test/acc_worst"] = accs.min().item()
            metrics["test/draws"] = float(clean_draws)
        if bare is not None:
            metrics["test/acc_unpurified"] = (bare.argmax(1) == y).float().mean().item()
    if stochastic:
        ran = {
            "clean": bool(cfg.clean.enabled),
            "corruption": bool(corruptions),
            "calibration": bool(cfg.calib.enabled),
            "OOD": bool(cfg.ood.enabled),
        }
        notes.append(
            stochastic_note(
                [k for k, v in ran.items() if v],
                clean_draws,
                shift_draws,
                bool(threats),
            )
        )

    # Temperature scaling, fit on the clean logits before the corruption cells, so that each
    # cell's calibration is computed as it finishes (its logits need not stay in memory).
    temperature: TemperatureFit | None = None
    if cfg.calib.enabled and cfg.calib.temperature and draw_logits is not None:
        temperature = temperature_scaling(cfg, draw_logits, y, metrics, meta, notes)
    cell_eces: dict[tuple[str, int], tuple[float, float | None]] = {}

    def on_cell(c: str, sev: int, per_draw: Tensor, labels: Tensor) -> None:
        cell_eces[c, sev] = cell_ece(cfg, per_draw, labels, temperature)

    shift_logits: Tensor | None = None  # (draws, M, classes)
    shift_labels: Tensor | None = None
    shift_feats: Tensor | None = None  # (M, D)
    with progress_bars(cfg.eval.progress) as bar:
        # -- corruptions -------------------------------------------------------------------
        if corruptions:
            shift_logits, shift_labels, shift_feats = shift_section(
                cfg,
                model,
                images,
                y,
                corruptions,
                severities,
                shift_draws,
                device,
                metrics,
                meta,
                notes,
                bar,
                cache,
                on_cell if cfg.calib.enabled else None,
                feats and bool(cfg.ood.shift),
            )
        # -- natural distribution shift -----------------------------------------------------
        natural_logits: dict[str, tuple[Tensor, Tensor]] = {}
        if natural:
            meta["natural"] = {k: v[2] for k, v in natural.items()}
            natural_logits = natural_section(
                natural, model, clean_draws, cfg, device, metrics, bar, cache
            )
        # -- adversarial -------------------------------------------------------------------
        adv_examples: dict[str, Tensor] = {}
        if threats:
            adv_examples = adv_section(
                cfg, model, x_u8, y, threats, device, metrics, report, bar, cache
            )
        # -- certified (randomized smoothing) ------------------------------------------------
        if cfg.cert.enabled:
            cert_section(cfg, model, x_u8, y, device, metrics, report, bar, cache)
        # -- outside OOD datasets through the pipeline --------------------------------------
        outside_logits: dict[str, Tensor] = {}
        outside_feats: dict[str, Tensor] = {}
        if draw_logits is not None:
            outside_images = {name: v[0] for name, v in outside.items()}
            outside_logits, outside_feats = set_logits(
                outside_images, "ood", seed + SEED_OOD, model, clean_draws, cfg, device, bar,
                cache, feats,
            )  # fmt: skip
        # -- the OOD feature scores' bank ---------------------------------------------------
        ood_feats: OODFeatures | None = None
        if bank_set is not None and clean_feats is not None:
            meta["ood_bank"] = bank_set[2]
            bank, bank_labels = bank_features(bank_set, model, cfg, device, bar, cache)
            ood_feats = OODFeatures(bank, bank_labels, clean_feats, shift_feats, outside_feats)
    if ce_reference is not None:
        ce_section(ce_reference, metrics, meta, notes)
    if cache.done:
        notes.append(
            f"Resumed: {len(cache.done)} of {len(cache.keys)} units of work (clean pass, "
            f"corruption cells, attacks, sanity checks) were read from {cache.folder}, stored "
            "by an earlier run with the same config, data and weights; their wall times are "
            "that run's."
        )

    # -- example figures -------------------------------------------------------------------
    if cfg.eval.examples > 0:
        try:
            examples_section(
                cfg, model, x_u8, y, corruptions, severities, threats, adv_examples, device,
                run_dir, report,
            )  # fmt: skip
        except Exception as err:  # figures must not cost the report its numbers
            notes.append(f"The example figures were not drawn: {err!r}")

    # -- calibration ---------------------------------------------------------------------------
    # Behind a stochastic purifier the predictions of every purification are pooled: the
    # calibration of the randomised pipeline is that of (prediction, label) pairs drawn over
    # images and purifier noise alike (NLL, Brier and accuracy are then the means over draws).
    reliability: dict[str, Any] = {}
    reliability_scaled: dict[str, Any] = {}  # after temperature scaling
    risk_curves: dict[str, Any] = {}  # selective prediction
    if cfg.calib.enabled:
        meta["calib_bins"] = int(cfg.calib.n_bins)
        sets: list[tuple[str, Tensor, Tensor]] = []  # (draws, N, classes) logits, (N,) labels
        if draw_logits is not None:
            sets.append(("clean", draw_logits, y))
        if shift_logits is not None and shift_labels is not None:
            # The corruptions of one image are not independent samples: for the bootstrap
            # they join its draws (the pooled metrics are the same either way).
            by_image, image_labels = group_by_image(shift_logits, shift_labels, len(corruptions))
            assert image_labels is not None
            sets.append(("shift", by_image, image_labels))
        for name, (n_logits, n_labels) in natural_logits.items():
            sets.append((f"natural_{name}", n_logits, n_labels))
        for name, per_draw, labels_1d in sets:
            reliability[name] = calibration_metrics(
                cfg, f"calib/{name}/", per_draw, labels_1d, seed, metrics
            )
            risk_curves[name] = selective_metrics(name, per_draw, labels_1d, metrics)
            if temperature is not None:
                # Cross-fitted on the clean images, and on the shift set when it holds them.
                same = name in ("clean", "shift")
                scaled = temperature.scale(per_draw, labels_1d, same)
                reliability_scaled[name] = calibration_metrics(
                    cfg, f"calib/{name}/ts_", scaled, labels_1d, seed, metrics,
                    refit=temperature.bootstrap_sides(per_draw, labels_1d, same),
                )  # fmt: skip
        if corruptions:
            severity_calibration(
                cell_eces, corruptions, severities, run_dir, metrics, report, notes
            )
    report["reliability"] = reliability
    if reliability_scaled:
        report["reliability_scaled"] = reliability_scaled
    if risk_curves:
        report["risk_coverage"] = risk_curves

    # -- per class -------------------------------------------------------------------------------
    # Which classes a shift hurts: accuracy per class, clean and on the calibration's shift set.
    if draw_logits is not None:
        names = [str(c) for c in clf_meta.get("classes") or range(num_classes)]
        clean_acc, counts = per_class_accuracy(draw_logits, y, num_classes)
        per_class: dict[str, Any] = {"classes": names, "images": counts, "clean": clean_acc}
        confusion = {"clean": confusion_matrix(draw_logits, y, num_classes).tolist()}
        if shift_logits is not None and shift_labels is not None:
            per_class["shift"] = per_class_accuracy(shift_logits, shift_labels, num_classes)[0]
            confusion["shift"] = confusion_matrix(shift_logits, shift_labels, num_classes).tolist()
        report["per_class"] = per_class
        report["confusion"] = confusion

    # -- the representation: kNN on the encoder's features ---------------------------------------
    if ood_feats is not None:
        representation_section(ood_feats, y, shift_labels, num_classes, metrics, meta, device)

    # -- OOD -----------------------------------------------------------------------------------
    if cfg.ood.enabled and draw_logits is not None:
        meta["ood_datasets"] = {k: v[1] for k, v in outside.items()}
        ood_section(
            cfg, model, draw_logits, y, shift_logits, outside_logits, ood_feats, images.shape,
            device, report,
        )  # fmt: skip

    # -- latency -------------------------------------------------------------------------------
    if cfg.perf.enabled:
        _perf_section(cfg, model, x_u8, device, metrics)

    metrics["perf/eval_wall_s"] = time.perf_counter() - start_wall
    paths = write_report(report, run_dir)
    write_json(run_dir / "metrics.json", metrics)
    if cfg.wandb.mode != "disabled":
        _log_wandb(
            cfg, run_dir, report, {k: v for k, v in paths.items() if k not in ("json", "markdown")}
        )
    shown = {k: v for k, v in metrics.items() if _in_summary(k)}
    failed = [
        f"{norm}/{check}"
        for norm, checks in report.get("sanity", {}).items()
        for check, result in checks.items()
        if not result["passed"]
    ]
    # Every file the evaluation leaves for a reader, not only the Markdown.
    extra = {"Report": str(paths["markdown"])}
    if (run_dir / "plots").is_dir():
        extra["Plots"] = str(run_dir / "plots")
    extra["Report JSON (every number, table and plot input)"] = str(paths["json"])
    extra["Metrics JSON"] = str(run_dir / "metrics.json")
    if report.get("sanity"):
        extra["Sanity checks"] = "all passed" if not failed else "FAILED: " + ", ".join(failed)
    print_summary(f"evaluate {meta['title']}", run_dir, shown, extra)
    return metrics


def _in_summary(key: str) -> bool:
    """Keep the console summary short: no grid cells, sanity details or protocol counts."""
    parts = key.split("/")
    if parts[0] == "shift" and len(parts) == 4 and parts[1] not in ("group", "severity"):
        return False
    if parts[0] == "shift" and len(parts) == 3 and parts[2] in ("ce", "relative_ce"):
        return False
    if key.startswith("adv/sanity/") and not key.endswith("/passed"):
        return False
    # Calibration: the ECE before and after scaling; selective prediction: the E-AURC.
    if parts[0] == "calib" and parts[-1] in ("nll", "brier", "ts_nll", "ts_brier", "acc"):
        return False
    if parts[0] == "selective" and parts[-1] != "eaurc":
        return False
    if parts[0] == "ood":  # each score's mean AUROC over the sets (the report has each set)
        return parts[1] == "mean" and parts[-1] == "auroc"
    ends = ("calls_per_image", "/steps", "/eot", "/rescore_draws", "/n", "_low", "_high")
    return not key.endswith(ends)


def _perf_section(
    cfg: DictConfig, model: Pipeline, x_u8: Tensor, device: torch.device, metrics: dict
) -> None:
    f = cfg.perf
    reps = math.ceil(f.batch_size / len(x_u8))
    batch = to_float(x_u8.repeat(reps, 1, 1, 1)[: f.batch_size], device)
    one = batch[:1]
    clf = model.classifier
    metrics["perf/latency_ms"] = measure_latency(clf, one, f.warmup, f.iters)["median_ms"]
    metrics["perf/throughput_ips"] = measure_latency(clf, batch, f.warmup, f.iters)["images_per_s"]
    metrics["perf/batch_size"] = float(batch.shape[0])
    if model.purifier is not None:
        model.reseed(int(cfg.run.seed) + SEED_PERF, device)
        lat = measure_latency(model, one, f.warmup, f.iters)
        thr = measure_latency(model, batch, f.warmup, f.iters)
        metrics["perf/purified_latency_ms"] = lat["median_ms"]
        metrics["perf/purified_throughput_ips"] = thr["images_per_s"]
        metrics["perf/purifier_nfe"] = float(model.purifier.nfe)


def _log_wandb(
    cfg: DictConfig, run_dir: Path, report: dict[str, Any], plots: dict[str, Path]
) -> None:
    import wandb

    w = cfg.wandb
    run = wandb.init(
        project=w.project,
        entity=w.entity or None,
        group=w.group or None,
        name=w.name or run_dir.name,
        tags=list(w.tags) or None,
        job_type=w.job_type or "evaluate",
        mode=w.mode,
        id=wandb_run_id(run_dir),
        resume="allow",
        dir=str(run_dir),
        config=to_dict(cfg),
        settings=wandb.Settings(init_timeout=w.init_timeout_s),
    )
    try:
        log_to_wandb(run, report, plots)
    finally:
        run.finish()
