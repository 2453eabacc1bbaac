"""Training of the purification denoiser: unconditional DDPM with epsilon prediction."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import EMAModel
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchvision.utils import save_image

from ssl_robust.purify.purifier import Purifier

# After the warm-up: cosine decay to 0 at the last step, or the peak rate held (Ho et al. 2020).
LR_SCHEDULES = ("constant", "cosine")


def _images(batch: Any) -> Tensor:
    """The images of a ``(x, y)`` / ``[x, y]`` batch or of a bare ``x`` batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class DenoiserModule(pl.LightningModule):
    """Unconditional DDPM training (Ho et al. 2020, Algorithm 1) of an epsilon-prediction UNet.

    Each step draws t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and regresses the
    UNet's output onto eps with the "simple" MSE loss (Ho et al. eq. 14). Images come in as [0, 1]
    and are mapped to [-1, 1].

    An EMA of the weights (``diffusers.training_utils.EMAModel``) is updated after every optimizer
    step; it is what ``ema_unet()`` exports and what ``sample()`` uses by default. EMAModel ramps
    the decay as min(ema_decay, (1 + n) / (10 + n)), so early EMA weights are not stuck at the
    random initialisation. The EMA state is stored in the Lightning checkpoint, so a resumed run
    continues exactly where it stopped.

    With ``seed`` set, the timesteps and noise of each training batch come from a generator
    seeded by ``(seed, rank, epoch, batch index)`` rather than the global RNG, which checkpoints
    do not hold: a run resumed from a checkpoint then takes exactly the steps an uninterrupted
    run takes.

    Validation uses the online weights and fixed noise (seeded by the batch index) so epochs are
    comparable. Timesteps are stratified: image i of a batch falls in bucket i mod
    ``num_timestep_buckets``, uniform within it, so ``val/loss`` is still the uniform-t loss and
    every ``val/mse_t<lo>-<hi>`` bucket (diffusers timestep indices, inclusive) is populated.

    Args:
        unet: The UNet to train.
        scheduler: Noise schedule (only ``alphas_cumprod`` and its config are read).
        lr: Peak AdamW learning rate (DDPM's CIFAR-10 value is 2e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear warmup (DDPM uses 5000).
        lr_schedule: After the warmup, ``"cosine"`` decays to 0 over the remaining
            ``trainer.estimated_stepping_batches``; ``"constant"`` holds ``lr`` (DDPM).
        ema_decay: Upper bound of the EMA decay (DDPM: 0.9999).
        num_timestep_buckets: Number of equal timestep ranges for the validation MSE.
        seed: Seed of the training noise; None draws it from the global RNG.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        lr_schedule: str = "cosine",
        ema_decay: float = 0.9999,
        num_timestep_buckets: int = 10,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        num_train_timesteps = int(scheduler.config["num_train_timesteps"])
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose from {LR_SCHEDULES}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if not 1 <= num_timestep_buckets <= num_train_timesteps:
            raise ValueError(
                f"num_timestep_buckets must be in [1, {num_train_timesteps}], "
                f"got {num_timestep_buckets}"
            )
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                "DenoiserModule trains epsilon prediction; the scheduler says otherwise"
            )
        self.save_hyperparameters(ignore=["unet", "scheduler"])
        self.unet = unet
        self.noise_scheduler = scheduler
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.num_timestep_buckets = num_timestep_buckets
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        # Not a buffer: precision=bf16-true casts every floating buffer to bf16, which rounds
        # abar to 1 for t < 10 (no noise at all) and is off by up to a third below t = 50,
        # the levels purification and denoised views use. Kept in float32, copied per device.
        self._alphas_cumprod = scheduler.alphas_cumprod.detach().float().clone()  # (T,)
        self.ema = EMAModel(self.unet.parameters(), decay=ema_decay)
        # Bucket b covers diffusers timesteps [edges[b], edges[b + 1]).
        self._bucket_edges = [
            b * num_train_timesteps // num_timestep_buckets for b in range(num_timestep_buckets + 1)
        ]
        self._val_sum = torch.zeros(num_timestep_buckets, dtype=torch.float64)
        self._val_count = torch.zeros(num_timestep_buckets, dtype=torch.float64)

    # ----------------------------------------------------------------------------- training

    def _noise_loss(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-image MSE between the true and predicted noise, (B,). The forward process runs
        in float32 whatever the module's precision; the UNet gets x_t in the images' dtype."""
        if self._alphas_cumprod.device != x.device:
            self._alphas_cumprod = self._alphas_cumprod.to(x.device)
        x0 = x.float() * 2 - 1  # (B, C, H, W) in [-1, 1]
        abar = self._alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # Ho et al. eq. 4
        eps = self.unet(x_t.to(x.dtype), t).sample
        return F.mse_loss(eps.float(), noise, reduction="none").flatten(1).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = _images(batch)
        generator = None
        if self.seed is not None:
            key = [self.seed, self.global_rank, self.current_epoch, batch_idx]
            state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)
            generator = torch.Generator(device=x.device).manual_seed(int(state[0]) >> 1)
        shape = (x.shape[0],)
        t = torch.randint(0, self.num_train_timesteps, shape, generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)  # float32
        loss = self._noise_loss(x, t, noise).mean()
        self.log("train/loss", loss)  # on the bar through launch.trainer.ProgressBar
        return loss

    def _ema_to_device(self) -> None:
        if self.ema.shadow_params and self.ema.shadow_params[0].device != self.device:
            self.ema.to(device=self.device)

    def on_fit_start(self) -> None:
        self._ema_to_device()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Overridden (not a batch-end hook) so the EMA follows optimizer steps exactly, also
        # under gradient accumulation.
        super().optimizer_step(*args, **kwargs)
        self._ema_to_device()
        self.ema.step(self.unet.parameters())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        # Derived from the trainer (max_steps, or max_epochs x batches / accumulation), the
        # single source of the run length.
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("set max_steps or max_epochs: the schedule needs a run length")
        total = int(total_steps)
        warmup = self.warmup_steps
        if warmup >= total:
            rank_zero_warn(
                f"denoiser.warmup_steps={warmup} is at least the whole run ({total} steps): the "
                f"learning rate only reaches {total / warmup:.0%} of denoiser.lr"
            )

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = LambdaLR(optimizer, lr_lambda)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros_like(self._val_sum, device=self.device)
        self._val_count = torch.zeros_like(self._val_count, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = _images(batch)
        b = x.shape[0]
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        edges = torch.tensor(self._bucket_edges, device=x.device)
        bucket = torch.arange(b, device=x.device) % self.num_timestep_buckets  # (B,)
        lo, width = edges[bucket], edges[bucket + 1] - edges[bucket]  # (B,) each
        u = torch.rand(b, generator=generator, device=x.device)
        t = lo + (u * width).long().clamp(max=width - 1)  # (B,) uniform within the bucket
        noise = torch.randn(x.shape, generator=generator, device=x.device)  # float32
        mse = self._noise_loss(x, t, noise).double()  # (B,)
        self._val_sum.index_add_(0, bucket, mse)
        self._val_count.index_add_(0, bucket, torch.ones_like(mse))

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if count.sum() == 0:
            return
        for k in range(self.num_timestep_buckets):
            if count[k] > 0:
                lo, hi = self._bucket_edges[k], self._bucket_edges[k + 1] - 1
                self.log(f"val/mse_t{lo}-{hi}", (total[k] / count[k]).float())
        self.log("val/loss", (total.sum() / count.sum()).float(), prog_bar=True)

    # ----------------------------------------------------------------------------- checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ema" not in checkpoint:
            raise KeyError("checkpoint has no 'ema' entry; it was not written by DenoiserModule")
        self.ema.load_state_dict(checkpoint["ema"])
        self._ema_to_device()

    # ----------------------------------------------------------------------------- export

    def ema_unet(self) -> UNet2DModel:
        """A copy of the UNet holding the EMA weights, in eval mode (for sampling and export)."""
        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        sampler: str = "ddpm",
        ddim_steps: int = 50,
        use_ema: bool = True,
    ) -> Tensor:
        """Generates images from pure noise by the full reverse process from t = T.

        Args:
            n: Number of images.
            generator: Source of all noise.
            sampler: ``"ddpm"`` (T NFE) or ``"ddim"`` (``ddim_steps`` NFE).
            ddim_steps: Steps of the DDIM sampler.
            use_ema: Sample with the EMA weights (else the online weights).

        Returns:
            Images in [0, 1], (n, C, H, W), on the module's device.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; choose from ['ddim', 'ddpm']")
        unet = self.ema_unet() if use_ema else self.unet
        was_training = unet.training
        purifier = Purifier(
            unet,
            self.noise_scheduler,
            t_star=self.num_train_timesteps,
            sampler=sampler,
            ddim_steps=ddim_steps,
        )
        size = unet.config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else size
        shape = (n, unet.config["in_channels"], h, w)
        if generator is None:
            x_t = torch.randn(shape, device=self.device)
        else:
            x_t = torch.randn(shape, generator=generator, device=generator.device)
        x_t = x_t.to(self.device)  # (n, C, H, W) ~ N(0, I), the prior at t = T
        x0 = purifier.reverse(x_t, generator)
        unet.train(was_training)
        return ((x0 + 1) / 2).clamp(0, 1)


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Writes [0, 1] images (N, C, H, W) as one PNG grid with ``nrow`` images per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2)
    return path


@torch.no_grad()
def purification_grid(
    purifier: Purifier, clean: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Rows of clean / diffused-to-t* / purified images, for ``save_image_grid(..., nrow=B)``.

    The purified row is the reverse process run from exactly the diffused images shown.

    Args:
        purifier: The purifier to show.
        clean: Images in [0, 1], (B, C, H, W).
        generator: Source of the noise.

    Returns:
        (3B, C, H, W) in [0, 1].
    """
    x_t = purifier.diffuse(clean * 2 - 1, generator)  # (B, C, H, W), [-1, 1] units
    purified = purifier.reverse(x_t, generator)
    rows = [clean, (x_t + 1) / 2, (purified + 1) / 2]
    return torch.cat([r.clamp(0, 1).to(clean.dtype) for r in rows], dim=0)
