#!/usr/bin/env python
"""Self-supervised pretraining.

python scripts/pretrain.py                                   # embedded default (digits)
python scripts/pretrain.py simclr_cifar10 data.root=/data    # a preset from configs/pretrain
python scripts/pretrain.py method=byol trainer.max_epochs=5  # key=value overrides
"""

import sys

from ssl_robust.config import ConfigError, PretrainConfig, load_config
from ssl_robust.pipelines import pretrain

if __name__ == "__main__":
    try:
        cfg = load_config(PretrainConfig, sys.argv[1:], job="pretrain")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    pretrain(cfg)
