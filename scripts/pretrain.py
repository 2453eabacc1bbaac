#!/usr/bin/env python
"""Self-supervised pretraining.

python scripts/pretrain.py                                   # embedded default (digits)
python scripts/pretrain.py simclr_cifar10 data.root=/data    # a preset from configs/pretrain
python scripts/pretrain.py method=byol trainer.max_epochs=5  # key=value overrides
python scripts/pretrain.py --help [SECTION]                  # every key, its value and meaning
"""

import sys

from ssl_robust.cli import main

if __name__ == "__main__":
    sys.exit(main("pretrain", doc=__doc__))
