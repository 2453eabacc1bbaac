"""The matplotlib plumbing every figure of the project shares: a display-free pyplot, and one
way to write a finished figure.

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, run_dir / "plot.png", dpi=110)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made if needed) and close it.

    The file is written next to ``path`` and then renamed over it, so a crash mid-write keeps
    the previous figure.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path
