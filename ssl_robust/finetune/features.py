"""Frozen-encoder features for linear probing, computed once per encoder and data and cached.

A linear probe only trains a head on ``f(x)``, so the features of the whole train and
evaluation splits are computed once (encoder in eval mode: BatchNorm uses its running
statistics, no augmentation) and stored as ``<cache dir>/<key>.pt``. The key hashes the encoder
weights, the data description and the image size, so a sweep over label fractions and seeds
reuses one file, and new weights or other data never read a stale one.

Computing them shows its progress (a rich bar on a terminal, a line a minute with the count of
images done and the time left in a log file, :mod:`ssl_robust.launch.progress`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from torch import nn

from ssl_robust.data.datasets import ArraySource, ImageSource
from ssl_robust.files import private_tmp
from ssl_robust.launch.distributed import is_global_zero
from ssl_robust.launch.progress import progress_bar


def weights_digest(module: nn.Module) -> str:
    """SHA-1 of a module's state (names, dtypes, shapes and values), independent of device."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_key(encoder_digest: str, data: dict[str, Any], image_size: int) -> str:
    """The cache key: encoder weights + data description + image size."""
    blob = json.dumps(
        {"encoder": encoder_digest, "data": data, "image_size": image_size}, sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def source_images(source: ImageSource) -> np.ndarray:
    """All images of a source as one uint8 array (N, H, W, 3)."""
    if isinstance(source, ArraySource):
        return source.images
    return np.stack([np.asarray(source.load(i)) for i in range(len(source))])


def _batches(images: np.ndarray | ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 batches of an array or a source, in order."""
    if isinstance(images, ArraySource):
        images = images.images
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        if isinstance(images, np.ndarray):
            yield images[start:stop]
        else:
            yield np.stack([np.asarray(images.load(i)) for i in range(start, stop)])


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | ImageSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    what: str = "features",
    progress: bool = True,
    console: Console | None = None,
) -> torch.Tensor:
    """Features of uint8 images.

    Args:
        features: Maps a (B, 3, H, W) batch in [0, 1] to (B, D) features (e.g.
            ``Classifier.features``, which normalises inside), already on ``device`` and in
            eval mode.
        images: (N, H, W, 3) uint8, or a source whose images are read a batch at a time
            (the reading counts in the progress).
        batch_size: Images per forward pass.
        device: Where to run.
        what: The progress task's name (e.g. ``"features, train images"``).
        progress: Show the progress in images (global rank zero only).
        console: Where the progress goes (default: a console on stdout).

    Returns:
        (N, D) float32 features on the CPU.
    """
    bar = progress_bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(),
        enabled=progress and is_global_zero(),
    )
    out = []
    with bar:
        task = bar.add_task(what, total=len(images))
        for batch in _batches(images, batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(batch))  # (B, H, W, 3) uint8
            x = chunk.to(device).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
            out.append(features(x).float().cpu())  # (B, D)
            bar.advance(task, len(chunk))
    return torch.cat(out)


@dataclass
class FeatureSet:
    """Cached features of both splits (float32, CPU) and where they live."""

    train: torch.Tensor  # (N, D)
    train_labels: torch.Tensor  # (N,)
    eval: torch.Tensor  # (K, D)
    eval_labels: torch.Tensor  # (K,)
    path: Path
    computed: bool  # False when read from the cache


def load_or_compute_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    train: ImageSource,
    evaluation: ImageSource,
    cache_dir: str | Path,
    key: str,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FeatureSet:
    """Features of the train and evaluation splits, from ``cache_dir/<key>.pt`` when present.

    Args:
        features: See :func:`extract_features`.
        train: The whole train split (subsets index its features).
        evaluation: The evaluation split.
        cache_dir: Folder of the cache files (created when missing).
        key: From :func:`feature_key`.
        batch_size: Images per forward pass.
        device: Where to run the encoder.
        progress: Show the progress of computing them (see :func:`extract_features`).
    """
    path = Path(cache_dir) / f"{key}.pt"
    train_labels = torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
    eval_labels = torch.as_tensor(np.asarray(evaluation.labels), dtype=torch.long)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        # A file for the same key with other labels means the split changed under the key.
        if torch.equal(blob["train_labels"], train_labels) and torch.equal(
            blob["eval_labels"], eval_labels
        ):
            return FeatureSet(
                blob["train"], train_labels, blob["eval"], eval_labels, path, computed=False
            )
    tr = extract_features(features, train, batch_size, device, "features, train images", progress)
    ev = extract_features(
        features, evaluation, batch_size, device, "features, eval images", progress
    )
    _save(path, {"train": tr, "train_labels": train_labels, "eval": ev, "eval_labels": eval_labels})
    return FeatureSet(tr, train_labels, ev, eval_labels, path, computed=True)


def load_or_compute_split_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    labels: np.ndarray,
    source: Callable[[], ImageSource],
    cache_dir: str | Path,
    key: str,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = True,
    what: str = "features, shifted eval images",
) -> tuple[torch.Tensor, bool]:
    """Features (K, D) of one more split with these labels (e.g. a shifted twin of the
    evaluation split), from ``cache_dir/<key>.pt`` when present, and whether they were
    computed. ``source()`` makes the split's images only when they are computed; ``what`` and
    ``progress`` as in :func:`extract_features`."""
    path = Path(cache_dir) / f"{key}.pt"
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if torch.equal(blob["labels"], y):
            return blob["features"], False
    feats = extract_features(features, source(), batch_size, device, what, progress)
    _save(path, {"features": feats, "labels": y})
    return feats, True


def _save(path: Path, blob: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path)
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: concurrent sweep jobs never read a torn file
