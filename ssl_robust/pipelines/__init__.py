"""Pipelines: build objects from a config, run a phase, write its run directory.

With ``ssl_robust.config`` the only layer that reads the config. Scripts, SLURM jobs and tests
call these functions; each returns its final metrics under the project's hierarchical names.
"""

from ssl_robust.pipelines.denoiser import build_denoiser, train_denoiser
from ssl_robust.pipelines.evaluate import evaluate
from ssl_robust.pipelines.finetune import finetune
from ssl_robust.pipelines.pretrain import build_method, pretrain

__all__ = ["build_denoiser", "build_method", "evaluate", "finetune", "pretrain", "train_denoiser"]
