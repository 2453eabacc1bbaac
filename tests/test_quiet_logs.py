"""What a run prints: no warning that every run of this design raises, plain text in a log
file, and the fine-tuning loss and accuracy on the progress bar."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.launch.trainer import quiet_lightning

REPO = Path(__file__).resolve().parents[1]
SRUN_HINT = "The `srun` command is available on your system but is not used"


def test_quiet_lightning_drops_the_expected_warnings_once_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import wandb

    said: list[str] = []
    monkeypatch.setattr(wandb, "termwarn", lambda string, *a, **k: said.append(string))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        filters = list(warnings.filters)
        quiet_lightning()  # every Trainer: nothing added again (that would repeat warnings)
        assert warnings.filters == filters
        warnings.warn(f"{SRUN_HINT}. HINT: ... srun python x.py ...", stacklevel=1)
        warnings.warn("Checkpoint directory /r/checkpoints exists and is not empty.", stacklevel=1)
        warnings.warn("The number of training batches (5) is smaller than ...", stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "The number of training batches (5) is smaller than ..."
    ]
    wandb.termwarn("The anonymous setting has no effect and will be removed in a future version.")
    wandb.termwarn("a real warning", repeat=False)
    assert said == ["a real warning"]


def test_the_fine_tuning_bar_shows_the_training_loss_and_accuracy(tmp_path: Path) -> None:
    from ssl_robust.config.common import TrainerConfig
    from ssl_robust.finetune.modules import LinearProbe
    from ssl_robust.launch.trainer import build_trainer

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    tcfg = TrainerConfig(accelerator="cpu", max_epochs=2)
    trainer = build_trainer(tcfg, tmp_path, loggers=[CSVLogger(str(tmp_path))], callbacks=[])
    module = LinearProbe(4, 2)
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.progress_bar_callback is not None
    bar = trainer.progress_bar_callback.get_metrics(trainer, module)
    assert {"train/loss", "train/acc"} <= set(bar) and "val/acc" not in bar
    # The logged names are unchanged (epoch means, no _step / _epoch variants).
    logged = set(trainer.logged_metrics)
    assert {"train/loss", "train/acc", "val/acc"} <= logged
    assert not any(k.endswith(("_step", "_epoch")) for k in logged), logged


def test_a_fine_tuning_log_file_is_plain_and_free_of_expected_warnings(tmp_path: Path) -> None:
    """A linear probe (features, fit, test: two Trainers) and its resume, to a file, with an
    `srun` on the PATH outside any SLURM job."""
    from ssl_robust.models.backbones import build_backbone
    from ssl_robust.models.export import EncoderMeta, export_encoder

    torch.manual_seed(0)
    enc = tmp_path / "encoder"
    meta = EncoderMeta("convnet", 4, 16, 8, [0.3] * 3, [0.4] * 3, 10, {"dataset": "digits"})
    export_encoder(build_backbone("convnet", 4), meta, enc)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        TERM="xterm-256color",  # a colour terminal, but the output goes to a file
    )
    env.pop("FORCE_COLOR", None)
    args = [
        sys.executable,
        str(REPO / "scripts/finetune.py"),
        "mode=linear",
        f"encoder.run={enc}",
        f"run.dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "data.num_workers=0",
        "data.batch_size=32",
    ]
    logs = []
    for extra in ([], ["run.resume=true"]):
        log = tmp_path / f"log{len(logs)}.txt"
        with log.open("w") as out:
            done = subprocess.run(
                args + extra, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600
            )
        text = log.read_text()
        assert done.returncode == 0, text
        logs.append(text)
    first, resumed = logs
    # The shell's srun is there, but Lightning's hint about it is not (nor in the test pass).
    assert SRUN_HINT not in first + resumed
    assert "Resuming from" in resumed and "exists and is not empty" not in resumed
    assert "\x1b" not in first + resumed  # no colour or cursor codes
    # Feature extraction's progress (counts), the bar's training loss, then the summary.
    assert "features, train images 1438/1438" in first and "features, eval images 359/359" in first
    assert "train/loss:" in first and "train/acc:" in first
    assert "read from the cache" in resumed and "features, train images" not in resumed
