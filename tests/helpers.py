"""Helpers that several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


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


@contextmanager
def host_syncs() -> Iterator[list[tuple[str, str]]]:
    """Records the operations inside the block that make the host wait for a CUDA device:
    ``.item()`` and ``bool()`` of a tensor, ``nonzero``, boolean-mask indexing and assignment,
    ``unique``... They run on any device, so a CPU run finds them
    (``torch.cuda.set_sync_debug_mode`` needs a GPU). Not seen in a CPU run: copies to the host
    (``.cpu()``, ``.tolist()``, ``.numpy()`` of a CPU tensor dispatch nothing), and an
    ``.item()`` of a tensor that lives on the host in a GPU run too (a CPU run cannot tell).
    Yields a list of ``(operation, innermost project or library frame)``, filled as they happen.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    always = {
        aten._local_scalar_dense.default,  # .item(), bool(), int(), float()
        aten.nonzero.default,
        aten.masked_select.default,
        aten._unique2.default,
        aten.unique_consecutive.default,
        aten.equal.default,
        aten.repeat_interleave.Tensor,
    }
    # With a boolean index among their indices (x[mask], x[mask] = v): a nonzero inside.
    masked = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
    masked.add(aten._index_put_impl_.default)
    found: list[tuple[str, str]] = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            flagged = func in always or (
                func in masked and any(i is not None and i.dtype == torch.bool for i in args[1])
            )
            if flagged:
                frames = [
                    f"{f.filename}:{f.lineno}"
                    for f in traceback.extract_stack()
                    if "/torch/" not in f.filename
                ]
                found.append((str(func), frames[-2] if len(frames) > 1 else "?"))
            return func(*args, **(kwargs or {}))

    with _Record():
        yield found


def blobs(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """Smooth synthetic images in [0, 1], (n, 3, size, size): two coloured Gaussian blobs on a
    grey background (what a small denoiser learns in a few hundred steps)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    centres = torch.rand(n, 2, 2, generator=g)  # (n, blob, xy)
    colours = torch.rand(n, 2, 3, generator=g)  # (n, blob, C)
    widths = 0.1 + 0.2 * torch.rand(n, 2, generator=g)  # (n, blob)
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2
    bumps = torch.exp(-d2 / (2 * widths[..., None, None] ** 2))  # (n, blob, H, W)
    return (0.2 + 0.8 * (colours[..., None, None] * bumps[:, :, None]).sum(1)).clamp(0, 1)


def frost_photos(folder: Path, height: int = 200, width: int = 200, seed: int = 0) -> Path:
    """Five random (height, width) "photographs" frost1..frost5.png in a new ``folder``, for
    the frost corruption's photo textures; returns the folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        photo = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        Image.fromarray(photo).save(folder / f"frost{i}.png")
    return folder
