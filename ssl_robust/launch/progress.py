"""Progress of long non-training work (evaluation units, CIFAR-10-C writing) on a terminal and
in log files.

rich draws a live bar only on a terminal; writing to a file or a pipe (a SLURM job's output, a
``tee``), it prints nothing until the work ends, so a run of hours would look hung. There,
:class:`LogProgress` prints one plain line whenever a unit starts (its description changes) or
a task finishes, and, for a task that only counts (no unit descriptions, e.g. PGD steps), at
most every ``interval_s`` seconds; each line has the time elapsed and the time left at the mean
pace so far.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn, TaskID


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# Description suffix of a unit whose result was restored, not computed.
RESTORED = "(stored)"


class LogProgress(Progress):
    """A :class:`rich.progress.Progress` that logs lines instead of drawing a bar.

    Tasks, totals and counts behave as in rich (the live display is off). Units advanced
    while the description ends in :data:`RESTORED` (results kept by an earlier run) count as
    done but not toward the pace, so a resumed job's time left is not skewed by them.
    """

    def __init__(
        self, *columns: str | ProgressColumn, console: Console, interval_s: float = 60.0
    ) -> None:
        # get_time looks time.monotonic up at each call (a test's fake clock reaches rich too).
        super().__init__(*columns, console=console, disable=True, get_time=lambda: time.monotonic())
        self._interval_s = interval_s
        self._last_line: dict[TaskID, float] = {}
        self._last_desc: dict[TaskID, str] = {}
        self._names: dict[TaskID, str] = {}
        self._restored: dict[TaskID, float] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._names[task_id] = self._last_desc[task_id] = description
        self._last_line[task_id] = time.monotonic()
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._count_restored(task_id, kwargs.get("advance"))
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._count_restored(task_id, advance)
        self._maybe_log(task_id)

    def _count_restored(self, task_id: TaskID, advance: float | None) -> None:
        if advance and self._tasks[task_id].description.endswith(RESTORED):
            self._restored[task_id] = self._restored.get(task_id, 0.0) + advance

    def _maybe_log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        changed = task.description != self._last_desc.get(task_id)
        done = task.total is not None and task.completed >= task.total
        # A task whose units announce themselves (descriptions) logs at each unit; a timed line
        # there would name a unit already finished. A plain count (PGD steps) logs on a timer.
        counting = task.description == self._names[task_id]
        due = counting and now - self._last_line[task_id] >= self._interval_s
        if not (changed or done or due):
            return
        if done and task.fields.get("_logged_done"):
            return
        self._last_desc[task_id] = task.description
        self._last_line[task_id] = now
        elapsed = task.elapsed or 0.0
        when = _clock(elapsed)
        computed = task.completed - self._restored.get(task_id, 0.0)
        if task.total is not None and computed > 0 and task.completed < task.total:
            left = elapsed / computed * (task.total - task.completed)
            when += f", ~{_clock(left)} left"
        total = "?" if task.total is None else f"{task.total:g}"
        name = self._names[task_id]
        what = "done" if done else task.description
        line = f"{name} {task.completed:g}/{total} ({when})"
        self.console.print(
            line if what == name else f"{line}: {what}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if done:
            task.fields["_logged_done"] = True


def progress_bar(
    *columns: str | ProgressColumn,
    console: Console,
    enabled: bool = True,
    interval_s: float = 60.0,
) -> Progress:
    """A live rich bar on a terminal, :class:`LogProgress` lines elsewhere, or nothing."""
    if enabled and not console.is_terminal:
        return LogProgress(*columns, console=console, interval_s=interval_s)
    return Progress(*columns, console=console, disable=not enabled, transient=False)
