from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_robust.models.backbones import BACKBONES, build_backbone, cifar_stem
from ssl_robust.models.export import EncoderMeta, export_encoder, load_encoder


def test_cifar_stem_keeps_resolution() -> None:
    enc = build_backbone("resnet18_cifar")
    conv1 = enc.net.conv1  # type: ignore[union-attr]
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(enc.net.maxpool, nn.Identity)  # type: ignore[union-attr]
    # After the CIFAR stem, layer1 sees the full 32x32 grid (ImageNet stem: 8x8).
    seen: dict[str, torch.Size] = {}

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen["hw"] = output.shape[-2:]

    enc.net.layer1.register_forward_hook(hook)  # type: ignore[union-attr]
    out = enc(torch.randn(2, 3, 32, 32))
    assert seen["hw"] == (32, 32) and out.shape == (2, 512) and enc.feat_dim == 512


@pytest.mark.parametrize(
    ("name", "feat_dim"),
    [
        ("resnet50_cifar", 2048),
        ("convnet", 64),
        ("tv:resnet18", 512),
        ("tv:mobilenet_v3_small", 576),
        ("tv:convnext_tiny", 768),  # its head's LayerNorm and Flatten stay
        ("tv:googlenet", 1024),  # no auxiliary heads (their tuple in training)
        ("timm:resnet10t", 512),
    ],
)
def test_backbones_report_feature_dim(name: str, feat_dim: int) -> None:
    enc = build_backbone(name, width=16)
    assert enc.feat_dim == feat_dim
    with torch.no_grad():
        assert enc.train()(torch.randn(2, 3, 32, 32)).shape == (2, feat_dim)
        assert enc.eval()(torch.randn(2, 3, 32, 32)).shape == (2, feat_dim)


def test_a_torchvision_head_with_pooling_keeps_it() -> None:
    # MaxViT's classifier pools, flattens and normalises before its Linear layers.
    enc = build_backbone("tv:maxvit_t").eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, enc.feat_dim) == (1, 512)
    with pytest.raises(ValueError, match=r"'squeezenet1_0' has no Linear classifier head"):
        build_backbone("tv:squeezenet1_0")


def test_cifar_stem_is_the_only_stem_surgery() -> None:
    src = Path(__file__).resolve().parents[1] / "ssl_robust"
    hits = [p for p in src.rglob("*.py") if "maxpool = " in p.read_text()]
    assert [p.name for p in hits] == ["backbones.py"]
    assert cifar_stem.__module__ == "ssl_robust.models.backbones"


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown backbone 'resnet19'.*convnet.*resnet18_cifar.*tv:"
    ):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        build_backbone("tv:notamodel")
    assert {"convnet", "resnet18_cifar", "resnet50_cifar"} <= set(BACKBONES)


def test_export_round_trip(tmp_path: Path) -> None:
    enc = build_backbone("convnet", width=4)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, [0.5] * 3, [0.25] * 3, num_classes=10)
    export_encoder(enc, meta, tmp_path)
    loaded, meta2 = load_encoder(tmp_path)
    assert meta2 == meta
    enc.eval()
    loaded.eval()
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(enc(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="no exported encoder"):
        load_encoder(tmp_path / "nothing")


def test_exported_metadata_is_checked_on_load(tmp_path: Path) -> None:
    import json

    enc = build_backbone("convnet", width=4)
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, [0.5] * 3, [0.25] * 3)
    export_encoder(torch.compile(enc), meta, tmp_path)  # no "_orig_mod." in the file
    loaded, _ = load_encoder(tmp_path)
    torch.testing.assert_close(loaded.state_dict(), enc.state_dict())
    info = tmp_path / "encoder.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"feat_dim": 999}))
    with pytest.raises(ValueError, match="says feat_dim 999"):
        load_encoder(tmp_path)
    info.write_text(json.dumps(json.loads(info.read_text()) | {"width": 8, "feat_dim": 64}))
    with pytest.raises(ValueError, match=r"do not fit the backbone.*'convnet', width 8"):
        load_encoder(tmp_path)
