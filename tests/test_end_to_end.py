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
    ft = json.loads((runs / "ft" / "metrics.json").read_text())
    assert ft["test/acc"] > 0.2  # 10 classes: far above chance even for this tiny encoder
    report = json.loads((runs / "eval" / "report.json").read_text())["metrics"]
    assert 0.0 <= report["shift/mean_acc"] <= 1.0
    assert report["adv/linf_128/acc"] <= report["test/acc"]
    assert "adv/linf_8/acc_worst" in report
    md = (runs / "eval" / "report.md").read_text()
    assert "| " in md and "Corruption" in md
    plots = sorted((runs / "eval" / "plots").glob("*.png"))
    assert plots
    for p in plots:
        with Image.open(p) as img:
            assert min(img.size) >= 200
