"""Losses shared by the methods, where lightly's own cannot serve as they are."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss as _LightlyNTXentLoss
from lightly.utils import dist


class NTXentLoss(_LightlyNTXentLoss):
    """lightly's NT-Xent loss (in-batch negatives) without a host synchronisation, with its
    similarities in float32.

    Why not lightly's as it is (measured on one H200, BENCHMARKS.md):

    - it drops each view's similarity to itself by boolean indexing (``logits[~diag]``), whose
      data-dependent shape makes the host wait for the GPU at every step. The host then cannot
      queue the next step while the GPU runs this one, and Lightning's per-step host work
      becomes GPU idle time: with this wait and one more (progress-bar metrics, see
      launch.trainer.ProgressBar) the SimCLR loop ran at 19.8k images/s, against 30.5k for the
      same step in a bare loop. Here those entries are set to -inf instead: they drop out of
      the softmax (exp(-inf) = 0) and the positive keeps its column, so the loss and its
      gradients are lightly's (checked against it in the tests).
    - under bf16 autocast its similarity matmul rounds the logits to bf16 (a step of 1/64 near
      the positives' 1/T = 2). lightly's published accuracies were trained in 32-bit; the
      (2B x 2B x D) product costs nothing next to the encoder, so it runs in float32 here.

    The memory bank of lightly's class is not supported (SimCLR here uses in-batch negatives).
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """Mean NT-Xent loss of the 2B views.

        Args:
            out0, out1: (B, D) projections of the two views of the same B images.
        """
        batch_size = out0.shape[0]
        device_type = out0.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()  # e.g. the meta device of shape checks
        )
        with no_autocast:
            z0 = F.normalize(out0.float(), dim=1)  # (B, D)
            z1 = F.normalize(out1.float(), dim=1)
            if self.gather_distributed and dist.world_size() > 1:
                # Negatives from every rank; gradients flow back through this rank's part.
                z0_all = torch.cat(dist.gather(z0), 0)  # (M, D), M = B x world
                z1_all = torch.cat(dist.gather(z1), 0)
                offset = dist.rank() * batch_size
            else:
                z0_all, z1_all, offset = z0, z1, 0
            # Each view's similarity to itself: (i, offset + i). Made on the device (lightly's
            # dist.eye_rank makes a host tensor: a copy per step, and masked_fill on a GPU
            # refuses a host mask).
            rows = torch.arange(batch_size, device=z0.device) + offset
            own = rows[:, None] == torch.arange(len(z0_all), device=z0.device)[None, :]  # (B, M)
            t = self.temperature
            logits_00 = (z0 @ z0_all.T / t).masked_fill(own, float("-inf"))  # (B, M)
            logits_01 = z0 @ z1_all.T / t
            logits_10 = z1 @ z0_all.T / t
            logits_11 = (z1 @ z1_all.T / t).masked_fill(own, float("-inf"))
            # Row i's positive is column offset + i of its cross-view block, which comes first.
            logits = torch.cat(
                [torch.cat([logits_01, logits_00], 1), torch.cat([logits_10, logits_11], 1)]
            )  # (2B, 2M)
            labels = torch.arange(batch_size, device=z0.device) + offset
            return F.cross_entropy(logits, labels.repeat(2))
