"""Generate and load CIFAR-10-C style corruption sets in the released layout.

The released CIFAR-10-C folder (Hendrycks & Dietterich 2019) holds one
``<corruption>.npy`` per corruption, uint8 of shape (5 * N, H, W, 3): five blocks of the
same N test images, severity 1 first, and ``labels.npy`` of shape (5 * N,).
``write_cifar_c`` writes that layout from our batched corruptions plus a
``manifest.json`` that makes an interrupted generation resumable; ``load_cifar_c``
reads either our folders or the released one. Frost uses procedural textures unless
``frost_textures`` names the photographs (``"package"`` or a folder, see
``corruptions.load_frost_textures``); the manifest records which.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_robust.evaluate.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    PARAMS,
    SEVERITIES,
    corrupt,
    frost_texture_folder,
    frost_textures_sha256,
    load_frost_textures,
)
from ssl_robust.files import private_tmp

__all__ = [
    "available_corruptions",
    "frost_identity",
    "load_cifar_c",
    "params_hash",
    "textures_for_frost",
    "write_cifar_c",
]

MANIFEST = "manifest.json"
LABELS = "labels.npy"
# Keys of the manifest that must match for an existing folder to be resumed.
_IDENTITY_KEYS = (
    "severities",
    "seed",
    "num_images",
    "image_size",
    "version",
    "params_hash",
    "images_sha256",
    "labels_sha256",
    "device_type",
    "frost_textures",
)
# What a manifest written before a key existed meant by it.
_IDENTITY_DEFAULTS: dict[str, Any] = {"frost_textures": "procedural"}


# Bump when a corruption's output changes for the same parameters and draws (2: glass blur
# copies pixels as make_cifar_c.py does, instead of swapping them): caches made before are stale.
IMPLEMENTATION = 2


def params_hash() -> str:
    """SHA-256 of the corruption parameter table and the implementation's version, to tie a
    cache (a generated CIFAR-10-C folder, stored corruption cells, twin features) to both."""
    text = json.dumps({"params": PARAMS, "implementation": IMPLEMENTATION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def textures_for_frost(source: str) -> tuple[torch.Tensor, ...] | None:
    """The frost textures of a source: None for ``"procedural"``, else the photographs.

    Args:
        source: ``"procedural"``, ``"package"`` or a folder (``load_frost_textures``).

    Raises:
        ImportError: ``"package"`` without the ``imagecorruptions`` package.
        ValueError: An unknown source.
        FileNotFoundError: A folder without frost1..frost5.
    """
    return None if source == "procedural" else load_frost_textures(source)


def frost_identity(source: str) -> str:
    """What caches record of a frost texture source, so a cache made with other textures is
    not reused: ``"procedural"``, or ``"photographs sha256:<hash>"`` of the five photographs
    (the same photographs in another folder are the same source)."""
    textures = textures_for_frost(source)
    if textures is None:
        return "procedural"
    return f"photographs sha256:{frost_textures_sha256(textures)}"


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _corruption_seed(seed: int, name: str, severity: int) -> int:
    # One independent stream per (corruption, severity), so that resuming or generating
    # a subset reproduces exactly the arrays of a full run.
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{severity}".encode())) % (2**63)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = private_tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = private_tmp(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _has_valid_array(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.uint8


class _Progress:
    """A rich progress bar (log lines when not on a terminal), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            from ssl_robust.launch.progress import progress_bar

            self._bar = progress_bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(),
            )
            self._bar.start()
            self._task = self._bar.add_task("CIFAR-10-C", total=total)

    def update(self, description: str, advance: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description, advance=advance)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def write_cifar_c(
    folder: str | os.PathLike[str],
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray | Sequence[int],
    corruptions: Iterable[str] = tuple(CORRUPTIONS),
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    progress: bool = False,
    frost_textures: str = "procedural",
) -> Path:
    """Corrupt a test set at severities 1..5 and save it in the CIFAR-10-C layout.

    Writes ``<corruption>.npy`` (uint8, (5 * N, H, W, 3), severity 1 first),
    ``labels.npy`` (int64, (5 * N,)) and ``manifest.json`` (corruptions done, severities,
    seed, N, image size, library version, parameter-table hash, hashes of the inputs, the
    frost textures).
    Each file is written to a temporary name and renamed, and the manifest is updated
    after every corruption, so rerunning after an interruption skips the corruptions
    already done. Each (corruption, severity) draws from its own seeded generator on
    ``device``; CPU and CUDA random streams differ, so the device type is part of the
    manifest.

    Float images are rounded to uint8 (make_cifar_c.py truncates with ``np.uint8``,
    which darkens by half a level on average).

    Args:
        folder: Output folder (created if missing).
        images_uint8_nhwc: Clean images, uint8 (N, H, W, 3).
        labels: N integer labels.
        corruptions: Names from ``CORRUPTIONS`` / ``EXTRA_CORRUPTIONS``.
        seed: Base seed.
        batch_size: Images per batched corruption call.
        device: Where the corruptions run.
        progress: Show a rich progress bar.
        frost_textures: ``"procedural"`` (generated textures), ``"package"`` (the
            CIFAR-10-C photographs shipped by the ``imagecorruptions`` package) or a folder
            holding frost1..frost5. Part of the folder's identity.

    Returns:
        The folder.

    Raises:
        ValueError: Bad inputs, unknown corruption names or frost texture source, or a
            folder that already holds a cache made from other inputs or settings (named in
            the message).
        ImportError: ``frost_textures="package"`` without the ``imagecorruptions`` package.
        FileNotFoundError: A frost texture folder without frost1..frost5.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (len(images),) or not np.issubdtype(labels_arr.dtype, np.integer):
        raise ValueError(
            f"labels must be {len(images)} integers, got {labels_arr.dtype} {labels_arr.shape}"
        )
    names = list(corruptions)
    valid = {**CORRUPTIONS, **EXTRA_CORRUPTIONS}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(valid)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    textures = textures_for_frost(frost_textures)  # before anything is written
    n, h, w, _ = images.shape
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)

    identity: dict[str, Any] = {
        "severities": list(SEVERITIES),
        "seed": int(seed),
        "num_images": int(n),
        "image_size": [int(h), int(w)],
        "version": _library_version(),
        "params_hash": params_hash(),
        "images_sha256": _sha256(images),
        "labels_sha256": _sha256(labels_arr.astype(np.int64)),
        "device_type": device.type,
        "frost_textures": frost_identity(frost_textures),
    }
    # Where the photographs were read from: informative, not part of the identity.
    extra = {} if textures is None else {"frost_folder": str(frost_texture_folder(frost_textures))}
    done: list[str] = []
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        differing = [
            k for k in _IDENTITY_KEYS if old.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k]
        ]
        if differing:
            raise ValueError(
                f"{out_dir} holds a corruption cache made with different {differing}; "
                "use another folder or delete it"
            )
        done = [c for c in old.get("corruptions", []) if isinstance(c, str)]

    shape = (len(SEVERITIES) * n, h, w, 3)
    labels_path = out_dir / LABELS
    all_labels = np.tile(labels_arr.astype(np.int64), len(SEVERITIES))
    if not (labels_path.exists() and np.array_equal(np.load(labels_path), all_labels)):
        _atomic_save(labels_path, all_labels)
    done = [c for c in done if _has_valid_array(out_dir / f"{c}.npy", shape)]
    todo = [c for c in names if c not in done]

    batches = (n + batch_size - 1) // batch_size
    bar = _Progress(progress, len(todo) * len(SEVERITIES) * batches)
    try:
        for name in todo:
            out = np.empty(shape, dtype=np.uint8)
            for severity in SEVERITIES:
                gen = torch.Generator(device=device)
                gen.manual_seed(_corruption_seed(seed, name, severity))
                block = (severity - 1) * n
                for start in range(0, n, batch_size):
                    stop = min(start + batch_size, n)
                    x = torch.from_numpy(images[start:stop]).to(device)
                    x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
                    y = corrupt(x, name, severity, generator=gen, frost_textures=textures)
                    y8 = torch.round(y * 255.0).to(torch.uint8).permute(0, 2, 3, 1)
                    out[block + start : block + stop] = y8.cpu().numpy()
                    bar.update(f"{name} s{severity}", 1)
            _atomic_save(out_dir / f"{name}.npy", out)
            done.append(name)
            _atomic_write_json(manifest_path, {"corruptions": done, **identity, **extra})
    finally:
        bar.close()
    if not manifest_path.exists():  # nothing to do, but record the folder's identity
        _atomic_write_json(manifest_path, {"corruptions": done, **identity, **extra})
    return out_dir


def _library_version() -> str:
    import ssl_robust

    return str(ssl_robust.__version__)


def available_corruptions(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the corruption arrays in a CIFAR-10-C style folder, sorted."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"no CIFAR-10-C folder at {path}")
    return sorted(p.stem for p in path.glob("*.npy") if p.name != LABELS)


def load_cifar_c(
    folder: str | os.PathLike[str], corruption: str, severity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one corruption at one severity from a CIFAR-10-C style folder.

    Works for folders written by ``write_cifar_c`` and for the released CIFAR-10-C folder
    (same layout, no manifest; its labels are uint8).

    Args:
        folder: The folder holding ``<corruption>.npy`` and ``labels.npy``.
        corruption: File stem of the corruption, e.g. ``"fog"``.
        severity: 1..5.

    Returns:
        Images uint8 (N, H, W, 3) and labels int64 (N,).

    Raises:
        FileNotFoundError: The folder, the corruption file or labels.npy is missing; the
            message names the path and the corruptions available.
        ValueError: Bad severity or inconsistent array shapes.
    """
    ok = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    if not ok or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")
    path = Path(folder)
    available = available_corruptions(path)
    file = path / f"{corruption}.npy"
    if not file.exists():
        raise FileNotFoundError(
            f"no corruption {corruption!r} in {path} (missing {file.name}); available: {available}"
        )
    labels_file = path / LABELS
    if not labels_file.exists():
        raise FileNotFoundError(f"missing {labels_file}; a CIFAR-10-C folder needs {LABELS}")
    data = np.load(file, mmap_mode="r")
    labels = np.load(labels_file, mmap_mode="r")
    k = len(SEVERITIES)
    if data.ndim != 4 or data.shape[-1] != 3 or len(data) % k or len(labels) != len(data):
        raise ValueError(
            f"{file} has shape {data.shape} and {labels_file} {labels.shape}; expected "
            f"(5 * N, H, W, 3) and (5 * N,)"
        )
    n = len(data) // k
    block = slice((severity - 1) * n, severity * n)
    return np.array(data[block], dtype=np.uint8), np.array(labels[block], dtype=np.int64)
