"""View transforms on the CPU path: lightly's SimCLR/BYOL transforms with explicit parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torchvision.transforms as T
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
)


@dataclass(frozen=True)
class ViewParams:
    """The view-augmentation parameters shared by the CPU and the GPU path."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_scale: float = 0.08
    hf_prob: float = 0.5
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    random_gray_scale: float = 0.2
    gaussian_blur: float = 0.0

    def lightly_kwargs(self) -> dict[str, Any]:
        kw = asdict(self)
        kw["normalize"] = {"mean": list(kw.pop("mean")), "std": list(kw.pop("std"))}
        return kw


def view_transform(method: str, params: ViewParams) -> Callable[[Any], list[Any]]:
    """The two-view transform lightly uses for ``method`` (returns a list of 2 tensors)."""
    kw = params.lightly_kwargs()
    if method == "simclr":
        return SimCLRTransform(**kw)
    if method == "byol":
        # BYOL's views differ in blur (1.0 vs 0.1) and solarisation (0 vs 0.2) probabilities
        # (Grill et al. 2020, Table 6); with blur off at small sizes both blurs are 0.
        view1 = BYOLView1Transform(**kw)
        view2 = BYOLView2Transform(**{**kw, "gaussian_blur": kw["gaussian_blur"] * 0.1})
        return BYOLTransform(view_1_transform=view1, view_2_transform=view2)
    raise ValueError(f"no view transform for method {method!r}; choose from ['byol', 'simclr']")


def gpu_view_transforms(method: str, params: ViewParams) -> list[Any]:
    """The device-side twin of :func:`view_transform`: one batched transform per view."""
    from ssl_robust.data import gpu_views as gv

    kw = params.lightly_kwargs()
    if method == "simclr":
        return gv.simclr_views(**kw)
    if method == "byol":
        p = kw.pop("gaussian_blur")
        return [
            gv.BatchViewTransform(
                **{**gv.BYOL_DEFAULTS, **gv.BYOL_VIEW1, **kw, "gaussian_blur": p}
            ),
            gv.BatchViewTransform(
                **{**gv.BYOL_DEFAULTS, **gv.BYOL_VIEW2, **kw, "gaussian_blur": 0.1 * p}
            ),
        ]
    raise ValueError(f"no view transform for method {method!r}; choose from ['byol', 'simclr']")


def eval_transform(input_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """Resize (if needed) + to tensor + normalise: what validation and feature extraction see."""
    return T.Compose(
        [T.Resize(input_size), T.CenterCrop(input_size), T.ToTensor(), T.Normalize(mean, std)]
    )


def gpu_eval_transform(input_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """The device-side twin of :func:`eval_transform`, for batches already at ``input_size``
    (uint8 (B, C, H, W) -> normalised float; the same arithmetic as ToTensor + Normalize)."""
    from ssl_robust.data import gpu_views as gv

    return gv.eval_transform(input_size, {"mean": list(mean), "std": list(std)})
