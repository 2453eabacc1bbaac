"""The denoiser-training pipeline: config -> data, UNet, DDPM module, trainer -> run directory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from ssl_robust.config import ConfigError, save_config, to_dict
from ssl_robust.config.common import RUN_ONLY_KEYS
from ssl_robust.data.images import ImageDataModule
from ssl_robust.launch.distributed import check_world_size
from ssl_robust.launch.trainer import (
    ConfigInCheckpoint,
    build_loggers,
    build_trainer,
    checkpoint_callbacks,
    write_json,
)
from ssl_robust.pipelines.common import (
    build_data,
    check_phase,
    check_resumable,
    console,
    fit_resumable,
    print_summary,
    run_dir_for,
    settings_of,
    smoke_in_scratch,
    write_curves,
)
from ssl_robust.purify.callbacks import SampleGrids
from ssl_robust.purify.denoiser import DenoiserModule
from ssl_robust.purify.unet import build_unet, make_scheduler, save_denoiser

# What a resumed denoiser training must share with its checkpoint (trainer.* and samples.*
# may change: a finished run can be extended).
_RESUME_SECTIONS = ("denoiser", "data", "views")
# I/O, and the view path (the CPU and the device views follow the same distributions).
_RESUME_FREE = RUN_ONLY_KEYS | {"data.augment"}


def resume_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened keys of a denoiser config that a resumed run must share."""
    return settings_of(config, _RESUME_SECTIONS, _RESUME_FREE)


def build_denoiser(cfg: DictConfig, image_size: int, seed: int) -> DenoiserModule:
    """The DDPM training module of the ``denoiser`` section for ``image_size`` RGB images."""
    d = cfg.denoiser
    scheduler = make_scheduler(d.num_train_timesteps, d.beta_start, d.beta_end)
    unet = build_unet(d.unet, sample_size=image_size, in_channels=3, dropout=d.dropout)
    return DenoiserModule(
        unet,
        scheduler,
        lr=d.lr,
        weight_decay=d.weight_decay,
        warmup_steps=d.warmup_steps,
        lr_schedule=d.lr_schedule,
        ema_decay=d.ema_decay,
        num_timestep_buckets=d.num_timestep_buckets,
        seed=seed,
    )


def check_config(cfg: DictConfig) -> None:
    """Bounds that depend on another key (the loader checks each key's own range); raises
    ConfigError (exit 2), before any data is read."""
    d = cfg.denoiser
    if d.beta_start > d.beta_end:
        raise ConfigError(
            f"denoiser.beta_start ({d.beta_start}) must be <= denoiser.beta_end ({d.beta_end})"
        )
    s, num_train_timesteps = cfg.samples, d.num_train_timesteps
    if not 1 <= s.steps <= num_train_timesteps:
        raise ConfigError(
            f"samples.steps must be in [1, {num_train_timesteps}] (denoiser.num_train_timesteps), "
            f"got {s.steps}"
        )
    if not 0 <= s.t_star <= num_train_timesteps:
        raise ConfigError(
            f"samples.t_star must be in [0, {num_train_timesteps}] "
            f"(denoiser.num_train_timesteps), got {s.t_star}"
        )


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Before anything is written (and by ``chain --check``): the run directory holds no other
    phase's run, and a checkpoint there was trained as ``cfg`` asks; raises ConfigError."""
    check_phase(run_dir, "denoiser")
    check_resumable(run_dir, cfg, resume_settings, "denoiser")


@smoke_in_scratch
def train_denoiser(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Trains a DDPM denoiser for purification; returns the final metrics (as in metrics.json).

    Writes into the run directory: ``config.yaml``, ``checkpoints/{last,best}.ckpt`` (best by
    ``val/loss``), ``logs/version_<k>/metrics.csv``, ``metrics.json``, the EMA UNet and its
    schedule as a diffusers folder (``unet/``, ``scheduler/``, ``model_index.json``; read it
    back with ``load_denoiser(run_dir)``) and image grids in ``samples/``. Rerunning with the
    same run directory resumes from the newest checkpoint.
    """
    run_dir = run_dir_for(cfg, "denoiser")
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)

    # Build everything that can fail on bad input before any file is written.
    check_config(cfg)
    # The launched processes against devices x num_nodes, before the run directory is touched
    # (build_trainer checks again).
    check_world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    check_run_dir(run_dir, cfg)
    splits = build_data(cfg, run_dir, with_unlabeled=True)
    info = splits.info
    datamodule = ImageDataModule(
        train=splits.unsupervised_train(),
        val=splits.val,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        hf_prob=cfg.views.hf_prob,
        channels_last=cfg.trainer.channels_last,
    )
    module = build_denoiser(cfg, info.image_size, cfg.run.seed)
    if cfg.trainer.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    s, num_train_timesteps = cfg.samples, cfg.denoiser.num_train_timesteps
    # DDIM purification from t* takes at most t* steps (distinct timesteps).
    purify_steps = max(1, min(s.steps, s.t_star))
    grids = SampleGrids(
        run_dir / "samples",
        clean=datamodule.val_images(s.n),
        every_n_epochs=s.every_n_epochs,
        num_samples=s.n,
        sampler=s.sampler,
        steps=s.steps,
        t_star=s.t_star,
        purify_sampler=s.purify_sampler,
        purify_steps=purify_steps,
        seed=s.seed,
    )

    config = to_dict(cfg)
    checkpoints = checkpoint_callbacks(
        run_dir,
        monitor="val/loss",
        mode="min",
        every_n_epochs=cfg.trainer.checkpoint_every_n_epochs,
    )
    trainer = build_trainer(
        cfg.trainer,
        run_dir,
        loggers=build_loggers(run_dir, cfg.wandb, config, "denoiser", run_dir.name),
        callbacks=[
            *checkpoints,
            ConfigInCheckpoint(config),
            grids,
            *callbacks,
        ],
    )
    num_params = sum(p.numel() for p in module.unet.parameters())
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        console.print(
            f"DDPM denoiser: UNet {cfg.denoiser.unet!r} ({num_params / 1e6:.2f}M parameters) on "
            f"{info.name} {info.image_size}px, T={num_train_timesteps}; purification grid: "
            f"t*={s.t_star}, {s.purify_sampler}"
            + (f" ({purify_steps} steps)" if s.purify_sampler == "ddim" else ""),
            soft_wrap=True,
        )
    # perf/train_images_per_s: the training steps' median over the epochs after the first, as
    # for pretraining (validation and the sample grids excluded).
    metrics, _ = fit_resumable(
        trainer, module, run_dir, cfg.run.resume, "val/loss", datamodule=datamodule
    )
    metrics["perf/unet_params"] = float(num_params)
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        write_json(run_dir / "metrics.json", metrics)
        save_denoiser(module.ema_unet(), module.noise_scheduler, run_dir)
        shown = {k: v for k, v in metrics.items() if k.split("/")[0] in ("train", "val", "perf")}
        extra = {"Denoiser (EMA)": f"{run_dir / 'unet'}  (load_denoiser({str(run_dir)!r}))"}
        for name, path in grids.latest.items():
            if path.is_file():
                extra[f"Latest {name} grid"] = str(path)
        if "perf/fit_time_s" in metrics:
            extra["Fit time"] = f"{metrics['perf/fit_time_s']:.1f} s"
        title = f"denoiser {cfg.denoiser.unet} on {info.name}"
        extra |= write_curves(run_dir, f"{title} ({run_dir.name})")
        print_summary(title, run_dir, shown, extra)
    return metrics
