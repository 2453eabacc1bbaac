"""The pretraining pipeline: config -> data, backbone, method, trainer -> run directory."""

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
from ssl_robust.data.datamodule import SSLDataModule
from ssl_robust.data.transforms import (
    ViewParams,
    eval_transform,
    gpu_eval_transform,
    gpu_view_transforms,
    view_transform,
)
from ssl_robust.launch.distributed import check_world_size
from ssl_robust.launch.figures import ViewsFigure
from ssl_robust.launch.trainer import (
    ConfigInCheckpoint,
    ValidateLastEpoch,
    build_loggers,
    build_trainer,
    checkpoint_callbacks,
    write_json,
)
from ssl_robust.methods import METHODS, compile_backbones
from ssl_robust.methods.optim import OptimizerSpec
from ssl_robust.models.backbones import Encoder, build_backbone
from ssl_robust.models.export import EncoderMeta, export_encoder
from ssl_robust.pipelines.common import (
    build_data,
    check_denoiser_size,
    check_phase,
    check_resumable,
    fit_resumable,
    print_summary,
    run_dir_for,
    settings_of,
    smoke_in_scratch,
    write_curves,
)

# What a resumed pretraining must share with its checkpoint: the method, the encoder, the
# data and views, the optimiser and the denoised views. trainer.* may change (a finished run
# extended by trainer.max_epochs follows the new schedule), and so may monitoring and I/O.
_RESUME_SECTIONS = ("method", "model", "data", "views", "optim", "denoise")
# I/O, and the view path (the CPU and the device views follow the same distributions).
_RESUME_FREE = RUN_ONLY_KEYS | {"data.augment"}


# What a config written before a key existed meant by it: both views went through the networks
# in one pass then.
_BEFORE_KEYS = {"method.joint_views": True}


def resume_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened keys of a pretraining config that a resumed run must share (the denoised
    views' settings only when there are denoised views)."""
    settings = settings_of(config, _RESUME_SECTIONS, _RESUME_FREE)
    for key, then in _BEFORE_KEYS.items():
        section = key.split(".")[0]
        if section in config and key not in settings:
            settings[key] = then
    if not settings.get("denoise.run"):
        settings = {k: v for k, v in settings.items() if not k.startswith("denoise.")}
    return settings


def check_config(cfg: DictConfig) -> None:
    """Value checks that need no data or files (the loader checks keys, types and each key's
    range): settings that depend on each other, and the backbone's name; raises ConfigError."""
    if cfg.data.compile_views and cfg.data.augment != "gpu":
        raise ConfigError(
            "data.compile_views=true compiles the batched device views, which only "
            f"data.augment=gpu uses; got data.augment={cfg.data.augment!r}"
        )
    d = cfg.denoise
    if d.t_min > d.t_max:
        raise ConfigError(f"denoise.t_min ({d.t_min}) must be <= denoise.t_max ({d.t_max})")
    try:
        # A throwaway build, on the meta device (no memory, no initialisation: a large timm
        # model takes seconds to build) and in a forked random state, so the run's own weights
        # are those it would get without this check.
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            build_backbone(str(cfg.model.backbone), int(cfg.model.width))
    except ValueError as err:
        raise ConfigError(f"model.backbone: {err}") from err


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Before anything is written (and by ``chain --check``): the run directory holds no other
    phase's run, and a checkpoint there was trained as ``cfg`` asks; raises ConfigError."""
    check_phase(run_dir, "pretrain")
    check_resumable(run_dir, cfg, resume_settings, "pretraining")


def build_method(cfg: DictConfig, backbone: Encoder, num_classes: int) -> pl.LightningModule:
    m, o, mon = cfg.method, cfg.optim, cfg.monitor
    spec = OptimizerSpec(
        name=o.name,
        base_lr=o.base_lr,
        reference_batch=o.reference_batch,
        lr_scaling=o.lr_scaling,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        warmup_epochs=o.warmup_epochs,
        decay_norm_bias=o.decay_norm_bias,
    )
    common: dict[str, Any] = {
        "backbone": backbone,
        "num_classes": num_classes,
        "batch_size_per_device": cfg.data.batch_size,
        "optimizer": spec,
        "proj_hidden_dim": m.proj_hidden_dim,
        "proj_out_dim": m.proj_out_dim,
        "knn_k": mon.knn_k,
        "knn_t": mon.knn_t,
        "online_probe": mon.online_probe,
        "joint_views": m.joint_views,
    }
    specific: dict[str, dict[str, Any]] = {
        "simclr": {"temperature": m.temperature},
        "byol": {"pred_hidden_dim": m.pred_hidden_dim, "base_tau": m.base_tau},
    }
    if m.name not in METHODS:
        raise ValueError(f"unknown method {m.name!r}; choose from {sorted(METHODS)}")
    return METHODS[m.name](**common, **specific[m.name])


@smoke_in_scratch
def pretrain(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Self-supervised pretraining: returns the final metrics (also in ``metrics.json``).

    Writes into the run directory: ``config.yaml``, ``checkpoints/{last,best}.ckpt``,
    ``logs/version_<k>/metrics.csv``, ``metrics.json``, ``encoder.safetensors`` + ``encoder.json``.
    Rerunning with the same run directory resumes from the newest checkpoint.
    """
    run_dir = run_dir_for(cfg, "pretrain")
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)

    # Build everything that can fail on bad input before any file is written.
    check_config(cfg)
    # The launched processes against devices x num_nodes, before the run directory is touched
    # (build_trainer checks again).
    check_world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    check_run_dir(run_dir, cfg)
    backbone = build_backbone(cfg.model.backbone, cfg.model.width)
    splits = build_data(cfg, run_dir, with_unlabeled=True)
    info = splits.info
    views = ViewParams(
        input_size=info.image_size,
        mean=tuple(info.mean),
        std=tuple(info.std),
        min_scale=cfg.views.min_scale,
        hf_prob=cfg.views.hf_prob,
        cj_prob=cfg.views.cj_prob,
        cj_strength=cfg.views.cj_strength,
        random_gray_scale=cfg.views.random_gray_scale,
        gaussian_blur=cfg.views.gaussian_blur,
    )
    augment = cfg.data.augment
    view_hook = None
    if cfg.denoise.run:
        from ssl_robust.purify.views import load_denoised_views

        try:
            view_hook = load_denoised_views(
                cfg.denoise.run,
                t_min=cfg.denoise.t_min,
                t_max=cfg.denoise.t_max,
                mode=cfg.denoise.mode,
                mean=info.mean,
                std=info.std,
            )
        except ValueError as err:  # t_max beyond the denoiser's schedule
            raise ConfigError(f"denoise (run {cfg.denoise.run!r}): {err}") from err
        fix = "set data.image_size to the denoiser's, or train a denoiser at the views' size"
        check_denoiser_size(
            view_hook.unet, info.image_size, "denoise.run", cfg.denoise.run, "views", fix
        )
    train_transform: Any
    if augment == "gpu":
        train_transform = gpu_view_transforms(cfg.method.name, views)
        if cfg.data.compile_views:
            train_transform = [t.compile_apply() for t in train_transform]
    else:
        train_transform = view_transform(cfg.method.name, views)
    val_shift = None
    if cfg.monitor.shift_severity > 0:
        from ssl_robust.evaluate.corruptions import corrupted_source

        # A fixed seed, not run.seed: every run is scored on the same shifted images (like the
        # clean val split), on every rank and after every restart.
        # Kept in the run directory: a resumed or requeued run reads it instead of making it.
        severity = int(cfg.monitor.shift_severity)
        val_shift = corrupted_source(splits.val, severity, seed=0, cache_dir=run_dir / "cache")
    datamodule = SSLDataModule(
        train=splits.unsupervised_train(),
        val=splits.val,
        bank=splits.train,
        val_shift=val_shift,
        train_transform=train_transform,
        eval_transform=eval_transform(info.image_size, tuple(info.mean), tuple(info.std)),
        device_eval_transform=(
            gpu_eval_transform(info.image_size, tuple(info.mean), tuple(info.std))
            if augment == "gpu"
            else None
        ),
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        channels_last=cfg.trainer.channels_last,
        augment=augment,
        view_hook=view_hook,
    )
    method = build_method(cfg, backbone, info.num_classes)
    if cfg.trainer.channels_last:
        method = method.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.model.compile:
        compile_backbones(method)

    figures: list[Callback] = []
    if cfg.monitor.views_figure > 0:
        denoised = {"": (), "second": (1,), "both": (0, 1)}[cfg.denoise.mode if view_hook else ""]
        names = [f"view {i + 1}" + (" (denoised)" if i in denoised else "") for i in range(2)]
        figures.append(
            ViewsFigure(
                run_dir / "views.png",
                info.mean,
                info.std,
                classes=splits.train.classes,
                row_names=names,
                n=int(cfg.monitor.views_figure),
            )
        )

    config = to_dict(cfg)
    trainer = build_trainer(
        cfg.trainer,
        run_dir,
        loggers=build_loggers(run_dir, cfg.wandb, config, "pretrain", run_dir.name),
        callbacks=[
            *checkpoint_callbacks(
                run_dir, monitor="val/knn_acc", every_n_epochs=cfg.trainer.checkpoint_every_n_epochs
            ),
            ConfigInCheckpoint(config),
            ValidateLastEpoch(),
            *figures,
            *callbacks,
        ],
        check_val_every_n_epoch=cfg.monitor.every_n_epochs,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    metrics, _ = fit_resumable(
        trainer, method, run_dir, cfg.run.resume, "val/knn_acc", datamodule=datamodule
    )
    metrics.update(getattr(method, "derived", {}))
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        write_json(run_dir / "metrics.json", metrics)
        meta = EncoderMeta(
            backbone=cfg.model.backbone,
            width=cfg.model.width,
            feat_dim=backbone.feat_dim,
            image_size=info.image_size,
            mean=list(info.mean),
            std=list(info.std),
            num_classes=info.num_classes,
            extra={"method": cfg.method.name, "dataset": info.name},
        )
        export_encoder(backbone, meta, run_dir)
        shown = {k: v for k, v in metrics.items() if k.split("/")[0] in ("train", "val")}
        title = f"pretrain {cfg.method.name} on {info.name}"
        print_summary(
            title,
            run_dir,
            shown,
            {
                "Encoder": str(run_dir / "encoder.safetensors"),
                **(
                    {"Views": str(run_dir / "views.png")}
                    if (run_dir / "views.png").is_file()
                    else {}
                ),
                "Fit time": f"{metrics['perf/fit_time_s']:.1f} s",
                **write_curves(run_dir, f"{title} ({run_dir.name})"),
            },
        )
    return metrics
