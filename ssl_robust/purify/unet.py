"""UNet presets, the DDPM noise schedule, and the diffusers folder format for denoisers.

A denoiser on disk is a diffusers folder::

    folder/
      model_index.json     # makes the folder loadable as a diffusers DDPMPipeline too
      unet/                # UNet2DModel.save_pretrained (config.json + safetensors)
      scheduler/           # DDPMScheduler.save_pretrained (scheduler_config.json)

``load_denoiser`` reads that layout and also a plain UNet folder a user already has, such as a
snapshot of ``google/ddpm-cifar10-32`` (``config.json``, weights and ``scheduler_config.json`` at
the top level). Only local paths are read; nothing here reaches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from ssl_robust.files import shared_modes, unfinished_note

# Keyword arguments for UNet2DModel, without sample_size / in_channels / out_channels.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~68k parameters: CPU tests only. No attention anywhere (mid block included) to stay fast.
    "tiny": {
        "block_out_channels": (16, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "add_attention": False,
    },
    # ~1.1M parameters: quick denoisers for smoke runs; attention at the middle resolution.
    "small": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    },
    # google/ddpm-cifar10-32 (Ho et al. 2020, CIFAR-10 model), 35.7M parameters. The last four
    # entries are the legacy settings of the converted TF checkpoint; they do not change the
    # parameter count but must match for its weights to compute the same function.
    "ddpm-cifar10": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
    },
}


def build_unet(
    preset: str, sample_size: int, in_channels: int = 3, dropout: float = 0.0
) -> UNet2DModel:
    """Builds a freshly initialised epsilon-prediction UNet.

    Args:
        preset: A key of ``UNET_PRESETS``.
        sample_size: Image height and width the UNet is built for.
        in_channels: Image channels (the output has the same number).
        dropout: Dropout probability in the residual blocks (active in train mode only).

    Returns:
        The UNet.

    Raises:
        ValueError: On an unknown preset or a non-positive size / channel count.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(UNET_PRESETS)}")
    if sample_size < 1 or in_channels < 1:
        raise ValueError(
            f"sample_size and in_channels must be positive, got {sample_size} and {in_channels}"
        )
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        dropout=dropout,
        **UNET_PRESETS[preset],
    )


def make_scheduler(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DDPMScheduler:
    """The DDPM noise schedule of Ho et al. (2020, Sec. 4): linear betas, epsilon prediction.

    ``clip_sample=True`` clips the predicted x0 to the data range [-1, 1] during sampling, as in
    the DDPM reference sampler and the google/ddpm-* scheduler configs.

    Args:
        num_train_timesteps: Number of forward diffusion steps T.
        beta_start: beta_1.
        beta_end: beta_T.

    Returns:
        The scheduler.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


def save_denoiser(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | Path) -> Path:
    """Writes ``unet`` and ``scheduler`` as a diffusers folder (see the module docstring).

    Args:
        unet: The UNet (its weights are written as safetensors).
        scheduler: The noise schedule it was trained with.
        folder: Destination; created if missing, files in it are overwritten.

    Returns:
        The folder as a Path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    shared_modes(folder / "unet")  # diffusers writes its safetensors private (0600)
    model_index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return folder


def load_denoiser(folder: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Loads a denoiser from a local diffusers folder.

    The UNet is read from ``folder/unet/`` or, failing that, from ``folder/`` itself (a bare
    ``UNet2DModel.save_pretrained`` folder or a downloaded model snapshot). The schedule is read
    from ``folder/scheduler/`` or ``folder/scheduler_config.json``; without either, the default
    linear schedule of ``make_scheduler()`` is used (the one every DDPM CIFAR model uses).

    Args:
        folder: Local path.

    Returns:
        ``(unet, scheduler)``, the UNet in eval mode.

    Raises:
        FileNotFoundError: When the folder does not exist or holds no UNet config or weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"denoiser folder {str(folder)!r} does not exist")
    if (folder / "unet" / "config.json").is_file():
        unet_dir = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_dir = folder
    else:
        expected = [str(folder / "unet" / "config.json"), str(folder / "config.json")]
        raise FileNotFoundError(
            f"no diffusers UNet in {str(folder)!r}: expected {expected[0]!r} or {expected[1]!r}"
            f"{unfinished_note(folder)}"
        )
    weights = [
        p
        for p in unet_dir.iterdir()
        if p.name.startswith("diffusion_pytorch_model") and p.suffix in (".safetensors", ".bin")
    ]
    if not weights:
        raise FileNotFoundError(
            f"no UNet weights (diffusion_pytorch_model.safetensors or .bin) in {str(unet_dir)!r}"
        )
    unet = UNet2DModel.from_pretrained(
        unet_dir,
        local_files_only=True,
        low_cpu_mem_usage=False,  # no `accelerate` needed
    )

    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    elif (folder / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    else:
        scheduler = make_scheduler()
    unet.eval()
    return unet, scheduler
