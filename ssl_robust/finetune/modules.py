"""LightningModules of the fine-tuning phase: a linear probe on cached features, full
fine-tuning of encoder + head, and the test pass (optionally through a purifier).

Metric names: ``train/loss``, ``train/acc``, ``val/acc`` (every epoch, on the evaluation split,
for monitoring only: nothing is selected by it), ``test/acc`` and ``test/acc_purified`` (once,
with the final weights).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_robust.finetune.model import Classifier
from ssl_robust.methods.optim import FollowingLambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup to 1 over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps`` (Loshchilov & Hutter 2017, without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _sgd_cosine(
    module: pl.LightningModule,
    groups: list[dict[str, Any]],
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    warmup_epochs: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """SGD over ``groups`` (each with its ``lr``) and a per-step warmup-cosine schedule whose
    length is the trainer's ``estimated_stepping_batches`` (never a second copy of epochs)."""
    trainer = module.trainer
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    warmup = min(total, int(warmup_epochs * total / epochs))
    optimizer = torch.optim.SGD(
        groups,
        lr=groups[0]["lr"],
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )
    scheduler = FollowingLambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    info = {"optim/total_steps": float(total), "optim/warmup_steps": float(warmup)}
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
    }, info


def _check_optim(lr: float, momentum: float, weight_decay: float, warmup_epochs: float) -> None:
    if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or warmup_epochs < 0:
        raise ValueError(
            f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0, warmup_epochs >= 0; got "
            f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
            f"warmup_epochs={warmup_epochs}"
        )


class _Classification(pl.LightningModule):
    """Training, validation and test steps of a classifier on ``(inputs, labels)`` batches:
    cross-entropy and accuracy of ``self(inputs)``, logged as ``<stage>/loss`` and
    ``<stage>/acc`` (epoch means). Subclasses define ``forward`` and the optimiser."""

    def _step(self, batch: Any, stage: str, suffix: str = "") -> Tensor:
        inputs, labels = batch[0], batch[1]
        logits = self(inputs)  # (B, K)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        n = labels.shape[0]
        for name, value in (("loss", loss), ("acc", acc)):
            self.log(
                f"{stage}/{name}{suffix}",
                value,
                batch_size=n,
                on_epoch=True,
                on_step=False,
                # The training loss and accuracy on the progress bar (epoch means: logging per
                # step too would rename the logged metrics train/loss_step, train/loss_epoch).
                prog_bar=stage == "train",
                add_dataloader_idx=False,
                # Under DDP each rank sees a shard of the evaluation split: the epoch means of
                # validation and test are over every rank's images.
                sync_dist=stage != "train",
            )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Loader 1, when there is one: the shifted twin of the evaluation split.
        self._step(batch, "val", "_shift" if dataloader_idx == 1 else "")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")


class LinearProbe(_Classification):
    """A linear classifier on frozen features; batches are ``(features (B, D), labels (B,))``.

    Args:
        feat_dim: Feature dimension D.
        num_classes: Number of classes K.
        lr: Learning rate (peak of the schedule).
        momentum: SGD momentum.
        weight_decay: L2 penalty on the linear weights.
        nesterov: Nesterov momentum.
        warmup_epochs: Linear warmup length.
        feat_mean: (D,) feature mean subtracted before the linear layer (default 0).
        feat_std: (D,) feature std divided out before the linear layer (default 1).
    """

    feat_mean: Tensor
    feat_std: Tensor

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        warmup_epochs: float = 0.0,
        feat_mean: Tensor | None = None,
        feat_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_optim(lr, momentum, weight_decay, warmup_epochs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.head = nn.Linear(feat_dim, num_classes)
        mean = torch.zeros(feat_dim) if feat_mean is None else feat_mean.float().clone()
        std = torch.ones(feat_dim) if feat_std is None else feat_std.float().clone()
        if mean.shape != (feat_dim,) or std.shape != (feat_dim,) or (std <= 0).any():
            raise ValueError(f"feat_mean and feat_std must be ({feat_dim},), std > 0")
        self.register_buffer("feat_mean", mean)
        self.register_buffer("feat_std", std)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov, self.warmup_epochs = nesterov, warmup_epochs
        self.derived: dict[str, float] = {}

    def forward(self, features: Tensor) -> Tensor:
        return self.head((features - self.feat_mean) / self.feat_std)  # (B, K)

    def folded_head(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` on raw features: W' = W / s, b' = b - W' m."""
        w = self.head.weight.detach() / self.feat_std  # (K, D)
        b = self.head.bias.detach() - w @ self.feat_mean  # (K,)
        out = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            out.weight.copy_(w)
            out.bias.copy_(b)
        return out

    def configure_optimizers(self) -> Any:
        groups = [
            {"name": "head", "params": [self.head.weight], "lr": self.lr},
            {"name": "head_bias", "params": [self.head.bias], "lr": self.lr, "weight_decay": 0.0},
        ]
        config, info = _sgd_cosine(
            self, groups, self.momentum, self.weight_decay, self.nesterov, self.warmup_epochs
        )
        self.derived = {"optim/lr": self.lr, **info}
        return config


class FineTuner(_Classification):
    """Full fine-tuning of a :class:`Classifier`; batches are ``(images in [0, 1], labels)``.

    The pretrained encoder gets a smaller learning rate than the fresh head, so the head can
    settle before large gradients through it disturb the pretrained features.

    Args:
        classifier: Encoder + head (normalisation inside).
        lr: Head learning rate (peak of the schedule).
        encoder_lr: Encoder learning rate (peak of the schedule).
        momentum: SGD momentum.
        weight_decay: L2 penalty on conv/linear weights (not on norms and biases).
        nesterov: Nesterov momentum.
        warmup_epochs: Linear warmup length.
    """

    def __init__(
        self,
        classifier: Classifier,
        lr: float = 0.1,
        encoder_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        _check_optim(lr, momentum, weight_decay, warmup_epochs)
        if encoder_lr < 0:
            raise ValueError(f"encoder_lr must be >= 0, got {encoder_lr}")
        self.classifier = classifier
        self.lr, self.encoder_lr, self.momentum = lr, encoder_lr, momentum
        self.weight_decay, self.nesterov, self.warmup_epochs = weight_decay, nesterov, warmup_epochs
        self.derived: dict[str, float] = {}
        if self.frozen_encoder:
            classifier.encoder.requires_grad_(False)
            classifier.encoder.eval()

    @property
    def frozen_encoder(self) -> bool:
        """``encoder_lr == 0``: the encoder is not trained at all, its BatchNorm statistics
        included (it stays in eval mode, as for a linear probe)."""
        return self.encoder_lr == 0

    def train(self, mode: bool = True) -> FineTuner:
        # Lightning switches the whole module to train mode each epoch (and back after each
        # validation); a frozen encoder stays in eval mode, or its BatchNorm running
        # statistics would follow the labeled subset.
        super().train(mode)
        if self.frozen_encoder:
            self.classifier.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x)  # (B, K)

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = []
        for name, module, lr in (
            ("encoder", self.classifier.encoder, self.encoder_lr),
            ("head", self.classifier.head, self.lr),
        ):
            decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
            no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
            if not decay and not no_decay:
                continue  # a frozen encoder: nothing to optimise
            groups.append({"name": name, "params": decay, "lr": lr})
            groups.append(
                {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
            )
        config, info = _sgd_cosine(
            self, groups, self.momentum, self.weight_decay, self.nesterov, self.warmup_epochs
        )
        self.derived = {"optim/lr": self.lr, "optim/encoder_lr": self.encoder_lr, **info}
        return config


class ClassifierTest(pl.LightningModule):
    """The test pass on images in [0, 1]: ``test/acc`` and, with a purifier in front,
    ``test/acc_purified`` (one purification per image, noise from a generator seeded once).

    Args:
        classifier: The trained classifier.
        purifier: Maps [0, 1] images to purified [0, 1] images (``Purifier``), or None.
        seed: Seed of the purification noise.
        clean: Also log ``test/acc`` on the unpurified images.
    """

    def __init__(
        self,
        classifier: Classifier,
        purifier: nn.Module | None = None,
        seed: int = 0,
        clean: bool = True,
    ) -> None:
        super().__init__()
        if purifier is None and not clean:
            raise ValueError("nothing to test: give a purifier or set clean=True")
        self.classifier = classifier
        self.purifier = purifier
        self.seed = seed
        self.clean = clean
        self._generator: torch.Generator | None = None
        self._counts: dict[str, Tensor] = {}

    def on_test_start(self) -> None:
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def on_test_epoch_start(self) -> None:
        # (correct, seen) per metric on this rank; summed over ranks at the end.
        self._counts = {}

    def _count(self, name: str, logits: Tensor, labels: Tensor) -> None:
        correct = (logits.argmax(1) == labels).sum()
        counts = torch.stack([correct, correct.new_tensor(labels.shape[0])]).double()
        self._counts[name] = self._counts.get(name, torch.zeros_like(counts)) + counts

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, labels = batch[0], batch[1]
        if self.clean:
            self._count("test/acc", self.classifier(x), labels)
        if self.purifier is not None:
            purified = self.purifier(x, self._generator)  # (B, C, H, W) in [0, 1]
            self._count("test/acc_purified", self.classifier(purified), labels)

    def on_test_epoch_end(self) -> None:
        # Under DDP each rank tests a shard of the split: the accuracy is the share of correct
        # predictions over every rank's images (exact but for the few images the distributed
        # sampler repeats to give every rank as many), not rank 0's share.
        names = ["test/acc"] if self.clean else []
        if self.purifier is not None:
            names.append("test/acc_purified")
        for name in names:
            empty = torch.zeros(2, dtype=torch.float64, device=self.device)
            counts = self._counts.get(name, empty)
            total = self.trainer.strategy.reduce(counts, reduce_op="sum")
            acc = total[0] / total[1].clamp(min=1)
            self.log(name, acc.float(), sync_dist=False)
