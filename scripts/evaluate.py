#!/usr/bin/env python
r"""Robustness evaluation of a fine-tuned classifier, optionally behind a diffusion purifier.

python scripts/evaluate.py classifier.run=runs/finetune-x              # everything, defaults
python scripts/evaluate.py quick classifier.run=runs/finetune-x        # configs/evaluate/quick
python scripts/evaluate.py classifier.run=runs/finetune-x purifier.run=runs/denoiser-y
python scripts/evaluate.py quick classifier.run=runs/finetune-x shift.ce_reference=runs/eval-sup
python scripts/evaluate.py quick classifier.run=runs/finetune-x natural.sets=[/data/CIFAR-10.1] \
    "ood.datasets=[svhn@/data/svhn,cifar100@/data]"
python scripts/evaluate.py --help [SECTION]  # every key, its value and meaning
"""

import sys

from ssl_robust.cli import main

if __name__ == "__main__":
    sys.exit(main("evaluate", doc=__doc__))
