"""Stopped runs: Ctrl-C (exit 130) and SIGTERM (exit 143) say in one line what happened and
how to go on, and the rerun resumes; a diverged fit stops with an error at the epoch end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ssl_robust.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, main
from ssl_robust.pipelines.pretrain import pretrain
from tests.conftest import TINY_PRETRAIN

ROOT = Path(__file__).resolve().parents[1]


class CtrlCInEpoch(pl.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) in the second epoch's first batch."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_in_a_fit_exits_130_with_one_line_and_the_rerun_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown: the status of bad
    input, with no word of why."""
    run = tmp_path / "run"
    args = [*TINY_PRETRAIN, f"run.dir={run}"]

    def interrupted(cfg: DictConfig) -> Any:
        return pretrain(cfg, callbacks=[CtrlCInEpoch()])

    assert main("pretrain", args, pipeline=interrupted) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "error: interrupted; the run directory keeps what was finished" in err
    assert "Traceback" not in err
    assert not (run / "metrics.json").exists()  # the run did not finish
    assert main("pretrain", args) == 0  # resumes from the first epoch's checkpoint
    assert "Resuming from" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_ctrl_c_outside_a_fit_exits_130_too(capsys: pytest.CaptureFixture[str]) -> None:
    def evaluation(cfg: DictConfig) -> None:
        raise KeyboardInterrupt

    assert main("evaluate", ["classifier.run=x"], pipeline=evaluation) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.startswith("error: interrupted;")


class SigtermInEpoch(pl.Callback):
    """Sends this process SIGTERM (what a scheduler's stop sends) in the second epoch's second
    batch."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
        if trainer.current_epoch == 1 and i == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _encoder_state(run: Path) -> dict[str, torch.Tensor]:
    from ssl_robust.models.export import load_encoder

    encoder, _ = load_encoder(run)
    return encoder.state_dict()


def test_sigterm_in_a_fit_checkpoints_the_step_exits_143_and_the_rerun_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning ends a fit on SIGTERM with a SystemExit of no code: the job used to exit 0,
    as if finished, with its progress since the last epoch's checkpoint lost."""
    run = tmp_path / "run"
    args = [*TINY_PRETRAIN, f"run.dir={run}"]

    def stopped(cfg: DictConfig) -> Any:
        return pretrain(cfg, callbacks=[SigtermInEpoch()])

    assert main("pretrain", args, pipeline=stopped) == EXIT_TERMINATED
    out, err = capsys.readouterr()
    assert "error: stopped by SIGTERM; the run directory keeps what was finished" in err
    assert "Traceback" not in err
    # The step in progress was finished and checkpointed: epoch 1's second batch, step 5.
    assert f"SIGTERM: checkpointed {run / 'hpc_ckpt_1.ckpt'} (step 5); stopping" in out
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 5
    assert not (run / "metrics.json").exists()
    assert main("pretrain", args) == 0
    assert f"Resuming from {run / 'hpc_ckpt_1.ckpt'}" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    # The same weights as a run that was never stopped.
    whole = tmp_path / "whole"
    assert main("pretrain", [*TINY_PRETRAIN, f"run.dir={whole}"]) == 0
    for key, value in _encoder_state(whole).items():
        torch.testing.assert_close(_encoder_state(run)[key], value, rtol=0, atol=0, msg=key)


def test_data_loader_workers_leave_sigterm_to_the_main_process() -> None:
    """Else a scheduler's SIGTERM to the whole job kills them first, and the main process
    fails at once ("DataLoader worker ... is killed by signal") instead of checkpointing."""
    from torch.utils.data import Dataset

    from ssl_robust.data.datamodule import eval_loader

    class Handler(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> bool:
            return signal.getsignal(signal.SIGTERM) == signal.SIG_IGN

    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    assert next(iter(eval_loader(Handler(), batch_size=2, num_workers=1))).tolist() == [True] * 2


def test_the_workers_are_seeded_as_lightning_seeds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """After seed_everything(workers=True) Lightning gives a loader without a worker_init_fn
    its own, which seeds numpy and random in each worker; the SIGTERM one runs it too."""
    import random
    from functools import partial

    import numpy as np
    from lightning_fabric.utilities.seed import pl_worker_init_function
    from torch.utils.data import DataLoader, Dataset

    from ssl_robust.data.datamodule import ignore_sigterm

    class Draws(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> list[float]:
            return [float(np.random.random()), random.random(), torch.rand(()).item()]

    def draws(init: Any) -> list[list[float]]:
        torch.manual_seed(0)  # the base seed the loader hands its workers
        loader = DataLoader(Draws(), batch_size=None, num_workers=2, worker_init_fn=init)
        return [list(map(float, d)) for d in loader]

    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    assert draws(ignore_sigterm) == draws(partial(pl_worker_init_function, rank=0))
    monkeypatch.delenv("PL_SEED_WORKERS")
    assert draws(ignore_sigterm) == draws(None)  # PyTorch's own seeding otherwise
    assert draws(ignore_sigterm) != draws(partial(pl_worker_init_function, rank=0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_whole_job_with_workers_exits_143_with_a_checkpoint(
    tmp_path: Path,
) -> None:
    """As SLURM, `timeout` or `kill -TERM -<pgid>` stop a job: every process, DataLoader
    workers included, gets SIGTERM."""
    run = tmp_path / "run"
    args = [*TINY_PRETRAIN, f"run.dir={run}", "data.num_workers=1", "trainer.max_epochs=500"]
    args += ["trainer.limit_train_batches=1.0", "monitor.every_n_epochs=1000"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job's
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # the fit has started (Lightning's handler is in place)
        lines.append(line)
        if line.startswith("scale: "):
            break
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, "".join(lines) + out + err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert "SIGTERM: checkpointed" in out and (run / "hpc_ckpt_1.ckpt").is_file()


class PoisonWeights(pl.Callback):
    """Puts a NaN into the encoder's first weight in the second epoch's first batch, as a
    diverging step would; the next steps spread it."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.current_epoch == 1 and i == 0:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).view(-1)[0] = float("nan")


def test_a_diverged_fit_stops_at_the_epoch_end_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = [*TINY_PRETRAIN, f"run.dir={run}", "trainer.max_epochs=4"]

    def diverging(cfg: DictConfig) -> Any:
        return pretrain(cfg, callbacks=[PoisonWeights()])

    assert main("pretrain", args, pipeline=diverging) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: training diverged in epoch 2 (step 6) (train/loss nan): " in err, err
    assert "e.g. backbone." in err and "Traceback" not in err
    assert f"The last finite state is {run / 'checkpoints' / 'last.ckpt'}. Lower" in err
    # Stopped before epoch 2's checkpoint: last.ckpt is epoch 1's, finite.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run / "metrics.json").exists() and not (run / "encoder.safetensors").exists()


def test_sigterm_in_an_evaluation_exits_143_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The evaluation has no Trainer: SIGTERM's default action ended it with no word."""
    from ssl_robust.pipelines.evaluate import job

    before = signal.getsignal(signal.SIGTERM)

    def working(cfg: DictConfig) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises first
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(job, "_evaluate", working)
    assert main("evaluate", ["classifier.run=x"], pipeline=job.evaluate) == EXIT_TERMINATED
    assert capsys.readouterr().err.startswith("error: stopped by SIGTERM;")
    assert signal.getsignal(signal.SIGTERM) == before  # restored
