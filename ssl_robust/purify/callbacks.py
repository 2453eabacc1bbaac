"""Lightning callbacks of the denoiser-training job."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from ssl_robust.files import write_text_atomic
from ssl_robust.purify.denoiser import DenoiserModule, purification_grid, save_image_grid
from ssl_robust.purify.purifier import SAMPLERS, Purifier

GENERATION_SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")


class SampleGrids(Callback):
    """Writes a sample grid and a purification grid with the EMA weights every few epochs.

    Files in ``folder``: ``epoch_<k>_samples.png`` (images generated from pure noise) and
    ``epoch_<k>_purify.png`` (rows: clean val images / diffused to t* / purified), where k counts
    finished epochs, plus copies ``latest_samples.png`` and ``latest_purify.png``. Grids are also
    written when training ends between two scheduled epochs. The grids are bare images (no
    title or row labels), so ``README.md`` beside them says what each shows: its rows, t*, the
    samplers and the epoch of the latest. With a ``WandbLogger`` attached they are logged as
    images ``samples/generated`` and ``samples/purified``.

    All noise comes from generators seeded by ``seed``, so grids of different epochs (and of
    resumed runs) show the same noise and differ only by the weights; the training RNG is not
    touched. Only global rank zero draws and writes.

    Args:
        folder: Output folder.
        clean: Fixed val images in [0, 1], (B, C, H, W), for the purification grid.
        every_n_epochs: Write after every this many epochs.
        num_samples: Images in the sample grid.
        sampler: Generation sampler, ``"ddim"`` or ``"ddpm"`` (T network calls).
        steps: DDIM steps for generation.
        t_star: Diffusion step of the purification grid (Purifier convention, 0..T).
        purify_sampler: One of ``SAMPLERS``.
        purify_steps: DDIM steps for purification, 1 <= purify_steps <= t_star.
        seed: Seed of the grids' noise.
        min_display_px: Small images are enlarged (nearest neighbour, an integer factor) to at
            least this many pixels per side in the PNGs, so 16-px digits stay readable.
    """

    def __init__(
        self,
        folder: str | Path,
        clean: Tensor,
        every_n_epochs: int,
        num_samples: int,
        sampler: str = "ddim",
        steps: int = 50,
        t_star: int = 100,
        purify_sampler: str = "ddpm",
        purify_steps: int = 5,
        seed: int = 0,
        min_display_px: int = 64,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if sampler not in GENERATION_SAMPLERS:
            raise ValueError(
                f"unknown sampler {sampler!r}; choose from {list(GENERATION_SAMPLERS)}"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if purify_sampler not in SAMPLERS:
            raise ValueError(
                f"unknown purify_sampler {purify_sampler!r}; choose from {list(SAMPLERS)}"
            )
        if t_star < 0:
            raise ValueError(f"t_star must be >= 0, got {t_star}")
        if purify_sampler == "ddim" and not 1 <= purify_steps <= max(t_star, 1):
            raise ValueError(f"purify_steps must be in [1, t_star={t_star}], got {purify_steps}")
        if clean.ndim != 4 or len(clean) == 0:
            raise ValueError(
                f"clean must be a non-empty (B, C, H, W) batch, got {tuple(clean.shape)}"
            )
        self.folder = Path(folder)
        self.clean = clean.detach().cpu()
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.sampler = sampler
        self.steps = steps
        self.t_star = t_star
        self.purify_sampler = purify_sampler
        self.purify_steps = purify_steps
        self.seed = seed
        self.zoom = max(1, math.ceil(min_display_px / max(clean.shape[-2:])))
        # The global step this fit's training started from (after resuming); None while (or
        # when, for a finished run rerun) no training loop has started.
        self.start_step: int | None = None
        self._written_step = -1

    @property
    def latest(self) -> dict[str, Path]:
        """Paths of the newest grids (they exist once a grid was written)."""
        return {
            "samples": self.folder / "latest_samples.png",
            "purify": self.folder / "latest_purify.png",
        }

    def caption(self, epoch: int) -> str:
        """The Markdown caption of the grids (``README.md`` beside them), the latest at
        ``epoch`` finished epochs."""
        n = len(self.clean)
        reverse = {
            "ddim": f"DDIM, {self.purify_steps} steps",
            "ddpm": f"ancestral DDPM, {self.t_star} steps",
            "oneshot": "one-shot: the x0 prediction at t*",
        }.get(self.purify_sampler, self.purify_sampler)
        gen = f"DDIM, {self.steps} steps" if self.sampler == "ddim" else "DDPM, every step"
        zoom = (
            f" Images are enlarged {self.zoom}x (nearest neighbour) for legibility."
            if self.zoom > 1
            else ""
        )
        return (
            "# Denoiser sample grids\n\n"
            f"The latest grids are from epoch {epoch} (EMA weights); `epoch_<k>_*.png` are "
            "the same grids after k finished epochs, drawn from the same seeded noise, so they "
            f"differ only by the weights.{zoom}\n\n"
            f"## latest_purify.png / epoch_<k>_purify.png\n\n"
            f"Purification of {n} fixed validation images, one per column ({n} columns):\n\n"
            "1. top row, **clean**: the validation images;\n"
            f"2. middle row, **noised to t\\*={self.t_star}**: the forward diffusion of each;\n"
            f"3. bottom row, **purified**: the reverse process ({reverse}) run from exactly the "
            "noised images above; it should look like the top row.\n\n"
            f"## latest_samples.png / epoch_<k>_samples.png\n\n"
            f"{self.num_samples} images generated from pure noise ({gen}): they should look "
            "like images of the dataset.\n"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # finished epochs
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs:
            self.write(trainer, pl_module, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Stopped between scheduled grids (max_steps, early stopping): show the final weights.
        started = self.start_step is not None and trainer.global_step > self.start_step
        if started and self._written_step != trainer.global_step:
            self.write(trainer, pl_module, trainer.current_epoch)

    @torch.no_grad()
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Draws both grids for the module's current EMA weights and writes them."""
        self._written_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, DenoiserModule):
            raise TypeError(f"SampleGrids needs a DenoiserModule, got {type(pl_module).__name__}")
        generator = torch.Generator().manual_seed(self.seed)  # CPU: the same grids on any device
        samples = pl_module.sample(
            self.num_samples, generator, sampler=self.sampler, ddim_steps=self.steps
        )  # (n, C, H, W) in [0, 1]
        purifier = Purifier(
            pl_module.ema_unet(),
            pl_module.noise_scheduler,
            t_star=self.t_star,
            sampler=self.purify_sampler,
            ddim_steps=self.purify_steps,
        )
        generator = torch.Generator().manual_seed(self.seed + 1)
        grid = purification_grid(purifier, self.clean.to(pl_module.device), generator)
        if self.zoom > 1:
            samples = F.interpolate(samples, scale_factor=self.zoom, mode="nearest")
            grid = F.interpolate(grid, scale_factor=self.zoom, mode="nearest")
        nrow = max(1, round(self.num_samples**0.5))
        paths = {
            "samples": save_image_grid(
                samples, self.folder / f"epoch_{epoch:04d}_samples.png", nrow=nrow
            ),
            "purify": save_image_grid(
                grid, self.folder / f"epoch_{epoch:04d}_purify.png", nrow=len(self.clean)
            ),
        }
        for name, path in paths.items():
            latest = self.latest[name]
            tmp = latest.with_suffix(".tmp.png")
            shutil.copyfile(path, tmp)
            os.replace(tmp, latest)  # atomic: a reader never sees a half-written PNG
        write_text_atomic(self.folder / "README.md", self.caption(epoch))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "samples/generated",
                    [str(paths["samples"])],
                    step=trainer.global_step,
                    caption=[f"epoch {epoch}, {self.sampler}"],
                )
                logger.log_image(
                    "samples/purified",
                    [str(paths["purify"])],
                    step=trainer.global_step,
                    caption=[f"epoch {epoch}: clean / diffused to t*={self.t_star} / purified"],
                )
