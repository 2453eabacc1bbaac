"""BYOL (Grill et al. 2020): predict a momentum target network's projection of the other view."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule

from ssl_robust.methods import optim
from ssl_robust.methods.monitor import OnlineMonitor, monitor_validation_step
from ssl_robust.methods.views import forward_views
from ssl_robust.models.backbones import Encoder


class BYOL(pl.LightningModule):
    def __init__(
        self,
        backbone: Encoder,
        num_classes: int,
        batch_size_per_device: int,
        optimizer: optim.OptimizerSpec,
        proj_hidden_dim: int = 1024,
        proj_out_dim: int = 256,
        pred_hidden_dim: int = 1024,
        base_tau: float = 0.99,
        knn_k: int = 200,
        knn_t: float = 0.1,
        online_probe: bool = True,
        joint_views: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= base_tau <= 1.0:
            raise ValueError(f"base_tau must be in [0, 1], got {base_tau}")
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        self.backbone = backbone
        self.joint_views = joint_views  # see methods.views.forward_views
        self.projection_head = BYOLProjectionHead(backbone.feat_dim, proj_hidden_dim, proj_out_dim)
        self.prediction_head = BYOLPredictionHead(proj_out_dim, pred_hidden_dim, proj_out_dim)
        # The target network: an exponential moving average of the online one, never trained.
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.monitor = OnlineMonitor(backbone.feat_dim, num_classes, knn_k, knn_t, online_probe)
        self.base_tau = base_tau
        self.optimizer_spec = optimizer
        self.batch_size_per_device = batch_size_per_device
        self.derived: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def momentum(self) -> float:
        """tau = 1 - (1 - tau_0)(cos(pi k / K) + 1) / 2 over K optimizer steps (BYOL Sec. 3.2)."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_schedule(min(self.global_step, total), total, self.base_tau, 1.0)

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)  # (B, D)
        return features, self.prediction_head(self.projection_head(features))

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.projection_head_momentum(self.backbone_momentum(x)),)

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetrised BYOL loss 1 - (cos(p0, z1) + cos(p1, z0)) / 2 in [0, 2], and the first
        view's features.

        lightly's benchmark loss, 0.5 (criterion(p0, z1) + criterion(p1, z0)) with criterion
        the negative cosine, plus 1: the same gradients, so its learning rate and weight decay
        (the presets') train as they did for its 86.8 anchor.
        """
        (f0, p0), (_, p1) = forward_views(self._online, views, self.joint_views)
        (z0,), (z1,) = forward_views(self._target, views, self.joint_views)
        loss = 1.0 + 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return loss, f0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tau = self.momentum()
        # Once per optimiser step, at the first batch of its accumulation window (Lightning
        # starts a window every `accumulate_grad_batches` batches of an epoch): a target
        # pulled towards unchanged online weights k times would move by tau^k instead of tau.
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            update_momentum(self.backbone, self.backbone_momentum, m=tau)
            update_momentum(self.projection_head, self.projection_head_momentum, m=tau)
        views, labels = batch
        loss, features = self.ssl_loss(views)
        probe_loss, probe_acc = self.monitor.probe_step(features, labels)
        bs = len(labels)
        # Not prog_bar=True: the bar reads it (launch.trainer.ProgressBar) without a per-step sync.
        self.log("train/loss", loss, sync_dist=True, batch_size=bs)
        self.log("train/online_acc", probe_acc, sync_dist=True, batch_size=bs)
        # A device tensor made in place: self.log would turn the float into one by a blocking
        # host-to-device copy every step.
        self.log("train/tau", torch.full((), tau, device=self.device), batch_size=bs)
        return loss + probe_loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, labels = batch
        monitor_validation_step(self, self.monitor, self.backbone(x), labels, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self.monitor.reset_bank()

    def configure_optimizers(self) -> Any:
        config, self.derived = optim.configure(
            self,
            self.optimizer_spec,
            self.batch_size_per_device,
            [self.backbone, self.projection_head, self.prediction_head],
            self.monitor.probe,
        )
        return config
