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
