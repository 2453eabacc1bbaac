from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_robust.data.datasets import build_splits, load_digits_source, stratified_split
from ssl_robust.data.subsets import (
    SubsetSpec,
    assert_disjoint,
    check_indices,
    class_counts,
    draw_subset,
    load_or_draw_subset,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train labels of the digits split, and the train/val indices into the full set."""
    full = load_digits_source(8)
    tr, va = stratified_split(full.labels, 0.2, seed=0)
    return full.labels[tr], tr, va


def test_draws_are_seeded_class_balanced_and_nested(digits: tuple) -> None:
    labels = digits[0]
    a = draw_subset(labels, SubsetSpec(per_class=5, seed=0))
    np.testing.assert_array_equal(a, draw_subset(labels, SubsetSpec(per_class=5, seed=0)))
    b = draw_subset(labels, SubsetSpec(per_class=5, seed=1))
    assert not np.array_equal(a, b) and len(a) == len(b) == 50
    np.testing.assert_array_equal(np.bincount(labels[a]), [5] * 10)
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    # Fractions take round(f * n_c) of every class, and one seed's subsets are nested.
    counts = np.bincount(labels)
    prev = np.array([], dtype=np.int64)
    for f in (0.01, 0.1, 1.0):
        idx = draw_subset(labels, SubsetSpec(fraction=f, seed=3))
        np.testing.assert_array_equal(
            np.bincount(labels[idx], minlength=10), np.floor(f * counts + 0.5)
        )
        assert set(prev) <= set(idx)
        prev = idx
    np.testing.assert_array_equal(prev, np.arange(len(labels)))  # 100 % is the whole split
    # 10 % of 1,438, each class's share rounded half up (two classes of 145 give 15 each).
    assert len(draw_subset(labels, SubsetSpec(fraction=0.1))) == 145
    assert len(draw_subset(labels, SubsetSpec(fraction=0.01))) == 10  # one per class


def test_subset_is_disjoint_from_the_evaluation_split(digits: tuple) -> None:
    labels, train_idx, val_idx = digits
    idx = draw_subset(labels, SubsetSpec(fraction=1.0))
    assert not set(train_idx[idx]) & set(val_idx)  # in indices of the full digits set
    splits = build_splits("digits", "data", image_size=8)
    assert assert_disjoint(splits.train.images[idx], splits.val.images) == 0
    # A stray duplicate (public datasets have a few) is reported; a real overlap raises.
    assert assert_disjoint(splits.train.images[idx], splits.train.images[idx[:1]]) == 1
    with pytest.raises(ValueError, match="100 labeled training image"):
        assert_disjoint(splits.train.images[idx], splits.train.images[idx[:100]])


def test_saved_subset_is_reused_and_a_different_request_raises(
    digits: tuple, tmp_path: Path
) -> None:
    labels = digits[0]
    spec = SubsetSpec(fraction=0.1, seed=0)
    first = load_or_draw_subset(tmp_path, labels, spec, data={"name": "digits"})
    assert (tmp_path / "subset.npy").is_file()
    assert json.loads((tmp_path / "subset.json").read_text())["fraction"] == 0.1
    # Reused from disk, not redrawn: a doctored (still valid) file is returned as it is.
    np.save(tmp_path / "subset.npy", first[:-1])
    np.testing.assert_array_equal(
        load_or_draw_subset(tmp_path, labels, spec, data={"name": "digits"}), first[:-1]
    )
    for other, data, lab in (
        (SubsetSpec(fraction=0.2, seed=0), {"name": "digits"}, labels),
        (SubsetSpec(fraction=0.1, seed=1), {"name": "digits"}, labels),
        (spec, {"name": "cifar10"}, labels),
        (spec, {"name": "digits"}, labels[::-1]),
    ):
        with pytest.raises(ValueError, match="drawn for another request"):
            load_or_draw_subset(tmp_path, lab, other, data=data)


def test_bad_requests_raise_clear_errors() -> None:
    labels = np.array([0] * 30 + [1] * 4)
    with pytest.raises(ValueError, match=r"class 'b' has only 4 train images.*per_class=5"):
        draw_subset(labels, SubsetSpec(per_class=5), classes=["a", "b"])
    with pytest.raises(ValueError, match=r"selects no image of class 1"):
        class_counts(labels, SubsetSpec(fraction=0.1))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"subset.fraction must be in \(0, 1\]"):
            SubsetSpec(fraction=bad)
    with pytest.raises(ValueError, match="per_class must be >= 0"):
        SubsetSpec(per_class=-1)
    assert SubsetSpec(fraction=0.01).label == "1pct" and SubsetSpec(per_class=4).label == (
        "4perclass"
    )


def test_each_class_is_shuffled_apart_and_a_whole_class_can_be_asked_for() -> None:
    # Two classes of 100 images, one after the other: the same seed must not pick the same
    # positions within each class.
    labels = np.repeat(np.arange(2), 100)
    idx = draw_subset(labels, SubsetSpec(per_class=10, seed=0))
    assert len(idx) == 20 and not np.array_equal(idx[:10], idx[10:] - 100)
    # As many per class as a class has: all of it.
    labels = np.repeat(np.arange(3), 5)
    np.testing.assert_array_equal(draw_subset(labels, SubsetSpec(per_class=5)), np.arange(15))


def test_check_indices_refuses_indices_past_the_split_and_repeats() -> None:
    check_indices(np.array([0, 9]), 10)
    with pytest.raises(ValueError, match="outside the train split of 10"):
        check_indices(np.array([0, 10]), 10)
    with pytest.raises(ValueError, match="outside"):
        check_indices(np.array([-1, 3]), 10)
    with pytest.raises(ValueError, match="repeat"):
        check_indices(np.array([1, 1]), 10)
