"""SimCLR (Chen et al. 2020): contrast two views of each image with the NT-Xent loss."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models.modules import SimCLRProjectionHead

from ssl_robust.methods import optim
from ssl_robust.methods.losses import NTXentLoss
from ssl_robust.methods.monitor import OnlineMonitor, monitor_validation_step
from ssl_robust.methods.views import forward_views
from ssl_robust.models.backbones import Encoder


class SimCLR(pl.LightningModule):
    def __init__(
        self,
        backbone: Encoder,
        num_classes: int,
        batch_size_per_device: int,
        optimizer: optim.OptimizerSpec,
        temperature: float = 0.5,
        proj_hidden_dim: int = 512,
        proj_out_dim: int = 128,
        knn_k: int = 200,
        knn_t: float = 0.1,
        online_probe: bool = True,
        joint_views: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        self.backbone = backbone
        self.joint_views = joint_views  # see methods.views.forward_views
        self.projection_head = SimCLRProjectionHead(
            backbone.feat_dim, proj_hidden_dim, proj_out_dim
        )
        # gather_distributed: negatives come from the global batch across all ranks. lightly's
        # loss without its per-step host synchronisation (see methods.losses).
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        self.monitor = OnlineMonitor(backbone.feat_dim, num_classes, knn_k, knn_t, online_probe)
        self.optimizer_spec = optimizer
        self.batch_size_per_device = batch_size_per_device
        self.derived: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)  # (B, D)
        return features, self.projection_head(features)  # (B, P)

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent loss of two views, and the first view's backbone features."""
        (f0, z0), (_, z1) = forward_views(self._embed, views, self.joint_views)
        return self.criterion(z0, z1), f0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        views, labels = batch
        loss, features = self.ssl_loss(views)
        probe_loss, probe_acc = self.monitor.probe_step(features, labels)
        bs = len(labels)
        # Not prog_bar=True: the bar reads it (launch.trainer.ProgressBar) without a per-step sync.
        self.log("train/loss", loss, sync_dist=True, batch_size=bs)
        self.log("train/online_acc", probe_acc, sync_dist=True, batch_size=bs)
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
            [self.backbone, self.projection_head],
            self.monitor.probe,
        )
        return config
