"""Image sources: the embedded default, torchvision datasets and ImageFolder trees.

Every source is an :class:`ImageSource`: a torch Dataset of ``(PIL RGB image, label)`` that
also knows its class names. Sources that fit in memory are :class:`ArraySource` objects holding
one uint8 array ``(N, H, W, 3)``, which is what a GPU-side augmentation path can upload once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from rich.progress import track
from torch.utils.data import Dataset

from ssl_robust.files import write_atomic

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Per-channel statistics of the training images (used when the config gives none).
CIFAR10_NORMALIZE = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
CIFAR100_NORMALIZE = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}
STL10_NORMALIZE = {"mean": [0.4467, 0.4398, 0.4066], "std": [0.2603, 0.2566, 0.2713]}
IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class DataError(ValueError):
    """Bad or missing data; the message names the path."""


class ImageSource(Dataset):
    """A dataset of ``(PIL RGB image, int label)`` with class names."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> ImageSource:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.labels[index])


class ArraySource(ImageSource):
    """Images held as one uint8 array ``(N, H, W, 3)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def subset(self, indices: np.ndarray) -> ArraySource:
        return ArraySource(self.images[indices], self.labels[indices], self.classes)

    def concat(self, other: ArraySource) -> ArraySource:
        return ArraySource(
            np.concatenate([self.images, other.images]),
            np.concatenate([self.labels, other.labels]),
            self.classes,
        )


class FileSource(ImageSource):
    """Images read lazily from files (large ImageFolder trees)."""

    def __init__(
        self, files: list[Path], labels: np.ndarray, classes: list[str], size: int
    ) -> None:
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.size = size

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            return _read_image(path, self.size)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot read image file {str(path)!r}: {err}") from None

    def subset(self, indices: np.ndarray) -> FileSource:
        return FileSource(
            [self.files[i] for i in indices], self.labels[indices], self.classes, self.size
        )


class TransformDataset(Dataset):
    """Applies a transform to a source's images: ``(transform(img), label)``.

    Indexed by ``(epoch, index)`` with a ``seed``, it seeds the RNGs that torchvision and
    lightly transforms draw from (torch, numpy, random) from ``(seed, epoch, index)`` first:
    each view is then a pure function of those three numbers.
    """

    def __init__(
        self, source: ImageSource, transform: Callable[[Image.Image], Any], seed: int | None = None
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        """``(transform(img), label)``; keyed by ``(epoch, index)`` also returns the key."""
        if isinstance(key, tuple):
            epoch, index = key
            if self.seed is not None:
                state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
                # The CPU generator alone, which the transforms draw from: torch.manual_seed
                # also seeds every accelerator's (85 us of the ~600 us a CIFAR view pair takes)
                # and, in the main process, would reset the GPU's random state per image.
                torch.default_generator.manual_seed(int(state[0]))
                np.random.seed(int(state[1]))
                random.seed(int(state[0]))
            img, label = self.source[index]
            return self.transform(img), label, key
        img, label = self.source[key]
        return self.transform(img), label


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: list[float]
    std: list[float]


@dataclass
class Splits:
    train: ImageSource
    val: ImageSource
    info: DatasetInfo
    # Extra images without labels (label -1) for the self-supervised phases: STL-10's 100k.
    unlabeled: ImageSource | None = None

    def unsupervised_train(self) -> ImageSource:
        """What pretraining and denoiser training learn from: train plus any unlabeled pool."""
        if self.unlabeled is None:
            return self.train
        if not isinstance(self.train, ArraySource) or not isinstance(self.unlabeled, ArraySource):
            raise TypeError("only in-memory sources can be pooled")
        return self.train.concat(self.unlabeled)


def _read_image(path: Path, size: int) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        # Grayscale, palette and alpha images all become 3-channel RGB.
        rgb = img.convert("RGB")
    if size and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return rgb


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced, seeded train/val index split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------------------------------------
# The embedded default: scikit-learn's handwritten digits
# ---------------------------------------------------------------------------------------------


def load_digits_source(image_size: int) -> ArraySource:
    """The 1,797 real 8x8 handwritten digits that scikit-learn ships, as RGB uint8 images.

    The 17 grey levels (0..16) are scaled to 0..255 and upsampled (bicubic) to ``image_size``;
    digits are white on black like MNIST.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = (bunch.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.stack(
        [
            np.asarray(
                Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC)
            )
            for im in raw
        ]
    )
    images = np.repeat(images[..., None], 3, axis=-1)  # (N, S, S, 3)
    return ArraySource(images, bunch.target.astype(np.int64), [str(d) for d in range(10)])


def _array_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, H, W, 3)`` images, in [0, 1].

    Exact integer sums of the values and their squares, a block of images at a time: a float64
    copy of CIFAR-10's training set would take 1.2 GB and seconds of every start-up."""
    n = 0
    total = np.zeros(3, dtype=np.int64)
    squares = np.zeros(3, dtype=np.int64)
    for start in range(0, len(images), 4096):
        block = images[start : start + 4096].reshape(-1, 3)
        total += block.sum(0, dtype=np.int64)
        wide = block.astype(np.int32)
        squares += np.einsum("ij,ij->j", wide, wide, dtype=np.int64)
        n += len(block)
    mean = total / (255.0 * n)
    var = np.maximum(squares / (255.0**2 * n) - mean**2, 0.0)
    return {"mean": mean.round(4).tolist(), "std": np.sqrt(var).round(4).tolist()}


# ---------------------------------------------------------------------------------------------
# torchvision datasets (local root, explicit download switch)
# ---------------------------------------------------------------------------------------------


def _torchvision(name: str, root: str, download: bool, split: str) -> Any:
    import torchvision

    kwargs: dict[str, Any]
    if name == "stl10":
        cls: Any = torchvision.datasets.STL10
        kwargs = {"split": split}
    else:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        kwargs = {"train": split == "train"}
    try:
        return cls(root=root, download=download, **kwargs)
    except RuntimeError as err:
        raise DataError(
            f"{name} not found under {str(Path(root).resolve())!r} ({err}). Put the dataset there "
            f"or set data.download=true to fetch it."
        ) from None


def _torchvision_source(name: str, root: str, download: bool, split: str) -> ArraySource:
    """One split of a torchvision dataset as uint8 (N, H, W, 3) images."""
    d = _torchvision(name, root, download, split)
    if name == "stl10":
        images = np.ascontiguousarray(d.data.transpose(0, 2, 3, 1))
        return ArraySource(images, np.asarray(d.labels), list(d.classes))
    return ArraySource(np.asarray(d.data), np.asarray(d.targets), list(d.classes))


def load_torchvision_splits(
    name: str, root: str, download: bool
) -> tuple[ArraySource, ArraySource]:
    return (
        _torchvision_source(name, root, download, "train"),
        _torchvision_source(name, root, download, "test"),
    )


# Datasets whose test images can serve as an outside (OOD) set: load_outside_images.
OUTSIDE_DATASETS = ("cifar10", "cifar100", "imagefolder", "stl10", "svhn")


def load_outside_images(
    name: str, root: str, image_size: int, download: bool = False
) -> np.ndarray:
    """The test images of a dataset as uint8 (N, image_size, image_size, 3), for use as an
    out-of-distribution set: SVHN's test split (torchvision's ``test_32x32.mat``), the test
    split of CIFAR-10/100 or STL-10, or every image of an ImageFolder tree at ``root``
    (decoded once, cached in ``root/.cache``). Resized (bicubic) when the size differs.

    Raises:
        DataError: The dataset is not at ``root`` (and ``download`` is off), or unknown.
    """
    if name not in OUTSIDE_DATASETS:
        raise DataError(f"unknown outside dataset {name!r}; choose from {list(OUTSIDE_DATASETS)}")
    source: ArraySource | ImageSource
    if name == "svhn":
        import torchvision

        try:
            d = torchvision.datasets.SVHN(root=root, split="test", download=download)
        except RuntimeError as err:
            raise DataError(
                f"svhn not found under {str(Path(root).resolve())!r} ({err}). Put its "
                "test_32x32.mat there or set eval.download=true to fetch it."
            ) from None
        images = np.ascontiguousarray(d.data.transpose(0, 2, 3, 1))
        source = ArraySource(images, np.asarray(d.labels), [str(k) for k in range(10)])
    elif name == "imagefolder":
        source = load_image_folder(root, image_size, True, False, Path(root) / ".cache")
    else:
        source = _torchvision_source(name, root, download, "test")
    assert isinstance(source, ArraySource)
    if source.images.shape[1:3] != (image_size, image_size):
        source = _resize_array(source, image_size)
    return source.images


# ---------------------------------------------------------------------------------------------
# ImageFolder trees
# ---------------------------------------------------------------------------------------------


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """List ``root/<class>/<image>`` files; clear errors for missing or empty folders."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {str(root)!r} is empty: expected one sub-folder per class "
            f"holding images ({', '.join(IMG_EXTENSIONS)})"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(
            p for p in (root / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        if not found:
            raise DataError(
                f"class folder {str(root / cls)!r} holds no images ({', '.join(IMG_EXTENSIONS)})"
            )
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64), classes


_UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError)
# Below this many files a process pool costs more than it saves.
_PARALLEL_MIN_FILES = 2000


def _open_image(job: tuple[Path, int, bool]) -> np.ndarray | str | None:
    """One file: its pixels (decoding), None (verified only) or the reason it is unreadable.

    A module-level function of one picklable argument, so that a process pool can run it.
    """
    path, size, decode = job
    try:
        if decode:
            return np.asarray(_read_image(path, size))
        with Image.open(path) as img:
            img.verify()
        return None
    except _UNREADABLE as err:
        return str(err) or type(err).__name__


def _check_files(
    files: list[Path], skip_bad: bool, size: int, decode: bool
) -> tuple[list[int], list[np.ndarray]]:
    """Open every file once; return the indices of good files (and their pixels if decoding).

    Large trees are read by a pool of forked processes (threads do not help: decoding a
    32-px JPEG is too short to release the GIL for long), in chunks and in file order, so
    that with ``skip_bad`` false the first unreadable file in that order is the one reported.
    """
    good: list[int] = []
    pixels: list[np.ndarray] = []
    bad: list[str] = []
    jobs = [(path, size, decode) for path in files]
    workers = min(16, os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        forkable = "fork" in multiprocessing.get_all_start_methods()  # not on Windows
        if forkable and workers > 1 and len(files) >= _PARALLEL_MIN_FILES:
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            )
            chunk = max(1, min(512, len(jobs) // (4 * workers)))
            results: Iterator[np.ndarray | str | None] = pool.map(
                _open_image, jobs, chunksize=chunk
            )
        else:
            results = map(_open_image, jobs)
        progress = track(results, total=len(files), description="Reading images", transient=True)
        for i, result in enumerate(progress):
            if isinstance(result, str):
                if not skip_bad:
                    raise DataError(
                        f"cannot read image file {str(files[i])!r}: {result}. Fix or remove "
                        f"it, or set data.skip_bad_images=true to skip unreadable files."
                    )
                bad.append(str(files[i]))
                continue
            if result is not None:
                pixels.append(result)
            good.append(i)
    if bad:
        print(f"Skipped {len(bad)} unreadable image file(s), e.g. {bad[0]!r}")
    if not good:
        raise DataError("no readable images left after skipping unreadable files")
    return good, pixels


def _native_size(files: list[Path]) -> int:
    """The longer side of the first readable image among ``files`` (0 if none is)."""
    for path in files:
        try:
            with Image.open(path) as img:
                return max(img.size)
        except _UNREADABLE:
            continue
    return 0


def load_image_folder(
    root: str | Path,
    image_size: int,
    in_memory: bool,
    skip_bad: bool,
    cache_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> ImageSource:
    """An ImageFolder tree, decoded once into a uint8 array when ``in_memory``.

    Args:
        root: The tree, ``root/<class>/<image>``.
        image_size: Side the images are resized to; 0 takes the longer side of the tree's
            first readable image when decoding (lazily read files keep their own sizes: the
            transforms crop and resize them).
        in_memory: Decode every image now into one array (else read files lazily).
        skip_bad: Skip unreadable files (reporting how many) instead of raising.
        cache_dir: Where the decoded array is cached as ``.npz``, keyed by the file list,
            sizes, modification times, the image size and the class list, so later runs skip
            decoding.
        classes: The class list the labels index, e.g. the train tree's for a test tree:
            labels follow the folder names (a tree may lack classes of the list). Default:
            the tree's own sorted folder names.

    Raises:
        DataError: Missing or empty folders, unreadable files (without ``skip_bad``), or class
            folders that ``classes`` does not hold.
    """
    files, labels, found = scan_image_folder(root)
    if classes is None:
        names = found
    else:
        names = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(names)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise DataError(
                f"class folder(s) {unknown} of {str(root)!r} are not among the classes "
                f"{names} (the train tree's); a test tree may lack classes of the train tree "
                "but hold no others"
            )
        labels = np.asarray([index[c] for c in found], dtype=np.int64)[labels]
    if in_memory and not image_size:
        image_size = _native_size(files)
    cache: Path | None = None
    if in_memory and cache_dir is not None:
        h = hashlib.sha1()
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(f"{image_size}|{skip_bad}".encode())
        if names != found:  # labels remapped to another class list: another array
            h.update(json.dumps(names).encode())
        cache = Path(cache_dir) / f"imagefolder-{h.hexdigest()[:16]}.npz"
        cached = _read_cache(cache, names)
        if cached is not None:
            return cached
    good, pixels = _check_files(files, skip_bad, image_size, decode=in_memory)
    if not in_memory:
        return FileSource([files[i] for i in good], labels[good], names, image_size)
    source = ArraySource(np.stack(pixels), labels[good], names)
    if cache is not None:
        try:  # through this process's own temp file: every DDP rank may write the cache
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(
                cache,
                lambda fh: np.savez(
                    fh, images=source.images, labels=source.labels, classes=json.dumps(names)
                ),
            )
        except OSError as err:  # a read-only dataset folder: decode again next time
            print(f"Could not cache decoded images in {str(cache.parent)!r}: {err}")
    return source


def _read_cache(cache: Path, classes: list[str]) -> ArraySource | None:
    """A cached decoded tree, or None when there is none, it is unreadable or it was saved
    for another class list (then it is decoded again and rewritten)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["classes"])) != classes:
                return None
            return ArraySource(z["images"], z["labels"], classes)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _is_labeled_npz(path: Path) -> bool:
    """Whether a ``.npz`` archive holds ``images`` and ``labels`` arrays (read lazily)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {"images", "labels"} <= set(archive.files)
    except (OSError, ValueError, TypeError, AttributeError, zipfile.BadZipFile):
        return False


def _npz_files(folder: Path) -> list[Path]:
    """The ``.npz`` archives of a folder that hold ``images`` and ``labels`` (others, say
    embeddings beside a class tree, are not labeled sets); of a ``<name>_train`` and
    ``<name>_test`` pair (CIFAR-10.2's layout), the test one."""
    files = [f for f in sorted(folder.glob("*.npz")) if _is_labeled_npz(f)]
    stems = {f.stem for f in files}
    if len(files) == 2 and any(s.endswith("_test") and s[:-5] + "_train" in stems for s in stems):
        return [f for f in files if f.stem.endswith("_test")]
    return files


def _read_labeled_arrays(data: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Images and labels of a ``<name>_data.npy`` file (labels beside it) or of a ``.npz``
    holding ``images`` and ``labels``; and where the labels came from, for errors. Read
    without pickle: CIFAR-10.2's other keys (lists of names) are never loaded."""
    if data.suffix == ".npz":
        try:
            archive = np.load(data, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):  # e.g. a renamed .npy file
                raise ValueError(f"it holds a single {type(archive).__name__}, not an archive")
            with archive:
                keys = list(archive.files)
                arrays = {k: archive[k] for k in ("images", "labels") if k in keys}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{str(data)!r} is not a readable .npz archive: {err}") from err
        missing = [k for k in ("images", "labels") if k not in arrays]
        if missing:
            raise DataError(
                f"{str(data)!r} has no {' or '.join(missing)} array; it holds {keys} "
                "(expected CIFAR-10.2's layout: images, labels)"
            )
        if not np.issubdtype(arrays["labels"].dtype, np.integer):
            raise DataError(
                f"{str(data)!r} holds {arrays['labels'].dtype} labels; expected integer class "
                "indices"
            )
        return arrays["images"], arrays["labels"].astype(np.int64).ravel(), f"{data}[labels]"
    if not data.name.endswith("_data.npy"):
        raise DataError(f"{str(data)!r}: expected a <name>_data.npy file, a .npz file or a folder")
    labels_file = data.with_name(data.name.removesuffix("_data.npy") + "_labels.npy")
    if not labels_file.is_file():
        raise DataError(f"{str(data)!r} has no labels file beside it ({labels_file.name})")
    return np.load(data), np.load(labels_file).astype(np.int64).ravel(), str(labels_file)


def labeled_set_file(path: str | Path) -> Path | None:
    """The array file a labeled set's ``path`` names (:func:`load_labeled_set`): the file
    itself, or the one ``<name>_data.npy`` or ``.npz`` file of a folder; None for a class
    tree or nothing.

    Raises:
        DataError: A folder with several candidate files.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    files = sorted(path.glob("*_data.npy")) or _npz_files(path)
    if len(files) > 1:
        raise DataError(
            f"{str(path)!r} holds several data files ({[p.name for p in files]}); name one"
        )
    return files[0] if files else None


def load_labeled_set(
    path: str | Path, classes: Sequence[str], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A labeled test set of the same classes, e.g. a natural distribution shift such as
    CIFAR-10.1, as uint8 (N, image_size, image_size, 3) images and int64 labels indexing
    ``classes``.

    ``path`` is a ``<name>_data.npy`` file (uint8 (N, H, W, 3)) beside ``<name>_labels.npy``
    (CIFAR-10.1's layout, labels in the class order of ``classes``), a ``.npz`` file holding
    ``images`` and ``labels`` arrays (CIFAR-10.2's layout), a folder holding one such pair or
    file (CIFAR-10.2's test file beside its train file), or a ``<folder>/<class>/<image>``
    tree whose class folders are named like ``classes`` (decoded once, cached in
    ``<folder>/.cache``). Resized (bicubic) when the size differs.

    Raises:
        DataError: Nothing readable there, labels outside ``classes``, class folders of other
            names.
    """
    path = Path(path)
    data = labeled_set_file(path)
    if data is not None:
        images, labels, labels_file = _read_labeled_arrays(data)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{str(data)!r} holds {images.dtype} {images.shape}; expected uint8 (N, H, W, 3)"
            )
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels in {str(path)!r}")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(classes):
            raise DataError(
                f"{labels_file!r} holds labels {labels.min()}..{labels.max()}; the "
                f"classifier has classes 0..{len(classes) - 1}"
            )
        source = ArraySource(images, labels, list(classes))
    elif path.is_dir():
        tree = load_image_folder(path, image_size, True, False, path / ".cache")
        assert isinstance(tree, ArraySource)
        index = {str(c): i for i, c in enumerate(classes)}
        unknown = [c for c in tree.classes if c not in index]
        if unknown:
            raise DataError(
                f"class folders of {str(path)!r} not among the classifier's classes: {unknown}; "
                f"its classes: {list(classes)}"
            )
        to_ours = np.array([index[c] for c in tree.classes], dtype=np.int64)
        source = ArraySource(tree.images, to_ours[tree.labels], list(classes))
    else:
        raise DataError(f"no labeled test set at {str(path)!r}")
    if source.images.shape[1:3] != (image_size, image_size):
        source = _resize_array(source, image_size)
    return np.ascontiguousarray(source.images), np.asarray(source.labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "stl10")
NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "stl10": 96}


def build_splits(
    name: str,
    root: str,
    download: bool = False,
    image_size: int = 0,
    val_fraction: float = 0.2,
    seed: int = 0,
    in_memory: bool = True,
    skip_bad_images: bool = False,
    cache_dir: str | Path | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    with_unlabeled: bool = False,
) -> Splits:
    """Train and validation sources plus what a model needs to know about them.

    ``with_unlabeled`` also loads a dataset's unlabeled pool (STL-10's 100k images, label -1)
    into ``Splits.unlabeled``, for the self-supervised phases.

    ImageFolder: ``root/train`` and ``root/test`` (or ``root/val``) when present, otherwise the
    whole tree split by ``val_fraction`` (class-balanced, seeded).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    # Normalisation statistics: known ones, or those of these images (computed only when the
    # config does not give mean and std).
    stats: dict[str, list[float]] = IMAGENET_NORMALIZE
    stats_of: np.ndarray | None = None
    train: ImageSource
    val: ImageSource
    unlabeled: ArraySource | None = None
    if name == "digits":
        size = image_size or NATIVE_SIZE["digits"]
        full = load_digits_source(size)
        tr_idx, va_idx = stratified_split(full.labels, val_fraction, seed)
        train, val = full.subset(tr_idx), full.subset(va_idx)
        stats_of = train.images
    elif name in ("cifar10", "cifar100", "stl10"):
        train, val = load_torchvision_splits(name, root, download)
        if name == "stl10" and with_unlabeled:
            pool = _torchvision(name, root, download, "unlabeled")
            images = np.ascontiguousarray(pool.data.transpose(0, 2, 3, 1))  # (N, 96, 96, 3)
            unlabeled = ArraySource(images, np.full(len(images), -1), list(train.classes))
        size = NATIVE_SIZE[name]
        if image_size and image_size != size:
            train, val = _resize_array(train, image_size), _resize_array(val, image_size)
            if unlabeled is not None:
                unlabeled = _resize_array(unlabeled, image_size)
            size = image_size
        stats = {
            "cifar10": CIFAR10_NORMALIZE,
            "cifar100": CIFAR100_NORMALIZE,
            "stl10": STL10_NORMALIZE,
        }[name]
    else:
        rootp = Path(root)
        if not rootp.exists():
            raise DataError(f"image folder {str(rootp)!r} does not exist")
        val_dir = next((rootp / d for d in ("test", "val") if (rootp / d).is_dir()), None)
        if (rootp / "train").is_dir() and val_dir is not None:
            train = load_image_folder(
                rootp / "train", image_size, in_memory, skip_bad_images, cache_dir
            )
            # The test tree in the train tree's terms: its classes (labels follow the folder
            # names, whatever folders either tree lacks) and, with image_size 0, its size.
            val_size = image_size or (_source_size(train) if in_memory else 0)
            val = load_image_folder(
                val_dir, val_size, in_memory, skip_bad_images, cache_dir, classes=train.classes
            )
        else:
            tree = load_image_folder(rootp, image_size, in_memory, skip_bad_images, cache_dir)
            tr_idx, va_idx = stratified_split(tree.labels, val_fraction, seed)
            train, val = tree.subset(tr_idx), tree.subset(va_idx)
        size = image_size or _source_size(train)
        if isinstance(train, ArraySource):
            stats_of = train.images
    if stats_of is not None and not (mean and std):
        stats = _array_stats(stats_of)
    info = DatasetInfo(
        name=name,
        num_classes=len(train.classes),
        image_size=size,
        mean=list(mean) if mean else stats["mean"],
        std=list(std) if std else stats["std"],
    )
    return Splits(train=train, val=val, info=info, unlabeled=unlabeled)


def _source_size(source: ImageSource) -> int:
    """The side an ImageFolder source's images come at (decoded, or resized when read)."""
    if isinstance(source, ArraySource):
        return int(source.images.shape[1])
    # Files read at their own sizes: the transforms' 224 px (ImageNet's) unless resized.
    return int(getattr(source, "size", 0)) or 224


def _resize_array(source: ArraySource, size: int) -> ArraySource:
    images = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
            for im in source.images
        ]
    )
    return ArraySource(images, source.labels, source.classes)
