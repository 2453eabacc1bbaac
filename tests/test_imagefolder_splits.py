"""ImageFolder ``train/`` + ``test/`` (or ``val/``) trees: the test tree in the train tree's
terms (its class list and, with image_size 0, its image size), and the decoded-tree cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_robust.data.datasets import (
    ArraySource,
    DataError,
    FileSource,
    build_splits,
    load_image_folder,
)

# One flat colour per class name, so that an image shows which class folder it came from.
COLOURS = {"a": 20, "b": 80, "c": 140, "d": 200, "z": 250}


def _tree(root: Path, classes: str, n: int = 2, size: int = 8) -> Path:
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((size, size, 3), COLOURS[cls], dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _names_from_pixels(source: ArraySource) -> list[str]:
    by_value = {v: k for k, v in COLOURS.items()}
    return [by_value[int(im[0, 0, 0])] for im in source.images]


def _names_from_labels(source: ArraySource | FileSource, classes: list[str]) -> list[str]:
    return [classes[i] for i in source.labels]


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_test_labels_follow_the_train_class_names(tmp_path: Path, test_dir: str) -> None:
    _tree(tmp_path / "train", "abc")
    _tree(tmp_path / test_dir, "ac")  # a test tree may lack a train class
    s = build_splits("imagefolder", str(tmp_path), image_size=8)
    assert s.train.classes == s.val.classes == ["a", "b", "c"] and s.info.num_classes == 3
    assert s.val.labels.tolist() == [0, 0, 2, 2]
    assert isinstance(s.val, ArraySource) and isinstance(s.train, ArraySource)
    assert _names_from_labels(s.val, s.train.classes) == _names_from_pixels(s.val)
    assert _names_from_labels(s.train, s.train.classes) == _names_from_pixels(s.train)


def test_test_labels_follow_the_names_when_both_trees_lack_classes(tmp_path: Path) -> None:
    _tree(tmp_path / "train", "abd")
    _tree(tmp_path / "test", "bd")
    s = build_splits("imagefolder", str(tmp_path), image_size=8)
    assert isinstance(s.val, ArraySource)
    assert s.val.classes == ["a", "b", "d"] and s.val.labels.tolist() == [1, 1, 2, 2]
    assert _names_from_labels(s.val, s.train.classes) == _names_from_pixels(s.val)


def test_lazily_read_test_trees_are_remapped_too(tmp_path: Path) -> None:
    _tree(tmp_path / "train", "abc")
    _tree(tmp_path / "test", "bc")
    s = build_splits("imagefolder", str(tmp_path), image_size=8, in_memory=False)
    assert isinstance(s.val, FileSource)
    assert s.val.classes == ["a", "b", "c"] and s.val.labels.tolist() == [1, 1, 2, 2]
    assert [f.parent.name for f in s.val.files] == _names_from_labels(s.val, s.val.classes)


def test_a_test_class_the_train_tree_lacks_raises_naming_it(tmp_path: Path) -> None:
    _tree(tmp_path / "train", "ab")
    _tree(tmp_path / "test", "abz")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['z'\] of '.*test'") as err:
        build_splits("imagefolder", str(tmp_path), image_size=8)
    assert isinstance(err.value, DataError) and "['a', 'b']" in str(err.value)


def test_with_size_0_the_test_tree_takes_the_train_tree_size(tmp_path: Path) -> None:
    _tree(tmp_path / "train", "ab", n=3, size=8)
    _tree(tmp_path / "test", "ab", n=3, size=12)
    s = build_splits("imagefolder", str(tmp_path), image_size=0)
    assert isinstance(s.train, ArraySource) and isinstance(s.val, ArraySource)
    assert s.info.image_size == 8
    assert s.train.images.shape == (6, 8, 8, 3) and s.val.images.shape == (6, 8, 8, 3)
    # An explicit size applies to both trees.
    s = build_splits("imagefolder", str(tmp_path), image_size=10)
    assert s.info.image_size == 10 and s.val.images.shape == (6, 10, 10, 3)  # type: ignore[attr-defined]


def test_size_0_skips_an_unreadable_first_image(tmp_path: Path) -> None:
    _tree(tmp_path / "train", "ab", size=9)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not a png")  # the first file
    _tree(tmp_path / "test", "ab", size=12)
    s = build_splits("imagefolder", str(tmp_path), image_size=0, skip_bad_images=True)
    assert s.info.image_size == 9 and len(s.train) == 3
    assert s.val.images.shape == (4, 9, 9, 3)  # type: ignore[attr-defined]


def test_the_cache_is_keyed_by_class_list_and_size(tmp_path: Path) -> None:
    root, cache = tmp_path / "ds", tmp_path / "cache"
    _tree(root / "train", "abc", size=8)
    _tree(root / "test", "bc", size=12)
    # The test tree decoded on its own terms first (own classes ['b', 'c'], own size 12): what
    # the old loader cached for it.
    alone = load_image_folder(root / "test", 0, True, False, cache)
    assert isinstance(alone, ArraySource)
    assert alone.classes == ["b", "c"] and alone.labels.tolist() == [0, 0, 1, 1]
    assert alone.images.shape[1] == 12
    # The splits do not reuse it: other labels, other size.
    s = build_splits("imagefolder", str(root), image_size=0, cache_dir=cache)
    assert isinstance(s.val, ArraySource)
    assert s.val.classes == ["a", "b", "c"] and s.val.labels.tolist() == [1, 1, 2, 2]
    assert s.val.images.shape == (4, 8, 8, 3)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and all(f.startswith("imagefolder-") for f in files)  # no temps
    # A second build reads every tree from the cache, with the same result.
    again = build_splits("imagefolder", str(root), image_size=0, cache_dir=cache)
    assert isinstance(again.val, ArraySource) and isinstance(again.train, ArraySource)
    assert again.val.classes == ["a", "b", "c"] and again.val.labels.tolist() == [1, 1, 2, 2]
    assert np.array_equal(again.val.images, s.val.images)
    assert np.array_equal(again.train.images, s.train.images)  # type: ignore[attr-defined]
    assert sorted(p.name for p in cache.iterdir()) == files
    # The tree on its own terms still comes back as it was.
    alone_again = load_image_folder(root / "test", 0, True, False, cache)
    assert isinstance(alone_again, ArraySource) and alone_again.classes == ["b", "c"]
    assert alone_again.labels.tolist() == [0, 0, 1, 1]


def test_an_unreadable_cache_is_decoded_again(tmp_path: Path) -> None:
    root, cache = _tree(tmp_path / "t", "ab"), tmp_path / "cache"
    first = load_image_folder(root, 0, True, False, cache)
    (path,) = cache.iterdir()
    path.write_bytes(b"truncated")
    again = load_image_folder(root, 0, True, False, cache)
    assert isinstance(first, ArraySource) and isinstance(again, ArraySource)
    assert np.array_equal(again.images, first.images) and again.classes == ["a", "b"]
    with np.load(path) as z:  # and rewritten
        assert z["images"].shape == (4, 8, 8, 3)
