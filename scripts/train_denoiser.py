#!/usr/bin/env python
"""Train a DDPM denoiser for diffusion purification and denoised views.

python scripts/train_denoiser.py                                  # embedded default (digits)
python scripts/train_denoiser.py ddpm_cifar10 data.root=/data     # a preset from configs/denoiser
python scripts/train_denoiser.py denoiser.unet=small trainer.max_epochs=5
"""

import sys

from ssl_robust.config import ConfigError, DenoiserJobConfig, load_config
from ssl_robust.pipelines.denoiser import train_denoiser

if __name__ == "__main__":
    try:
        cfg = load_config(DenoiserJobConfig, sys.argv[1:], job="denoiser")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    train_denoiser(cfg)
