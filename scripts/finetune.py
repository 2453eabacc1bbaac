#!/usr/bin/env python
"""Fine-tuning of a pretrained encoder on a labeled subset (linear probe or full fine-tune).

python scripts/finetune.py encoder.run=runs/pretrain-simclr-digits          # linear, 10 % labels
python scripts/finetune.py linear_cifar10 encoder.run=runs/simclr-c10 subset.fraction=0.01
python scripts/finetune.py full_cifar10 encoder.run=runs/byol-c10 run.seed=1
"""

import sys

from ssl_robust.config import ConfigError, FinetuneConfig, load_config
from ssl_robust.pipelines.finetune import finetune

if __name__ == "__main__":
    try:
        cfg = load_config(FinetuneConfig, sys.argv[1:], job="finetune")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    try:
        finetune(cfg)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
