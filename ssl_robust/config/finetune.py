"""The fine-tuning job's schema (labeled subsets; linear probe or full fine-tune).

The defaults are the embedded default job: a linear probe on 10 % of the digits labels, on the
encoder of the pretraining run named by ``encoder.run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import (
    COMMON_CHOICES,
    FRACTION,
    MOMENTUM,
    PROBABILITY,
    DataConfig,
    Range,
    RunConfig,
    TrainerConfig,
    WandbConfig,
    above,
    at_least,
)


@dataclass
class EncoderSourceConfig:
    # A pretraining run directory holding encoder.safetensors + encoder.json ...
    run: str = ""
    # ... or, instead, a backbone from random weights (model.backbone's names: resnet18_cifar,
    # convnet, tv:<name>, timm:<name>) trained on the labeled subset alone: the supervised
    # baseline with mode=full (optim.encoder_lr_mult=1), a probe on random features with
    # mode=linear. Needs data.name or data.like; normalisation is the dataset's own unless
    # data.mean/std.
    backbone: str = ""
    # Width of a `convnet` backbone.
    width: int = 32


@dataclass
class FinetuneDataConfig(DataConfig):
    # "" fine-tunes on the data the encoder was pretrained on: name, root, download,
    # image_size, val_fraction, in_memory and skip_bad_images are then read from the pretraining
    # run's config.yaml (the dataset name from encoder.json when there is none). A dataset name
    # uses this section as written.
    name: str = ""
    # Seed of the train/evaluation split (datasets without a test split); -1 takes the
    # pretraining run's run.seed, so the evaluation images are ones the encoder never saw.
    split_seed: int = -1
    # With encoder.backbone (no encoder run): a pretraining run whose data to use as the
    # fine-tunings of its encoder do (name, root, image size, split and its seed), so that a
    # supervised baseline sees the same images; needs data.name "". The chain's --baseline
    # sets it.
    like: str = ""
    batch_size: int = 64
    # The validation also on a shifted twin of the evaluation split (val/acc_shift, beside
    # val/acc): each image under one of the 15 CIFAR-10-C corruptions at this severity, spread
    # evenly in the fixed order of the pretraining monitor's twin, so that runs compare; how a
    # fine-tuning trades robustness for accuracy as it trains. 0 = off.
    val_shift_severity: int = 3


@dataclass
class SubsetConfig:
    # Share of each class's train images that keep their labels, in (0, 1]: 0.01, 0.1, 1.0.
    fraction: float = 0.1
    # > 0: exactly this many labeled images per class instead of a fraction.
    per_class: int = 0


@dataclass
class LinearConfig:
    # Where features are cached; "" = <encoder run>/features (keyed by the encoder weights'
    # hash, the data and the image size, so a sweep over fractions and seeds computes them once).
    cache_dir: str = ""
    # Standardise features with the labeled set's mean/std before the linear layer (MAE, He et
    # al. 2022, App. A.2, uses a non-affine BatchNorm for this); folded into the exported head.
    standardize: bool = True


@dataclass
class AugmentConfig:
    # Full fine-tuning only (mode=linear trains on cached, unaugmented features): random crop
    # from an image zero-padded by this many pixels, then a horizontal flip (the CIFAR
    # augmentation of He et al. 2016, Sec. 4.2: pad 4, flip 0.5); 0 = no crop.
    crop_padding: int = 2
    # Full fine-tuning only: probability of the horizontal flip. Digits: a mirrored digit is
    # another symbol, so the default flips nothing.
    hflip_prob: float = 0.0
    # Full fine-tuning only: std of Gaussian noise added to every training image on [0, 1],
    # unclipped (0: none): the
    # base classifier of randomized smoothing is trained with the sigma it is certified at
    # (Cohen et al. 2019, cert.sigma of the evaluation); also a common corruption baseline.
    gaussian_noise: float = 0.0


@dataclass
class FinetuneOptimConfig:
    # Learning rate of the head (SGD with momentum): linear warmup, then cosine decay to 0 over
    # the trainer's total steps.
    lr: float = 0.1
    # Full fine-tuning: the encoder's learning rate is lr * encoder_lr_mult; 0 freezes the
    # encoder, its BatchNorm statistics included (it stays in eval mode).
    encoder_lr_mult: float = 0.1
    # SGD momentum.
    momentum: float = 0.9
    # Nesterov momentum instead of the classical one.
    nesterov: bool = False
    # Weight decay (an L2 penalty on the weights).
    weight_decay: float = 0.0
    # Epochs of the linear warmup from 0 to lr (fractions allowed); 0 = none.
    warmup_epochs: float = 0.0


@dataclass
class PurifyConfig:
    # A denoiser run directory (diffusers folder): the final weights are also tested through it
    # (test/acc_purified beside test/acc); "" = none. Training and validation never use it.
    run: str = ""
    # ddpm: ancestral steps t* .. 1 (DiffPure); ddim: ddim_steps deterministic steps; oneshot:
    # the predicted x0 after one UNet call (denoised smoothing).
    sampler: str = "ddpm"
    # Forward diffusion steps t* (DiffPure's t* = 0.1 of 1000 steps is 100); used while sigma
    # is 0.
    t_star: int = 100
    # > 0: the t* whose noise matches N(0, sigma^2) on [0, 1] images instead of t_star (as the
    # evaluation's purifier.sigma); 0 = use t_star.
    sigma: float = 0.0
    # Steps of the ddim sampler, 1 <= ddim_steps <= t*.
    ddim_steps: int = 5
    # Seed of the purification noise (the test accuracy through a stochastic purifier).
    seed: int = 0


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    # linear: a linear head on frozen, cached features; full: encoder + head, augmented images.
    mode: str = "linear"
    encoder: EncoderSourceConfig = field(default_factory=EncoderSourceConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=100))
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    # "" = the encoder's pretraining data.
    "data.name": ("", *COMMON_CHOICES["data.name"]),
    "mode": ("full", "linear"),
    "purify.sampler": ("ddim", "ddpm", "oneshot"),
}

# Numeric ranges of this job's own keys, checked when the config loads (with the shared ones).
RANGES: dict[str, Range] = {
    "subset.fraction": FRACTION,
    "subset.per_class": at_least(0, "0 = use subset.fraction"),
    "encoder.width": at_least(1),
    "data.val_shift_severity": ((lambda v: 0 <= v <= 5), "in 0..5; 0 = off"),
    "augment.crop_padding": at_least(0),
    "augment.hflip_prob": PROBABILITY,
    "augment.gaussian_noise": at_least(0, "0 = none"),
    "optim.lr": above(0),
    "optim.encoder_lr_mult": at_least(0, "0 = a frozen encoder"),
    "optim.momentum": MOMENTUM,
    "optim.weight_decay": at_least(0),
    "optim.warmup_epochs": at_least(0),
    "purify.t_star": at_least(0),
    "purify.sigma": at_least(0, "0 = use purify.t_star"),
    "purify.ddim_steps": at_least(1),
}
