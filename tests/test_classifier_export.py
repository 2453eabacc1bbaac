from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_robust.finetune.export import load_classifier, save_classifier
from ssl_robust.finetune.model import Classifier
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta


def test_classifier_normalises_inside_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = build_backbone("convnet", width=4)
    clf = Classifier(enc, 3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]).eval()
    x = torch.rand(4, 3, 8, 8)
    # The reference normalises with the numbers given, not with the classifier's own buffers.
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    manual = clf.head(enc((x - mean) / std))
    torch.testing.assert_close(clf(x), manual, rtol=0, atol=0)
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 3)
    save_classifier(clf, meta, tmp_path, classes=["a", "b", "c"], data={"name": "digits"})
    loaded, info = load_classifier(tmp_path)
    assert info["classes"] == ["a", "b", "c"] and info["num_classes"] == 3
    torch.testing.assert_close(loaded.eval()(x), manual, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no exported classifier"):
        load_classifier(tmp_path / "missing")


def test_a_classifier_with_its_own_normalisation_round_trips(tmp_path: Path) -> None:
    """data.mean/std may override the encoder's, with one value for every channel."""
    torch.manual_seed(0)
    enc = build_backbone("convnet", width=4)
    clf = Classifier(enc, 3, mean=[0.5], std=[0.25]).eval()
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, [0.1, 0.2, 0.3], [0.3, 0.3, 0.3], 3)
    save_classifier(clf, meta, tmp_path)
    loaded, info = load_classifier(tmp_path)
    x = torch.rand(2, 3, 8, 8)
    manual = clf.head(enc((x - 0.5) / 0.25))  # the one value on every channel
    torch.testing.assert_close(clf(x), manual, rtol=0, atol=0)
    torch.testing.assert_close(loaded.eval()(x), manual, rtol=0, atol=0)
    assert info["encoder"]["mean"] == [0.5] and info["encoder"]["std"] == [0.25]  # as applied
