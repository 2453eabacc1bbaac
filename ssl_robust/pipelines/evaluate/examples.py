"""The report's example figures: the same images clean, corrupted, attacked and purified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from ssl_robust.evaluate.cifar_c import textures_for_frost
from ssl_robust.evaluate.corruptions import corrupt
from ssl_robust.evaluate.examples import perturbation_image
from ssl_robust.pipelines.evaluate.adversarial import attacked_indices
from ssl_robust.pipelines.evaluate.setup import SEED_EXAMPLES, Pipeline
from ssl_robust.pipelines.evaluate.units import to_float
from ssl_robust.plotting import ImageRow, plot_image_grid


def examples_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    corruptions: list[str],
    severities: list[int],
    threats: list[dict[str, Any]],
    adv_examples: dict[str, Tensor],
    device: torch.device,
    run_dir: Path,
    report: dict[str, Any],
) -> None:
    """The report's example figures, from the first ``eval.examples`` images of the attacked
    subset (so the adversarial examples are the attack's own):

    - ``plots/examples.png``: each image clean, then (behind a purifier) purified, then per
      threat attacked, its perturbation made visible, and purified;
    - ``plots/corruption_examples.png``: the first image under every corruption and severity
      of the grid (generated here, with the grid's frost textures).

    Each classified row shows the pipeline's prediction (one purification, from its own seeded
    stream); nothing here enters a metric.
    """
    k = int(cfg.eval.examples)
    seed = int(cfg.run.seed)
    idx = attacked_indices(cfg, len(y))[:k]
    # Each PGD unit keeps the adversarial examples of its block's first images: with the
    # attacks in shards, block 1 may hold fewer than eval.examples, and every row shows as
    # many images as the shortest.
    kept = [len(adv_examples[t["name"]]) for t in threats if t["name"] in adv_examples]
    short = min(kept, default=len(idx))
    fewer = short < len(idx)
    if fewer:
        idx = idx[:short]
    x = to_float(x_u8[idx], device)
    labels = y[idx]
    classes = list(report["meta"].get("classes") or [])
    if not classes:
        classes = [str(c) for c in range(model.classifier.num_classes)]
    purifier = model.purifier
    model.reseed(seed + SEED_EXAMPLES, device)

    @torch.no_grad()
    def look(inp: Tensor) -> tuple[Tensor | None, Tensor]:
        """What the classifier sees (the purified input, or None) and its predictions."""
        seen: list[Tensor] = []
        preds: list[Tensor] = []
        for start in range(0, len(inp), int(cfg.eval.batch_size)):
            b = inp[start : start + int(cfg.eval.batch_size)].to(device)
            if purifier is not None:
                b = purifier(b, None if purifier.fixed_noise else model.generator)
                seen.append(b.float().cpu())
            preds.append(model.classifier(b).argmax(1).cpu())
        return (torch.cat(seen) if seen else None), torch.cat(preds)

    def rows_for(name: str, inp: Tensor) -> list[ImageRow]:
        purified, preds = look(inp)
        rows = [ImageRow(name, inp.cpu(), preds)]
        if purified is not None:
            rows.append(ImageRow("purified", purified))
        return rows

    rows = rows_for("clean", x)
    for t in threats:
        x_adv = adv_examples.get(t["name"])
        if x_adv is None:
            continue
        x_adv = x_adv[: len(x)]
        name = f"{t['norm']} {t['eps_label']}"
        attacked = rows_for(name, x_adv)
        attacked.insert(
            1, ImageRow("perturbation", perturbation_image(x_adv, x[: len(x_adv)].cpu()))
        )
        rows += attacked
    words = [
        f"The first {len(x)} {'attacked' if threats else 'evaluation'} images"
        + (", one purification each." if purifier is not None else ".")
    ]
    if purifier is not None:
        words.append("purified: the purifier's output, what the classifier sees.")
    if fewer:
        note = (
            f"The example figure shows {short} of the eval.examples={k} images: the PGD attacks "
            f"ran in adv.shards={int(cfg.adv.shards)} blocks, and the first holds only "
            f"{short} of the attacked images."
        )
        words.append(note)
        report["notes"].append(note)
    if any(t["name"] in adv_examples for t in threats):
        words.append(
            "perturbation: the adversarial change (mid grey: none), scaled per image to its "
            "largest change."
        )
    path = plot_image_grid(
        rows,
        labels,
        classes,
        run_dir / "plots" / "examples.png",
        title="column: true class; under each image: the prediction (green right, red wrong)",
    )
    figures = report.setdefault("figures", {})
    figures["examples"] = {
        "path": str(path.relative_to(run_dir)),
        "text": " ".join(words),
        "labels": labels.tolist(),
        "rows": _rows_json(rows),
    }
    if not corruptions:
        return
    textures = textures_for_frost(str(cfg.shift.frost))
    gen = torch.Generator(device=device).manual_seed(seed + SEED_EXAMPLES)
    first = x[:1]
    grid = [torch.cat([first, *(corrupt(first, c, s, gen, textures) for s in severities)])
            for c in corruptions]  # fmt: skip
    flat = torch.cat(grid)  # (C * (1 + S), 3, H, W)
    _, preds = look(flat)
    width = 1 + len(severities)
    rows = [
        ImageRow(c, grid[i].cpu(), preds[i * width : (i + 1) * width])
        for i, c in enumerate(corruptions)
    ]
    path = plot_image_grid(
        rows,
        labels[:1].expand(width),
        classes,
        run_dir / "plots" / "corruption_examples.png",
        column_titles=["clean", *(f"severity {s}" for s in severities)],
        title=f"true class: {classes[int(labels[0])]}; under each image: the prediction",
    )
    folder = bool(cfg.shift.cifar_c_dir)
    figures["corruption_examples"] = {
        "path": str(path.relative_to(run_dir)),
        "labels": labels[:1].tolist(),
        "rows": _rows_json(rows),
        "text": "One image under every corruption and severity of the grid"
        + (", each a purification of its own" if purifier is not None else "")
        + (
            " (generated on the fly for the figure; the grid was read from the folder)"
            if folder
            else ""
        )
        + ".",
    }


def _rows_json(rows: list[ImageRow]) -> list[dict[str, Any]]:
    """A figure's rows as the report records them: name and predictions (None: unclassified)."""
    return [{"name": r.name, "preds": None if r.preds is None else r.preds.tolist()} for r in rows]
