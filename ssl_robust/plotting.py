"""The matplotlib plumbing every figure of the project shares: a display-free pyplot, one way to
write a finished figure, and a grid of images for the figures that show data rather than numbers
(a pretraining run's views, an evaluation's examples).

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, run_dir / "plot.png", dpi=110)

    plot_image_grid([ImageRow("clean", x, pred)], labels=y, classes=names, path=run_dir / "x.png")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ssl_robust.files import private_tmp

__all__ = ["ImageRow", "plot_image_grid", "pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(
    fig: Any, path: Path, dpi: int, rect: tuple[float, float, float, float] | None = None
) -> Path:
    """Lay out ``fig`` (the axes within ``rect``, figure fractions, when given: room for a
    figure legend), write it to ``path`` (its folder made if needed) and close it.

    The file is written next to ``path`` and then renamed over it, so a crash mid-write keeps
    the previous figure.
    """
    tmp = private_tmp(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout(rect=rect)
        # The format named: the temp file's suffix is not the figure's.
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or None)
        tmp.replace(path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


_CORRECT, _WRONG = "#1a7f37", "#cf222e"  # green, red


@dataclass
class ImageRow:
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


def _short(name: str, width: int = 10) -> str:
    return name if len(name) <= width else name[: width - 1] + "."


def plot_image_grid(
    rows: Sequence[ImageRow],
    labels: Tensor,
    classes: Sequence[str],
    path: Path,
    column_titles: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """A grid of images, one :class:`ImageRow` per row.

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
    if len(tops) < k:
        raise ValueError(f"{len(tops)} column titles for {k} columns")
    plt = pyplot()
    fig, axes = plt.subplots(
        len(rows), k, figsize=(0.95 * k + 1.3, 1.05 * len(rows) + (0.4 if title else 0.1)),
        squeeze=False,
    )  # fmt: skip
    try:
        _draw_rows(axes, rows, k, tops, labels, name_of)
    except BaseException:
        plt.close(fig)  # save_figure closes it otherwise
        raise
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, dpi=dpi)


def _draw_rows(
    axes: Any,
    rows: Sequence[ImageRow],
    k: int,
    tops: list[str],
    labels: Any,
    name_of: Callable[[int], str],
) -> None:
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
