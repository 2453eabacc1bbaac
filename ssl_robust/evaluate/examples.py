"""Figures of example images: what the evaluated pipeline was shown, what its purifier made of
it, and what it predicted.

Numbers say how often a pipeline fails; these figures show how. A reader checks at a glance
that a corruption looks like its name, that an attack's perturbation stays within its radius,
and what a purifier does to a clean and to an adversarial image.

    rows = [ExampleRow("clean", x, pred), ExampleRow("perturbation", perturbation_image(x_adv, x))]
    plot_image_grid(rows, labels=y, classes=names, path=run_dir / "plots" / "examples.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ssl_robust.plotting import pyplot, save_figure

__all__ = ["ExampleRow", "perturbation_image", "plot_image_grid"]

_CORRECT, _WRONG = "#1a7f37", "#cf222e"  # green, red


@dataclass
class ExampleRow:
    """One row of a figure: a name, K images and (optionally) the predicted class of each.

    Attributes:
        name: Shown left of the row.
        images: (K, 3, H, W) floats in [0, 1].
        preds: (K,) predicted classes, shown under the images in green when right and red
            when wrong; None for rows that were not classified (a perturbation, a purified
            image whose prediction the row above shows).
    """

    name: str
    images: Tensor
    preds: Tensor | None = None


def perturbation_image(x_adv: Tensor, x: Tensor) -> Tensor:
    """An adversarial perturbation made visible: 0.5 + delta / (2 max |delta|) per image, so mid
    grey is no change and the largest change of each image reaches black or white.

    Args:
        x_adv: (K, C, H, W) adversarial images.
        x: (K, C, H, W) the images they were made from.

    Returns:
        (K, C, H, W) floats in [0, 1].
    """
    delta = x_adv - x
    scale = delta.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
    return (0.5 + delta / (2 * scale)).clamp(0, 1)


def _short(name: str, width: int = 10) -> str:
    return name if len(name) <= width else name[: width - 1] + "."


def plot_image_grid(
    rows: Sequence[ExampleRow],
    labels: Tensor,
    classes: Sequence[str],
    path: Path,
    column_titles: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """A grid of images, one :class:`ExampleRow` per row.

    Args:
        rows: The rows; every row holds the same number K of images (or fewer: the rest of the
            row stays empty).
        labels: (K,) the true class of each column.
        classes: Class names, indexed by class.
        path: The PNG to write.
        column_titles: Titles over the columns; default: each column's true class.
        title: The figure's title.
        dpi: Resolution.

    Returns:
        ``path``.
    """
    if not rows:
        raise ValueError("no rows to plot")
    k = max(len(r.images) for r in rows)
    if len(labels) < k:
        raise ValueError(f"{len(labels)} labels for {k} columns")
    names = [str(c) for c in classes]

    def name_of(c: int) -> str:
        return _short(names[c] if 0 <= c < len(names) else str(c))

    tops = list(column_titles) if column_titles is not None else [name_of(int(c)) for c in labels]
    plt = pyplot()
    fig, axes = plt.subplots(
        len(rows), k, figsize=(0.95 * k + 1.3, 1.05 * len(rows) + (0.4 if title else 0.1)),
        squeeze=False,
    )  # fmt: skip
    for i, row in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0:
                ax.set_title(tops[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row.name, fontsize=7, rotation=0, ha="right", va="center")
            if j >= len(row.images):
                continue
            img = row.images[j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax.imshow(img, interpolation="nearest")
            if row.preds is not None:
                pred = int(row.preds[j])
                right = pred == int(labels[j])
                ax.set_xlabel(name_of(pred), fontsize=7, color=_CORRECT if right else _WRONG)
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, dpi=dpi)
