"""Progress of long work in log files: a line per unit, not a silent bar; feature extraction
and the evaluation's clean pass show theirs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from rich.progress import Progress, TextColumn

from ssl_robust.data.datasets import ImageSource
from ssl_robust.finetune.features import extract_features
from ssl_robust.launch import progress as progress_mod
from ssl_robust.launch.progress import LogProgress, progress_bar


def _log_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_in_a_log_each_unit_start_and_the_end_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    console, buf = _log_console()
    assert not console.is_terminal
    with progress_bar(TextColumn("{task.description}"), console=console, interval_s=60) as bar:
        assert isinstance(bar, LogProgress)
        task = bar.add_task("corruptions", total=3)
        for unit in ("fog s1", "fog s2", "snow s1"):
            bar.update(task, description=unit)
            clock[0] += 10  # within the interval: the advance prints nothing
            bar.advance(task)
        clock[0] += 30
        bar.update(task, description="snow s1")  # unchanged, done already logged: nothing
    # Elapsed time, and the time left at the mean pace (10 s a unit).
    assert buf.getvalue().splitlines() == [
        "corruptions 0/3 (0:00:00): fog s1",
        "corruptions 1/3 (0:00:10, ~0:00:20 left): fog s2",
        "corruptions 2/3 (0:00:20, ~0:00:10 left): snow s1",
        "corruptions 3/3 (0:00:30): done",
    ]


def test_a_counting_task_logs_on_a_timer_and_unit_tasks_only_per_unit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    console, buf = _log_console()
    bar = LogProgress(TextColumn("{task.description}"), console=console, interval_s=60)
    steps = bar.add_task("PGD linf_8 steps", total=100)
    for _ in range(10):
        clock[0] += 25
        bar.advance(steps)
    # Lines after 75 s (3 x 25), 150 s (6 x 25) and 225 s (9 x 25), with the time left.
    assert buf.getvalue().splitlines() == [
        "PGD linf_8 steps 3/100 (0:01:15, ~0:40:25 left)",
        "PGD linf_8 steps 6/100 (0:02:30, ~0:39:10 left)",
        "PGD linf_8 steps 9/100 (0:03:45, ~0:37:55 left)",
    ]
    # A task of named units: a line per unit, however long, and none when a unit ends (the
    # description would name the finished unit).
    units = bar.add_task("attacks", total=2)
    bar.update(units, description="PGD linf_8")
    clock[0] += 600
    bar.advance(units)
    clock[0] += 600
    bar.update(units, description="sanity checks linf")
    assert buf.getvalue().splitlines()[3:] == [
        "attacks 0/2 (0:00:00): PGD linf_8",
        "attacks 1/2 (0:20:00, ~0:20:00 left): sanity checks linf",
    ]


def test_restored_units_do_not_count_toward_the_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    console, buf = _log_console()
    bar = LogProgress(TextColumn("{task.description}"), console=console)
    task = bar.add_task("attacks", total=4)
    for unit in ("PGD linf_8", "PGD l2_0.5"):  # kept by the interrupted run: instant
        bar.update(task, description=f"{unit} (stored)")
        bar.advance(task)
    bar.update(task, description="sanity checks linf")
    clock[0] += 600
    bar.advance(task)
    bar.update(task, description="sanity checks l2")
    lines = buf.getvalue().splitlines()
    # No time left while only restored units are done; then the pace of the computed one.
    assert lines[1:] == [
        "attacks 1/4 (0:00:00): PGD l2_0.5 (stored)",
        "attacks 2/4 (0:00:00): sanity checks linf",
        "attacks 3/4 (0:10:00, ~0:10:00 left): sanity checks l2",
    ]


def test_a_terminal_gets_rich_s_live_bar_and_disabled_prints_nothing() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    bar = progress_bar(TextColumn("{task.description}"), console=terminal)
    assert type(bar) is Progress and not bar.disable
    console, buf = _log_console()
    with progress_bar(TextColumn("x"), console=console, enabled=False) as off:
        task = off.add_task("attacks", total=1)
        off.update(task, description="PGD", advance=1)
    assert type(off) is Progress and off.disable and buf.getvalue() == ""


class _Loaded(ImageSource):
    """Images read one at a time (like an image folder), counting the reads."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.labels, self.classes, self.reads = images, np.zeros(len(images)), [], 0

    def load(self, index: int) -> Image.Image:
        self.reads += 1
        return Image.fromarray(self.images[index])


def test_feature_extraction_logs_its_count_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)

    def mean_colour(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4) -> (B, 3), 40 s a batch
        clock[0] += 40
        return x.mean((2, 3))

    console, buf = _log_console()
    source = _Loaded(images)
    feats = extract_features(mean_colour, source, 4, what="features, train images", console=console)
    # Read a batch at a time (every image once) and the same features as from the array.
    assert source.reads == 10
    torch.testing.assert_close(feats, extract_features(mean_colour, images, 4, progress=False))
    # A line a minute (after the 2nd batch, 80 s) and one at the end, with the images done.
    assert buf.getvalue().splitlines() == [
        "features, train images 8/10 (0:01:20, ~0:00:20 left)",
        "features, train images 10/10 (0:02:00): done",
    ]
    console, buf = _log_console()
    extract_features(mean_colour, images, 4, progress=False, console=console)
    assert buf.getvalue() == ""


def test_the_evaluation_s_clean_pass_logs_its_image_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ssl_robust.pipelines.evaluate.units import predict_draws

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    cpu = torch.device("cpu")
    logits, _ = predict_draws(model, x, 2, 2, cpu, progress=True, what="clean passes")
    assert logits.shape == (2, 5, 3)
    # The pipelines' console writes to stdout, captured here (not a terminal): one line at the
    # end of a pass shorter than the minute between lines; plain text, no colour codes.
    out = capsys.readouterr().out
    assert out.splitlines() == ["clean passes 10/10 (0:00:00): done"] and "\x1b" not in out
    # Without progress (inside another section's bar) nothing.
    predict_draws(model, x, 2, 2, cpu)
    assert capsys.readouterr().out == ""
