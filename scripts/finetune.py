#!/usr/bin/env python
"""Fine-tuning of a pretrained encoder on a labeled subset (linear probe or full fine-tune), or
the supervised baseline: a backbone trained from random weights on the same subset.

python scripts/finetune.py encoder.run=runs/pretrain-simclr-digits          # linear, 10 % labels
python scripts/finetune.py linear_cifar10 encoder.run=runs/simclr-c10 subset.fraction=0.01
python scripts/finetune.py full_cifar10 encoder.run=runs/byol-c10 run.seed=1
python scripts/finetune.py supervised_cifar10 data.root=/data subset.fraction=0.1  # no pretraining
python scripts/finetune.py --help [SECTION]  # every key, its value and meaning
"""

import sys

from ssl_robust.cli import main

if __name__ == "__main__":
    sys.exit(main("finetune", doc=__doc__))
