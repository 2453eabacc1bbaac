"""How every file of a run is written: through a temp file of this process, renamed into place.

    tmp = private_tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)   # atomic: a reader sees the old file or the new one, never half

The temp file is hidden and named after the process, so processes writing into one run
directory at the same time (separate evaluation jobs, DDP ranks, a sweep sharing a feature
cache) never write through the same temp file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["private_tmp", "save_safetensors", "shared_modes", "write_atomic", "write_text_atomic"]


def private_tmp(path: Path) -> Path:
    """The temp file this process writes ``path`` through before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` with ``write(file)`` through :func:`private_tmp`, renamed over it: a
    reader (or a crash mid-write) sees the old file or the new one, never half of one, and a
    failed write leaves no temp file behind."""
    tmp = private_tmp(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` of ``text`` (UTF-8)."""
    write_atomic(path, lambda fh: fh.write(text.encode()))


def save_safetensors(
    path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """safetensors' ``save_file``, through :func:`write_atomic`. The file gets the permissions
    of any file this process opens (the umask's): safetensors' own ``save_file`` (0.8) makes
    it private (0600), so colleagues on a shared cluster could not read exported weights."""
    from safetensors.torch import save

    write_atomic(path, lambda fh: fh.write(save(tensors, metadata)))


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only
    set it, and a file another thread creates meanwhile would get the temporary mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_modes(folder: Path) -> None:
    """Give every file under ``folder`` the permissions of a file opened normally (0666 less
    the umask): for folders a library wrote with private files (diffusers' safetensors)."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def unfinished_note(folder: Path) -> str:
    """For an error about a run directory's missing export: when the folder holds checkpoints,
    the sentence that its job stopped before its end (the export is a job's last step) and how
    to finish it; else nothing."""
    if (folder / "checkpoints" / "last.ckpt").is_file() or any(folder.glob("hpc_ckpt_*.ckpt")):
        return (
            ". It holds checkpoints, so its job stopped before the end: run that job's command "
            "again to resume and finish it"
        )
    return ""
