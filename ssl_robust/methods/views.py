"""How the views of a batch go through a network: one pass per view, or all in one pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def forward_views(
    fn: Callable[[Tensor], tuple[Tensor, ...]], views: Sequence[Tensor], joint: bool
) -> list[tuple[Tensor, ...]]:
    """``fn``'s outputs for each view.

    The two differ through BatchNorm, whose training-mode statistics are those of the batch
    a pass sees:

    - ``joint=False``: ``fn`` runs once per view, so each view is normalised by its own
      statistics, as lightly's CIFAR-10 benchmark (the anchors this project measures against)
      and solo-learn run them;
    - ``joint=True``: ``fn`` runs once on the views concatenated along the batch, so they
      share statistics (one pass of twice the batch, as SimCLR's TPU implementation ran).

    Args:
        fn: A batch-first network that returns a tuple of (batch, ...) tensors.
        views: Batches (each view's outputs keep its own batch size).
        joint: One pass for all the views.

    Returns:
        One tuple per view, in the order of ``views``.
    """
    if not joint:
        return [fn(v) for v in views]
    outs = fn(torch.cat(list(views)))
    sizes = [len(v) for v in views]
    parts = [out.split(sizes) for out in outs]
    return [tuple(p[i] for p in parts) for i in range(len(views))]
