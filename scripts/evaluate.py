#!/usr/bin/env python
"""Robustness evaluation of a fine-tuned classifier, optionally behind a diffusion purifier.

python scripts/evaluate.py classifier.run=runs/finetune-x              # everything, defaults
python scripts/evaluate.py quick classifier.run=runs/finetune-x        # configs/evaluate/quick
python scripts/evaluate.py classifier.run=runs/finetune-x purifier.run=runs/denoiser-y
"""

import sys

from ssl_robust.config import ConfigError, EvaluateConfig, load_config
from ssl_robust.pipelines.evaluate import evaluate

if __name__ == "__main__":
    try:
        cfg = load_config(EvaluateConfig, sys.argv[1:], job="evaluate")
        evaluate(cfg)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
