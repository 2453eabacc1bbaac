"""Tiny exported runs that the evaluation tests evaluate: a digits classifier and a denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssl_robust.data.datasets import ArraySource, build_splits
from ssl_robust.finetune.export import save_classifier
from ssl_robust.finetune.model import Classifier
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta
from ssl_robust.purify.unet import build_unet, make_scheduler, save_denoiser

DATA: dict[str, Any] = {
    "name": "digits",
    "root": "data",
    "image_size": 8,
    "val_fraction": 0.2,
    "seed": 0,
}


def train_digits_classifier(folder: Path, steps: int) -> Path:
    """A convnet-4 classifier on the 8 px digits, ``steps`` Adam steps (120: ~95% val
    accuracy in a few seconds), exported to ``folder`` like a fine-tuning run."""
    torch.manual_seed(0)
    splits = build_splits(**DATA)
    train = splits.train
    assert isinstance(train, ArraySource)  # the digits live in memory
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.labels)
    enc = build_backbone("convnet", 4)
    clf = Classifier(enc, 10, splits.info.mean, splits.info.std)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,))
        loss = torch.nn.functional.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, splits.info.mean, splits.info.std, 10)
    data = {**DATA, "mean": splits.info.mean, "std": splits.info.std, "download": False}
    save_classifier(clf.eval(), meta, folder, classes=train.classes, data=data)
    return folder


def tiny_denoiser(folder: Path) -> Path:
    """An untrained tiny 8 px UNet with the default noise schedule, exported to ``folder``."""
    torch.manual_seed(0)
    save_denoiser(build_unet("tiny", sample_size=8), make_scheduler(), folder)
    return folder
