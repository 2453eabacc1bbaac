"""Distribution shift: the corruption grid, corruption errors against a reference, natural shift
sets."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor

from ssl_robust.config import ConfigError
from ssl_robust.evaluate.cifar_c import (
    MANIFEST,
    _corruption_seed,
    load_cifar_c,
    textures_for_frost,
)
from ssl_robust.evaluate.corruptions import CORRUPTIONS, SEVERITIES, frost_texture_folder
from ssl_robust.evaluate.metrics import corruption_errors, grid_accuracies, standard_error
from ssl_robust.evaluate.report import group_of
from ssl_robust.evaluate.store import UnitStore
from ssl_robust.launch.progress import RESTORED
from ssl_robust.pipelines.evaluate.setup import SEED_NATURAL, SEED_SHIFT, Pipeline, seeded_subset
from ssl_robust.pipelines.evaluate.units import generate, nchw, predict_draws


def natural_section(
    sets: dict[str, tuple[np.ndarray, np.ndarray, str]],
    model: Pipeline,
    draws: int,
    cfg: DictConfig,
    device: torch.device,
    metrics: dict[str, float],
    bar: Progress,
    cache: UnitStore,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Accuracy of the pipeline on each natural-shift set (:func:`set_logits`, units
    ``natural/<set>``). Returns each set's logits (draws, M, classes) and labels, for
    calibration."""
    images = {name: v[0] for name, v in sets.items()}
    seed = int(cfg.run.seed) + SEED_NATURAL
    logits, _ = set_logits(images, "natural", seed, model, draws, cfg, device, bar, cache)
    out = {}
    for name, (_, labels, _) in sets.items():
        y = torch.from_numpy(labels)
        metrics[f"natural/{name}/acc"] = (logits[name].argmax(2) == y).float().mean().item()
        metrics[f"natural/{name}/n"] = float(len(y))
        out[name] = (logits[name], y)
    return out


def set_logits(
    images: dict[str, np.ndarray],
    kind: str,
    seed: int,
    model: Pipeline,
    draws: int,
    cfg: DictConfig,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
    features: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The pipeline's logits (draws, M, classes) on each named set of uint8 (M, H, W, 3)
    images: one unit ``<kind>/<name>`` each, over ``draws`` purifications from a stream of its
    own (``seed`` and the name), read back from ``cache`` when stored; and with ``features``,
    the encoder's features (M, D) of each set's first draw."""
    out: dict[str, Tensor] = {}
    feats: dict[str, Tensor] = {}
    if not images:
        return out, feats
    task = bar.add_task(f"{kind} sets", total=len(images))
    for name, pixels in images.items():
        unit = f"{kind}/{name}"
        stored = cache.get(unit)
        bar.update(task, description=f"{kind} {name}" + (f" {RESTORED}" if stored else ""))
        f: Tensor | None
        if stored is not None:
            out[name], f = stored[1]["logits"], stored[1].get("features")
        else:
            model.reseed(_corruption_seed(seed, name, 0), device)
            bs = int(cfg.eval.batch_size)
            out[name], f = predict_draws(model, nchw(pixels), draws, bs, device, features)
            cache.put(unit, {}, {"logits": out[name]} | ({"features": f} if f is not None else {}))
        if f is not None:
            feats[name] = f
        bar.advance(task)
    return out, feats


def shift_section(
    cfg: DictConfig,
    model: Pipeline,
    images: np.ndarray,
    y: Tensor,
    corruptions: list[str],
    severities: list[int],
    draws: int,
    device: torch.device,
    metrics: dict[str, float],
    meta: dict[str, Any],
    notes: list[str],
    bar: Progress,
    cache: UnitStore,
    on_cell: Callable[[str, int, Tensor, Tensor], None] | None = None,
    features: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accuracy over the corruption grid; returns the highest-severity cells' logits of every
    draw, (draws, M, classes), and their labels (M,), the corruptions one after another, and
    with ``features`` their first draw's encoder features (M, D) (else None).
    With ``on_cell``, every cell keeps its logits in its stored unit (else the top severity
    only), and ``on_cell(corruption, severity, logits (draws, N, classes), labels)`` is called
    with each cell's that has them (computed, or read from a store that kept them).

    Each cell is one unit of ``cache``, and draws the purifier's noise from its own stream,
    seeded by (run.seed, corruption, severity), so that a cell computed after a resume sees
    what it would have seen in an uninterrupted run. With ``draws`` > 1 (a stochastic
    purifier), a cell's accuracy is the mean over that many purifications of every image, and
    the spread of the grid mean over the draws is reported beside it.
    """
    s = cfg.shift
    seed = int(cfg.run.seed)
    folder = Path(s.cifar_c_dir) if s.cifar_c_dir else None
    textures = textures_for_frost(str(s.frost)) if folder is None else None
    meta["grid"] = {
        "corruptions": corruptions,
        "severities": severities,
        "source": f"the folder {folder}"
        if folder
        else f"generated on the fly on {device.type} (seed {seed}, rounded to uint8)",
    }
    if "frost" in corruptions:
        meta["grid"]["frost"] = _frost_note(str(s.frost), folder, bool(s.write_cifar_c))
        notes.append(meta["grid"]["frost"])
    task = bar.add_task("corruptions", total=len(corruptions) * len(severities))
    top = max(severities)
    pooled_logits: list[Tensor] = []
    pooled_labels: list[Tensor] = []
    pooled_feats: list[Tensor] = []
    folder_sizes: list[int] = []  # images per severity in the folder, per cell
    cell_accs: dict[tuple[str, int], list[float]] = {}  # per draw
    # Per image: the fraction of draws that classified it right, per cell (None in stores
    # written before these were kept); they give the grid means' intervals over the images.
    cell_hits: dict[tuple[str, int], Tensor | None] = {}
    numbers: dict[str, Any]  # a cell's stored numbers
    kept: dict[str, Tensor]  # and tensors
    logits: Tensor | None
    y_c: Tensor | None
    for c in corruptions:
        for sev in severities:
            unit = f"shift/{c}/{sev}"
            stored = cache.get(unit)
            if stored is not None:
                bar.update(task, description=f"{c} s{sev} {RESTORED}")
                numbers, kept = stored
                accs = [float(a) for a in numbers.get("accs", [numbers["acc"]])]
                logits, y_c = kept.get("logits"), kept.get("labels")
                hits = kept.get("hits")
                feats = kept.get("features")
            else:
                bar.update(task, description=f"{c} s{sev}")
                numbers = {}
                if folder is not None:
                    arr, lab = load_cifar_c(folder, c, sev)
                    numbers["folder_images"] = len(arr)
                    if len(arr) != len(images):
                        idx = seeded_subset(len(arr), cfg.eval.max_images, seed)
                        arr, lab = arr[idx], lab[idx]
                    x_c, y_c = nchw(arr), torch.from_numpy(lab)
                else:
                    x_c = generate(images, c, sev, seed, s.batch_size, device, textures)
                    y_c = y
                # One stream for all draws: the first is the one-draw run's purification.
                model.reseed(_corruption_seed(seed + SEED_SHIFT, c, sev), device)
                # The OOD feature scores need the top cells' features.
                with_feats = features and sev == top
                stacked, feats = predict_draws(
                    model, x_c, draws, cfg.eval.batch_size, device, with_feats
                )
                outs = list(stacked)
                correct = torch.stack([(out.argmax(1) == y_c).float() for out in outs])
                accs = correct.mean(1).tolist()
                hits = correct.mean(0)
                # Calibration and OOD: every draw, (draws, N, classes); one draw stays (N, classes)
                # as stores written before the draws existed hold it.
                logits = torch.stack(outs) if draws > 1 else outs[0]
                numbers["acc"] = float(np.mean(accs))
                if draws > 1:
                    numbers["accs"] = accs
                # The top severity's logits pool into the shift set of the calibration and
                # OOD sections; with on_cell, every cell's feed the calibration per severity.
                keep = sev == top or on_cell is not None
                kept = {"logits": logits, "labels": y_c} if keep else {}
                kept["hits"] = hits
                if feats is not None:
                    kept["features"] = feats
                cache.put(unit, numbers, kept)
            cell_accs[c, sev] = accs
            cell_hits[c, sev] = hits
            metrics[f"shift/{c}/{sev}/acc"] = float(np.mean(accs))
            if "folder_images" in numbers:
                folder_sizes.append(int(numbers["folder_images"]))
            if logits is not None and y_c is not None:
                per_draw = logits if logits.dim() == 3 else logits[None]
                if on_cell is not None:
                    on_cell(c, sev, per_draw, y_c)
                if sev == top:
                    pooled_logits.append(per_draw)
                    pooled_labels.append(y_c)
                    if feats is not None:
                        pooled_feats.append(feats)
            bar.advance(task)
    if folder_sizes and folder_sizes[0] != len(images):
        notes.append(
            f"{folder} holds {folder_sizes[0]} images per severity, the evaluation set "
            f"{len(images)}; its own images and labels were used"
        )
    cell = {key: float(np.mean(accs)) for key, accs in cell_accs.items()}
    metrics["shift/mean_acc"] = float(np.mean(list(cell.values())))
    if draws > 1:
        per_draw = np.mean(np.array(list(cell_accs.values())), axis=0)  # grid mean per draw
        metrics["shift/mean_acc_std"] = float(per_draw.std(ddof=1))
        metrics["shift/mean_acc_worst"] = float(per_draw.min())
        metrics["shift/draws"] = float(draws)
    for sev in severities:
        metrics[f"shift/severity/{sev}/acc"] = float(np.mean([cell[c, sev] for c in corruptions]))
    metrics.update(_grid_standard_errors(cell_hits, corruptions, severities))
    if 5 in severities:
        metrics["shift/severity5_acc"] = metrics["shift/severity/5/acc"]
    groups: dict[str, list[float]] = {}
    for (c, _), v in cell.items():
        groups.setdefault(group_of(c), []).append(v)
    for g, values in groups.items():
        metrics[f"shift/group/{g}/acc"] = float(np.mean(values))
    meta["calib_shift_set"] = f"severity {top} of the {len(corruptions)} corruptions"
    if set(corruptions) != set(CORRUPTIONS) or severities != list(SEVERITIES):
        notes.append(
            f"Corruption grid: {len(corruptions)} corruptions x {len(severities)} severities, "
            "not the full 15 x 5 CIFAR-10-C benchmark; means are over this grid."
        )
    # Features of every top cell, or none (a cell stored before they were kept lacks them).
    every = features and len(pooled_feats) == len(pooled_logits)
    return (
        torch.cat(pooled_logits, dim=1),
        torch.cat(pooled_labels),
        torch.cat(pooled_feats) if every else None,
    )


def load_ce_reference(
    path: str | Path, corruptions: Sequence[str], severities: Sequence[int], data: dict[str, Any]
) -> dict[str, Any]:
    """The reference evaluation of ``shift.ce_reference`` (a run directory or its
    metrics.json): its cell accuracies on this grid (``cells``), clean accuracy (``clean``,
    None when it did not run), image count, and how its data differ from ``data`` (this
    evaluation's description) where its report.json says (``differences``: split settings).

    Raises:
        FileNotFoundError: No metrics.json there.
        ConfigError: It lacks cells of this grid, or it evaluated another dataset or size.
    """
    given = Path(path)
    file = given / "metrics.json" if given.is_dir() else given
    if not file.is_file():
        raise FileNotFoundError(
            f"shift.ce_reference: no evaluation metrics at {str(given)!r} (expected an "
            "evaluation run directory holding metrics.json, or that file)"
        )
    try:
        metrics = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"shift.ce_reference: {file} is not valid JSON ({err})") from err
    cells = grid_accuracies(metrics)
    missing = [f"{c}/{s}" for c in corruptions for s in severities if (c, s) not in cells]
    if missing:
        have = sorted({c for c, _ in cells}) or "none"
        raise ConfigError(
            f"shift.ce_reference: {file} has no accuracy for {len(missing)} cells of this grid "
            f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); its corruptions: "
            f"{have}. Evaluate the reference on the same shift.corruptions and "
            "shift.severities."
        )
    report_file = file.parent / "report.json"
    meta = {}
    if report_file.is_file():
        try:
            meta = json.loads(report_file.read_text()).get("meta", {})
        except json.JSONDecodeError:
            meta = {}
    ref_data = meta.get("data_config") or {}
    for key in ("name", "image_size"):
        if key in ref_data and ref_data[key] != data.get(key):
            raise ConfigError(
                f"shift.ce_reference: {file.parent} evaluated {ref_data.get('name')!r} at "
                f"{ref_data.get('image_size')} px, this evaluation {data.get('name')!r} at "
                f"{data.get('image_size')} px; corruption errors compare models on the same data"
            )
    # The split (which images are evaluated) may still differ: said in a note.
    differences = [
        f"{key} {ref_data[key]!r} there, {data.get(key)!r} here"
        for key in ("seed", "val_fraction", "root")
        if key in ref_data and ref_data[key] != data.get(key)
    ]
    return {
        "differences": differences,
        "run": str(file.parent),
        "cells": {key: cells[key] for key in cells if key[0] in corruptions},
        "clean": metrics.get("test/acc"),
        "images": metrics.get("shift/n", meta.get("num_images")),
        "title": meta.get("title", file.parent.name),
        "mean_acc": metrics.get("shift/mean_acc"),
    }


def ce_section(
    reference: dict[str, Any], metrics: dict[str, float], meta: dict[str, Any], notes: list[str]
) -> None:
    """mCE and relative mCE of this evaluation's grid against ``reference``
    (:func:`load_ce_reference`), into ``metrics``; what they were measured against into
    ``meta["ce_reference"]``."""
    cells = grid_accuracies(metrics)
    errors = corruption_errors(
        cells, reference["cells"], metrics.get("test/acc"), reference["clean"]
    )
    metrics.update(errors)
    meta["ce_reference"] = {
        k: reference[k] for k in ("run", "title", "clean", "mean_acc", "images")
    }
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    undefined = [c for c in corruptions if f"shift/{c}/ce" not in errors]
    if undefined:
        notes.append(
            f"Corruption error undefined for {', '.join(undefined)}: the reference "
            f"({reference['run']}) made no errors there; no mCE."
        )
    if reference["clean"] is None or "test/acc" not in metrics:
        notes.append(
            "No relative corruption errors: they need the clean accuracy of both this "
            "evaluation and the reference (clean.enabled)."
        )
    else:
        flat = [c for c in corruptions if f"shift/{c}/relative_ce" not in errors]
        if flat:
            notes.append(
                f"Relative corruption error undefined for {', '.join(flat)}: the reference "
                "lost no accuracy there relative to its clean accuracy; no relative mCE."
            )
    if reference["differences"]:
        notes.append(
            "The corruption-error reference evaluated the same dataset split otherwise ("
            + "; ".join(reference["differences"])
            + "): its errors may be over other images."
        )
    n, ref_n = metrics.get("shift/n"), reference["images"]
    if n is not None and ref_n is not None and int(n) != int(ref_n):
        notes.append(
            f"The corruption-error reference was evaluated on {int(ref_n)} images, this "
            f"evaluation on {int(n)}; the errors compare different image samples."
        )


def _grid_standard_errors(
    cell_hits: dict[tuple[str, int], Tensor | None], corruptions: list[str], severities: list[int]
) -> dict[str, float]:
    """Standard errors over the images of the grid mean and of each severity's and group's mean
    (``metrics.standard_error`` of each image's accuracy averaged over those cells), and the
    image count; nothing when a cell has no per-image results (a store from before they were
    kept) or the cells hold different images (a CIFAR-10-C folder of another size)."""
    hits = {key: h for key, h in cell_hits.items() if h is not None}
    if len(hits) < len(cell_hits) or len({len(h) for h in hits.values()}) != 1:
        return {}
    n = len(next(iter(hits.values())))
    if n < 2:
        return {}

    def se(cells: list[tuple[str, int]]) -> float:
        return standard_error(torch.stack([hits[k] for k in cells]).double().mean(0).numpy())

    out = {"shift/n": float(n), "shift/mean_acc_se": se(list(hits))}
    for sev in severities:
        out[f"shift/severity/{sev}/acc_se"] = se([(c, sev) for c in corruptions])
    for g in dict.fromkeys(group_of(c) for c in corruptions):
        out[f"shift/group/{g}/acc_se"] = se([k for k in hits if group_of(k[0]) == g])
    return out


def _frost_textures_words(photo_folder: str | None) -> str:
    if photo_folder is None:
        return "procedural textures (not the CIFAR-10-C photographs)"
    return f"the CIFAR-10-C frost photographs from {photo_folder}"


def _frost_note(source: str, folder: Path | None, written: bool) -> str:
    """Which frost textures the grid's frost cells were made with, for the report.

    Generated cells (on the fly, or written to ``folder`` first) use ``source``; cells read
    from a folder use what its manifest records (none for the released CIFAR-10-C).
    """
    if folder is None or written:
        photos = None if source == "procedural" else str(frost_texture_folder(source))
        cached = f", cached in {folder}" if folder is not None else ""
        return f"frost: {_frost_textures_words(photos)}{cached}"
    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return (
            f"frost: read from {folder}, which records no frost textures (the released "
            "CIFAR-10-C uses the photographs); shift.frost applies to generated corruptions only"
        )
    photos = None
    if record.get("frost_textures", "procedural") != "procedural":
        photos = str(record.get("frost_folder", "a folder it does not name"))
    return f"frost: read from {folder}, written with {_frost_textures_words(photos)}"
