"""The deployed classifier: ``x in [0, 1] -> logits``, normalisation inside.

Keeping the normalisation inside the module means attacks, purifiers and corruptions all work
on images in [0, 1] (an attack must target the whole pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_robust.models.backbones import Encoder


class Classifier(nn.Module):
    """Encoder + linear head on inputs in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, encoder: Encoder, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std lengths differ: {len(mean)} vs {len(std)}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.feat_dim, num_classes)
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, D) encoder features."""
        return self.encoder(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K) logits
