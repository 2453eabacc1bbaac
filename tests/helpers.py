"""Helpers that several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def unit_stamps(run_dir: Path) -> dict[str, tuple[int, int]]:
    """An evaluation run's stored units and the identity of their files (inode, mtime): a
    rewrite makes a new file."""
    folder = run_dir / "partial"
    return {
        str(p.relative_to(folder)).removesuffix(".safetensors"): (
            p.stat().st_ino,
            p.stat().st_mtime_ns,
        )
        for p in folder.rglob("*.safetensors")
    }


def metric_numbers(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric but the wall-clock times (which differ between equal runs)."""
    return {k: v for k, v in metrics.items() if not k.endswith("wall_s")}


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's rank/world variables, plus ``extra``."""
    drop = ("SLURM_", "TORCHELASTIC_", "PL_")
    names = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in names}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


class TickingClock:
    """Stands for the ``time`` module of :mod:`ssl_robust.launch.perf`: each read of
    ``perf_counter`` is ``step_s`` later than the one before."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return self.reads * self.step_s
