"""Diffusion purification: UNet denoisers, their training, and the Purifier module."""

from ssl_robust.purify.denoiser import DenoiserModule, purification_grid, save_image_grid
from ssl_robust.purify.purifier import (
    SAMPLERS,
    Purifier,
    ddim_schedule,
    ddim_step,
    ddpm_step,
    predict_x0,
    t_star_from_sigma,
)
from ssl_robust.purify.unet import (
    UNET_PRESETS,
    build_unet,
    load_denoiser,
    make_scheduler,
    save_denoiser,
)

__all__ = [
    "SAMPLERS",
    "UNET_PRESETS",
    "DenoiserModule",
    "Purifier",
    "build_unet",
    "ddim_schedule",
    "ddim_step",
    "ddpm_step",
    "load_denoiser",
    "make_scheduler",
    "predict_x0",
    "purification_grid",
    "save_denoiser",
    "save_image_grid",
    "t_star_from_sigma",
]
