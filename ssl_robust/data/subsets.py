"""Labeled subsets of the train split for semi-supervised fine-tuning.

A subset is a sorted array of indices into the train split, drawn class by class (so every
class gets its share), from a seed, and saved as ``subset.npy`` in the fine-tuning run
directory with ``subset.json`` recording what was asked for and which split it indexes. Every
later run on that directory reuses exactly those images, and a request that does not match the
saved one raises instead of silently training on other images.

Draws are nested: with one seed, the 1 % subset is contained in the 10 % subset, which is
contained in the 100 % one (each class is shuffled once by ``(seed, class)`` and a prefix is
taken), so a label-fraction sweep changes one thing at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from ssl_robust.files import write_atomic, write_text_atomic

SUBSET_FILE = "subset.npy"
SPEC_FILE = "subset.json"


@dataclass(frozen=True)
class SubsetSpec:
    """What to draw: a fraction of each class, or a fixed number per class.

    Args:
        fraction: Share of each class's train images, in (0, 1]; used when ``per_class`` is 0.
        per_class: Exactly this many images of every class (> 0), instead of a fraction.
        seed: Seed of the draw.
    """

    fraction: float = 0.1
    per_class: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_class < 0:
            raise ValueError(
                f"subset.per_class must be >= 0 (0 uses subset.fraction), got {self.per_class}"
            )
        if self.per_class == 0 and not 0.0 < self.fraction <= 1.0:
            raise ValueError(
                f"subset.fraction must be in (0, 1] (e.g. 0.01, 0.1 or 1.0), got {self.fraction}; "
                f"or set subset.per_class to a number of images per class"
            )

    @property
    def label(self) -> str:
        """A short name for run directories: ``10pct`` or ``25perclass``."""
        if self.per_class:
            return f"{self.per_class}perclass"
        return f"{round(self.fraction * 100, 6):g}pct"


def fraction_share(fraction: float, n: int) -> int:
    """Images a fraction selects of a class of ``n``: ``fraction * n`` rounded half up.

    Half up, not Python's ``round`` (half to even: 0.5 -> 0, 2.5 -> 2, 3.5 -> 4), so that a
    share of exactly one half always counts. The product is first rounded to 9 decimals, so
    that a half that binary floating point lands just below (``0.29 * 50`` and the like)
    still rounds up.
    """
    return math.floor(round(fraction * n, 9) + 0.5)


def smallest_fraction(n: int) -> str:
    """The smallest ``subset.fraction`` that selects an image of a class of ``n``, as text:
    ``1 / (2n)`` rounded up to 4 significant digits (so that the text itself selects one)."""
    exact = Decimal(1) / Decimal(2 * n)
    for digits in range(4, 20):
        step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
        text = format(exact.quantize(step, rounding=ROUND_CEILING).normalize(), "f")
        if fraction_share(float(text), n) >= 1:
            return text
    return format(exact, "f")


def class_counts(
    labels: np.ndarray, spec: SubsetSpec, classes: list[str] | None = None
) -> dict[int, int]:
    """Images to draw from each class present in ``labels``: ``spec.per_class``, or
    ``spec.fraction`` of the class rounded half up (:func:`fraction_share`).

    Raises:
        ValueError: A class has fewer images than requested, or a fraction selects none of a
            class (naming the smallest such class and the smallest fraction that selects an
            image of every class).
    """
    out: dict[int, int] = {}
    empty: list[tuple[int, int]] = []  # (n, class) of the classes the fraction misses
    present = np.unique(labels, return_counts=True)
    for c, n in zip(*present):
        name = repr(classes[int(c)]) if classes else str(int(c))
        if spec.per_class:
            k = spec.per_class
            if k > n:
                raise ValueError(
                    f"class {name} has only {n} train images, fewer than subset.per_class={k}; "
                    f"ask for at most {n} per class or use subset.fraction"
                )
        else:
            k = fraction_share(spec.fraction, int(n))
            if k < 1:
                empty.append((int(n), int(c)))
        out[int(c)] = int(k)
    if empty:
        n, c = min(empty)
        name = repr(classes[c]) if classes else str(c)
        n_min = int(present[1].min())
        raise ValueError(
            f"subset.fraction={spec.fraction} selects no image of class {name} ({n} train "
            f"images); use subset.fraction >= {smallest_fraction(n_min)} (about 1/{2 * n_min}, "
            f"the smallest that selects an image of every class: each class gives "
            f"fraction x its images, rounded half up, and the smallest has {n_min}) or "
            f"subset.per_class"
        )
    return out


def draw_subset(
    labels: np.ndarray, spec: SubsetSpec, classes: list[str] | None = None
) -> np.ndarray:
    """Class-balanced, seeded indices into the split that ``labels`` describes.

    Args:
        labels: (N,) integer labels of the train split.
        spec: What to draw.
        classes: Class names, only for error messages.

    Returns:
        (M,) sorted int64 indices, ``counts[c]`` of each class ``c`` (see :func:`class_counts`).
    """
    labels = np.asarray(labels)
    chosen = []
    for c, k in class_counts(labels, spec, classes).items():
        idx = np.flatnonzero(labels == c)  # (n_c,) ascending
        # One shuffle per (seed, class), independent of the other classes and of k: prefixes
        # of the same permutation make the subsets of one seed nested.
        rng = np.random.default_rng([spec.seed, c])
        chosen.append(idx[rng.permutation(len(idx))[:k]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def labels_digest(labels: np.ndarray) -> str:
    """A fingerprint of the split a subset indexes (its size and label sequence)."""
    arr = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    return hashlib.sha1(arr.tobytes()).hexdigest()[:16]


def subset_record(spec: SubsetSpec, labels: np.ndarray, data: dict[str, Any]) -> dict[str, Any]:
    """What ``subset.json`` holds: the request, the split it indexes and the data it came from."""
    return {
        **asdict(spec),
        "num_train": len(labels),
        "train_labels_sha1": labels_digest(labels),
        "data": data,
    }


def load_or_draw_subset(
    folder: str | Path,
    labels: np.ndarray,
    spec: SubsetSpec,
    data: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> np.ndarray:
    """The subset saved in ``folder``, or a fresh draw saved there.

    Args:
        folder: The run directory (``subset.npy`` + ``subset.json``).
        labels: (N,) labels of the train split the indices point into.
        spec: The request.
        data: What identifies the data (name, image size, split seed, ...), recorded and checked.
        classes: Class names, only for error messages.

    Returns:
        (M,) sorted int64 indices into the train split.

    Raises:
        ValueError: The saved subset was drawn for another request or another train split.
    """
    folder = Path(folder)
    npy, desc = folder / SUBSET_FILE, folder / SPEC_FILE
    record = subset_record(spec, labels, data or {})
    # The record is written first and the indices last, so a complete subset is an .npy with
    # its .json; an .npy alone is a write that stopped between the two, drawn anew here (as
    # a .json alone is: nothing was saved for it yet).
    if npy.is_file() and desc.is_file():
        saved = json.loads(desc.read_text())
        if saved != record:
            diff = {k: (saved.get(k), record[k]) for k in record if saved.get(k) != record.get(k)}
            raise ValueError(
                f"{str(npy)!r} was drawn for another request; differing (saved, requested): "
                f"{diff}. Use another run.dir, or delete the subset files to draw anew"
            )
        indices = np.load(npy)
        check_indices(indices, len(labels))
        return indices
    indices = draw_subset(labels, spec, classes)
    folder.mkdir(parents=True, exist_ok=True)
    # Every rank of a multi-process run draws at once: each writes through its own temp file
    # and renames it into place, and since the draws are identical, whichever rename lands
    # last leaves the same files.
    write_text_atomic(desc, json.dumps(record, indent=2, sort_keys=True))
    write_atomic(npy, lambda fh: np.save(fh, indices))
    return indices


def check_indices(indices: np.ndarray, num_train: int) -> None:
    """Indices must be unique and inside the train split."""
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"a subset must be a non-empty 1-D index array, got {indices.shape}")
    if indices.min() < 0 or indices.max() >= num_train:
        raise ValueError(f"subset indices outside the train split of {num_train} images")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("subset indices repeat")


def image_digests(images: np.ndarray) -> set[bytes]:
    """Content fingerprints of uint8 images (N, H, W, C), one per image."""
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images}


def assert_disjoint(
    labeled: np.ndarray, evaluation: np.ndarray, max_shared_fraction: float = 0.01
) -> int:
    """No more than a stray labeled image may be byte-identical to an evaluation image.

    The indices point into the train split, so the subset is disjoint from the evaluation split
    by construction; this checks the splits themselves (an ImageFolder whose ``train`` and
    ``test`` trees share files, a split rebuilt with another seed, ...). Public datasets hold
    a few exact train/test duplicates (Barz & Denzler 2020 on CIFAR), so up to
    ``max_shared_fraction`` of the subset is reported, not refused.

    Args:
        labeled: (M, H, W, C) uint8 images of the subset.
        evaluation: (K, H, W, C) uint8 images of the evaluation split.

    Raises:
        ValueError: Naming how many labeled images also appear in the evaluation split.
    """
    shared = image_digests(labeled) & image_digests(evaluation)
    if shared and len(shared) <= max_shared_fraction * len(labeled):
        print(f"note: {len(shared)} labeled image(s) also appear in the evaluation split")
    elif shared:
        raise ValueError(
            f"{len(shared)} labeled training image(s) also appear in the evaluation split; "
            f"the train and evaluation splits overlap (check data.name/root/val_fraction/"
            f"split_seed)"
        )
    return len(shared)
