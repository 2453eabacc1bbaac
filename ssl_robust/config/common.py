"""Config sections shared by several jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config key, type, value or preset is invalid."""


@dataclass
class RunConfig:
    # Run directory: the unit of resume. "" derives one: pretraining runs/pretrain-<method>-<data>,
    # denoiser runs/denoiser-<data>, fine-tuning finetune-<mode>-<subset>-seed<seed>-<encoder
    # run> beside the encoder run, evaluation runs/evaluate-<classifier run>[-purified].
    dir: str = ""
    # Seeds everything random: weights, data order, views, splits and subsets.
    seed: int = 0
    # Rerunning with the same directory continues where it stopped: training jobs from
    # checkpoints/last.ckpt, evaluation from the finished units in partial/. false: start over
    # (the old checkpoints, stored units and metrics are deleted); a requeued SLURM job of a
    # run started with false still resumes what its first piece began.
    resume: bool = True


@dataclass
class DataConfig:
    # digits: the embedded default (scikit-learn's 1,797 real 8x8 handwritten digits, upsampled),
    # needs no download. cifar10/cifar100/stl10 through torchvision; imagefolder: any tree.
    name: str = "digits"
    # The folder holding the dataset (torchvision's layout, or the imagefolder tree).
    root: str = "data"
    # Let torchvision fetch cifar10/cifar100/stl10 into root (needs the network).
    download: bool = False
    # 0 keeps the native size (digits: upsampled from 8 to 16 px, CIFAR: 32, STL-10: 96).
    image_size: int = 0
    # Held-out fraction when the source has no separate validation split.
    val_fraction: float = 0.2
    # Training batch per device (the global batch is batch_size x devices x num_nodes x
    # accumulation).
    batch_size: int = 128
    # Batch of the validation passes (pretraining: the kNN bank and probes; fine-tuning: the
    # features and the evaluation split; denoiser: the validation loss).
    eval_batch_size: int = 512
    # DataLoader worker processes per rank.
    num_workers: int = 2
    # imagefolder: decode every image once into a uint8 array (cached on disk under
    # <root>/.cache, shared by every run on the tree).
    in_memory: bool = True
    # Unreadable image files: false raises naming the file; true skips them and reports a count.
    skip_bad_images: bool = False
    # Pretraining only (fine-tuning and denoiser training ignore it): where the two SSL views
    # of each image are made: "cpu" (lightly's PIL transforms in DataLoader workers, any
    # dataset) or "gpu" (the uint8 dataset on the device, batched transforms; in-memory datasets
    # only; works on the CPU too).
    augment: str = "cpu"
    # Pretraining only: torch.compile the device views (augment=gpu): fuses their ~420 small ops
    # per view into a few kernels, which is what they cost on a GPU. Compiles once per batch
    # shape.
    compile_views: bool = False
    # Per-channel mean of the encoder's input normalisation; [] = the dataset's own statistics.
    # (The denoiser works on the raw [0, 1] images and ignores mean and std.)
    mean: list[float] = field(default_factory=list)
    # Per-channel std of the normalisation, each > 0; [] = the dataset's own statistics.
    std: list[float] = field(default_factory=list)


@dataclass
class ViewsConfig:
    """Parameters of lightly's SimCLR/BYOL view transforms that the presets change."""

    # Smallest area fraction of the random resized crop. The defaults suit the 16-px digits (the
    # presets set lightly's CIFAR values 0.08 and hf_prob 0.5): tiny crops of a digit leave
    # nothing to recognise and a mirrored digit is another symbol.
    min_scale: float = 0.3
    # Probability of a horizontal flip.
    hf_prob: float = 0.0
    # Probability of colour jitter.
    cj_prob: float = 0.8
    # Strength s of the colour jitter: brightness/contrast/saturation 0.8 x s, hue 0.2 x s (as
    # lightly's SimCLRTransform).
    cj_strength: float = 1.0
    # Probability of converting a view to grayscale.
    random_gray_scale: float = 0.2
    # Probability of a Gaussian blur; 0 = none, as at 32 px in lightly's CIFAR-10 benchmark and
    # solo-learn.
    gaussian_blur: float = 0.0


@dataclass
class ModelConfig:
    # resnet18_cifar, resnet50_cifar, convnet, a torchvision model name ("tv:resnet34")
    # or a timm model name ("timm:resnet26d").
    backbone: str = "convnet"
    # Base width of the small "convnet" backbone (ignored by the others).
    width: int = 32
    # torch.compile the backbone's forward (the weights and their names are unchanged).
    compile: bool = False


@dataclass
class MethodConfig:
    # simclr: contrastive, NT-Xent over the batch (Chen et al. 2020); byol: a predictor and a
    # momentum target network, no negatives (Grill et al. 2020).
    name: str = "simclr"
    # SimCLR: NT-Xent temperature (Chen et al. 2020).
    temperature: float = 0.5
    # Projection head: hidden width (SimCLR 512, BYOL 1024 in the presets) ...
    proj_hidden_dim: int = 512
    # ... and output width (SimCLR 128, BYOL 256 in the presets).
    proj_out_dim: int = 128
    # BYOL: hidden width of the prediction head.
    pred_hidden_dim: int = 1024
    # BYOL: the target network's EMA momentum at the start; a cosine schedule takes it to 1.
    base_tau: float = 0.99
    # How the two views go through the networks. false: one pass per view, so BatchNorm
    # normalises each view by its own batch statistics, as lightly's CIFAR-10 benchmark (the
    # 84.8 / 86.8 anchors) and solo-learn run them. true: one pass of both views (twice the
    # batch), whose BatchNorm statistics they share.
    joint_views: bool = False


@dataclass
class OptimConfig:
    # sgd: SGD with momentum; lars: LARS (You et al. 2017; SimCLR's and BYOL's large-batch
    # optimiser).
    name: str = "sgd"
    # The learning rate at reference_batch; scaled to the global batch by lr_scaling.
    base_lr: float = 0.06
    # The global batch that base_lr is given for.
    reference_batch: int = 128
    # linear: base_lr x global_batch / reference_batch; sqrt: x its square root; none: base_lr.
    lr_scaling: str = "linear"
    # Momentum of SGD and LARS.
    momentum: float = 0.9
    # Weight decay (an L2 penalty on the weights; see decay_norm_bias).
    weight_decay: float = 5e-4
    # Weight decay on norms and biases too. false (SimCLR's and LARS's practice) exempts them;
    # lightly's CIFAR-10 benchmarks decay every parameter (true in the CIFAR presets).
    decay_norm_bias: bool = False
    # Epochs of linear warm-up from 0 (fractions allowed), then cosine decay to 0 at the last
    # step.
    warmup_epochs: float = 1.0


@dataclass
class TrainerConfig:
    # Training epochs (passes over the training images or, for a linear probe, features). A
    # larger value on a finished run extends it along the longer schedule; never fewer than its
    # checkpoint has trained.
    max_epochs: int = 15
    # auto: a GPU when there is one (cuda and gpu: the same), else the CPU.
    accelerator: str = "auto"
    # One process per device: devices x num_nodes ranks (srun: --ntasks-per-node=devices,
    # --nodes=num_nodes; torchrun: --nproc-per-node=devices, --nnodes=num_nodes).
    devices: int = 1
    # Machines (nodes) of a multi-node run, each with `devices` processes.
    num_nodes: int = 1
    # auto: DDP as soon as devices x num_nodes > 1 (NCCL on GPUs, gloo on CPU).
    strategy: str = "auto"
    # How long a rank waits in a collective for the others before the job fails.
    pg_timeout_s: int = 1800
    # BatchNorm statistics over the global batch; GPUs only (ignored with a note on CPU).
    sync_batchnorm: bool = False
    # Under SLURM: on SIGUSR1 write hpc_ckpt_N.ckpt into the run dir and requeue the job.
    auto_requeue: bool = True
    # bf16-mixed: bfloat16 autocast (GPUs since Ampere); 16-mixed: float16 with loss scaling.
    precision: str = "32-true"
    # Models and images in channels-last memory format (faster convolutions on GPUs).
    channels_last: bool = False
    # Sum gradients over this many batches per optimiser step (part of the global batch).
    accumulate_grad_batches: int = 1
    # Clip the gradient norm to this value; 0 = no clipping.
    gradient_clip_val: float = 0.0
    # Log the training metrics (metrics.csv, wandb) every this many optimiser steps.
    log_every_n_steps: int = 10
    # Training batches per epoch: a fraction (< 1) or a number of 2 or more (smoke runs;
    # Lightning's limit). 1 means every batch (1.0 = 100 %), not one.
    limit_train_batches: float = 1.0
    # Validation batches per validation, as limit_train_batches. Validation reads its splits in
    # one fixed shuffled order, so a limited one is the same sample of every class each time.
    limit_val_batches: float = 1.0
    # Deterministic algorithms only: bit-reproducible runs, slower on GPUs.
    deterministic: bool = False
    # cuDNN picks the fastest convolution algorithms for each input shape (fixed-size batches
    # gain); off under deterministic=true, whose algorithms it would override.
    cudnn_benchmark: bool = True
    # A progress bar of the training and validation batches (a live bar on a terminal); false
    # for quieter logs, e.g. SLURM output files.
    progress_bar: bool = True
    # Redraw <run dir>/curves.png at an epoch's end once this many seconds have passed (and
    # always when a fit stops on an error or a requeue); 0 = only when the fit ends or stops.
    curves_every_s: float = 60.0
    # Write checkpoints/last.ckpt every this many training epochs, and after the last one. A
    # crash loses at most this many epochs (a SLURM preemption none: it checkpoints on its
    # signal); more than 1 for short epochs (CIFAR on a fast GPU: ~100 MB every few seconds).
    checkpoint_every_n_epochs: int = 1
    # Profile this many training steps (torch.profiler; after the first epoch, which compiles)
    # into <run dir>/profile.txt: the device's busy share of the steps' wall time and the
    # operators that take the most host and device time; 0 = off.
    profile_steps: int = 0
    # One training and one validation batch in a scratch directory, removed after: nothing in
    # run.dir is read or written (a smoke test; no checkpoints, metrics or exports).
    fast_dev_run: bool = False


@dataclass
class MonitorConfig:
    # Neighbours k of the kNN classifier on the val split (Wu et al. 2018: cosine similarity,
    # k=200, t=0.1), val/knn_acc.
    knn_k: int = 200
    # Temperature of the kNN classifier's similarity weights exp(sim / t).
    knn_t: float = 0.1
    # Validate (kNN and online probe) every this many epochs.
    every_n_epochs: int = 1
    # A linear classifier trained alongside on detached features (val/online_acc); it never
    # changes the encoder.
    online_probe: bool = True
    # Images in <run dir>/views.png, the first training batch's views as the encoder gets them
    # (after device augmentation and denoising), one row per view; 0 = no figure.
    views_figure: int = 8
    # The kNN and probe accuracies also on a shifted twin of the val split: each image under
    # one of the 15 CIFAR-10-C corruptions at this severity, spread evenly in a fixed order,
    # the same for every run so that runs compare (val/knn_acc_shift, val/online_acc_shift):
    # how robust the features are as they train; 0 = off.
    shift_severity: int = 3


@dataclass
class WandbConfig:
    # disabled: no wandb (no account needed); offline: logged to <run>/wandb, `wandb sync`
    # later; online: streamed to the server.
    mode: str = "disabled"
    # The wandb project the runs are logged to.
    project: str = "ssl_robust"
    # "" uses the account's default entity.
    entity: str = ""
    # Group runs of one experiment; "" = none.
    group: str = ""
    # "" names the run after its run directory.
    name: str = ""
    # Labels of the run in wandb, e.g. [cifar10, baseline].
    tags: list[str] = field(default_factory=list)
    # "" = the job (pretrain, denoiser, finetune, evaluate).
    job_type: str = ""
    # Seconds wandb.init may take before the job fails.
    init_timeout_s: int = 300


# Keys that say how a run was run, not what it computed: where data and caches lie,
# downloads, loader processes, logging and progress, collectives, compilation, devices (a run
# is the same experiment on a CPU or a GPU). A resumed run may change them (pipelines'
# resume checks), and they never explain a difference between results (compare).
RUN_ONLY_KEYS = frozenset(
    {
        "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
        "data.in_memory", "data.compile_views", "model.compile", "linear.cache_dir",
        "trainer.progress_bar", "trainer.curves_every_s", "trainer.log_every_n_steps",
        "trainer.profile_steps", "trainer.checkpoint_every_n_epochs",
        "trainer.pg_timeout_s", "trainer.auto_requeue", "trainer.cudnn_benchmark",
        "trainer.accelerator", "eval.progress", "eval.data_root", "eval.device",
        "eval.batch_size",
    }
)  # fmt: skip


# Closed sets of values of the shared sections, checked at load time (each job adds its own).
# Registries (METHODS, datasets) have tests that keep these lists equal to the code.
COMMON_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("cifar10", "cifar100", "digits", "imagefolder", "stl10"),
    "data.augment": ("cpu", "gpu"),
    "trainer.accelerator": ("auto", "cpu", "cuda", "gpu"),
    "trainer.precision": ("16-mixed", "32-true", "bf16-mixed", "bf16-true"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"),
    "wandb.mode": ("disabled", "offline", "online"),
}


# A numeric key's valid range: (value -> ok, what is valid, as the error and --help say it).
Range = tuple[Callable[[Any], bool], str]


def at_least(low: float, note: str = "") -> Range:
    return (lambda v: v >= low), f">= {low:g}" + (f"; {note}" if note else "")


def above(low: float) -> Range:
    return (lambda v: v > low), f"> {low:g}"


def _batch_limit(value: Any) -> bool:
    """Lightning's batch limits: a fraction in (0, 1] or a whole number of batches."""
    return value > 0 and (value <= 1 or float(value).is_integer())


PROBABILITY: Range = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
UNIT: Range = (PROBABILITY[0], "in [0, 1]")  # a decay, a momentum target
FRACTION: Range = (lambda v: 0 < v <= 1, "in (0, 1]")
MOMENTUM: Range = (lambda v: 0 <= v < 1, "in [0, 1)")
_BATCHES: Range = (_batch_limit, "a fraction in (0, 1] or a number of batches")

# Numeric keys of the shared sections and their valid range (value -> ok, what is valid),
# checked when the config loads, before any work: out of range, a fit would fail deep inside
# (a division by zero, a warm-up longer than the run, a convolution of width 0) or silently do
# something else (zero epochs and an untrained export).
COMMON_RANGES: dict[str, Range] = {
    # numpy's and Lightning's seeds (a negative one fails deep inside seed_everything).
    "run.seed": ((lambda v: 0 <= v < 2**32), "in 0..4294967295"),
    "trainer.max_epochs": at_least(1),
    "trainer.devices": at_least(1),
    "trainer.num_nodes": at_least(1),
    "trainer.pg_timeout_s": above(0),
    "trainer.accumulate_grad_batches": at_least(1),
    "trainer.gradient_clip_val": at_least(0, "0 = no clipping"),
    "trainer.log_every_n_steps": at_least(1),
    "trainer.limit_train_batches": _BATCHES,
    "trainer.limit_val_batches": _BATCHES,
    "trainer.curves_every_s": at_least(0, "0 = only when a fit ends or stops"),
    "trainer.profile_steps": at_least(0, "0 = off"),
    "trainer.checkpoint_every_n_epochs": at_least(1),
    "data.image_size": at_least(0, "0 = the dataset's own size"),
    "data.num_workers": at_least(0),
    "data.batch_size": at_least(1),
    "data.eval_batch_size": at_least(1),
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    # A zero std divides by zero in the normalisation (every image becomes inf/nan).
    "data.std": ((lambda v: all(x > 0 for x in v)), "each > 0; [] = the dataset's own"),
    "views.min_scale": FRACTION,
    "views.hf_prob": PROBABILITY,
    "views.cj_prob": PROBABILITY,
    "views.cj_strength": at_least(0),
    "views.random_gray_scale": PROBABILITY,
    "views.gaussian_blur": PROBABILITY,
    "model.width": at_least(1),
    "method.temperature": above(0),
    "method.proj_hidden_dim": at_least(1),
    "method.proj_out_dim": at_least(1),
    "method.pred_hidden_dim": at_least(1),
    "method.base_tau": UNIT,
    # OnlineMonitor refuses knn_k < 1 and knn_t <= 0 only when the job has started.
    "monitor.knn_k": at_least(1),
    "monitor.knn_t": above(0),
    "monitor.every_n_epochs": at_least(1),
    "monitor.views_figure": at_least(0, "0 = no figure"),
    "monitor.shift_severity": ((lambda v: 0 <= v <= 5), "in 0..5; 0 = off"),
    "wandb.init_timeout_s": above(0),
}
