"""Progress of long work in log files: a line per unit, not a silent bar."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.progress import Progress, TextColumn

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


def test_a_long_unit_logs_again_after_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    console, buf = _log_console()
    bar = LogProgress(TextColumn("{task.description}"), console=console, interval_s=60)
    task = bar.add_task("CIFAR-10-C", total=100)
    bar.update(task, description="fog", advance=1)
    for _ in range(9):
        clock[0] += 25
        bar.update(task, description="fog", advance=1)
    # Lines at the start, then after 75 s (3 x 25) and 150 s (6 x 25) and 225 s (9 x 25).
    assert buf.getvalue().splitlines() == [
        "CIFAR-10-C 1/100 (0:00:00, ~0:00:00 left): fog",
        "CIFAR-10-C 4/100 (0:01:15, ~0:30:00 left): fog",
        "CIFAR-10-C 7/100 (0:02:30, ~0:33:12 left): fog",
        "CIFAR-10-C 10/100 (0:03:45, ~0:33:45 left): fog",
    ]
    # A task named like its description prints it once.
    steps = bar.add_task("PGD linf_8 steps", total=4)
    clock[0] += 60
    bar.advance(steps)
    assert buf.getvalue().splitlines()[-1] == "PGD linf_8 steps 1/4 (0:01:00, ~0:03:00 left)"


def test_a_terminal_gets_rich_s_live_bar_and_disabled_prints_nothing() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    bar = progress_bar(TextColumn("{task.description}"), console=terminal)
    assert type(bar) is Progress and not bar.disable
    console, buf = _log_console()
    with progress_bar(TextColumn("x"), console=console, enabled=False) as off:
        task = off.add_task("attacks", total=1)
        off.update(task, description="PGD", advance=1)
    assert type(off) is Progress and off.disable and buf.getvalue() == ""
