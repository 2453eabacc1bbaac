"""The subset files under concurrent and interrupted writes, and the per-class rounding."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ssl_robust.data import subsets
from ssl_robust.data.subsets import (
    SPEC_FILE,
    SUBSET_FILE,
    SubsetSpec,
    class_counts,
    draw_subset,
    fraction_share,
    load_or_draw_subset,
    smallest_fraction,
    subset_record,
)

# ---------------------------------------------------------------------------------------------
# Rounding and the advice of the error message
# ---------------------------------------------------------------------------------------------


def test_fraction_shares_round_half_up() -> None:
    # Python's round() gives 0, 2, 4 (half to even); half up gives 1, 3, 4.
    labels = np.repeat([0, 1, 2], [1, 5, 7])
    assert class_counts(labels, SubsetSpec(fraction=0.5)) == {0: 1, 1: 3, 2: 4}
    # Halves that binary floating point lands just below still round up.
    assert 0.29 * 50 < 14.5 and fraction_share(0.29, 50) == 15
    assert 0.45 * 10 == 4.5 and fraction_share(0.45, 10) == 5
    # Below and above one half are untouched.
    assert fraction_share(0.1, 144) == 14 and fraction_share(0.1, 146) == 15
    assert fraction_share(1.0, 7) == 7
    drawn = draw_subset(labels, SubsetSpec(fraction=0.5, seed=2))
    assert np.bincount(labels[drawn]).tolist() == [1, 3, 4]


@pytest.mark.parametrize("n", [*range(1, 60), 97, 143, 999, 1000, 5000])
def test_the_suggested_fraction_is_the_smallest_that_works(n: int) -> None:
    labels = np.repeat([0, 1], [10 * n + 10, n])  # class 1 (n images) is the small one
    # The exact bound 1/(2n) selects one image, anything noticeably below selects none.
    assert class_counts(labels, SubsetSpec(fraction=1 / (2 * n)))[1] == 1
    too_small = 1 / (2 * n) * 0.999
    with pytest.raises(ValueError, match=r"selects no image of class 1") as err:
        class_counts(labels, SubsetSpec(fraction=too_small))
    found = re.search(r"use subset\.fraction >= ([0-9.]+) ", str(err.value))
    assert found is not None, str(err.value)
    advised = float(found.group(1))
    assert found.group(1) == smallest_fraction(n)
    # The advice works, and is within a rounding of the exact smallest fraction.
    assert class_counts(labels, SubsetSpec(fraction=advised))[1] == 1
    assert 1 / (2 * n) <= advised <= 1 / (2 * n) * 1.001  # 4 significant digits, rounded up


def test_the_error_names_the_smallest_missed_class_and_advises_for_every_class() -> None:
    labels = np.repeat([0, 1, 2], [3, 2, 40])  # 10 % misses classes 0 and 1
    with pytest.raises(ValueError) as err:
        class_counts(labels, SubsetSpec(fraction=0.1), classes=["cat", "dog", "eel"])
    text = str(err.value)
    assert "selects no image of class 'dog' (2 train images)" in text
    assert "subset.fraction >= 0.25 " in text
    counts = class_counts(labels, SubsetSpec(fraction=0.25))
    assert min(counts.values()) >= 1 and counts == {0: 1, 1: 1, 2: 10}


# ---------------------------------------------------------------------------------------------
# Interrupted writes
# ---------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(5), 40)
SPEC = SubsetSpec(fraction=0.5, seed=1)


def test_an_npy_without_its_json_is_drawn_anew(tmp_path: Path) -> None:
    # What the old writer left when it stopped between the two files: a foreign .npy alone.
    np.save(tmp_path / SUBSET_FILE, np.arange(3))
    got = load_or_draw_subset(tmp_path, LABELS, SPEC, data={"name": "x"})
    np.testing.assert_array_equal(got, draw_subset(LABELS, SPEC))
    np.testing.assert_array_equal(np.load(tmp_path / SUBSET_FILE), got)
    saved = json.loads((tmp_path / SPEC_FILE).read_text())
    assert saved == subset_record(SPEC, LABELS, {"name": "x"})
    # And the repaired pair is reused afterwards.
    np.testing.assert_array_equal(load_or_draw_subset(tmp_path, LABELS, SPEC, {"name": "x"}), got)


def test_a_json_without_its_npy_is_drawn_anew(tmp_path: Path) -> None:
    other = subset_record(SubsetSpec(per_class=3), LABELS, {"name": "y"})
    (tmp_path / SPEC_FILE).write_text(json.dumps(other))
    got = load_or_draw_subset(tmp_path, LABELS, SPEC, data={"name": "x"})
    np.testing.assert_array_equal(got, draw_subset(LABELS, SPEC))
    assert json.loads((tmp_path / SPEC_FILE).read_text())["data"] == {"name": "x"}


def test_a_crash_while_writing_the_indices_leaves_no_half_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(Exception):
        pass

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash

    monkeypatch.setattr(subsets.np, "save", crash)
    with pytest.raises(Crash):
        load_or_draw_subset(tmp_path, LABELS, SPEC, data={"name": "x"})
    monkeypatch.undo()
    # The record went first; no .npy (not even a temp file) is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPEC_FILE]
    got = load_or_draw_subset(tmp_path, LABELS, SPEC, data={"name": "x"})
    np.testing.assert_array_equal(got, draw_subset(LABELS, SPEC))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPEC_FILE, SUBSET_FILE]


def test_a_complete_pair_of_another_request_still_raises(tmp_path: Path) -> None:
    load_or_draw_subset(tmp_path, LABELS, SPEC, data={"name": "x"})
    with pytest.raises(ValueError, match="drawn for another request"):
        load_or_draw_subset(tmp_path, LABELS, SubsetSpec(fraction=0.25), data={"name": "x"})


def test_the_writer_uses_temp_files_of_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real = os.replace

    def recording(src: Any, dst: Any) -> None:
        written.append(f"{Path(src).name} -> {Path(dst).name}")
        real(src, dst)

    monkeypatch.setattr(os, "replace", recording)  # the writer's (ssl_robust.files) too
    load_or_draw_subset(tmp_path, LABELS, SPEC)
    pid = multiprocessing.current_process().pid
    assert written == [
        f".{SPEC_FILE}.{pid}.tmp -> {SPEC_FILE}",
        f".{SUBSET_FILE}.{pid}.tmp -> {SUBSET_FILE}",
    ]


# ---------------------------------------------------------------------------------------------
# Every rank of a multi-process run drawing at once
# ---------------------------------------------------------------------------------------------

RACE_LABELS = np.repeat(np.arange(10), 2000)
RACE_SPEC = SubsetSpec(fraction=0.5, seed=0)
PROCS, TRIALS = 4, 10


def _race_worker(root: str, barrier: Any, out: Any) -> None:
    """Draw into a fresh folder per trial, all processes released at once."""
    results = []
    for trial in range(TRIALS):
        barrier.wait(timeout=60)
        try:
            idx = load_or_draw_subset(
                Path(root) / str(trial), RACE_LABELS, RACE_SPEC, data={"name": "race"}
            )
            results.append(("ok", idx.tobytes()))
        except Exception as err:  # reported to the parent, which fails the test
            results.append(("error", f"{type(err).__name__}: {err}"))
    out.put(results)


def test_concurrent_identical_draws_all_succeed_and_agree(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, out)) for _ in range(PROCS)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [r[1] for rs in results for r in rs if r[0] == "error"]
    assert not errors, errors[:3]
    expected = draw_subset(RACE_LABELS, RACE_SPEC)
    assert {r[1] for rs in results for r in rs} == {expected.tobytes()}
    record = subset_record(RACE_SPEC, RACE_LABELS, {"name": "race"})
    for trial in range(TRIALS):
        folder = tmp_path / str(trial)
        assert sorted(p.name for p in folder.iterdir()) == [SPEC_FILE, SUBSET_FILE]  # no temps
        np.testing.assert_array_equal(np.load(folder / SUBSET_FILE), expected)
        assert json.loads((folder / SPEC_FILE).read_text()) == record
