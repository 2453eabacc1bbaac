"""The pretraining views figure (what it shows, and when it is drawn) and the caption of the
denoiser's sample grids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from ssl_robust.launch import figures
from ssl_robust.launch.figures import ViewsFigure

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)


def _batch(n: int = 5, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(n, 3, 6, 6, generator=gen) for _ in range(2)]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return [(x - mean) / std for x in images], images


def test_views_are_shown_unnormalised_one_row_per_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def capture(rows, labels, classes, path, column_titles=None, title=""):  # type: ignore[no-untyped-def]
        seen.update(rows=rows, labels=labels, titles=column_titles)
        return path

    monkeypatch.setattr(figures, "plot_image_grid", capture)
    views, images = _batch()
    cb = ViewsFigure(tmp_path / "v.png", MEAN, STD, classes=["a", "b"], row_names=["clean"], n=3)
    cb.draw((views, torch.tensor([1, -1, 0, 1, 1])))
    assert [r.name for r in seen["rows"]] == ["clean", "view 2"]
    for row, x in zip(seen["rows"], images, strict=True):
        torch.testing.assert_close(row.images, x[:3])
        assert row.preds is None
    assert seen["titles"] == ["b", "", "a"]  # an unlabeled image (-1) gets no title


def test_drawn_once_on_rank_zero_of_a_fresh_run_and_never_fatal(tmp_path: Path) -> None:
    views, _ = _batch()
    batch = (views, torch.zeros(5, dtype=torch.long))
    fresh = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[])
    for trainer in (
        SimpleNamespace(global_step=7, is_global_zero=True),  # resumed: keeps its figure
        SimpleNamespace(global_step=0, is_global_zero=False),  # another rank
    ):
        cb = ViewsFigure(tmp_path / "v.png", MEAN, STD)
        cb.on_train_batch_start(trainer, None, batch, 0)  # type: ignore[arg-type]
        assert not (tmp_path / "v.png").exists()
    cb = ViewsFigure(tmp_path / "v.png", MEAN, STD, classes=["zero"], n=4)
    cb.on_train_batch_start(fresh, None, batch, 0)  # type: ignore[arg-type]
    with Image.open(tmp_path / "v.png") as png:
        width, height = png.size
        assert width > height > 100  # 4 columns, 2 rows
    (tmp_path / "v.png").unlink()
    cb.on_train_batch_start(fresh, None, batch, 1)  # type: ignore[arg-type]
    assert not (tmp_path / "v.png").exists()  # once
    broken = ViewsFigure(tmp_path / "b.png", MEAN, STD)
    with pytest.warns(UserWarning, match="could not draw"):
        broken.on_train_batch_start(fresh, None, ("not", "a batch"), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be >= 1"):
        ViewsFigure(tmp_path / "x.png", MEAN, STD, n=0)


def test_a_failing_image_grid_leaves_no_figure_open(tmp_path: Path) -> None:
    from ssl_robust.plotting import ImageRow, plot_image_grid, pyplot

    plt = pyplot()
    before = set(plt.get_fignums())
    bad = ImageRow("two channels", torch.rand(2, 2, 4, 4))  # neither grey nor RGB
    labels = torch.tensor([0, 1])
    with pytest.raises(TypeError):
        plot_image_grid([bad], labels, ["a", "b"], tmp_path / "grid.png")
    with pytest.raises(ValueError, match="1 column titles for 2 columns"):
        plot_image_grid([bad], labels, ["a", "b"], tmp_path / "g.png", column_titles=["x"])
    assert set(plt.get_fignums()) == before and not (tmp_path / "grid.png").exists()


def test_denoiser_grids_get_a_caption_naming_their_rows(tmp_path: Path) -> None:
    from ssl_robust.purify import DenoiserModule, build_unet, make_scheduler
    from ssl_robust.purify.callbacks import SampleGrids

    torch.manual_seed(0)
    module = DenoiserModule(build_unet("tiny", 8), make_scheduler())
    grids = SampleGrids(
        tmp_path / "samples", torch.rand(3, 3, 8, 8), every_n_epochs=1, num_samples=4, steps=2,
        t_star=20, purify_sampler="ddim", purify_steps=2,
    )  # fmt: skip
    trainer = SimpleNamespace(global_step=6, is_global_zero=True, loggers=[])
    grids.write(trainer, module, epoch=2)  # type: ignore[arg-type]
    caption = (tmp_path / "samples" / "README.md").read_text()
    for needle in (
        "The latest grids are from epoch 2 (EMA weights)",
        "## latest_purify.png / epoch_<k>_purify.png",
        "Purification of 3 fixed validation images, one per column (3 columns):",
        "1. top row, **clean**: the validation images;",
        "2. middle row, **noised to t\\*=20**: the forward diffusion of each;",
        "3. bottom row, **purified**: the reverse process (DDIM, 2 steps) run from exactly",
        "4 images generated from pure noise (DDIM, 2 steps)",
        "enlarged 8x (nearest neighbour)",
    ):
        assert needle in caption, needle
    # The grids themselves stay bare images: the caption sits beside them.
    names = {p.name for p in (tmp_path / "samples").iterdir()}
    assert names == {
        "README.md", "epoch_0002_samples.png", "epoch_0002_purify.png",
        "latest_samples.png", "latest_purify.png",
    }  # fmt: skip
    ddpm = SampleGrids(tmp_path, torch.rand(2, 3, 8, 8), 1, 1, sampler="ddpm", t_star=50)
    assert "(ancestral DDPM, 50 steps)" in ddpm.caption(1)
    assert "(DDPM, every step)" in ddpm.caption(1)
