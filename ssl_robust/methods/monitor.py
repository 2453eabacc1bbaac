"""Monitoring parts composed into every method: an online linear probe and a kNN classifier.

Both read detached backbone features, so neither changes what the encoder learns.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import nn


def knn_accuracy_counts(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
) -> torch.Tensor:
    """Number of correct weighted-kNN predictions (Wu et al. 2018): cosine similarity,
    ``exp(sim / t)`` votes of the k nearest bank features.

    Args:
        query: (B, D) features, any scale (normalised here).
        bank: (N, D) features, any scale.
    """
    q = F.normalize(query.float(), dim=1)  # (B, D)
    b = F.normalize(bank.float(), dim=1).t().contiguous()  # (D, N): lightly's layout
    # In float32 under a bf16 autocast too, as lightly's benchmark (and its accuracies) did.
    with torch.autocast(q.device.type, enabled=False):
        pred = knn_predict(q, b, bank_labels, num_classes, knn_k=min(k, b.shape[1]), knn_t=t)
    return (pred[:, 0] == query_labels).sum()


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """The weighted-kNN accuracy (:func:`knn_accuracy_counts`) of every query, ``chunk`` of
    them at a time (memory: chunk x bank size), on ``device`` (default: the queries')."""
    if len(query) == 0:
        raise ValueError("no query features")
    device = query.device if device is None else device
    bank, bank_labels = bank.to(device), bank_labels.to(device)
    correct = 0
    for i in range(0, len(query), chunk):
        q = query[i : i + chunk].to(device)
        labels = query_labels[i : i + chunk].to(device)
        correct += int(knn_accuracy_counts(q, labels, bank, bank_labels, num_classes, k, t))
    return correct / len(query)


class OnlineMonitor(nn.Module):
    """A linear probe trained on detached features, and a kNN feature bank.

    Usage inside a LightningModule:
        training: ``loss, acc = monitor.probe_step(features, labels)``
        validation loader 0: ``monitor.add_to_bank(features, labels)``
        validation loader 1 (and 2, a shifted twin of it):
            ``stats = monitor.evaluate(features, labels, all_gather)``
    """

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        knn_k: int = 200,
        knn_t: float = 0.1,
        probe: bool = True,
    ) -> None:
        super().__init__()
        if knn_k < 1 or knn_t <= 0:
            raise ValueError(f"knn_k must be >= 1 and knn_t > 0, got {knn_k}, {knn_t}")
        self.num_classes = num_classes
        self.knn_k = knn_k
        self.knn_t = knn_t
        self.probe = nn.Linear(feat_dim, num_classes) if probe else None
        self._bank: list[torch.Tensor] = []
        self._bank_labels: list[torch.Tensor] = []
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def probe_step(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe loss and accuracy; labels < 0 (unlabeled images) are ignored."""
        if self.probe is None:
            zero = features.new_zeros(())
            return zero, zero
        # Masked means rather than boolean indexing, whose data-dependent shape would make the
        # host wait for the device on every training step.
        keep = (labels >= 0).float()
        n = keep.sum().clamp(min=1.0)
        logits = self.probe(features.detach())  # detach: no gradient into the encoder
        per_sample = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        loss = (per_sample * keep).sum() / n
        acc = ((logits.argmax(1) == labels).float() * keep).sum() / n
        return loss, acc

    def reset_bank(self) -> None:
        self._bank, self._bank_labels, self._gathered = [], [], None

    def add_to_bank(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self._gathered = None
        self._bank.append(F.normalize(features.detach().float(), dim=1))
        self._bank_labels.append(labels.detach())

    def _full_bank(
        self, all_gather: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gathered is None:
            if not self._bank:
                raise RuntimeError("the kNN bank is empty: run validation loader 0 first")
            bank, labels = torch.cat(self._bank), torch.cat(self._bank_labels)
            if all_gather is not None:
                # (world, N_rank, D) -> (world * N_rank, D): every rank sees the whole bank.
                bank = all_gather(bank).reshape(-1, bank.shape[-1])
                labels = all_gather(labels).reshape(-1)
            self._gathered = (bank, labels)
        return self._gathered

    def evaluate(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch accuracies of the kNN classifier and of the probe on val features."""
        bank, bank_labels = self._full_bank(all_gather)
        out = {
            "val/knn_acc": knn_accuracy_counts(
                features, labels, bank, bank_labels, self.num_classes, self.knn_k, self.knn_t
            ).float()
            / len(labels)
        }
        if self.probe is not None:
            out["val/online_acc"] = (
                (self.probe(features.float()).argmax(1) == labels).float().mean()
            )
        return out


def monitor_validation_step(
    module: pl.LightningModule,
    monitor: OnlineMonitor,
    features: torch.Tensor,
    labels: torch.Tensor,
    dataloader_idx: int,
) -> None:
    """Validation loader 0 fills the kNN bank; loader 1 scores the val split and logs; loader
    2, when there is one, scores its shifted twin (``val/knn_acc_shift``, ...)."""
    if dataloader_idx == 0:
        monitor.add_to_bank(features, labels)
        return
    gather = module.all_gather if module.trainer.world_size > 1 else None
    stats = monitor.evaluate(features, labels, gather)  # type: ignore[arg-type]
    if dataloader_idx == 2:
        stats = {f"{k}_shift": v for k, v in stats.items()}
    module.log_dict(stats, batch_size=len(labels), sync_dist=True, add_dataloader_idx=False)
