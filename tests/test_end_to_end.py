"""The whole chain on the embedded dataset, through the scripts a user runs:
pretrain -> train a denoiser -> fine-tune at 10 % labels -> evaluate (with the purifier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY_PRETRAIN

ROOT = Path(__file__).resolve().parents[1]
CPU = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "data.num_workers=0"]


def _run(script: str, *args: str, cwd: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def _untrained_denoiser_loss(run: Path, cwd: Path) -> float:
    """``val/loss`` of the run's denoiser module before any training step."""
    import os

    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ssl_robust.data.images import ImageDataModule
    from ssl_robust.pipelines.common import build_data
    from ssl_robust.pipelines.denoiser import build_denoiser

    cfg = OmegaConf.load(run / "config.yaml")
    here = os.getcwd()
    os.chdir(cwd)  # data.root is relative to where the job ran
    try:
        splits = build_data(cfg, run, with_unlabeled=True)
    finally:
        os.chdir(here)
    data = ImageDataModule(
        train=splits.unsupervised_train(),
        val=splits.val,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        seed=cfg.run.seed,
    )
    pl.seed_everything(cfg.run.seed, verbose=False)  # the job's initialisation
    untrained = build_denoiser(cfg, cfg.data.image_size, cfg.run.seed)
    validator = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return float(validator.validate(untrained, datamodule=data, verbose=False)[0]["val/loss"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pretrain_denoise_finetune_evaluate(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run("pretrain.py", *TINY_PRETRAIN, f"run.dir={runs / 'pre'}", cwd=tmp_path)
    _run(
        "train_denoiser.py",
        *CPU,
        "data.image_size=8",
        "data.batch_size=64",
        "denoiser.unet=tiny",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "denoiser.warmup_steps=2",  # six steps that train (the default warms up over 50)
        f"run.dir={runs / 'den'}",
        cwd=tmp_path,
    )
    _run(
        "finetune.py",
        *CPU,
        f"encoder.run={runs / 'pre'}",
        "subset.fraction=0.1",
        f"run.dir={runs / 'ft'}",
        cwd=tmp_path,
    )
    _run(
        "evaluate.py",
        "tiny",
        f"classifier.run={runs / 'ft'}",
        f"purifier.run={runs / 'den'}",
        "purifier.sampler=ddim",
        "purifier.t_star=20",
        "purifier.ddim_steps=2",
        f"run.dir={runs / 'eval'}",
        cwd=tmp_path,
    )
    # Six steps of training take the denoiser well below the loss of its untrained UNet (the
    # same initialisation, scored on the same validation noise).
    den = json.loads((runs / "den" / "metrics.json").read_text())
    assert den["val/loss"] < 0.9 * _untrained_denoiser_loss(runs / "den", cwd=tmp_path)
    ft = json.loads((runs / "ft" / "metrics.json").read_text())
    assert ft["test/acc"] > 0.2  # 10 classes: far above chance even for this tiny encoder
    report = json.loads((runs / "eval" / "report.json").read_text())["metrics"]
    # The same classifier on the same test split: without the purifier, fine-tuning's number.
    assert report["test/acc_unpurified"] == pytest.approx(ft["test/acc"], abs=1e-6)
    assert report["calib/clean/acc"] == pytest.approx(report["test/acc"], abs=1e-6)
    # Corruptions hurt, the strong ones more; the mean is over the 2 x 2 grid.
    cells = [report[f"shift/{c}/{s}/acc"] for c in ("impulse_noise", "contrast") for s in (1, 5)]
    assert report["shift/mean_acc"] == pytest.approx(sum(cells) / 4, abs=1e-6)
    assert report["shift/mean_acc"] < report["test/acc"] - 0.05
    assert report["shift/severity/5/acc"] < report["shift/severity/1/acc"]
    assert report["shift/contrast/5/acc"] < report["shift/contrast/1/acc"]
    # Attacks: no better than the clean accuracy of the attacked images, the worst case of the
    # rescoring no better than its mean, a larger budget no better than a smaller one.
    for eps in (8, 128):
        p = f"adv/linf_{eps}/"
        assert report[p + "acc_worst"] <= report[p + "acc"] <= report[p + "clean_acc"]
    assert report["adv/linf_128/acc"] <= report["adv/linf_8/acc"]
    md = (runs / "eval" / "report.md").read_text()
    assert "| " in md and "Corruption" in md
    plots = sorted((runs / "eval" / "plots").glob("*.png"))
    assert plots
    for p in plots:
        with Image.open(p) as img:
            assert min(img.size) >= 200
