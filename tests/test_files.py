"""How exported files are written: atomically, and readable as the umask says."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_robust.files import save_safetensors
from ssl_robust.finetune.export import save_classifier
from ssl_robust.finetune.model import Classifier
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta, export_encoder
from ssl_robust.purify.unet import build_unet, make_scheduler, save_denoiser


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exported_weights_are_readable_by_the_group_and_others(
    tmp_path: Path, umask_022: None
) -> None:
    """safetensors 0.8's save_file (and so diffusers' save_pretrained) creates 0600 files: on a
    shared cluster nobody else could load an exported encoder, classifier or denoiser."""
    enc = build_backbone("convnet", width=4)
    meta = EncoderMeta("convnet", 4, enc.feat_dim, 8, [0.5], [0.25], 3)
    weights = export_encoder(enc, meta, tmp_path / "pretrain")
    save_classifier(Classifier(enc, 3, mean=[0.5], std=[0.25]), meta, tmp_path / "finetune")
    save_denoiser(build_unet("tiny", sample_size=8), make_scheduler(), tmp_path / "denoiser")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"encoder.safetensors", "classifier.safetensors"} <= names
    assert "diffusion_pytorch_model.safetensors" in names
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files} == {
        str(p.relative_to(tmp_path)): oct(0o644) for p in files
    }
    assert not [p for p in files if p.name.startswith(".")]  # no temp file left behind
    state = load_file(weights)
    assert state.keys() == enc.state_dict().keys()


def test_save_safetensors_round_trips_and_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        save_safetensors(tmp_path / "private.safetensors", {"a": torch.arange(3.0)}, {"k": "v"})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.safetensors") == 0o600
    torch.testing.assert_close(load_file(tmp_path / "private.safetensors")["a"], torch.arange(3.0))


@pytest.mark.parametrize("phase", ["encoder", "classifier", "denoiser"])
def test_a_missing_export_of_a_run_with_checkpoints_says_the_job_stopped(
    phase: str, tmp_path: Path
) -> None:
    from ssl_robust.finetune.export import load_classifier
    from ssl_robust.models.export import load_encoder
    from ssl_robust.purify.unet import load_denoiser

    load = {"encoder": load_encoder, "classifier": load_classifier, "denoiser": load_denoiser}
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError) as plain:
        load[phase](run)
    assert "stopped before the end" not in str(plain.value)
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"a step's state")
    with pytest.raises(FileNotFoundError, match=r"no (exported|diffusers)") as stopped:
        load[phase](run)
    assert str(stopped.value).endswith(
        ". It holds checkpoints, so its job stopped before the end: run that job's command "
        "again to resume and finish it"
    )
