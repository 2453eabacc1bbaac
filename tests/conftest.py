"""Shared fixtures: tiny CPU configs so every test runs in seconds on 2 cores."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.slurm_utils import cancel_quietly, require_slurm

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_PRETRAIN = [
    "data.image_size=8",
    "data.batch_size=64",
    "data.eval_batch_size=512",
    "data.num_workers=0",
    "model.backbone=convnet",
    "model.width=4",
    "method.proj_hidden_dim=16",
    "method.proj_out_dim=8",
    "method.pred_hidden_dim=16",
    "monitor.knn_k=20",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.progress_bar=false",
    "trainer.accelerator=cpu",
    "monitor.views_figure=0",  # tests that want views.png turn it on
]

# A seconds-long fine-tuning on the CPU (with finetune_cfg's encoder and run directory).
TINY_FINETUNE = [
    "trainer.accelerator=cpu",
    "trainer.progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=32",
]


def finetune_cfg(
    encoder_run: Path, run_dir: Path, *overrides: str, base: tuple[str, ...] = ()
) -> DictConfig:
    """A fine-tuning config: TINY_FINETUNE, then ``base``, the encoder and run directory, then
    ``overrides``."""
    from ssl_robust.config import FinetuneConfig, load_config

    args = [*TINY_FINETUNE, *base, f"encoder.run={encoder_run}", f"run.dir={run_dir}"]
    return load_config(FinetuneConfig, [*args, *overrides], job="finetune")


@pytest.fixture
def tiny_pretrain_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``tiny_pretrain_cfg("method=byol", ...)``: a seconds-long pretraining config in tmp_path."""
    from ssl_robust.config import PretrainConfig, load_config

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        run = run_dir or tmp_path / "run"
        return load_config(
            PretrainConfig, [*TINY_PRETRAIN, f"run.dir={run}", *overrides], job="pretrain"
        )

    return make


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised convnet-4 (with BatchNorm) exported like a pretraining run on the
    8 px digits (no config.yaml: the data comes from encoder.json)."""
    from ssl_robust.models.backbones import build_backbone
    from ssl_robust.models.export import EncoderMeta, export_encoder

    torch.manual_seed(0)
    enc = build_backbone("convnet", 4)
    folder = tmp_path_factory.mktemp("enc") / "pretrain-random"
    meta = EncoderMeta(
        "convnet", 4, enc.feat_dim, 8, [0.3] * 3, [0.4] * 3, 10, {"dataset": "digits"}
    )
    export_encoder(enc, meta, folder)
    return folder


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip (or, under ``CI=true``, fail) a SLURM test module when no cluster answers."""
    require_slurm()


@pytest.fixture
def jobs() -> Iterator[list[int]]:
    """SLURM job ids submitted by a test; any still queued or running are cancelled afterwards."""
    submitted: list[int] = []
    yield submitted
    cancel_quietly(submitted)


# The evaluation tests' runs, made once per test module (they take seconds).
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits classifier fine-tuned for 60 steps (tests/eval_runs.py)."""
    from tests.eval_runs import train_digits_classifier

    return train_digits_classifier(tmp_path_factory.mktemp("finetune-digits"), steps=60)


@pytest.fixture(scope="module")
def denoiser_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny 8 px denoiser (tests/eval_runs.py)."""
    from tests.eval_runs import tiny_denoiser

    return tiny_denoiser(tmp_path_factory.mktemp("denoiser"))
