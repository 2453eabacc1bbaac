"""Optimiser, learning-rate scaling and schedule: derived hyperparameters in one place."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

OPTIMIZERS = ("lars", "sgd")
LR_SCALING = ("linear", "none", "sqrt")


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build the optimiser; the learning rate is given at ``reference_batch``."""

    name: str = "sgd"
    base_lr: float = 0.06
    reference_batch: int = 128
    lr_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    # Norms and biases decay too (lightly's CIFAR benchmarks); else they are exempt.
    decay_norm_bias: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose from {list(OPTIMIZERS)}")
        if self.lr_scaling not in LR_SCALING:
            raise ValueError(
                f"unknown lr_scaling {self.lr_scaling!r}; choose from {list(LR_SCALING)}"
            )
        if self.base_lr <= 0 or self.reference_batch < 1 or self.warmup_epochs < 0:
            raise ValueError("base_lr must be > 0, reference_batch >= 1, warmup_epochs >= 0")


class WarmupCosine(CosineWarmupScheduler):
    """lightly's warm-up + cosine schedule that follows the current run's length on resume.

    LambdaLR checkpoints its attributes, so a run resumed with a larger ``max_epochs`` would
    otherwise keep the old schedule length and sit at the final learning rate.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keep = ("max_epochs", "warmup_epochs")
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in keep})
        follow_schedule(self)


class FollowingLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR whose rates follow its (current) lambdas when restored: a run resumed with a
    larger ``max_epochs`` continues along the longer schedule from its first step. (A plain
    function lambda is not checkpointed, so the new one is used from the next step anyway.)"""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        follow_schedule(self)


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's rates to the scheduler's at its restored step. The rates restored
    with the optimizer came from the old schedule; with an unchanged one this is a no-op, so an
    ordinary resume stays exact."""
    for group, base_lr, lr_lambda in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The learning-rate scaling rule (Goyal et al. 2017 linear; Krizhevsky 2014 sqrt).

    ``global_batch`` = per-device batch x devices x nodes x gradient accumulation.
    """
    ratio = global_batch / reference_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr_scaling {rule!r}; choose from {list(LR_SCALING)}")


def split_weight_decay(
    modules: Iterable[nn.Module],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameters with weight decay (conv/linear weights) and without (norms, biases)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def configure(
    module: pl.LightningModule,
    spec: OptimizerSpec,
    batch_size_per_device: int,
    model_modules: list[nn.Module],
    probe: nn.Module | None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Build ``configure_optimizers``'s return value and the derived numbers to log.

    The global batch comes from the trainer (world size, accumulation); the schedule length from
    ``trainer.estimated_stepping_batches``, never from a second copy of ``max_epochs``.
    """
    trainer = module.trainer
    global_batch = batch_size_per_device * trainer.world_size * trainer.accumulate_grad_batches
    lr = scaled_lr(spec.base_lr, global_batch, spec.reference_batch, spec.lr_scaling)
    decay, no_decay = split_weight_decay(model_modules)
    if spec.decay_norm_bias:  # one group, every parameter decayed (and adapted by LARS)
        groups: list[dict[str, Any]] = [{"name": "model", "params": decay + no_decay}]
    else:
        groups = [
            {"name": "model", "params": decay},
            # LARS (You et al. 2017) and SimCLR exclude norms and biases from decay and
            # adaptation.
            {"name": "model_no_decay", "params": no_decay, "weight_decay": 0.0},
        ]
    if probe is not None:
        groups.append(
            {"name": "online_probe", "params": list(probe.parameters()), "weight_decay": 0.0}
        )
    optimizer: torch.optim.Optimizer
    if spec.name == "lars":
        optimizer = LARS(groups, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    total_steps = int(trainer.estimated_stepping_batches)
    steps_per_epoch = total_steps / max(1, trainer.max_epochs or 1)
    # Leave at least one step of cosine decay (lightly's schedule needs a non-empty decay).
    asked = int(spec.warmup_epochs * steps_per_epoch)
    warmup_steps = min(max(0, total_steps - 1), asked)
    if asked > warmup_steps:
        rank_zero_warn(
            f"optim.warmup_epochs={spec.warmup_epochs:g} is at least the whole run "
            f"({trainer.max_epochs} epochs, {total_steps} steps): the warm-up is cut to "
            f"{warmup_steps} steps and the learning rate peaks only at the end"
        )
    scheduler = WarmupCosine(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
    info = {
        "optim/global_batch": float(global_batch),
        "optim/lr": lr,
        "optim/total_steps": float(total_steps),
        "optim/warmup_steps": float(warmup_steps),
    }
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
    }, info
