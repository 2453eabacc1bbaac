#!/usr/bin/env python
"""Train a DDPM denoiser for diffusion purification and denoised views.

python scripts/train_denoiser.py                                  # embedded default (digits)
python scripts/train_denoiser.py ddpm_cifar10 data.root=/data     # a preset from configs/denoiser
python scripts/train_denoiser.py denoiser.unet=small trainer.max_epochs=5
python scripts/train_denoiser.py --help [SECTION]  # every key, its value and meaning
"""

import sys

from ssl_robust.cli import main

if __name__ == "__main__":
    sys.exit(main("denoiser", doc=__doc__))
