"""Backbones with one interface: ``Encoder(x) -> (B, feat_dim)`` features.

Names: ``resnet18_cifar``/``resnet50_cifar`` (torchvision ResNets with the CIFAR stem),
``convnet`` (a small CNN for CPU runs and tests), ``tv:<name>`` for any torchvision
classification model and ``timm:<name>`` for any timm model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn


class Encoder(nn.Module):
    """A feature extractor that reports its feature dimension (timm's ``num_features``)."""

    def __init__(self, net: nn.Module, feat_dim: int, name: str) -> None:
        super().__init__()
        self.net = net
        self.feat_dim = feat_dim
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(start_dim=1)  # (B, D)


def cifar_stem(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """Replace the ImageNet stem by the CIFAR one: 3x3 conv, stride 1, no max-pool.

    The one place in the project that does stem surgery. At 32 px the 7x7/2 conv + max-pool
    throws away 15/16 of the resolution before the first block; the CIFAR stem (He et al. 2016,
    Sec. 4.2; SimCLR Appendix B.9) is worth ~8 kNN points on CIFAR-10.
    """
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def _torchvision_resnet(name: str, cifar: bool) -> Encoder:
    model = torchvision.models.get_model(name, weights=None)
    if cifar:
        model = cifar_stem(model)
    feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return Encoder(model, feat_dim, name + ("_cifar" if cifar else ""))


def convnet(width: int = 32, in_channels: int = 3) -> Encoder:
    """A small 4-stage CNN (conv-BN-ReLU, stride-2 stages) for tiny images and CPU runs."""
    widths = [width, width * 2, width * 4, width * 4]
    layers: list[nn.Module] = []
    c = in_channels
    for i, w in enumerate(widths):
        layers += [
            nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Encoder(nn.Sequential(*layers), c, "convnet")


BACKBONES: dict[str, Callable[[int], Encoder]] = {
    "convnet": lambda width: convnet(width),
    "resnet18_cifar": lambda width: _torchvision_resnet("resnet18", cifar=True),
    "resnet50_cifar": lambda width: _torchvision_resnet("resnet50", cifar=True),
}


def build_backbone(name: str, width: int = 32) -> Encoder:
    """Build a randomly initialised backbone by name.

    Raises:
        ValueError: unknown name, with the valid choices.
    """
    if name in BACKBONES:
        return BACKBONES[name](width)
    if name.startswith("tv:"):
        tv_name = name[3:]
        available = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in available:
            raise ValueError(f"unknown torchvision model {tv_name!r}; e.g. {available[:8]} ...")
        # GoogLeNet and Inception v3 return a tuple with their auxiliary heads in training.
        kwargs = {"aux_logits": False} if tv_name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(tv_name, weights=None, **kwargs)
        head_name = next(
            (h for h in ("fc", "classifier", "head", "heads") if hasattr(model, h)), None
        )
        head = getattr(model, head_name) if head_name else None
        layers: list[nn.Module] = (
            list(head.children()) if isinstance(head, nn.Sequential) else [head] if head else []
        )
        first = next((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), None)
        if head_name is None or first is None:
            raise ValueError(
                f"torchvision model {tv_name!r} has no Linear classifier head to remove "
                f"({head_name or 'no fc/classifier/head'}: {type(head).__name__}); use "
                "another model or 'timm:<name>'"
            )
        # The head from its first Linear layer on goes; what comes before it stays (pooling,
        # flattening and norms, e.g. MaxViT's and ConvNeXt's), dropout aside, so that the
        # features are exactly what that Linear layer reads.
        kept = [m for m in layers[:first] if not isinstance(m, nn.Dropout)]
        setattr(model, head_name, nn.Sequential(*kept) if kept else nn.Identity())
        linear = layers[first]
        assert isinstance(linear, nn.Linear)
        return Encoder(model, linear.in_features, name)
    if name.startswith("timm:"):
        import timm

        timm_name = name[5:]
        if not timm.is_model(timm_name):
            raise ValueError(f"unknown timm model {timm_name!r}; see timm.list_models()")
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        return Encoder(model, int(model.num_features), name)  # type: ignore[arg-type]
    raise ValueError(
        f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}, 'tv:<torchvision name>' "
        f"or 'timm:<timm name>'"
    )
