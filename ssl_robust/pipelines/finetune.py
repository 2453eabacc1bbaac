"""The fine-tuning pipeline: encoder run + labeled subset -> classifier run directory.

Two modes share everything but the training loop:

- ``linear``: features of the whole train and evaluation splits are computed once per encoder
  and data (``<encoder run>/features/``) and a linear head is trained on the subset's rows;
- ``full``: encoder + head are trained on augmented images of the subset, the encoder with a
  smaller learning rate; ``checkpoints/last.ckpt`` makes a rerun resume.

Both test the final weights on the evaluation split (``test/acc``), optionally through a
diffusion purifier too (``test/acc_purified``), and export ``classifier.safetensors`` +
``classifier.json`` for the evaluation phase.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torchvision.transforms as T
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms.v2 import GaussianNoise

from ssl_robust.config import ConfigError, save_config, to_dict
from ssl_robust.config.common import RUN_ONLY_KEYS
from ssl_robust.config.finetune import CHOICES
from ssl_robust.data.datamodule import (
    EpochSeededSampler,
    ResumableDataLoader,
    batches_done_this_epoch,
    eval_loader,
    ignore_sigterm,
    usable_workers,
)
from ssl_robust.data.datasets import (
    FileSource,
    ImageSource,
    Splits,
    TransformDataset,
    build_splits,
)
from ssl_robust.data.subsets import SPEC_FILE, SubsetSpec, assert_disjoint, load_or_draw_subset
from ssl_robust.evaluate.cifar_c import params_hash
from ssl_robust.finetune.export import save_classifier
from ssl_robust.finetune.features import (
    feature_key,
    load_or_compute_features,
    load_or_compute_split_features,
    source_images,
    weights_digest,
)
from ssl_robust.finetune.model import Classifier
from ssl_robust.finetune.modules import ClassifierTest, FineTuner, LinearProbe
from ssl_robust.launch.distributed import check_world_size, local_rank
from ssl_robust.launch.trainer import (
    ConfigInCheckpoint,
    build_loggers,
    build_trainer,
    checkpoint_callbacks,
    fit,
    read_json,
    resume_checkpoint,
    test,
    write_json,
)
from ssl_robust.models.backbones import Encoder, build_backbone
from ssl_robust.models.export import EncoderMeta, load_encoder, load_encoder_meta
from ssl_robust.pipelines.common import (
    check_denoiser_size,
    check_phase,
    check_resumable,
    console,
    final_metrics,
    fit_time_s,
    flatten,
    print_summary,
    smoke_in_scratch,
    write_curves,
)

if TYPE_CHECKING:
    from ssl_robust.purify.purifier import Purifier

# The keys of classifier.json's "data": what the evaluation phase needs to rebuild the split.
DATA_KEYS = (
    "name",
    "root",
    "download",
    "image_size",
    "val_fraction",
    "seed",
    "in_memory",
    "skip_bad_images",
    "mean",
    "std",
)


@dataclass
class _Job:
    """What both modes get from the shared preparation."""

    cfg: DictConfig
    run_dir: Path
    encoder_dir: Path | None  # None: a backbone from random weights (encoder.backbone)
    classifier: Classifier
    meta: EncoderMeta
    splits: Splits
    data: dict[str, Any]
    subset: torch.Tensor  # (M,) indices into the train split
    purifier: Purifier | None
    device: torch.device
    resume_from: str | None = None  # the checkpoint this run continues, if any

    @property
    def cache_home(self) -> Path:
        """Where caches shared by every fine-tuning of the encoder live: its run directory (this
        run's for a backbone from random weights)."""
        return self.encoder_dir if self.encoder_dir is not None else self.run_dir


def resolve_data(
    cfg: DictConfig, encoder_dir: Path | None, meta: EncoderMeta | None
) -> dict[str, Any]:
    """The data description (``DATA_KEYS``): the encoder's pretraining data unless
    ``data.name`` is set; the split seed of the pretraining run unless ``data.split_seed`` is.
    Without an encoder run (``encoder_dir`` and ``meta`` None: random weights), the data are
    ``data.name``'s or, with ``data.like``, that pretraining run's, and empty ``mean``/``std``
    take the dataset's own statistics."""
    d = cfg.data
    source = encoder_dir
    means_meta = meta  # whose normalisation the inputs keep: the encoder's, not data.like's
    if encoder_dir is None and d.like and not d.name:
        source = Path(d.like)
        if not (source / "config.yaml").is_file() and not (source / "encoder.json").is_file():
            raise FileNotFoundError(
                f"data.like: no run in {str(source)!r} (expected the config.yaml or the "
                "encoder.json of a pretraining run)"
            )
        if meta is None and (source / "encoder.json").is_file():
            meta = load_encoder_meta(source)  # only to name its data, as for its encoder
    pre_path = source / "config.yaml" if source is not None else None
    pre = OmegaConf.load(pre_path) if pre_path is not None and pre_path.is_file() else None
    inherited = ("root", "download", "image_size", "val_fraction", "in_memory", "skip_bad_images")
    if d.name:
        out: dict[str, Any] = {"name": d.name, **{k: d[k] for k in inherited}}
    elif pre is not None and "data" in pre:
        out = {"name": pre.data.name, **{k: pre.data.get(k, d[k]) for k in inherited}}
    else:
        name = meta.extra.get("dataset") if meta is not None else None
        if not name:
            raise ValueError(
                f"cannot tell which data the run in {str(source)!r} was pretrained on "
                f"(no data in its config.yaml, no dataset in its encoder.json); set data.name"
            )
        assert meta is not None
        out = {"name": str(name), **{k: d[k] for k in inherited}}
        out["image_size"] = d.image_size or meta.image_size
    if d.split_seed >= 0:
        out["seed"] = int(d.split_seed)
    else:
        out["seed"] = int(pre.run.seed) if pre is not None and "run" in pre else 0
    # The encoder saw inputs normalised with its own statistics; keep them unless overridden.
    out["mean"] = [float(v) for v in (d.mean or (means_meta.mean if means_meta else []))]
    out["std"] = [float(v) for v in (d.std or (means_meta.std if means_meta else []))]
    return out


def _build_splits(data: dict[str, Any]) -> Splits:
    return build_splits(
        name=data["name"],
        root=data["root"],
        download=data["download"],
        image_size=data["image_size"],
        val_fraction=data["val_fraction"],
        seed=data["seed"],
        in_memory=data["in_memory"],
        skip_bad_images=data["skip_bad_images"],
        cache_dir=Path(data["root"]) / ".cache" if data["name"] == "imagefolder" else None,
        mean=data["mean"],
        std=data["std"],
    )


def default_run_dir(cfg: DictConfig, spec: SubsetSpec) -> Path:
    """``run.dir``, or ``finetune-<mode>-<subset>-seed<seed>-<encoder run name>`` next to the
    encoder run (the encoder's name keeps sweeps over several encoders apart)."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    if not cfg.encoder.run:  # random weights: runs/...-scratch-<backbone>[-w<width>]-<data>
        e = cfg.encoder
        name = "scratch-" + str(e.backbone).replace(":", "-").replace("/", "-")
        if e.backbone == "convnet":
            name += f"-w{e.width}"
        like = Path(cfg.data.like)
        name += "-" + (cfg.data.name or f"{like.resolve().parent.name}-{like.name}")
        return Path("runs") / f"finetune-{cfg.mode}-{spec.label}-seed{cfg.run.seed}-{name}"
    enc = Path(cfg.encoder.run)
    return enc.parent / f"finetune-{cfg.mode}-{spec.label}-seed{cfg.run.seed}-{enc.name}"


def check_same_job(run_dir: Path, cfg: DictConfig) -> None:
    """A rerun must continue the same job: never resume another encoder's or mode's run."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = OmegaConf.load(path)
    keys = [("mode", cfg.mode), ("encoder.run", cfg.encoder.run)]
    keys.append(("encoder.backbone", cfg.encoder.backbone))
    if cfg.encoder.backbone:  # random weights: their data and (a convnet's) width too
        shape = ["encoder.width"] if cfg.encoder.backbone == "convnet" else []
        keys += [(k, OmegaConf.select(cfg, k)) for k in (*shape, "data.name", "data.like")]
    # Keys an older run's config may lack: their values then.
    defaults = {"encoder.backbone": "", "encoder.width": 32, "data.like": ""}
    for key, new in keys:
        before = OmegaConf.select(old, key, default=defaults.get(key))
        same = (
            Path(str(before)).resolve() == Path(new).resolve()
            if key in ("encoder.run", "data.like") and before and new
            else before == new
        )
        if not same:
            raise ValueError(
                f"{str(run_dir)!r} holds a fine-tuning run with {key}={before!r}, not {new!r}; "
                f"use another run.dir"
            )


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Before anything is written (and by ``chain --check``): the run directory holds no other
    phase's run nor another encoder's or mode's fine-tuning, and a checkpoint there was trained
    as ``cfg`` asks; raises ConfigError (ValueError for another job)."""
    check_phase(run_dir, "finetune")
    check_same_job(run_dir, cfg)
    # A run that would resume must ask for the training its checkpoint holds. Without
    # subset.json the subset's request is compared here; with it, by its own check.
    with_subset = not (run_dir / SPEC_FILE).is_file()
    check_resumable(run_dir, cfg, lambda c: training_settings(c, with_subset), "fine-tuning")


# The config sections that determine a checkpoint's weights and the metrics recorded with them,
# per mode (the probe has no augmentation, full fine-tuning no linear.*): a run resumes a
# checkpoint only if these hold the same values as in the run that wrote it. Each section is
# compared whole, so that a key added later is compared too, except for _NOT_TRAINING: where
# files live, how many processes on which devices, logging. The encoder and the mode are
# checked by check_same_job, the data and the labeled subset against subset.json.
_TRAINING_SECTIONS = {
    "full": ("data", "optim", "augment", "trainer"),
    "linear": ("data", "optim", "linear", "trainer"),
}
_NOT_TRAINING = RUN_ONLY_KEYS | {
    # The data's identity is checked (resolved) against subset.json.
    "data.name", "data.image_size", "data.val_fraction", "data.skip_bad_images", "data.mean",
    "data.std", "data.split_seed", "data.like", "data.augment",
    # How many processes on which devices; memory layout; reproducibility switches.
    "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.sync_batchnorm",
    "trainer.channels_last", "trainer.deterministic", "trainer.fast_dev_run",
    # More epochs extend a run along the longer schedule (check_resumable refuses fewer).
    "trainer.max_epochs",
}  # fmt: skip


def training_settings(config: Mapping[str, Any], with_subset: bool = True) -> dict[str, Any]:
    """The flattened keys of a fine-tuning config (plain data) that a resumed run must share
    with the run that wrote the checkpoint; with ``with_subset`` also ``run.seed`` and
    ``subset.*`` (otherwise checked against ``subset.json``)."""
    flat = flatten(config)
    sections = _TRAINING_SECTIONS.get(str(config.get("mode")), ())
    if with_subset:
        sections = (*sections, "subset")
    out = {
        k: v
        for k, v in flat.items()
        if k.split(".")[0] in sections
        and k not in _NOT_TRAINING
        and not (config.get("mode") == "linear" and k == "optim.encoder_lr_mult")
    }
    if with_subset and "run.seed" in flat:
        out["run.seed"] = flat["run.seed"]
    return out


def _device(accelerator: str, env: Mapping[str, str] | None = None) -> torch.device:
    """Where this process computes before the Trainer exists (the linear probe's features):
    its own GPU, ``cuda:<local rank>``, so that the ranks of a node do not all share cuda:0."""
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return torch.device("cuda", local_rank(env) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


class _Rows(Dataset):
    """Rows of feature and label tensors keyed by ``(epoch, index)``, the keys of
    :class:`EpochSeededSampler`: ``(features[index], labels[index])``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[key[1]], self.labels[key[1]]


def _train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    trainer: pl.Trainer,
    drop_last: bool,
    num_workers: int = 0,
) -> ResumableDataLoader:
    """The training loader of both modes: batches in an order seeded by ``(seed, epoch)`` (the
    dataset is keyed by ``(epoch, index)``), and a run resumed from a mid-epoch checkpoint
    (SLURM preemption) starts at the first batch ``trainer`` has not trained on. A resumed run
    therefore sees the same batches as an uninterrupted one."""
    sampler = EpochSeededSampler(len(dataset), seed)  # type: ignore[arg-type]
    sampler.skip_batches = lambda: batches_done_this_epoch(trainer)
    workers = usable_workers(num_workers)
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        worker_init_fn=ignore_sigterm if workers > 0 else None,
    )


def build_purifier(p: DictConfig, image_size: int) -> Purifier | None:
    """The test-time purifier of the ``purify`` section, or None when ``purify.run`` is empty."""
    if not p.run:
        return None
    from ssl_robust.purify.purifier import Purifier
    from ssl_robust.purify.unet import load_denoiser

    unet, scheduler = load_denoiser(p.run)
    fix = "train a denoiser at this size, or set data.image_size to the denoiser's"
    check_denoiser_size(unet, image_size, "purify.run", p.run, "images", fix)
    unet.requires_grad_(False)
    use_sigma = p.sigma > 0
    return Purifier(
        unet,
        scheduler,
        t_star=None if use_sigma else p.t_star,
        sigma=p.sigma if use_sigma else None,
        sampler=p.sampler,
        ddim_steps=p.ddim_steps,
    )


def _image_loader(source: ImageSource, batch_size: int, num_workers: int) -> DataLoader:
    """Unaugmented [0, 1] images of an evaluation split (the classifier normalises inside), in
    the fixed spread order of ``eval_loader``: a limited validation still sees every class."""
    return eval_loader(TransformDataset(source, T.ToTensor()), batch_size, num_workers)


def _val_shift(job: _Job) -> ImageSource:
    """The shifted twin of the evaluation split (``data.val_shift_severity``): the pretraining
    monitor's, each image under one of the 15 corruptions, the same for every run."""
    from ssl_robust.evaluate.corruptions import corrupted_source

    # Kept beside the encoder's cached features: every fine-tuning of it reads the same twin.
    severity = int(job.cfg.data.val_shift_severity)
    return corrupted_source(job.splits.val, severity, seed=0, cache_dir=job.cache_home / "cache")


def _trainer(job: _Job, callbacks: Sequence[Callback]) -> pl.Trainer:
    cfg = job.cfg
    config = to_dict(cfg)
    return build_trainer(
        cfg.trainer,
        job.run_dir,
        loggers=build_loggers(job.run_dir, cfg.wandb, config, "finetune", job.run_dir.name),
        # No best-by-val checkpoint: val/acc is measured on the evaluation split, and picking
        # weights by it would select on the test set. The final weights are tested.
        callbacks=[
            *checkpoint_callbacks(
                job.run_dir, monitor=None, every_n_epochs=cfg.trainer.checkpoint_every_n_epochs
            ),
            ConfigInCheckpoint(config),
            *callbacks,
        ],
    )


def _test_purified(trainer: pl.Trainer, job: _Job, clean: bool, metrics: dict[str, float]) -> None:
    """Run the image-level test pass (clean and/or purified) and record its metrics."""
    if job.purifier is None and not clean:
        return
    d = job.cfg.data
    loader = _image_loader(job.splits.val, d.eval_batch_size, d.num_workers)
    module = ClassifierTest(job.classifier, job.purifier, seed=job.cfg.purify.seed, clean=clean)
    start = time.perf_counter()
    test(trainer, module, dataloaders=loader, verbose=False)
    metrics.update(final_metrics(trainer))
    if job.purifier is not None:
        metrics["purify/nfe"] = float(job.purifier.nfe)
        metrics["purify/t_star"] = float(job.purifier.t_star)
        metrics["perf/test_purified_s"] = time.perf_counter() - start


def run_linear(
    job: _Job, callbacks: Sequence[Callback], metrics: dict[str, float]
) -> tuple[pl.Trainer, dict[str, str]]:
    """Linear probe on cached features; the folded head is copied into the classifier."""
    cfg, clf = job.cfg, job.classifier
    clf.to(job.device).eval()
    cache = Path(cfg.linear.cache_dir) if cfg.linear.cache_dir else job.cache_home / "features"
    key = feature_key(weights_digest(clf.encoder), job.data, job.data["image_size"])
    start = time.perf_counter()
    feats = load_or_compute_features(
        clf.features, job.splits.train, job.splits.val, cache, key,
        cfg.data.eval_batch_size, job.device, progress=cfg.trainer.progress_bar,
    )  # fmt: skip
    shifted: torch.Tensor | None = None
    severity = int(cfg.data.val_shift_severity)
    if severity:
        # The twin's features, cached beside the splits' (keyed by the corruption parameters
        # too); its images are made only when they are not cached.
        shift_key = hashlib.sha1(f"{key} {params_hash()} {severity}".encode()).hexdigest()[:20]
        shifted, _ = load_or_compute_split_features(
            clf.features, feats.eval_labels.numpy(), lambda: _val_shift(job), cache,
            f"{shift_key}-val-shift", cfg.data.eval_batch_size, job.device,
            progress=cfg.trainer.progress_bar,
        )  # fmt: skip
    metrics["perf/features_s"] = time.perf_counter() - start
    clf.cpu()
    x = feats.train[job.subset]  # (M, D)
    y = feats.train_labels[job.subset]  # (M,)
    mean, std = None, None
    if cfg.linear.standardize:
        # Features that never vary (dead units) keep a unit scale instead of a division by 0.
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    o = cfg.optim
    probe = LinearProbe(
        feats.train.shape[1],
        job.splits.info.num_classes,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        warmup_epochs=o.warmup_epochs,
        feat_mean=mean,
        feat_std=std,
    )
    trainer = _trainer(job, callbacks)
    train_loader = _train_loader(
        _Rows(x, y),
        cfg.data.batch_size,
        cfg.run.seed,
        trainer,
        # Every labeled image every epoch: a linear layer takes a last batch of any size (with
        # 1 % of CIFAR-10's labels and batch 256, dropping it would skip 244 of 500 images).
        drop_last=False,
    )
    # Validation and the test; a limited validation reads a sample of every class.
    eval_features = eval_loader(
        TensorDataset(feats.eval, feats.eval_labels), cfg.data.eval_batch_size
    )
    val_loaders = [eval_features]
    if shifted is not None:
        val_loaders.append(
            eval_loader(TensorDataset(shifted, feats.eval_labels), cfg.data.eval_batch_size)
        )
    _fit(trainer, probe, train_loader, val_loaders, job, metrics)
    test(trainer, probe, dataloaders=eval_features, verbose=False)
    metrics.update(final_metrics(trainer))
    metrics.update(probe.derived)
    clf.head = probe.folded_head()
    _test_purified(trainer, job, clean=False, metrics=metrics)
    extra = {
        "Features": f"{feats.path} ({'computed' if feats.computed else 'read from the cache'})"
    }
    return trainer, extra


def run_full(
    job: _Job, callbacks: Sequence[Callback], metrics: dict[str, float]
) -> tuple[pl.Trainer, dict[str, str]]:
    """Full fine-tuning on augmented images of the subset."""
    cfg, o, a = job.cfg, job.cfg.optim, job.cfg.augment
    if a.crop_padding < 0 or not 0.0 <= a.hflip_prob <= 1.0:
        raise ValueError(
            f"augment.crop_padding must be >= 0 and augment.hflip_prob in [0, 1], got "
            f"{a.crop_padding}, {a.hflip_prob}"
        )
    size = job.splits.info.image_size
    steps: list[Callable[..., Any]] = []
    if a.crop_padding:
        steps.append(T.RandomCrop(size, padding=a.crop_padding))
    if a.hflip_prob:
        steps.append(T.RandomHorizontalFlip(a.hflip_prob))
    steps.append(T.ToTensor())
    if a.gaussian_noise:
        # Drawn from torch's RNG, which TransformDataset seeds per (seed, epoch, image): a
        # resumed run adds the same noise.
        steps.append(GaussianNoise(sigma=float(a.gaussian_noise), clip=False))
    train_source = job.splits.train.subset(job.subset.numpy())
    train_ds = TransformDataset(train_source, T.Compose(steps), seed=cfg.run.seed)
    bs = cfg.data.batch_size
    trainer = _trainer(job, callbacks)
    # (seed, epoch)-ordered batches and per-sample seeded crops: a resumed run, from the end of
    # an epoch or from the middle of one, sees the same images in the same order as an
    # uninterrupted one.
    train_loader = _train_loader(
        train_ds,
        bs,
        cfg.run.seed,
        trainer,
        # BatchNorm in train mode cannot take a batch of one: drop a last batch only then, so a
        # small labeled subset is not cut (1 % of CIFAR-10 at batch 256: 256 + 244 images).
        drop_last=_last_batch_of_one(len(train_ds), bs, cfg.trainer),
        num_workers=cfg.data.num_workers,
    )
    eval_images = _image_loader(job.splits.val, cfg.data.eval_batch_size, cfg.data.num_workers)
    val_loaders = [eval_images]
    if cfg.data.val_shift_severity:
        val_loaders.append(
            _image_loader(_val_shift(job), cfg.data.eval_batch_size, cfg.data.num_workers)
        )
    module = FineTuner(
        job.classifier,
        lr=o.lr,
        encoder_lr=o.lr * o.encoder_lr_mult,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        warmup_epochs=o.warmup_epochs,
    )
    if cfg.trainer.channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _fit(trainer, module, train_loader, val_loaders, job, metrics)
    metrics.update(module.derived)
    _test_purified(trainer, job, clean=True, metrics=metrics)
    return trainer, {}


def _carried_metrics(run_dir: Path) -> dict[str, float]:
    """What a resumed run keeps of the ``metrics.json`` of the run it continues (e.g. the
    training metrics of a finished run, which a rerun does not train again): all but the test
    pass's, which every run measures anew. The new run's own metrics overwrite these."""
    old = read_json(run_dir / "metrics.json")
    test_keys = ("test/", "purify/", "perf/test_purified_s")
    return {k: v for k, v in old.items() if not k.startswith(test_keys)}


def _last_batch_of_one(n: int, batch_size: int, trainer_cfg: DictConfig) -> bool:
    """Whether some rank's last training batch would hold a single image (each of the
    ``devices x num_nodes`` ranks reads ``ceil(n / world)`` images)."""
    world = int(trainer_cfg.devices) * int(trainer_cfg.num_nodes)
    return math.ceil(n / world) % batch_size == 1


def _fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    train_loader: DataLoader,
    val_loaders: list[DataLoader],
    job: _Job,
    metrics: dict[str, float],
) -> None:
    ckpt = job.resume_from
    if ckpt and trainer.is_global_zero:
        console.print(f"Resuming from {ckpt}", soft_wrap=True)
    fit(trainer, module, train_loader, val_loaders, ckpt_path=ckpt)
    fit_time_s(trainer, metrics)  # over all the run's pieces
    metrics["epochs"] = float(trainer.current_epoch)
    metrics.update(final_metrics(trainer))


MODES: dict[
    str,
    Callable[[_Job, Sequence[Callback], dict[str, float]], tuple[pl.Trainer, dict[str, str]]],
] = {"full": run_full, "linear": run_linear}


def check_config(cfg: DictConfig) -> None:
    """Value checks that need no data or files (the schema checks keys, types and ranges):
    the mode, its augmentation, and where the encoder comes from; raises ConfigError."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose from {sorted(MODES)}")
    if cfg.mode == "linear" and cfg.augment.gaussian_noise > 0:
        raise ConfigError(
            "augment.gaussian_noise trains on noisy images, which only mode=full does; a linear "
            "probe trains on features of the clean images (cached once)"
        )
    e = cfg.encoder
    if e.run and e.backbone:
        raise ConfigError(
            f"encoder.run={e.run!r} and encoder.backbone={e.backbone!r}: set one, the pretrained "
            "encoder to fine-tune or the backbone to train from random weights"
        )
    if not e.run and not e.backbone:
        raise ConfigError(
            "encoder.run is empty: give the pretraining run directory that holds "
            "encoder.safetensors and encoder.json, e.g. encoder.run=runs/pretrain-simclr-digits "
            "(or encoder.backbone=<name> to train a backbone from random weights, the "
            "supervised baseline)"
        )
    if cfg.data.like and (e.run or cfg.data.name):
        raise ConfigError(
            f"data.like={cfg.data.like!r} takes the data of a pretraining run for "
            "encoder.backbone, with data.name empty; an encoder run brings its own data, and "
            "data.name names other data"
        )
    if e.backbone:
        if not cfg.data.name and not cfg.data.like:
            raise ConfigError(
                "encoder.backbone trains from random weights, so there is no pretraining run to "
                f"take the data from: set data.name (one of {list(CHOICES['data.name'][1:])}) "
                "or data.like (a pretraining run whose data to use)"
            )
        _random_backbone(cfg)


def _random_backbone(cfg: DictConfig) -> Encoder:
    try:
        return build_backbone(str(cfg.encoder.backbone), int(cfg.encoder.width))
    except ValueError as err:
        raise ConfigError(f"encoder.backbone: {err}") from err


def _encoder(cfg: DictConfig) -> tuple[Path | None, Encoder, EncoderMeta | None]:
    """The encoder to fine-tune (after :func:`check_config`): a pretraining run's export (its
    folder, the encoder, its description), or with ``encoder.backbone`` a backbone from random
    weights (None, the encoder, None), seeded by ``run.seed``."""
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if cfg.encoder.run:
        encoder_dir = Path(cfg.encoder.run)
        encoder, meta = load_encoder(encoder_dir)
        return encoder_dir, encoder, meta
    if cfg.mode == "full" and cfg.optim.encoder_lr_mult != 1:
        console.print(
            f"warning: encoder.backbone trains random weights at optim.encoder_lr_mult="
            f"{cfg.optim.encoder_lr_mult:g} of the head's rate; a supervised baseline trains "
            "the whole network at one rate (optim.encoder_lr_mult=1, as the supervised_* "
            "presets set)",
            markup=False,
            highlight=False,
        )
    return None, _random_backbone(cfg), None


@smoke_in_scratch
def finetune(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Fine-tune a pretrained encoder on a labeled subset; returns the final metrics.

    Writes into the run directory: ``config.yaml``, ``subset.npy`` + ``subset.json``,
    ``checkpoints/last.ckpt``, ``logs/version_<k>/metrics.csv``, ``metrics.json`` and
    ``classifier.safetensors`` + ``classifier.json``. Rerunning with the same run directory
    reuses the subset and resumes from the newest checkpoint (also one written mid-epoch on
    SLURM preemption: the run then ends with the weights of an uninterrupted one), provided
    the training settings (:func:`training_settings`) are the checkpoint's; ``run.resume=false``
    starts anew, and ``metrics.json`` then holds only the new run's metrics.

    Raises:
        ValueError: Unknown mode, bad subset request, a subset or run directory that belongs
            to another request, a checkpoint to resume trained with other settings,
            overlapping splits.
        FileNotFoundError: ``encoder.run`` (or ``purify.run``) holds no export.
    """
    # Cheap checks first: nothing is loaded or written before the request is known valid.
    check_config(cfg)
    spec = SubsetSpec(cfg.subset.fraction, cfg.subset.per_class, seed=cfg.run.seed)
    encoder_dir, encoder, meta = _encoder(cfg)

    data = resolve_data(cfg, encoder_dir, meta)
    splits = _build_splits(data)
    if isinstance(splits.train, FileSource) and not splits.train.size:
        # Files read at their own sizes cannot be batched unaugmented (nor corrupted with the
        # 32 px parameters' scaling later): the classifier needs one input size.
        raise ConfigError(
            "fine-tuning reads images of one size: with data.in_memory=false give "
            "data.image_size (e.g. 224) too"
        )
    data["image_size"] = splits.info.image_size  # 0 ("native") resolved, for the evaluation
    if meta is None:  # random weights: described by what they will be trained on
        data["mean"], data["std"] = list(splits.info.mean), list(splits.info.std)
        meta = EncoderMeta(
            backbone=str(cfg.encoder.backbone),
            width=int(cfg.encoder.width),
            feat_dim=encoder.feat_dim,
            image_size=splits.info.image_size,
            mean=data["mean"],
            std=data["std"],
            num_classes=splits.info.num_classes,
            extra={"method": "supervised", "dataset": splits.info.name},
        )
    run_dir = default_run_dir(cfg, spec)
    # The launched processes against devices x num_nodes, before anything is written.
    check_world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    check_run_dir(run_dir, cfg)
    purifier = build_purifier(cfg.purify, splits.info.image_size)
    classifier = Classifier(encoder, splits.info.num_classes, data["mean"], data["std"])

    indices = load_or_draw_subset(
        run_dir, splits.train.labels, spec, data=data, classes=splits.train.classes
    )
    assert_disjoint(source_images(splits.train.subset(indices)), source_images(splits.val))
    resume_from = resume_checkpoint(run_dir, cfg.run.resume)
    job = _Job(
        cfg=cfg,
        run_dir=run_dir,
        encoder_dir=encoder_dir,
        classifier=classifier,
        meta=meta,
        splits=splits,
        data=data,
        subset=torch.from_numpy(indices),
        purifier=purifier,
        device=_device(cfg.trainer.accelerator),
        resume_from=resume_from,
    )
    save_config(cfg, run_dir / "config.yaml")

    metrics = _carried_metrics(run_dir) if resume_from else {}
    metrics["subset/size"] = float(len(indices))
    trainer, extra = MODES[cfg.mode](job, callbacks, metrics)

    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        write_json(run_dir / "metrics.json", metrics)
        save_classifier(
            classifier,
            meta,
            run_dir,
            classes=list(splits.train.classes),
            data={k: data[k] for k in DATA_KEYS},
            mode=cfg.mode,
            subset={**spec.__dict__, "size": len(indices)},
            encoder_run=str(encoder_dir) if encoder_dir is not None else "",
        )
        shown = {
            k: v
            for k, v in metrics.items()
            if k.split("/")[0] in ("train", "val", "test", "purify")
        }
        title = f"finetune {cfg.mode} on {data['name']}, {spec.label} labels"
        print_summary(
            title,
            run_dir,
            shown,
            {
                "Encoder": str(encoder_dir)
                if encoder_dir is not None
                else f"{cfg.encoder.backbone} from random weights",
                "Labeled images": f"{len(indices)} of {len(splits.train)}",
                **extra,
                "Classifier": str(run_dir / "classifier.safetensors"),
                "Fit time": f"{metrics.get('perf/fit_time_s', 0.0):.1f} s",
                **write_curves(run_dir, f"{title} ({run_dir.name})"),
            },
        )
    return metrics
