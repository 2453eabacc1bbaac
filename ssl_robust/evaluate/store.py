"""Finished units of work, one file each, so that an interrupted job's rerun skips them.

The evaluation job stores each unit it finishes (the clean pass, a corruption cell, one
threat's attack, ...) with :class:`UnitStore`; a rerun with the same settings reads them back
and computes only the rest. Units are keyed by a hash of everything they depend on, so a
changed config, dataset or set of weights never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ssl_robust.files import private_tmp

UNIT_SUFFIX = ".safetensors"


# A temp file older than this is left over from a killed write, not one in progress.
STALE_TMP_S = 3600.0


def sha256_json(value: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_stamp(path: Path) -> list[int] | None:
    """Size and modification time of a file that is read, not hashed (None: missing)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def read_unit(path: Path) -> tuple[str, dict[str, Any], dict[str, Tensor]] | None:
    """A stored unit's key, numbers and tensors; None when the file is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # not a dict
        data = json.loads(meta["data"])
        key = meta["key"]
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    return (key, data, tensors) if isinstance(data, dict) else None


class UnitStore:
    """The finished units of one job, one file each, so that a rerun skips them.

    A unit is written to ``<folder>/<unit>.safetensors`` (unit names may contain ``/``) as
    soon as it is done: its tensors, its numbers as JSON (floats round-trip exactly) and its
    key, the SHA-256 of the run fingerprint and the unit's own settings. Files are written to
    a temp file that is then renamed over the old one (``os.replace``), so a kill mid-write
    leaves either the old file or the new one. Only units whose key matches are read back;
    stale ones (another config, data or weights) and unreadable ones are recomputed and their
    files replaced.

    Args:
        folder: Where the units live (e.g. ``<run dir>/partial``).
        fingerprint: What every unit depends on (JSON-able).
        specs: The units this run needs, by name, with their own settings (JSON-able).
        resume: False discards the folder first: everything is recomputed (and stored again).
        describe: Names the kind of a unit for the resume message (e.g. "corruption cells");
            units are counted per kind.
        discard: With ``resume`` false, the units to discard instead of the whole folder: when
            other processes store their own units in it (the PGD shards of an array job).
    """

    def __init__(
        self,
        folder: Path,
        fingerprint: dict[str, Any],
        specs: dict[str, dict[str, Any]],
        resume: bool,
        describe: Callable[[str], str] = lambda unit: "units",
        discard: Iterable[str] | None = None,
    ) -> None:
        self.folder = folder
        self.describe = describe
        self.keys = {
            unit: sha256_json({"run": fingerprint, "unit": unit, "spec": spec})
            for unit, spec in specs.items()
        }
        self.done: dict[str, tuple[dict[str, Any], dict[str, Tensor]]] = {}
        self.stale: list[str] = []
        self.unreadable: list[str] = []
        self.discarded = not resume and folder.exists()
        if self.discarded and discard is None:
            shutil.rmtree(folder)
        elif self.discarded and discard is not None:
            for unit in discard:
                self._path(unit).unlink(missing_ok=True)
        if folder.exists():  # temp files of writes that a kill interrupted, an hour ago or more
            # (younger ones may be another process's write in progress into the same folder)
            stale = time.time() - STALE_TMP_S
            for tmp in folder.rglob(".*.tmp"):
                try:
                    if tmp.stat().st_mtime < stale:
                        tmp.unlink()
                except FileNotFoundError:  # renamed into place meanwhile
                    pass
        for unit, key in self.keys.items():
            path = self._path(unit)
            if not path.is_file():
                continue
            stored = read_unit(path)
            if stored is None:
                self.unreadable.append(unit)
            elif stored[0] != key:
                self.stale.append(unit)
            else:
                self.done[unit] = stored[1], stored[2]

    def _path(self, unit: str) -> Path:
        return self.folder / f"{unit}{UNIT_SUFFIX}"

    def get(self, unit: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """A finished unit's numbers and tensors, or None when it must be computed."""
        return self.done.get(unit)

    def put(
        self, unit: str, data: dict[str, Any], tensors: dict[str, Tensor] | None = None
    ) -> None:
        """Stores a finished unit atomically."""
        path = self._path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = safetensors_bytes(
            {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
            metadata={"key": self.keys[unit], "data": json.dumps(data)},
        )
        tmp = private_tmp(path)
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def messages(self) -> list[str]:
        """What a rerun takes over, ignores or discards, one line each (nothing on a fresh run)."""
        where = self.folder
        lines = []
        if self.discarded:
            lines.append(f"run.resume=false: discarded the finished units in {where}")
        if self.done:
            kinds = list(dict.fromkeys(self.describe(u) for u in self.keys))
            counts = [
                f"{sum(self.describe(u) == k for u in self.done)}/"
                f"{sum(self.describe(u) == k for u in self.keys)} {k}"
                for k in kinds
            ]
            lines.append(f"resuming evaluation: {', '.join(counts)} already done in {where}")
        for units, why in (
            (self.stale, "computed with a different config, data or weights"),
            (self.unreadable, "unreadable"),
        ):
            if units:
                shown = ", ".join(units[:6]) + (", ..." if len(units) > 6 else "")
                lines.append(
                    f"ignoring {len(units)} stored unit(s) in {where}, {why}; recomputing and "
                    f"replacing them: {shown}"
                )
        return lines
