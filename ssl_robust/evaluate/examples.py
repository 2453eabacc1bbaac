"""What the evaluation's example figures show beyond the images themselves."""

from __future__ import annotations

from torch import Tensor

__all__ = ["perturbation_image"]


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
