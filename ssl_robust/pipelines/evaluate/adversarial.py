"""Adversarial robustness: PGD(-EOT) in shards, AutoAttack, the sanity checks against gradient
masking, and certified accuracy under randomized smoothing."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor

from ssl_robust.config.evaluate import MAX_EXAMPLES
from ssl_robust.evaluate.attacks import (
    autoattack,
    robust_accuracy,
    robust_accuracy_steps,
    sanity_attack_costs,
    sanity_checks,
)
from ssl_robust.evaluate.smoothing import ABSTAIN, certified_accuracy, certify
from ssl_robust.evaluate.store import UnitStore
from ssl_robust.launch.progress import RESTORED
from ssl_robust.pipelines.common import print_summary
from ssl_robust.pipelines.evaluate.setup import (
    MIN_EOT,
    MIN_STEPS,
    SEED_ADV,
    SEED_CERT,
    Pipeline,
    attack_budget,
    autoattack_skip,
    seeded_subset,
)
from ssl_robust.pipelines.evaluate.units import (
    attack_started,
    pgd_unit,
    predict,
    progress_bars,
    to_float,
    wide_interval_note,
)


def shard_block(n: int, shard: int, shards: int) -> slice:
    """Block ``shard`` (1-based) of ``shards`` contiguous, near-equal blocks of n items; the
    first block holds the first items (the examples figure's)."""
    return slice((shard - 1) * n // shards, shard * n // shards)


# Per-image means of a PGD unit, merged across shards weighted by their images.
_PER_IMAGE = (
    "acc",
    "acc_worst",
    "clean_acc",
    "attack_calls_per_image",
    "pipeline_calls_per_image",
    "nfe_per_image",
)


def merge_pgd_shards(parts: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """One threat's PGD numbers from those of its shards: per-image means weighted by each
    shard's images, the images and wall times summed, the settings (steps, EOT, draws) kept."""
    n = sum(part[prefix + "n"] for part in parts)
    merged = dict(parts[0])
    for key in _PER_IMAGE:
        merged[prefix + key] = sum(part[prefix + key] * part[prefix + "n"] for part in parts) / n
    merged[prefix + "n"] = n
    merged[prefix + "wall_s"] = sum(part[prefix + "wall_s"] for part in parts)
    return merged


def _pgd(
    cfg: DictConfig,
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    t: dict[str, Any],
    eot: int,
    draws: int,
    device: torch.device,
    bar: Progress,
    shard: int,
) -> tuple[dict[str, float], Tensor]:
    """PGD(-EOT) with re-scoring of one threat on ``x``: its numbers under ``adv/<threat>/``
    and its first adversarial examples. Shard i > 1 draws from streams of its own; shard 1 (an
    unsharded attack) from those the evaluation always used."""
    a = cfg.adv
    p = f"adv/{t['name']}/"
    seed = int(cfg.run.seed) + SEED_ADV + 1_000_003 * (shard - 1)
    model.reseed(seed, device)
    model.calls = 0
    # PGD on a purifier runs for hours: a bar of its steps (all batches) beside.
    n_steps = robust_accuracy_steps(len(x), int(cfg.eval.batch_size), int(a.steps))
    steps_task = bar.add_task(f"PGD {t['name']} steps", total=n_steps)
    res = robust_accuracy(
        model,
        (x, y),
        norm=t["norm"],
        eps=t["eps"],
        steps=int(a.steps),
        eot=eot,
        rescore_draws=draws,
        step_size=float(a.step_size) if a.step_size > 0 else None,
        random_start=bool(a.random_start),
        generator=torch.Generator().manual_seed(seed),
        loss=a.loss,
        batch_size=int(cfg.eval.batch_size),
        nfe_per_call=model.nfe,
        on_step=functools.partial(bar.advance, steps_task),
        examples=MAX_EXAMPLES,
    )
    bar.remove_task(steps_task)
    found = {
        p + "acc": res["acc"],
        p + "acc_worst": res["acc_worst"],
        p + "clean_acc": res["clean_acc"],
        p + "n": res["n"],
        p + "steps": float(a.steps),
        p + "eot": float(eot),
        p + "rescore_draws": float(draws),
        p + "attack_calls_per_image": res["attack_calls_per_image"],
        p + "pipeline_calls_per_image": model.calls / res["n"],
        p + "nfe_per_image": res["attack_nfe_per_image"],
        p + "wall_s": res["wall_s"],
    }
    return found, res["x_adv"]


def _pgd_block(
    cfg: DictConfig,
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    t: dict[str, Any],
    shard: int,
    eot: int,
    draws: int,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
    announce: Callable[[bool], None] = lambda read: None,
) -> tuple[dict[str, float], Tensor | None]:
    """One threat's PGD on block ``shard`` of ``adv.shards`` of the attacked images ``x``: read
    from ``cache`` when stored, else run and stored; ``announce(read)`` is called first (for
    progress). Returns its numbers and its first adversarial examples (None in stores from
    before they were kept)."""
    shards = int(cfg.adv.shards)
    unit = pgd_unit(t["name"], shard, shards)
    stored = cache.get(unit)
    announce(stored is not None)
    if stored is not None:
        return stored[0], stored[1].get("x_adv")
    block = shard_block(len(x), shard, shards)
    found, x_adv = _pgd(cfg, model, x[block], y[block], t, eot, draws, device, bar, shard)
    cache.put(unit, found, {"x_adv": x_adv})
    return found, x_adv


def attacked_indices(cfg: DictConfig, n: int) -> Tensor:
    """The indices of the attacked images among the n evaluation images (a seeded subset of
    ``adv.max_images``, sorted): the PGD blocks and the example figures take theirs from it."""
    return torch.from_numpy(seeded_subset(n, int(cfg.adv.max_images), int(cfg.run.seed) + SEED_ADV))


def shard_worker(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    threats: list[dict[str, Any]],
    device: torch.device,
    cache: UnitStore,
    run_dir: Path,
) -> dict[str, float]:
    """``adv.shard`` = i: PGD on block i of the attacked images for every threat, stored as
    units (a job of a SLURM array, say); no report. The run with ``adv.shard=0`` merges."""
    i, k = int(cfg.adv.shard), int(cfg.adv.shards)
    eot, draws = attack_budget(cfg, model.stochastic)
    idx = attacked_indices(cfg, len(y))
    x = to_float(x_u8[idx], device)
    y_a = y[idx].to(device)
    metrics: dict[str, float] = {}
    with progress_bars(cfg.eval.progress) as bar:
        for t in threats:
            found, _ = _pgd_block(cfg, model, x, y_a, t, i, eot, draws, device, bar, cache)
            metrics.update(found)
    title = f"evaluate {Path(cfg.classifier.run).resolve().name}: PGD shard {i} of {k}"
    extra = {
        "Stored": str(cache.folder),
        "Next": "once every shard has run, the same config with adv.shard=0 merges them "
        "(and runs whatever is missing) into the report",
    }
    print_summary(title, run_dir, metrics, extra)
    return metrics


def adv_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    threats: list[dict[str, Any]],
    device: torch.device,
    metrics: dict[str, float],
    report: dict[str, Any],
    bar: Progress,
    cache: UnitStore,
) -> dict[str, Tensor]:
    """PGD(-EOT), AutoAttack and the sanity checks; one unit of ``cache`` per threat's PGD,
    per threat's AutoAttack and per norm's sanity checks, each reseeding every random stream
    it uses, so a unit computed after a resume sees what it would have in an uninterrupted run.

    Returns:
        Threat name -> the PGD adversarial examples of the first (up to
        :data:`MAX_EXAMPLES`) attacked images, for the report's figures (none for PGD units
        stored before they were kept).
    """
    a = cfg.adv
    seed = int(cfg.run.seed)
    notes: list[str] = report["notes"]
    stochastic = model.stochastic
    eot, draws = attack_budget(cfg, stochastic)
    idx = attacked_indices(cfg, len(y))
    x = to_float(x_u8[idx], device)
    y_a = y[idx].to(device)
    purified = model.purifier is not None
    gradients = "exact (autograd through the whole pipeline)"
    if purified and model.purifier is not None and model.purifier.gradient_checkpointing:
        gradients = "exact, through the sampler with gradient checkpointing on the UNet"
    report["meta"]["threats"] = threats
    report["meta"]["attack"] = {
        "steps": int(a.steps),
        "eot": eot,
        "rescore_draws": draws,
        "loss": a.loss,
        "random_start": bool(a.random_start),
        "step_size_rule": f"{a.step_size:g}" if a.step_size > 0 else "2.5 eps / steps",
        "gradients": gradients,
        "num_images": len(y_a),
        "shards": int(a.shards),
    }
    if stochastic and (eot < MIN_EOT or a.steps < MIN_STEPS):
        notes.append(
            f"Attack budget below the recommended one for a stochastic purifier (EOT {eot} < "
            f"{MIN_EOT} or steps {a.steps} < {MIN_STEPS}): robust accuracy is an upper bound."
        )
    aa_skip = autoattack_skip(cfg, stochastic)
    if aa_skip is not None:
        notes.append(aa_skip)
    run_aa = bool(a.autoattack) and aa_skip is None
    norms = list(dict.fromkeys(t["norm"] for t in threats))
    n_s = min(int(a.sanity_images), len(y_a))
    sanity_grid = {
        norm: [e / 255 for e in a.sanity_linf_eps] if norm == "linf" else list(a.sanity_l2_eps)
        for norm in norms
    }
    # Progress in image passes through the pipeline (a pass with a backward counts 3), so the
    # time left holds although a norm's sanity checks can cost many times a PGD run. The
    # cost of AutoAttack depends on how many images its first attack leaves; it counts as a PGD.
    pgd_cost = len(y_a) * ((3 * int(a.steps) + 1) * eot + 2 * draws)
    sanity_costs = {  # per attack of the checks, passes per image
        norm: sanity_attack_costs(
            len(sanity_grid[norm]), int(a.steps), eot, draws,
            black_box_queries=int(a.sanity_queries) or None, eot_check=stochastic,
        )
        for norm in norms
    }  # fmt: skip
    total = len(threats) * pgd_cost * (2 if run_aa else 1)
    total += n_s * sum(sum(c) for c in sanity_costs.values()) if a.sanity_checks else 0
    task = bar.add_task("attacks, image passes", total=total)
    examples: dict[str, Tensor] = {}
    shards = int(a.shards)
    for t in threats:
        p = f"adv/{t['name']}/"
        parts: list[tuple[dict[str, float], Tensor | None]] = []
        for i in range(1, shards + 1):
            label = f"PGD {t['name']}" + (f" shard {i}/{shards}" if shards > 1 else "")

            def announce(read: bool, label: str = label) -> None:
                bar.update(task, description=f"{label} {RESTORED}" if read else label)

            parts.append(
                _pgd_block(cfg, model, x, y_a, t, i, eot, draws, device, bar, cache, announce)
            )
        if shards == 1:
            metrics.update(parts[0][0])
        else:
            metrics.update(merge_pgd_shards([found for found, _ in parts], p))
        if parts[0][1] is not None:  # stores written before the examples were kept lack them
            examples[t["name"]] = parts[0][1]
        bar.advance(task, pgd_cost)
        if not run_aa:
            continue
        stored = cache.get(p + "autoattack")
        if stored is not None:
            bar.update(task, description=f"AutoAttack {t['name']} {RESTORED}")
            metrics.update(stored[0])
        else:
            bar.update(task, description=f"AutoAttack {t['name']}")
            start = time.perf_counter()
            version = a.autoattack_version
            # A deterministic pipeline ignores the generator; reseeded all the same, so the
            # unit never depends on what ran before it.
            model.reseed(seed + SEED_ADV, device)
            x_aa = autoattack(
                model,
                x,
                y_a,
                norm=t["norm"],
                eps=t["eps"],
                version=version,
                batch_size=int(cfg.eval.batch_size),
                attacks=list(a.autoattack_attacks) if version == "custom" else None,
                seed=seed,
            )
            with torch.no_grad():
                pred = predict(model, x_aa, int(cfg.eval.batch_size), device).argmax(1)
            found = {
                p + "autoattack_acc": (pred == y_a.cpu()).float().mean().item(),
                p + "autoattack_wall_s": time.perf_counter() - start,
            }
            metrics.update(found)
            cache.put(p + "autoattack", found)
        bar.advance(task, pgd_cost)
    wide = wide_interval_note([metrics[f"adv/{t['name']}/acc"] for t in threats], len(y_a))
    if wide:
        notes.append(wide)
    if not a.sanity_checks:
        return examples
    if a.step_size > 0:
        notes.append(
            f"The sanity checks run PGD with the default step size (2.5 eps / steps at each "
            f"radius and step count they sweep), not adv.step_size={a.step_size:g}: one fixed "
            "step cannot fit radii up to the whole image box."
        )
    sanity: dict[str, dict[str, dict[str, Any]]] = {}
    tol = float(a.sanity_tol)
    if tol == 0:
        # One image of slack for a deterministic pipeline; about two standard errors of an
        # accuracy estimate (at acc = 0.5) for a stochastic one (attacks.sanity_checks).
        tol = max(0.02, 1.0 / n_s) if not stochastic else max(0.02, math.sqrt(1 / (n_s * draws)))
    for norm in norms:
        stored = cache.get(f"adv/sanity/{norm}")
        if stored is not None:
            bar.update(task, description=f"sanity checks {norm} {RESTORED}")
            checks = stored[0]["checks"]
        else:
            bar.update(task, description=f"sanity checks {norm}")
            grid = sanity_grid[norm]
            model.reseed(seed + SEED_ADV, device)
            # Progress in pipeline passes, not attacks: their budgets differ up to ~2x.
            costs = sanity_costs[norm]
            attacks_task = bar.add_task(f"sanity checks {norm}, passes/image", total=sum(costs))
            checks = sanity_checks(
                model,
                x[:n_s],
                y_a[:n_s],
                norm=norm,
                eps_grid=list(grid),
                steps=int(a.steps),
                eot=eot,
                rescore_draws=draws,
                tol=tol,
                black_box_queries=int(a.sanity_queries) or None,
                loss=a.loss,
                generator=torch.Generator().manual_seed(seed + SEED_ADV),
                on_attack=functools.partial(attack_started, bar, attacks_task, costs),
                random_start=bool(a.random_start),
                eot_check=stochastic,
            )
            bar.update(attacks_task, completed=sum(costs))
            bar.remove_task(attacks_task)
            cache.put(f"adv/sanity/{norm}", {"checks": checks})
        sanity[norm] = checks
        for name, result in checks.items():
            metrics[f"adv/sanity/{norm}/{name}"] = float(bool(result["passed"]))
        metrics[f"adv/sanity/{norm}/passed"] = float(all(r["passed"] for r in checks.values()))
        failed = [k for k, r in checks.items() if not r["passed"]]
        if failed:
            notes.append(
                f"Sanity checks failed for {norm}: {', '.join(failed)} (tolerance {tol:.3f}); "
                "the robust accuracy above may be overestimated."
            )
        bar.advance(task, n_s * sum(sanity_costs[norm]))
    report["sanity"] = sanity
    return examples


def cert_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    device: torch.device,
    metrics: dict[str, float],
    report: dict[str, Any],
    bar: Progress,
    cache: UnitStore,
) -> None:
    """Certified L2 accuracy of the smoothed pipeline (:func:`certify`), one unit of ``cache``
    holding each image's class and radius (so other ``cert.radii`` need no recomputation)."""
    c = cfg.cert
    seed = int(cfg.run.seed)
    idx = torch.from_numpy(seeded_subset(len(y), int(c.max_images), seed + SEED_CERT))
    labels = y[idx]
    purifier = model.purifier
    sigma = purifier.noise_sigma if purifier is not None else float(c.sigma)
    stored = cache.get("cert")
    if stored is not None:
        pred, radius = stored[1]["pred"], stored[1]["radius"]
        wall = float(stored[0]["wall_s"])
    else:
        model.reseed(seed + SEED_CERT, device)
        gen = torch.Generator(device=device).manual_seed(seed + SEED_CERT)

        def bare(xb: Tensor) -> Tensor:
            noise = torch.randn(xb.shape, generator=gen, device=device, dtype=xb.dtype)
            return model.classifier(xb + sigma * noise)

        task = bar.add_task("certify, images", total=len(idx))
        start = time.perf_counter()
        pred, radius = certify(
            model if purifier is not None else bare,  # the purifier draws the noise itself
            to_float(x_u8[idx], device),
            model.classifier.num_classes,
            sigma,
            n0=int(c.n0),
            n=int(c.samples),
            alpha=float(c.alpha),
            batch_size=int(c.batch_size),
            on_image=functools.partial(bar.advance, task),
        )
        wall = time.perf_counter() - start
        bar.remove_task(task)
        cache.put("cert", {"wall_s": wall}, {"pred": pred, "radius": radius})
    right = pred == labels
    metrics["cert/sigma"] = sigma
    metrics["cert/n"] = float(len(labels))
    metrics["cert/samples"] = float(c.samples)
    metrics["cert/n0"] = float(c.n0)
    metrics["cert/alpha"] = float(c.alpha)
    metrics["cert/acc"] = right.double().mean().item()
    metrics["cert/abstain"] = (pred == ABSTAIN).double().mean().item()
    metrics["cert/acr"] = (radius * right).mean().item()
    for r, acc in certified_accuracy(pred, radius, labels, list(c.radii)).items():
        metrics[f"cert/radius/{r:g}/acc"] = acc
    metrics["cert/nfe_per_image"] = float((c.n0 + c.samples) * model.nfe)
    metrics["cert/wall_s"] = wall
    report["cert"] = {"radius": radius.tolist(), "correct": right.tolist()}
    report["meta"]["cert"] = {
        "sigma": sigma,
        "noise": f"the purifier's diffusion to t*={purifier.t_star}" if purifier else "cert.sigma",
        "n0": int(c.n0),
        "samples": int(c.samples),
        "alpha": float(c.alpha),
        "radii": [float(r) for r in c.radii],
    }
