"""Ctrl-C: one line that says what happened and how to go on, exit 130, and the rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from omegaconf import DictConfig

from ssl_robust.cli import EXIT_INTERRUPTED, main
from ssl_robust.pipelines.pretrain import pretrain
from tests.conftest import TINY_PRETRAIN


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
