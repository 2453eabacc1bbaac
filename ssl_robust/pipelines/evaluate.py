"""The evaluation pipeline: a classifier (and optionally a purifier) -> report.json, report.md.

Sections, each switchable and shrinkable from the config: clean accuracy; CIFAR-10-C style
corruptions (generated on the fly on the device, or read from a released-layout folder);
PGD(-EOT) robust accuracy with re-scoring, AutoAttack for deterministic pipelines and the
sanity checks against gradient masking; calibration; OOD detection; latency and throughput. Every
section evaluates the deployed pipeline ``x in [0, 1] -> purifier -> classifier``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from torch import Tensor, nn

from ssl_robust.config import ConfigError, save_config, to_dict
from ssl_robust.data.datasets import (
    OUTSIDE_DATASETS,
    ArraySource,
    ImageSource,
    Splits,
    build_splits,
    labeled_set_file,
    load_labeled_set,
    load_outside_images,
)
from ssl_robust.data.subsets import SPEC_FILE, SUBSET_FILE, check_indices, labels_digest
from ssl_robust.evaluate.attacks import (
    autoattack,
    robust_accuracy,
    robust_accuracy_steps,
    sanity_attack_costs,
    sanity_checks,
)
from ssl_robust.evaluate.cifar_c import (
    MANIFEST,
    _corruption_seed,
    frost_identity,
    load_cifar_c,
    params_hash,
    textures_for_frost,
    write_cifar_c,
)
from ssl_robust.evaluate.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    FROST_SOURCES,
    SEVERITIES,
    corrupt,
    frost_texture_folder,
)
from ssl_robust.evaluate.examples import perturbation_image
from ssl_robust.evaluate.latency import measure_latency
from ssl_robust.evaluate.metrics import (
    TEMPERATURE_BOUNDS,
    bootstrap_interval,
    calibration_report,
    confusion_matrix,
    corruption_errors,
    cross_fit_temperatures,
    ece,
    fit_temperature,
    fold_of,
    grid_accuracies,
    per_class_accuracy,
    refit_scaled_ece,
    reliability_bins,
    selective_curves,
    selective_report,
    standard_error,
    wilson_interval,
)
from ssl_robust.evaluate.ood import (
    FEATURE_SCORES,
    LOGIT_SCORERS,
    NOISE_KINDS,
    auroc,
    fit_mahalanobis,
    held_out_class_split,
    knn_score,
    mahalanobis_score,
    noise_images,
    ood_metrics,
)
from ssl_robust.evaluate.report import group_of, log_to_wandb, threat_name, write_report
from ssl_robust.evaluate.smoothing import ABSTAIN, certified_accuracy, certify
from ssl_robust.evaluate.store import UnitStore, file_stamp, weights_sha256
from ssl_robust.finetune.export import load_classifier
from ssl_robust.finetune.features import source_images
from ssl_robust.finetune.model import Classifier
from ssl_robust.launch.progress import RESTORED, progress_bar
from ssl_robust.launch.trainer import wandb_run_id, write_json
from ssl_robust.methods.monitor import knn_accuracy
from ssl_robust.pipelines.common import console, print_summary
from ssl_robust.plotting import ImageRow, plot_image_grid
from ssl_robust.purify.purifier import Purifier
from ssl_robust.purify.unet import load_denoiser

# Offsets of the per-section random streams from run.seed, so that switching one section off
# does not change the numbers of another.
_SEED_CLEAN, _SEED_SHIFT, _SEED_ADV, _SEED_OOD, _SEED_PERF, _SEED_EXAMPLES = 1, 2, 3, 4, 5, 6
_SEED_CERT, _SEED_NATURAL, _SEED_BOOTSTRAP, _SEED_TEMPERATURE = 7, 8, 9, 10
# Adversarial examples each PGD unit keeps for the report's figures (eval.examples shows up to
# this many, so changing it never recomputes an attack).
MAX_EXAMPLES = 16
# The minimum attack budget for a stochastic purifier: EOT >= 20 draws per step, >= 100 steps.
_MIN_EOT, _MIN_STEPS = 20, 100


class Pipeline(nn.Module):
    """The deployed model ``x in [0, 1] -> [purifier ->] classifier -> logits``.

    The purifier draws its noise from ``generator`` (fresh noise on every call unless it has
    ``fixed_noise``). ``calls`` counts the images passed through, so the cost of each protocol
    can be measured independently of the attack code's own bookkeeping.
    """

    def __init__(self, classifier: Classifier, purifier: Purifier | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.generator: torch.Generator | None = None
        self.calls = 0

    @property
    def stochastic(self) -> bool:
        p = self.purifier
        return p is not None and not p.fixed_noise and p.t_star > 0

    @property
    def nfe(self) -> int:
        """Network evaluations per image: denoiser calls plus the classifier."""
        return 1 + (self.purifier.nfe if self.purifier is not None else 0)

    def reseed(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, K) and the encoder's features (B, D) of one pass: one purification."""
        self.calls += x.shape[0]
        if self.purifier is not None:
            x = self.purifier(x, None if self.purifier.fixed_noise else self.generator)
        features = self.classifier.features(x)
        return self.classifier.head(features), features

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)[0]  # (B, K)


# ---------------------------------------------------------------------------------------------
# Validation and loading
# ---------------------------------------------------------------------------------------------


def _threats(cfg: DictConfig) -> list[dict[str, Any]]:
    """Threat models from the eps lists: name, norm, eps on [0, 1] images, label."""
    out: list[dict[str, Any]] = []
    for e in dict.fromkeys(float(v) for v in cfg.adv.linf_eps):
        out.append(
            {
                "name": threat_name("linf", e),
                "norm": "linf",
                "eps": e / 255,
                "eps_label": f"{e:g}/255",
            }
        )
    for e in dict.fromkeys(float(v) for v in cfg.adv.l2_eps):
        out.append({"name": threat_name("l2", e), "norm": "l2", "eps": e, "eps_label": f"{e:g}"})
    return out


def check_config(cfg: DictConfig) -> None:
    """Value checks the schema cannot express (list contents, ranges); raises ConfigError."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(
        bool(cfg.classifier.run),
        "classifier.run is required: a fine-tuning run directory holding classifier.json "
        "and classifier.safetensors",
    )
    need(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    need(cfg.clean.draws >= 1, f"clean.draws must be >= 1, got {cfg.clean.draws}")
    need(cfg.shift.draws >= 1, f"shift.draws must be >= 1, got {cfg.shift.draws}")
    need(cfg.eval.max_images >= 0, f"eval.max_images must be >= 0, got {cfg.eval.max_images}")
    need(cfg.eval.bootstrap >= 0, f"eval.bootstrap must be >= 0, got {cfg.eval.bootstrap}")
    need(
        0 <= cfg.eval.examples <= MAX_EXAMPLES,
        f"eval.examples must be in 0..{MAX_EXAMPLES}, got {cfg.eval.examples}",
    )
    p = cfg.purifier
    need(p.t_star >= 0, f"purifier.t_star must be >= 0, got {p.t_star}")
    need(p.sigma >= 0, f"purifier.sigma must be >= 0, got {p.sigma}")
    need(p.ddim_steps >= 1, f"purifier.ddim_steps must be >= 1, got {p.ddim_steps}")
    s = cfg.shift
    if s.enabled:
        valid = [*CORRUPTIONS, *EXTRA_CORRUPTIONS]
        need(len(s.corruptions) > 0, f"shift.corruptions is empty; choose from {valid}")
        for name in s.corruptions:
            need(
                name in valid,
                f"unknown corruption {name!r} in shift.corruptions; choose from {valid}",
            )
        need(len(s.severities) > 0, f"shift.severities is empty; choose from {list(SEVERITIES)}")
        for sev in s.severities:
            need(
                sev in SEVERITIES,
                f"invalid severity {sev!r} in shift.severities; choose from {list(SEVERITIES)}",
            )
        need(s.batch_size >= 1, f"shift.batch_size must be >= 1, got {s.batch_size}")
        need(
            not s.write_cifar_c or bool(s.cifar_c_dir),
            "shift.write_cifar_c needs shift.cifar_c_dir (the folder to write)",
        )
        try:
            textures_for_frost(str(s.frost))  # loads (and caches) the photographs
        except (ImportError, OSError, ValueError) as err:
            raise ConfigError(
                f"shift.frost={s.frost!r}: {err} (shift.frost is one of {list(FROST_SOURCES)} "
                "or a folder holding frost1..frost5)"
            ) from err
    a = cfg.adv
    need(
        a.enabled or a.shard == 0,
        f"adv.shard={a.shard} runs one block of the attacks, but adv.enabled=false",
    )
    if a.enabled:
        for e in a.linf_eps:
            need(
                0 < e <= 255,
                f"invalid eps {e} in adv.linf_eps: Linf radii are in units of "
                "1/255 and must be in (0, 255]",
            )
        for e in a.l2_eps:
            need(e > 0, f"invalid eps {e} in adv.l2_eps: L2 radii must be > 0")
        need(
            len(a.linf_eps) + len(a.l2_eps) > 0,
            "adv.enabled but adv.linf_eps and adv.l2_eps are empty; give a radius or set "
            "adv.enabled=false",
        )
        for key in ("steps", "eot", "rescore_draws", "sanity_images"):
            need(a[key] >= 1, f"adv.{key} must be >= 1, got {a[key]}")
        need(a.max_images >= 0, f"adv.max_images must be >= 0, got {a.max_images}")
        need(a.shards >= 1, f"adv.shards must be >= 1, got {a.shards}")
        need(
            0 <= a.shard <= a.shards,
            f"adv.shard must be in 0..adv.shards ({a.shards}): 0 runs every block, i one block; "
            f"got {a.shard}",
        )
        need(
            a.shard == 0 or a.shards > 1,
            f"adv.shard={a.shard} runs one block of the attacked images: set adv.shards > 1",
        )
        need(a.step_size >= 0, f"adv.step_size must be >= 0 (0: automatic), got {a.step_size}")
        need(a.sanity_queries >= 0, f"adv.sanity_queries must be >= 0, got {a.sanity_queries}")
        need(a.sanity_tol >= 0, f"adv.sanity_tol must be >= 0, got {a.sanity_tol}")
        for key in ("sanity_linf_eps", "sanity_l2_eps"):
            need(
                all(e > 0 for e in a[key]) and len(a[key]) > 0,
                f"adv.{key} must hold positive radii, got {list(a[key])}",
            )
        custom = a.autoattack_version == "custom"
        need(
            not a.autoattack or custom == bool(a.autoattack_attacks),
            "adv.autoattack_attacks must be given exactly when adv.autoattack_version=custom",
        )
    c = cfg.cert
    if c.enabled:
        if cfg.purifier.run:
            need(
                c.sigma == 0,
                "cert.sigma is the smoothing noise of a bare classifier; behind a purifier its own "
                "diffusion noise smooths (choose it with purifier.sigma or purifier.t_star), so "
                "leave cert.sigma=0",
            )
            need(
                not p.fixed_noise,
                "certification needs fresh noise in every call; set purifier.fixed_noise=false",
            )
            need(
                p.t_star > 0 or p.sigma > 0,
                "purifier.t_star=0 adds no noise to certify with; set purifier.sigma (e.g. 0.25)",
            )
        else:
            need(
                c.sigma > 0,
                "cert.sigma must be > 0 to certify a bare classifier: the std of the smoothing "
                f"noise on [0, 1] images, e.g. 0.25 (got {c.sigma})",
            )
        need(
            c.n0 >= 1 and c.samples >= 1,
            f"cert.n0 and cert.samples must be >= 1, got {c.n0} and {c.samples}",
        )
        need(0 < c.alpha < 0.5, f"cert.alpha must be in (0, 0.5), got {c.alpha}")
        need(c.max_images >= 0, f"cert.max_images must be >= 0, got {c.max_images}")
        need(c.batch_size >= 1, f"cert.batch_size must be >= 1, got {c.batch_size}")
        need(
            len(c.radii) > 0 and all(r >= 0 for r in c.radii),
            f"cert.radii must hold radii >= 0, got {list(c.radii)}",
        )
    need(cfg.calib.n_bins >= 1, f"calib.n_bins must be >= 1, got {cfg.calib.n_bins}")
    need(
        cfg.calib.temperature_folds >= 2,
        f"calib.temperature_folds must be >= 2, got {cfg.calib.temperature_folds}",
    )
    need(
        cfg.natural.max_images >= 0,
        f"natural.max_images must be >= 0, got {cfg.natural.max_images}",
    )
    natural_set_names([str(p) for p in cfg.natural.sets])
    o = cfg.ood
    if o.enabled:
        for kind in o.noise_kinds:
            need(
                kind in NOISE_KINDS,
                f"unknown noise kind {kind!r} in ood.noise_kinds; choose from {list(NOISE_KINDS)}",
            )
        need(o.num_noise >= 0, f"ood.num_noise must be >= 0, got {o.num_noise}")
        need(o.num_images >= 0, f"ood.num_images must be >= 0, got {o.num_images}")
        for score in o.feature_scores:
            need(
                score in FEATURE_SCORES,
                f"unknown score {score!r} in ood.feature_scores; choose from "
                f"{list(FEATURE_SCORES)}",
            )
        need(
            o.bank_size == 0 or o.bank_size >= 2,
            f"ood.bank_size must be 0 (all) or >= 2, got {o.bank_size}",
        )
        need(o.knn_k >= 0, f"ood.knn_k must be >= 0 (0 = by the bank's size), got {o.knn_k}")
        ood_set_names([str(spec) for spec in o.datasets])
    f = cfg.perf
    if f.enabled:
        need(f.batch_size >= 1, f"perf.batch_size must be >= 1, got {f.batch_size}")
        need(f.warmup >= 0 and f.iters >= 1, "perf.warmup must be >= 0 and perf.iters >= 1")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    name = Path(cfg.classifier.run).resolve().name
    return Path("runs") / f"evaluate-{name}{'-purified' if cfg.purifier.run else ''}"


def _subset(n: int, cap: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``cap`` indices out of n (all when cap is 0 or >= n), sorted."""
    if cap <= 0 or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def _eval_data(
    cfg: DictConfig, meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict, Splits]:
    """The evaluation split as uint8 (N, H, W, 3) images and labels, its description, and the
    splits it came from."""
    data = dict(meta.get("data") or {})
    if cfg.eval.data != "auto":
        data["name"] = cfg.eval.data
    if cfg.eval.data_root:
        data["root"] = cfg.eval.data_root
    if cfg.eval.download:
        data["download"] = True
    if "name" not in data:
        raise ConfigError(
            f"the classifier in {cfg.classifier.run} records no data; set eval.data "
            "(and eval.data_root)"
        )
    name = str(data["name"])
    root = str(data.get("root", "data"))
    splits = build_splits(
        name=name,
        root=root,
        download=bool(data.get("download", False)),
        image_size=int(data.get("image_size", 0)),
        val_fraction=float(data.get("val_fraction", 0.2)),
        seed=int(data.get("seed", 0)),
        in_memory=bool(data.get("in_memory", True)),
        cache_dir=Path(root) / ".cache" if name == "imagefolder" else None,
    )
    val = splits.val
    if isinstance(val, ArraySource):
        images = val.images
    else:  # files read lazily: decode the evaluation split once
        images = np.stack([np.asarray(val.load(i).convert("RGB")) for i in range(len(val))])
    labels = np.asarray(val.labels, dtype=np.int64)
    idx = _subset(len(images), cfg.eval.max_images, cfg.run.seed)
    data["image_size"] = splits.info.image_size
    return np.ascontiguousarray(images[idx]), labels[idx], data, splits


def _balanced(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded subset of ``cap`` labels (all when cap is 0 or >= N) that
    shares them out between the classes as evenly as they allow: the round-robin of each
    class's shuffled positions, so a small bank still holds every class."""
    n = len(labels)
    if cap <= 0 or cap >= n:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    rank = np.empty(n, dtype=np.int64)  # each position's place among its class, shuffled
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    place = np.empty(n, dtype=np.int64)
    place[order] = np.arange(n)
    return np.sort(np.lexsort((place, rank))[:cap])


def _bank_images(
    cfg: DictConfig, train: ImageSource, held_out: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, str]:
    """The OOD feature bank: uint8 (M, H, W, 3) images and labels of the train split that the
    classifier was fine-tuned on (its run's ``subset.npy``; the whole split without one), less
    the held-out classes, a seeded subset of ``ood.bank_size``; and their description."""
    path = Path(cfg.classifier.run) / SUBSET_FILE
    labels = np.asarray(train.labels, dtype=np.int64)
    if path.is_file():
        idx = np.load(path)
        record = path.with_name(SPEC_FILE)
        saved = json.loads(record.read_text()) if record.is_file() else {}
        if saved.get("train_labels_sha1", labels_digest(labels)) != labels_digest(labels):
            raise ConfigError(
                f"{path} indexes another train split than the one rebuilt here "
                f"({saved.get('num_train')} images then, {len(labels)} now: eval.data or "
                "eval.data_root points elsewhere); the OOD feature bank would hold other "
                "images. Evaluate on the classifier's own data, or set ood.feature_scores=[]"
            )
        check_indices(idx, len(labels))
        what = f"the classifier's {len(idx)} fine-tuning images ({SUBSET_FILE})"
    else:
        idx = np.arange(len(labels))
        what = f"the whole train split ({len(idx)} images; the classifier run has no {SUBSET_FILE})"
    if held_out:
        idx = idx[~np.isin(labels[idx], list(held_out))]
        what += ", less the held-out classes"
    idx = idx[_balanced(labels[idx], int(cfg.ood.bank_size), int(cfg.run.seed) + _SEED_OOD)]
    if len(idx) < 2:
        raise ConfigError(
            f"the OOD feature bank would hold {len(idx)} image(s) ({what}); set "
            "ood.feature_scores=[] to score the logits only"
        )
    images = source_images(train.subset(idx))
    return np.ascontiguousarray(images), labels[idx], f"{len(idx)} of {what}"


def _build_purifier(cfg: DictConfig, image_size: int) -> tuple[Purifier | None, dict[str, Any]]:
    """The purifier (None without ``purifier.run``) and the denoiser's UNet and noise-schedule
    configs (for the resume fingerprint; private ``_`` keys such as the load path dropped)."""
    p = cfg.purifier
    if not p.run:
        return None, {}
    unet, scheduler = load_denoiser(p.run)
    size = unet.config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    if size != image_size or unet.config["in_channels"] != 3:
        raise ConfigError(
            f"the denoiser in {p.run} was built for {unet.config['in_channels']}-channel "
            f"{size}x{size} images, the evaluation images are 3-channel {image_size}x{image_size}"
        )
    desc = {
        name: {k: v for k, v in dict(c).items() if not k.startswith("_")}
        for name, c in (("unet", unet.config), ("scheduler", scheduler.config))
    }
    purifier = Purifier(
        unet.requires_grad_(False),
        scheduler,
        t_star=None if p.sigma > 0 else p.t_star,
        sigma=p.sigma if p.sigma > 0 else None,
        sampler=p.sampler,
        ddim_steps=p.ddim_steps,
        fixed_noise=p.fixed_noise,
        gradient_checkpointing=p.gradient_checkpointing,
        dtype=torch.bfloat16 if p.dtype == "bfloat16" else None,
        seed=cfg.run.seed,
    )
    return purifier, desc


# ---------------------------------------------------------------------------------------------
# Resume: the finished units of work, one file each
# ---------------------------------------------------------------------------------------------

# Bump when what a stored unit holds changes meaning: every unit stored before is then stale.
_PARTIAL_FORMAT = 1


def _fingerprint(
    cfg: DictConfig,
    model: Pipeline,
    clf_meta: dict[str, Any],
    denoiser_desc: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
) -> dict[str, Any]:
    """What every unit of work depends on.

    The weights of the whole pipeline (classifier and UNet, hashed from memory, so the files
    may move), the classifier's export description, the purifier settings and the denoiser's
    UNet and noise-schedule configs, the evaluation images and labels themselves (hashed, so
    data, data root, subset size and seed are all covered), the seed, the device type (the
    random streams and kernels differ between CPU and GPU) and the batch size (it groups the
    purifier's noise draws and the attack batches).
    """
    data = hashlib.sha256(f"{images.shape} {images.dtype} {labels.shape} {labels.dtype}".encode())
    data.update(np.ascontiguousarray(images).data)
    data.update(np.ascontiguousarray(labels).data)
    purifier = None
    if cfg.purifier.run:
        settings = {k: v for k, v in to_dict(cfg.purifier).items() if k != "run"}
        purifier = {**settings, **denoiser_desc}
    return {
        "format": _PARTIAL_FORMAT,
        "weights": weights_sha256(model),
        "classifier": clf_meta,
        "purifier": purifier,
        "images": data.hexdigest(),
        "seed": int(cfg.run.seed),
        "device": device.type,
        "batch_size": int(cfg.eval.batch_size),
    }


def _attack_budget(cfg: DictConfig, stochastic: bool) -> tuple[int, int]:
    """EOT passes per gradient and scoring draws: 1 and 1 for a deterministic pipeline."""
    if not stochastic:
        return 1, 1
    return int(cfg.adv.eot), int(cfg.adv.rescore_draws)


def _autoattack_skip(cfg: DictConfig, stochastic: bool) -> str | None:
    """Why the AutoAttack the config asks for cannot run (a note for the report), or None."""
    if not cfg.adv.autoattack:
        return None
    if stochastic:
        return (
            "AutoAttack skipped: the pipeline is stochastic (fresh purifier noise per call), and "
            "AutoAttack assumes a deterministic model; PGD-EOT with re-scoring is the protocol "
            "here. Set purifier.fixed_noise=true to evaluate a frozen-noise "
            "pipeline with AutoAttack."
        )
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        return "AutoAttack skipped: the `pyautoattack` package is not installed."
    return None


def _unit_specs(
    cfg: DictConfig,
    *,
    clean: bool,
    bare: bool,
    clean_draws: int,
    shift_draws: int,
    corruptions: list[str],
    severities: list[int],
    threats: list[dict[str, Any]],
    stochastic: bool,
    outside: dict[str, str] | None = None,
    natural: dict[str, str] | None = None,
    bank: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Every unit of expensive work the config asks for: its name (also the relative path of
    its file, after the metric names) and the settings it depends on beyond the fingerprint.

    Units: ``clean`` (the clean logits of ``clean_draws`` purifications, and the unpurified
    ones when ``bare``),
    ``shift/<corruption>/<severity>`` (one cell of the grid, over ``shift_draws``
    purifications; the top severity also keeps the logits of every draw for calibration and
    OOD, and with calibration on every cell keeps them, for its calibration per severity; a
    cell stored without them is not recomputed for that), ``adv/<threat>/pgd``,
    ``adv/<threat>/autoattack`` and ``adv/sanity/<norm>``, ``ood/<set>`` (the logits of an
    outside OOD dataset over ``clean_draws`` purifications; ``outside`` maps each set to the
    digest of its images), ``natural/<set>`` (likewise, a labeled natural-shift set;
    ``natural``: images and labels), ``features/bank`` (the OOD feature scores' bank: the
    features of the training images whose digest is ``bank``).

    With ``bank``, the units that feed the OOD section (the clean pass, the top-severity cells
    when ``ood.shift``, the outside sets) also keep the encoder's features of their first
    draw.
    """
    specs: dict[str, dict[str, Any]] = {}
    features = {"features": True} if bank is not None else {}
    if clean:
        specs["clean"] = {"bare": bare, "draws": clean_draws, **features}
    for name, digest in (outside or {}).items():
        specs[f"ood/{name}"] = {"images": digest, "draws": clean_draws, **features}
    for name, digest in (natural or {}).items():
        specs[f"natural/{name}"] = {"images": digest, "draws": clean_draws}
    s = cfg.shift
    folder = Path(s.cifar_c_dir) if s.cifar_c_dir else None
    for c in corruptions:
        source: dict[str, Any]
        if folder is None:
            generated: dict[str, Any] = {"batch_size": int(s.batch_size), "params": params_hash()}
            if c == "frost":
                generated["frost"] = frost_identity(str(s.frost))
            source = {"generated": generated}
        else:
            files = [file_stamp(folder / f"{c}.npy"), file_stamp(folder / "labels.npy")]
            source = {
                "folder": str(folder.resolve()),
                "files": files,
                "max_images": int(cfg.eval.max_images),
            }
        for sev in severities:
            top = sev == max(severities)
            specs[f"shift/{c}/{sev}"] = {
                "corruption": c,
                "severity": sev,
                # Stores of several draws that kept only the first draw's logits are stale.
                "logits": "every draw" if top and shift_draws > 1 else top,
                "source": source,
            }
            if shift_draws > 1:  # only then: stores written before draws existed stay valid
                specs[f"shift/{c}/{sev}"]["draws"] = shift_draws
            if top and cfg.ood.shift:
                specs[f"shift/{c}/{sev}"].update(features)
    a = cfg.adv
    eot, draws = _attack_budget(cfg, stochastic)
    attack = {
        "steps": int(a.steps),
        "step_size": float(a.step_size),
        "random_start": bool(a.random_start),
        "loss": str(a.loss),
        "eot": eot,
        "rescore_draws": draws,
        "max_images": int(a.max_images),
    }
    run_aa = bool(a.autoattack) and _autoattack_skip(cfg, stochastic) is None
    shards = int(a.shards)
    for t in threats:
        for i in range(1, shards + 1):
            spec = {"threat": t, "attack": attack}
            specs[pgd_unit(t["name"], i, shards)] = spec | (
                {"shard": [i, shards]} if shards > 1 else {}
            )
        if run_aa:
            specs[f"adv/{t['name']}/autoattack"] = {
                "threat": t,
                "version": str(a.autoattack_version),
                "attacks": list(a.autoattack_attacks),
                "max_images": int(a.max_images),
            }
    if cfg.cert.enabled:
        c = cfg.cert
        specs["cert"] = {
            k: float(c[k]) if k in ("sigma", "alpha") else int(c[k])
            for k in ("sigma", "n0", "samples", "alpha", "max_images", "batch_size")
        }
        # The guessing draws of several images share a call (other noise than one image's
        # calls): certificates stored before are recomputed.
        specs["cert"]["guesses"] = "batched"
    if a.sanity_checks:
        for norm in dict.fromkeys(t["norm"] for t in threats):
            specs[f"adv/sanity/{norm}"] = {
                "norm": norm,
                "eps_grid": list(a.sanity_linf_eps if norm == "linf" else a.sanity_l2_eps),
                "attack": attack,
                "images": int(a.sanity_images),
                "queries": int(a.sanity_queries),
                "tol": float(a.sanity_tol),
            }
    if bank is not None:
        specs["features/bank"] = {"images": bank}
    return specs


# Names an outside OOD set may not take: the section's own sets, and "mean" (ood/mean/...).
_OWN_OOD_SETS = ("held_out", "mean", *(f"noise_{k}" for k in NOISE_KINDS))


# Folder names that say which split, not which data: an image folder so named is called after
# its parent too.
_SPLIT_NAMES = ("train", "test", "val", "valid", "validation", "images")


def _folder_label(path: str) -> str:
    """A data folder's name for metric keys: its own, after its parent's when it names a split
    (``.../cifar10-jpeg/test`` -> ``cifar10-jpeg_test``); ``<name>`` for a ``<name>_data.npy``
    or ``<name>.npz`` file."""
    folder = Path(path).resolve()
    label = folder.name
    if label.endswith("_data.npy"):
        label = label.removesuffix("_data.npy")
    elif label.endswith(".npz"):
        label = label.removesuffix(".npz")
    elif label.lower() in _SPLIT_NAMES:
        label = f"{folder.parent.name}_{label}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", label) or "data"


def natural_set_names(paths: Sequence[str]) -> dict[str, str]:
    """The ``natural.sets`` by name (:func:`_folder_label`).

    Raises:
        ConfigError: Two sets of one name.
    """
    names: dict[str, str] = {}
    for path in paths:
        name = _folder_label(path)
        if name in names:
            raise ConfigError(
                f"natural.sets: {names[name]!r} and {path!r} would both be named {name!r}; "
                "give each set once (named by its folder, or its <name>_data.npy or <name>.npz "
                "file)"
            )
        names[name] = path
    return names


def _natural_sets(
    cfg: DictConfig, classes: Sequence[str], image_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """The images, labels and description of every ``natural.sets`` set by name (a seeded
    subset of ``natural.max_images``), loaded before the run writes anything."""
    out = {}
    for name, path in natural_set_names([str(p) for p in cfg.natural.sets]).items():
        images, labels = load_labeled_set(path, classes, image_size)
        idx = _subset(len(images), int(cfg.natural.max_images), int(cfg.run.seed) + _SEED_NATURAL)
        data = labeled_set_file(path)
        where = f"{data}" if data is not None and Path(path).is_dir() else str(path)
        desc = f"{where}, {len(idx)} of {len(images)} images at {image_size} px"
        out[name] = (np.ascontiguousarray(images[idx]), labels[idx], desc)
    return out


def _natural_section(
    sets: dict[str, tuple[np.ndarray, np.ndarray, str]],
    model: Pipeline,
    draws: int,
    cfg: DictConfig,
    device: torch.device,
    metrics: dict[str, float],
    bar: Progress,
    cache: UnitStore,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Accuracy of the pipeline on each natural-shift set (:func:`_set_logits`, units
    ``natural/<set>``). Returns each set's logits (draws, M, classes) and labels, for
    calibration."""
    images = {name: v[0] for name, v in sets.items()}
    seed = int(cfg.run.seed) + _SEED_NATURAL
    logits, _ = _set_logits(images, "natural", seed, model, draws, cfg, device, bar, cache)
    out = {}
    for name, (_, labels, _) in sets.items():
        y = torch.from_numpy(labels)
        metrics[f"natural/{name}/acc"] = (logits[name].argmax(2) == y).float().mean().item()
        metrics[f"natural/{name}/n"] = float(len(y))
        out[name] = (logits[name], y)
    return out


def _set_logits(
    images: dict[str, np.ndarray],
    kind: str,
    seed: int,
    model: Pipeline,
    draws: int,
    cfg: DictConfig,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
    features: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The pipeline's logits (draws, M, classes) on each named set of uint8 (M, H, W, 3)
    images: one unit ``<kind>/<name>`` each, over ``draws`` purifications from a stream of its
    own (``seed`` and the name), read back from ``cache`` when stored; and with ``features``,
    the encoder's features (M, D) of each set's first draw."""
    out: dict[str, Tensor] = {}
    feats: dict[str, Tensor] = {}
    if not images:
        return out, feats
    task = bar.add_task(f"{kind} sets", total=len(images))
    for name, pixels in images.items():
        unit = f"{kind}/{name}"
        stored = cache.get(unit)
        bar.update(task, description=f"{kind} {name}" + (f" {RESTORED}" if stored else ""))
        f: Tensor | None
        if stored is not None:
            out[name], f = stored[1]["logits"], stored[1].get("features")
        else:
            model.reseed(_corruption_seed(seed, name, 0), device)
            bs = int(cfg.eval.batch_size)
            out[name], f = _predict_draws(model, _nchw(pixels), draws, bs, device, features)
            cache.put(unit, {}, {"logits": out[name]} | ({"features": f} if f is not None else {}))
        if f is not None:
            feats[name] = f
        bar.advance(task)
    return out, feats


def _bank_features(
    bank_set: tuple[np.ndarray, np.ndarray, str],
    model: Pipeline,
    cfg: DictConfig,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
) -> tuple[Tensor, Tensor]:
    """The OOD feature bank's features (M, D) through the whole pipeline (one purification
    each, as the evaluation images' features), and its labels (M,); unit ``features/bank``."""
    stored = cache.get("features/bank")
    task = bar.add_task("OOD feature bank" + (f" {RESTORED}" if stored else ""), total=1)
    if stored is not None:
        feats, labels = stored[1]["features"], stored[1]["labels"]
    else:
        images, labels_np, _ = bank_set
        model.reseed(_corruption_seed(int(cfg.run.seed) + _SEED_OOD, "bank", 0), device)
        bs = int(cfg.eval.batch_size)
        _, f = _predict_draws(model, _nchw(images), 1, bs, device, features=True)
        assert f is not None
        feats, labels = f, torch.from_numpy(labels_np)
        cache.put("features/bank", {}, {"features": feats, "labels": labels})
    bar.advance(task)
    return feats, labels


@dataclass
class _OODFeatures:
    """Encoder features of the OOD section's sets, each image's first draw, and the bank."""

    bank: Tensor  # (M, D)
    bank_labels: Tensor  # (M,)
    clean: Tensor  # (N, D)
    shift: Tensor | None  # (corruptions x N, D), the top severity; None without it
    outside: dict[str, Tensor]  # by outside set


def ood_set_names(specs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The outside OOD datasets of ``ood.datasets`` (``<name>`` or ``<name>@<root>``) by set
    name (the dataset's name; an image folder's: its folder name, after its parent's when the
    folder is a split such as ``test``), each as (dataset, root; "" for the evaluation data's
    root).

    Raises:
        ConfigError: An unknown dataset (naming the valid ones), an image folder without its
            folder, or two sets of one name.
    """
    sets: dict[str, tuple[str, str]] = {}
    for spec in specs:
        name, _, root = spec.partition("@")
        if name not in OUTSIDE_DATASETS:
            raise ConfigError(
                f"unknown dataset {name!r} in ood.datasets; choose from "
                f"{list(OUTSIDE_DATASETS)}, each as <name> or <name>@<root>"
            )
        if name == "imagefolder" and not root:
            raise ConfigError("ood.datasets: imagefolder needs its folder, as imagefolder@<folder>")
        set_name = _folder_label(root) if name == "imagefolder" else name
        if set_name in _OWN_OOD_SETS or set_name.startswith("shift_s"):
            raise ConfigError(
                f"ood.datasets: {spec!r} would be the OOD set {set_name!r}, a name the section "
                f"keeps for its own sets and means ({', '.join(_OWN_OOD_SETS)}, shift_s<k>); "
                "rename the folder"
            )
        if set_name in sets:
            raise ConfigError(
                f"ood.datasets: two OOD sets would be named {set_name!r} (from {spec!r}); "
                "give each dataset once (image folders are named by their folder)"
            )
        sets[set_name] = (name, root)
    return sets


def _outside_sets(
    cfg: DictConfig, data: dict[str, Any], n_eval: int
) -> dict[str, tuple[np.ndarray, str]]:
    """The images of every ``ood.datasets`` set (a seeded subset of ``ood.num_images``, or of
    as many as the evaluation images) with their description, by set name; loaded before the
    run writes anything, so a missing dataset stops it at once."""
    if not cfg.ood.enabled:
        return {}
    size = int(data["image_size"])
    default_root = str(data.get("root", "data"))
    out = {}
    for set_name, (name, root) in ood_set_names([str(x) for x in cfg.ood.datasets]).items():
        root = root or default_root
        if name == data["name"] and (name != "imagefolder" or root == default_root):
            raise ConfigError(
                f"ood.datasets holds {name!r}, the evaluation data itself; an OOD set must hold "
                "images of other classes"
            )
        images = load_outside_images(name, root, size, bool(cfg.eval.download))
        n = int(cfg.ood.num_images) or n_eval
        idx = _subset(len(images), n, int(cfg.run.seed) + _SEED_OOD)
        what = f"{name} test split" if name != "imagefolder" else "the image folder"
        desc = f"{what} ({root}), {len(idx)} of {len(images)} images at {size} px"
        if {name, data["name"]} == {"cifar10", "stl10"}:
            desc += (
                f" (it shares 9 of its 10 classes with {data['name']}: mostly images of the "
                "classifier's own classes, not OOD)"
            )
        out[set_name] = (np.ascontiguousarray(images[idx]), desc)
    return out


def _images_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape} {array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _unit_kind(unit: str) -> str:
    if unit == "clean":
        return "clean pass"
    if unit.startswith("shift/"):
        return "corruption cells"
    if unit.startswith("adv/sanity/"):
        return "sanity-check norms"
    if unit == "cert":
        return "certification"
    if unit.startswith("ood/"):
        return "OOD datasets"
    if unit.startswith("natural/"):
        return "natural-shift sets"
    if unit == "features/bank":
        return "OOD feature bank"
    if "/pgd/shard-" in unit:
        return "PGD shards"
    return "AutoAttack threats" if unit.endswith("/autoattack") else "PGD threats"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _to_float(u8: Tensor, device: torch.device) -> Tensor:
    return u8.to(device).float() / 255.0  # (B, 3, H, W) in [0, 1]


def _on_device(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Batches of uint8 (N, 3, H, W) or float [0, 1] images as float [0, 1] on ``device``."""
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        yield _to_float(batch, device) if batch.dtype == torch.uint8 else batch.to(device)


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits (N, K) on the CPU for uint8 (N, 3, H, W) or float [0, 1] images."""
    return torch.cat([model(x).float().cpu() for x in _on_device(images, batch_size, device)])


@torch.no_grad()
def _predict_draws(
    model: Pipeline,
    images: Tensor,
    draws: int,
    batch_size: int,
    device: torch.device,
    features: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits (draws, N, K) of ``draws`` passes over the images (purifications, behind a
    stochastic purifier) and, with ``features``, the encoder's features (N, D) of the first
    pass: the same noise draws as without them."""
    if not features:
        logits = [_predict(model, images, batch_size, device) for _ in range(draws)]
        return torch.stack(logits), None
    outs, feats = [], []
    for x in _on_device(images, batch_size, device):
        out, f = model.embed(x)
        outs.append(out.float().cpu())
        feats.append(f.float().cpu())
    rest = [_predict(model, images, batch_size, device) for _ in range(draws - 1)]
    return torch.stack([torch.cat(outs), *rest]), torch.cat(feats)


def _nchw(images_nhwc: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def _generate(
    images_nhwc: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    batch: int,
    device: torch.device,
    frost_textures: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """One cell of the grid, bit-identical to what ``write_cifar_c`` stores for the same seed,
    batch size, device type and frost textures: the same per-(corruption, severity) generator,
    the same batches, the same rounding to uint8 (the released CIFAR-10-C is uint8 too).
    uint8 (N, 3, H, W)."""
    gen = torch.Generator(device=device).manual_seed(_corruption_seed(seed, name, severity))
    out = []
    for start in range(0, len(images_nhwc), batch):
        x = _to_float(_nchw(images_nhwc[start : start + batch]), device)
        y = corrupt(x, name, severity, generator=gen, frost_textures=frost_textures)
        out.append(torch.round(y * 255.0).to(torch.uint8).cpu())
    return torch.cat(out)


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    bar = progress_bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        enabled=enabled,
    )
    with bar:
        yield bar


def _ood_hist(s_in: Tensor, s_out: Tensor, score: str, bins: int = 20) -> dict[str, list[float]]:
    if score == "msp":
        lo, hi = 0.0, 1.0
    else:
        both = torch.cat([s_in, s_out])
        lo, hi = float(both.min()), float(both.max())
        hi = hi if hi > lo else lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)

    def frac(s: Tensor) -> list[float]:
        counts = torch.histc(s.double().clamp(lo, hi), bins=bins, min=lo, max=hi)
        return (counts / max(1, s.numel())).tolist()

    return {"edges": edges.tolist(), "in": frac(s_in), "out": frac(s_out)}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a fine-tuned classifier, optionally behind a diffusion purifier.

    Writes into the run directory (``run.dir``, default ``runs/evaluate-<classifier run>``
    with ``-purified`` appended when a purifier is used): ``config.yaml``, ``report.json``
    (every number under hierarchical names, plus the sanity checks, reliability bins, OOD
    histograms and notes), ``report.md``, ``plots/*.png`` and ``metrics.json`` (the report's
    numbers, like every other job). Logs the same to wandb unless ``wandb.mode=disabled``.

    Resuming: each finished unit of expensive work (the clean logits, each corruption x
    severity cell, each threat's PGD and AutoAttack result, the sanity checks of each norm) is
    stored at once, atomically, in ``partial/`` of the run directory, keyed by a fingerprint
    of everything it depends on (pipeline weights, purifier settings, evaluation images, seed,
    device type, batch size, and the unit's own shift or attack settings). Rerunning the same
    config in the same directory (after a crash or a preemption) reads those units back and
    computes only the rest, with the same numbers as an uninterrupted run: every unit draws
    from its own seeded random streams. Units stored under another fingerprint are recomputed
    and replaced, and say so. ``partial/`` is kept after the report is written, so a rerun
    that adds a threat or a corruption computes only the new units; ``run.resume=false``
    deletes it first and recomputes everything. Calibration, OOD and latency are recomputed
    on every run (they reuse the stored logits).

    Returns:
        The metrics (names documented in :data:`ssl_robust.evaluate.report.METRIC_DOCS`).
    """
    start_wall = time.perf_counter()
    # Everything that can fail on bad input comes before any file is written.
    check_config(cfg)
    device = _device(cfg.eval.device)
    classifier, clf_meta = load_classifier(cfg.classifier.run)
    images, labels, data, splits = _eval_data(cfg, clf_meta)
    purifier, denoiser_desc = _build_purifier(cfg, int(data["image_size"]))
    num_classes = classifier.num_classes
    held_out = list(cfg.ood.held_out_classes) if cfg.ood.enabled else []
    for c in held_out:
        if not 0 <= c < num_classes:
            raise ConfigError(
                f"ood.held_out_classes holds {c}; the classifier has classes 0..{num_classes - 1}"
            )
    if labels.size and labels.max() >= num_classes:
        raise ConfigError(
            f"the evaluation data has labels up to {labels.max()} but the classifier has "
            f"{num_classes} classes; check eval.data"
        )
    threats = _threats(cfg) if cfg.adv.enabled else []
    corruptions = list(cfg.shift.corruptions) if cfg.shift.enabled else []
    severities = sorted({int(s) for s in cfg.shift.severities}) if cfg.shift.enabled else []
    worker = bool(cfg.adv.enabled) and int(cfg.adv.shard) >= 1  # one block of the attacks only
    # The report's own inputs (a worker writes no report: the merging run loads them).
    outside: dict[str, tuple[np.ndarray, str]] = {}
    natural: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    bank_set: tuple[np.ndarray, np.ndarray, str] | None = None
    ce_reference = None
    if not worker:
        outside = _outside_sets(cfg, data, len(labels))
        if cfg.ood.enabled and cfg.ood.feature_scores:
            bank_set = _bank_images(cfg, splits.train, held_out)
        class_names = [str(c) for c in clf_meta.get("classes") or range(num_classes)]
        natural = _natural_sets(cfg, class_names, int(data["image_size"]))
        if corruptions and cfg.shift.ce_reference:
            ce_reference = load_ce_reference(cfg.shift.ce_reference, corruptions, severities, data)

    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    model = Pipeline(classifier.eval().requires_grad_(False), purifier).eval()
    seed = int(cfg.run.seed)
    bs = int(cfg.eval.batch_size)
    x_u8 = _nchw(images)  # (N, 3, H, W) uint8 on the CPU
    y = torch.from_numpy(labels)
    n = len(y)
    if n == 0:
        raise ConfigError("the evaluation split is empty")
    metrics: dict[str, float] = {}
    notes: list[str] = []
    stochastic = model.stochastic

    # -- finished units of an earlier, interrupted run -----------------------------------------
    if corruptions and cfg.shift.cifar_c_dir and cfg.shift.write_cifar_c and not worker:
        # Before the units are keyed: the cells read from the folder are keyed by its files.
        write_cifar_c(
            Path(cfg.shift.cifar_c_dir),
            images,
            labels,
            corruptions,
            seed=seed,
            batch_size=int(cfg.shift.batch_size),
            device=device,
            frost_textures=str(cfg.shift.frost),
        )
    fingerprint = _fingerprint(cfg, model, clf_meta, denoiser_desc, images, labels, device)
    need_clean = bool(cfg.clean.enabled or cfg.calib.enabled or cfg.ood.enabled)
    clean_draws = int(cfg.clean.draws) if stochastic and cfg.clean.enabled else 1
    shift_draws = int(cfg.shift.draws) if stochastic and corruptions else 1
    specs = _unit_specs(
        cfg,
        clean=need_clean,
        bare=bool(cfg.clean.enabled) and purifier is not None,
        clean_draws=clean_draws,
        shift_draws=shift_draws,
        corruptions=corruptions,
        severities=severities,
        threats=threats,
        stochastic=stochastic,
        outside={k: _images_digest(v[0]) for k, v in outside.items()} if need_clean else {},
        natural={k: _images_digest(v[0], v[1]) for k, v in natural.items()},
        bank=_images_digest(bank_set[0], bank_set[1]) if bank_set is not None else None,
    )
    if worker:  # its PGD blocks only: reading the other units' tensors would be wasted
        specs = {k: v for k, v in specs.items() if k.startswith("adv/") and "/pgd" in k}
    cache = UnitStore(
        run_dir / "partial", fingerprint, specs, resume=bool(cfg.run.resume), describe=_unit_kind
    )
    for line in cache.messages():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    model = model.to(device)
    if worker:
        return _shard_worker(cfg, model, x_u8, y, threats, device, cache, run_dir)
    purifier_desc = None
    if purifier is not None:
        purifier_desc = (
            f"{cfg.purifier.run} ({purifier.sampler}, t*={purifier.t_star}, "
            f"{purifier.nfe} NFE, {'fixed noise' if purifier.fixed_noise else 'fresh noise'})"
        )
    meta: dict[str, Any] = {
        "title": Path(cfg.classifier.run).resolve().name + (" + purifier" if purifier else ""),
        "classifier": str(cfg.classifier.run),
        "purifier": purifier_desc,
        "stochastic": stochastic,
        "data": f"{data['name']} validation split ({data.get('root', '')}), "
        f"{data['image_size']} px",
        "data_config": data,
        "classes": list(clf_meta.get("classes", [])),
        "num_images": n,
        "device": str(device),
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ood_sets": [],
    }
    report: dict[str, Any] = {"metrics": metrics, "meta": meta, "notes": notes}

    # -- clean -----------------------------------------------------------------------------
    draw_logits: Tensor | None = None  # (draws, N, classes)
    bare: Tensor | None = None
    feats = bank_set is not None  # the OOD feature scores' units keep their features
    clean_feats: Tensor | None = None  # (N, D), the first draw's
    if need_clean:
        stored = cache.get("clean")
        if stored is not None:
            draw_logits, bare = stored[1]["logits"], stored[1].get("bare")
            clean_feats = stored[1].get("features")
        else:
            # One stream for all draws: the unit is stored whole, so a resume replays it.
            model.reseed(seed + _SEED_CLEAN, device)
            draw_logits, clean_feats = _predict_draws(model, x_u8, clean_draws, bs, device, feats)
            if specs["clean"]["bare"]:
                bare = _predict(model.classifier, x_u8, bs, device)
            kept = {"logits": draw_logits} | ({"bare": bare} if bare is not None else {})
            if clean_feats is not None:
                kept["features"] = clean_feats
            cache.put("clean", {}, kept)
    if cfg.clean.enabled:
        assert draw_logits is not None
        accs = (draw_logits.argmax(2) == y).float().mean(1)  # (draws,)
        metrics["test/acc"] = accs.mean().item()
        metrics["test/n"] = float(n)
        if clean_draws > 1:
            metrics["test/acc_std"] = accs.std().item()
            metrics["test/acc_worst"] = accs.min().item()
            metrics["test/draws"] = float(clean_draws)
        if bare is not None:
            metrics["test/acc_unpurified"] = (bare.argmax(1) == y).float().mean().item()
    if stochastic:
        ran = {
            "clean": bool(cfg.clean.enabled),
            "corruption": bool(corruptions),
            "calibration": bool(cfg.calib.enabled),
            "OOD": bool(cfg.ood.enabled),
        }
        notes.append(
            _stochastic_note(
                [k for k, v in ran.items() if v],
                clean_draws,
                shift_draws,
                bool(threats),
            )
        )

    # Temperature scaling, fit on the clean logits before the corruption cells, so that each
    # cell's calibration is computed as it finishes (its logits need not stay in memory).
    temperature: _Temperature | None = None
    if cfg.calib.enabled and cfg.calib.temperature and draw_logits is not None:
        temperature = _fit_temperature(cfg, draw_logits, y, metrics, meta, notes)
    cell_eces: dict[tuple[str, int], tuple[float, float | None]] = {}

    def on_cell(c: str, sev: int, per_draw: Tensor, labels: Tensor) -> None:
        cell_eces[c, sev] = _cell_ece(cfg, per_draw, labels, temperature)

    shift_logits: Tensor | None = None  # (draws, M, classes)
    shift_labels: Tensor | None = None
    shift_feats: Tensor | None = None  # (M, D)
    with _progress(cfg.eval.progress) as bar:
        # -- corruptions -------------------------------------------------------------------
        if corruptions:
            shift_logits, shift_labels, shift_feats = _shift_section(
                cfg,
                model,
                images,
                y,
                corruptions,
                severities,
                shift_draws,
                device,
                metrics,
                meta,
                notes,
                bar,
                cache,
                on_cell if cfg.calib.enabled else None,
                feats and bool(cfg.ood.shift),
            )
        # -- natural distribution shift -----------------------------------------------------
        natural_logits: dict[str, tuple[Tensor, Tensor]] = {}
        if natural:
            meta["natural"] = {k: v[2] for k, v in natural.items()}
            natural_logits = _natural_section(
                natural, model, clean_draws, cfg, device, metrics, bar, cache
            )
        # -- adversarial -------------------------------------------------------------------
        adv_examples: dict[str, Tensor] = {}
        if threats:
            adv_examples = _adv_section(
                cfg, model, x_u8, y, threats, device, metrics, report, bar, cache
            )
        # -- certified (randomized smoothing) ------------------------------------------------
        if cfg.cert.enabled:
            _cert_section(cfg, model, x_u8, y, device, metrics, report, bar, cache)
        # -- outside OOD datasets through the pipeline --------------------------------------
        outside_logits: dict[str, Tensor] = {}
        outside_feats: dict[str, Tensor] = {}
        if draw_logits is not None:
            outside_images = {name: v[0] for name, v in outside.items()}
            outside_logits, outside_feats = _set_logits(
                outside_images, "ood", seed + _SEED_OOD, model, clean_draws, cfg, device, bar,
                cache, feats,
            )  # fmt: skip
        # -- the OOD feature scores' bank ---------------------------------------------------
        ood_feats: _OODFeatures | None = None
        if bank_set is not None and clean_feats is not None:
            meta["ood_bank"] = bank_set[2]
            bank, bank_labels = _bank_features(bank_set, model, cfg, device, bar, cache)
            ood_feats = _OODFeatures(bank, bank_labels, clean_feats, shift_feats, outside_feats)
    if ce_reference is not None:
        _ce_section(ce_reference, metrics, meta, notes)
    if cache.done:
        notes.append(
            f"Resumed: {len(cache.done)} of {len(cache.keys)} units of work (clean pass, "
            f"corruption cells, attacks, sanity checks) were read from {cache.folder}, stored "
            "by an earlier run with the same config, data and weights; their wall times are "
            "that run's."
        )

    # -- example figures -------------------------------------------------------------------
    if cfg.eval.examples > 0:
        try:
            _examples_section(
                cfg, model, x_u8, y, corruptions, severities, threats, adv_examples, device,
                run_dir, report,
            )  # fmt: skip
        except Exception as err:  # figures must not cost the report its numbers
            notes.append(f"The example figures were not drawn: {err!r}")

    # -- calibration ---------------------------------------------------------------------------
    # Behind a stochastic purifier the predictions of every purification are pooled: the
    # calibration of the randomised pipeline is that of (prediction, label) pairs drawn over
    # images and purifier noise alike (NLL, Brier and accuracy are then the means over draws).
    reliability: dict[str, Any] = {}
    reliability_scaled: dict[str, Any] = {}  # after temperature scaling
    risk_curves: dict[str, Any] = {}  # selective prediction
    if cfg.calib.enabled:
        meta["calib_bins"] = int(cfg.calib.n_bins)
        sets: list[tuple[str, Tensor, Tensor]] = []  # (draws, N, classes) logits, (N,) labels
        if draw_logits is not None:
            sets.append(("clean", draw_logits, y))
        if shift_logits is not None and shift_labels is not None:
            # The corruptions of one image are not independent samples: for the bootstrap
            # they join its draws (the pooled metrics are the same either way).
            by_image, image_labels = _by_image(shift_logits, shift_labels, len(corruptions))
            assert image_labels is not None
            sets.append(("shift", by_image, image_labels))
        for name, (n_logits, n_labels) in natural_logits.items():
            sets.append((f"natural_{name}", n_logits, n_labels))
        for name, per_draw, labels_1d in sets:
            reliability[name] = _calibration(
                cfg, f"calib/{name}/", per_draw, labels_1d, seed, metrics
            )
            risk_curves[name] = _selective(name, per_draw, labels_1d, metrics)
            if temperature is not None:
                # Cross-fitted on the clean images, and on the shift set when it holds them.
                same = name in ("clean", "shift")
                scaled = temperature.scale(per_draw, labels_1d, same)
                reliability_scaled[name] = _calibration(
                    cfg, f"calib/{name}/ts_", scaled, labels_1d, seed, metrics,
                    refit=temperature.bootstrap_sides(per_draw, labels_1d, same),
                )  # fmt: skip
        if corruptions:
            _severity_calibration(
                cell_eces, corruptions, severities, run_dir, metrics, report, notes
            )
    report["reliability"] = reliability
    if reliability_scaled:
        report["reliability_scaled"] = reliability_scaled
    if risk_curves:
        report["risk_coverage"] = risk_curves

    # -- per class -------------------------------------------------------------------------------
    # Which classes a shift hurts: accuracy per class, clean and on the calibration's shift set.
    if draw_logits is not None:
        names = [str(c) for c in clf_meta.get("classes") or range(num_classes)]
        clean_acc, counts = per_class_accuracy(draw_logits, y, num_classes)
        per_class: dict[str, Any] = {"classes": names, "images": counts, "clean": clean_acc}
        confusion = {"clean": confusion_matrix(draw_logits, y, num_classes).tolist()}
        if shift_logits is not None and shift_labels is not None:
            per_class["shift"] = per_class_accuracy(shift_logits, shift_labels, num_classes)[0]
            confusion["shift"] = confusion_matrix(shift_logits, shift_labels, num_classes).tolist()
        report["per_class"] = per_class
        report["confusion"] = confusion

    # -- the representation: kNN on the encoder's features ---------------------------------------
    if ood_feats is not None:
        _representation_section(ood_feats, y, shift_labels, num_classes, metrics, meta, device)

    # -- OOD -----------------------------------------------------------------------------------
    if cfg.ood.enabled and draw_logits is not None:
        meta["ood_datasets"] = {k: v[1] for k, v in outside.items()}
        _ood_section(
            cfg, model, draw_logits, y, shift_logits, outside_logits, ood_feats, images.shape,
            device, report,
        )  # fmt: skip

    # -- latency -------------------------------------------------------------------------------
    if cfg.perf.enabled:
        _perf_section(cfg, model, x_u8, device, metrics)

    metrics["perf/eval_wall_s"] = time.perf_counter() - start_wall
    paths = write_report(report, run_dir)
    write_json(run_dir / "metrics.json", metrics)
    if cfg.wandb.mode != "disabled":
        _log_wandb(
            cfg, run_dir, report, {k: v for k, v in paths.items() if k not in ("json", "markdown")}
        )
    shown = {k: v for k, v in metrics.items() if _in_summary(k)}
    failed = [
        f"{norm}/{check}"
        for norm, checks in report.get("sanity", {}).items()
        for check, result in checks.items()
        if not result["passed"]
    ]
    extra = {"Report": str(paths["markdown"])}
    if report.get("sanity"):
        extra["Sanity checks"] = "all passed" if not failed else "FAILED: " + ", ".join(failed)
    print_summary(f"evaluate {meta['title']}", run_dir, shown, extra)
    return metrics


def _calibration(
    cfg: DictConfig,
    prefix: str,
    per_draw: Tensor,
    labels: Tensor,
    seed: int,
    metrics: dict,
    refit: list[tuple[Tensor, ...]] | None = None,
) -> dict[str, list[float]]:
    """ECE (with its bootstrap interval), NLL and Brier score of a calibration set's logits
    (draws, N, classes), pooled over the draws, as ``<prefix>ece`` etc. in ``metrics``; the
    accuracy too, unless they are temperature-scaled (``ts_``: a temperature changes no
    prediction). With ``refit`` (temperature-scaled logits: ``_Temperature.bootstrap_sides``),
    each bootstrap resample refits the temperatures on its clean images. Returns the set's
    reliability bins."""
    n_bins = int(cfg.calib.n_bins)
    logits, labels_t = _pooled(per_draw, labels)
    for k, v in calibration_report(logits, labels_t, n_bins).items():
        if not (k == "acc" and prefix.endswith("ts_")):
            metrics[f"{prefix}{k}"] = v
    if cfg.eval.bootstrap > 0:
        statistic: Callable[..., float]
        if refit is not None:
            sides = refit
            statistic = functools.partial(refit_scaled_ece, n_bins=n_bins)
        else:
            sides = [(per_draw, labels.expand(per_draw.shape[:2]))]
            statistic = lambda lg, lb: ece(lg.float().softmax(1), lb, n_bins)  # noqa: E731
        low, high = bootstrap_interval(
            statistic, sides, int(cfg.eval.bootstrap), seed + _SEED_BOOTSTRAP, bounds=(0.0, 1.0)
        )
        metrics[f"{prefix}ece_low"], metrics[f"{prefix}ece_high"] = low, high
    bins = reliability_bins(logits.float().softmax(1), labels_t, n_bins)
    return {k: v.tolist() for k, v in bins.items()}


def _severity_calibration(
    cell_eces: dict[tuple[str, int], tuple[float, float | None]],
    corruptions: Sequence[str],
    severities: Sequence[int],
    run_dir: Path,
    metrics: dict[str, float],
    report: dict[str, Any],
    notes: list[str],
) -> None:
    """The corruption cells' ECEs (:func:`_cell_ece`) as the mean over the corruptions per
    severity (``calib/severity/<s>/ece``, ``ts_ece``), and every cell's in
    ``report["calib_severity"]`` for the plot: how calibration decays as the shift grows, and
    how much of that a temperature fit on clean data undoes (Ovadia et al. 2019, Fig. 2). A
    severity some of whose cells came from a store without their logits is left out, with a
    note."""
    complete = [s for s in severities if all((c, s) in cell_eces for c in corruptions)]
    if len(complete) < len(severities):
        missing = [s for s in severities if s not in complete]
        notes.append(
            f"Calibration per severity left out for severities {missing}: their stored "
            "corruption cells (from an earlier run, or one with calib.enabled=false) kept no "
            f"logits. Delete {run_dir / 'partial' / 'shift'} (or rerun with run.resume=false) "
            "to compute them."
        )
    if not complete:
        return
    scaled = all(cell_eces[c, s][1] is not None for c in corruptions for s in complete)
    out: dict[str, Any] = {
        "severities": complete,
        "ece": {c: [cell_eces[c, s][0] for s in complete] for c in corruptions},
    }
    if scaled:
        out["ts_ece"] = {c: [cell_eces[c, s][1] for s in complete] for c in corruptions}
    for i, sev in enumerate(complete):
        metrics[f"calib/severity/{sev}/ece"] = float(np.mean([v[i] for v in out["ece"].values()]))
        if scaled:
            values = [v[i] for v in out["ts_ece"].values()]
            metrics[f"calib/severity/{sev}/ts_ece"] = float(np.mean(values))
    report["calib_severity"] = out


def _selective(
    name: str, per_draw: Tensor, labels: Tensor, metrics: dict[str, float], points: int = 100
) -> dict[str, list[float]]:
    """Selective prediction on a calibration set's logits (draws, N, classes), pooled over the
    draws: ``selective/<name>/aurc`` etc. in ``metrics``; returns its risk-coverage curve, and
    that of the best ranking of the same predictions, at ``points`` coverages."""
    risk, best = selective_curves(*_pooled(per_draw, labels))
    for k, v in selective_report(risk, best).items():
        metrics[f"selective/{name}/{k}"] = v
    n = len(risk)
    points = min(points, n)  # fewer predictions: every one of them
    coverage = [(i + 1) / points for i in range(points)]
    at = [max(1, -(-(i + 1) * n // points)) - 1 for i in range(points)]  # ceil, in integers
    return {
        "coverage": coverage,
        "risk": risk[at].tolist(),
        "best": best[at].tolist(),
    }


@dataclass
class _Temperature:
    """Temperature scaling fit on the clean images: ``per_image`` (N,), each clean image's
    cross-fitted temperature (fit on the other folds), and ``overall``, fit on all of them."""

    per_image: Tensor
    overall: float
    fold: Tensor  # (N,) each clean image's fold
    clean: Tensor  # (draws, N, classes) the logits the temperatures were fit on
    y: Tensor  # (N,) their labels

    def _holds_clean(self, per_draw: Tensor, labels: Tensor, same_images: bool) -> bool:
        """Whether a set that may hold the clean images (``same_images``) does: the same
        count and labels."""
        n = per_draw.shape[1]
        return same_images and n == len(self.y) and bool(torch.equal(labels.cpu(), self.y.cpu()))

    def scale(self, per_draw: Tensor, labels: Tensor, same_images: bool) -> Tensor:
        """A set's logits (draws, n, classes) divided by its images' temperatures (float32):
        cross-fitted when it holds the clean images, else ``overall``."""
        n = per_draw.shape[1]
        if self._holds_clean(per_draw, labels, same_images):
            t = self.per_image
        else:
            t = torch.full((n,), self.overall, dtype=torch.float64)
        return per_draw.float() / t.to(per_draw.device).float()[None, :, None]

    def bootstrap_sides(
        self, per_draw: Tensor, labels: Tensor, same_images: bool
    ) -> list[tuple[Tensor, ...]]:
        """The bootstrap sides of a set's scaled ECE that refits the temperatures in every
        resample (the arguments of ``refit_scaled_ece``, each (draws, images)): one side with
        the clean images when the set holds them (an image's fold, its clean and its scaled
        logits resampled together), else the set and the clean images as two sides."""
        d, n = per_draw.shape[:2]
        shape = self.clean.shape[:2]
        clean = (self.clean, self.y.expand(shape), self.fold.expand(shape))
        if self._holds_clean(per_draw, labels, same_images):
            return [(per_draw, labels.expand(d, n), self.fold.expand(d, n), *clean)]
        overall = torch.full((d, n), -1, dtype=torch.long)
        return [(per_draw, labels.expand(d, n), overall), clean]


def _fit_temperature(
    cfg: DictConfig,
    clean: Tensor,
    y: Tensor,
    metrics: dict[str, float],
    meta: dict[str, Any],
    notes: list[str],
) -> _Temperature | None:
    """Temperature scaling fit on the clean logits ``clean`` (draws, N, classes), reported as
    ``calib/temperature`` (all images) and the fold fits in ``meta``; None (with a note) when
    the images are too few for the folds."""
    folds = int(cfg.calib.temperature_folds)
    if len(y) < 2 * folds:
        notes.append(
            f"Temperature scaling skipped: {len(y)} clean images cannot be split into {folds} "
            "folds of at least 2 (calib.temperature_folds)."
        )
        return None
    seed = int(cfg.run.seed) + _SEED_TEMPERATURE
    per_image, fits = cross_fit_temperatures(clean, y, folds, seed)
    t_all = fit_temperature(*_pooled(clean, y))
    low, high = TEMPERATURE_BOUNDS
    if any(t in (low, high) for t in [*fits, t_all]):
        notes.append(
            f"Temperature scaling: a fit reached the bound of its range [{low:g}, {high:g}] "
            f"(all images: {t_all:.3g}; folds: {', '.join(f'{t:.3g}' for t in fits)}): every "
            f"prediction of the images it was fit on right ({low:g}) or wrong ({high:g}). The "
            "scaled numbers of the images it scores are those of an extreme temperature; more "
            "images (eval.max_images) give a steadier fit."
        )
    metrics["calib/temperature"] = t_all
    meta["calib_temperature"] = {"folds": folds, "fold_fits": fits}
    return _Temperature(per_image, t_all, fold_of(len(y), folds, seed), clean, y)


def _cell_ece(
    cfg: DictConfig, per_draw: Tensor, labels: Tensor, temp: _Temperature | None
) -> tuple[float, float | None]:
    """A corruption cell's ECE (draws pooled), and after temperature scaling (None without
    it); a cell of the clean images scales each by its cross-fitted temperature."""
    n_bins = int(cfg.calib.n_bins)
    per_draw = per_draw.float()
    logits, labels_t = _pooled(per_draw, labels)
    raw = ece(logits.softmax(1), labels_t, n_bins)
    if temp is None:
        return raw, None
    scaled, _ = _pooled(temp.scale(per_draw, labels, same_images=True), labels)
    return raw, ece(scaled.softmax(1), labels_t, n_bins)


def _by_image(logits: Tensor, labels: Tensor | None, groups: int) -> tuple[Tensor, Tensor | None]:
    """The shift set's logits (draws, groups x N, classes), its ``groups`` corruptions one after
    another over the same N images, as (draws x groups, N, classes): an image's corrupted
    versions with its draws, so that a bootstrap resamples images, not (corruption, image)
    pairs; labels (groups x N,) -> (N,). Unchanged where the corruptions do not share images
    (the labels differ between them, or N is not a whole number)."""
    d, m = logits.shape[:2]
    if groups <= 1 or m % groups:
        return logits, labels
    n = m // groups
    if labels is not None:
        per_group = labels.view(groups, n)
        if not bool((per_group == per_group[0]).all()):
            return logits, labels
        labels = per_group[0]
    return logits.reshape(d, groups, n, *logits.shape[2:]).flatten(0, 1), labels


def _pooled(draws: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The (draws, N, classes) logits of several purifications as draws x N predictions, each
    with its image's label."""
    return draws.flatten(0, 1), labels.repeat(draws.shape[0])


def _stochastic_note(
    sections: list[str], clean_draws: int, shift_draws: int, attacked: bool
) -> str:
    """How many purifications per image stand behind the numbers of each section that ran
    (``sections``: of clean, corruption, calibration, OOD; ``attacked``: the attacks ran)."""
    spread = {
        "clean": "test/acc_std, test/acc_worst",
        "corruption": "shift/mean_acc_std, shift/mean_acc_worst",
    }
    draws = {"clean": clean_draws, "corruption": shift_draws}
    parts = [
        f"{name} accuracy is the mean over {draws[name]} purifications per image ({spread[name]})"
        for name in ("clean", "corruption")
        if name in sections and draws[name] > 1
    ]
    one: list[str] = [n for n in ("clean", "corruption") if n in sections and draws[n] == 1]
    pooled = [name for name in ("calibration", "OOD") if name in sections]
    if pooled:
        made = [f"clean {_times(clean_draws)}"]
        if "corruption" in sections:
            made.append(f"corrupted {_times(shift_draws)}")
        if clean_draws == 1 and ("corruption" not in sections or shift_draws == 1):
            one += pooled
        else:
            parts.append(
                f"{' and '.join(pooled)} pool{'s' if len(pooled) == 1 else ''} the predictions "
                "of every purification made "
                f"({', '.join(made)} per image)"
            )
    if one:
        parts.append(", ".join(one) + " numbers use one purification per image")
    if attacked:
        parts.append("robust accuracy is re-scored over several (mean and worst)")
    return "The purifier is stochastic" + (f": {'; '.join(parts)}." if parts else ".")


def _wide_interval_note(accs: Sequence[float], n: int, half_width: float = 0.05) -> str:
    """A note when robust accuracies over ``n`` images are too uncertain to rank pipelines
    a few points apart: a 95 % Wilson interval wider than +-``half_width``."""
    if not accs:
        return ""
    widest = max(high - low for low, high in (wilson_interval(acc, n) for acc in accs)) / 2
    if widest <= half_width:
        return ""
    return (
        f"Robust accuracy is measured on {n} images: its 95% interval reaches +-"
        f"{100 * widest:.1f} points, so smaller differences between pipelines are noise; raise "
        "adv.max_images to tell them apart."
    )


def _times(k: int) -> str:
    return "once" if k == 1 else f"{k} times"


def _attack_started(
    bar: Progress, task: TaskID, costs: Sequence[int], done: int, what: str
) -> None:
    """Before an attack of the sanity checks: the cost of those ``done`` is completed."""
    bar.update(task, completed=sum(costs[:done]), description=what)


def _in_summary(key: str) -> bool:
    """Keep the console summary short: no grid cells, sanity details or protocol counts."""
    parts = key.split("/")
    if parts[0] == "shift" and len(parts) == 4 and parts[1] not in ("group", "severity"):
        return False
    if parts[0] == "shift" and len(parts) == 3 and parts[2] in ("ce", "relative_ce"):
        return False
    if key.startswith("adv/sanity/") and not key.endswith("/passed"):
        return False
    # Calibration: the ECE before and after scaling; selective prediction: the E-AURC.
    if parts[0] == "calib" and parts[-1] in ("nll", "brier", "ts_nll", "ts_brier", "acc"):
        return False
    if parts[0] == "selective" and parts[-1] != "eaurc":
        return False
    if parts[0] == "ood":  # each score's mean AUROC over the sets (the report has each set)
        return parts[1] == "mean" and parts[-1] == "auroc"
    ends = ("calls_per_image", "/steps", "/eot", "/rescore_draws", "/n", "_low", "_high")
    return not key.endswith(ends)


def _shift_section(
    cfg: DictConfig,
    model: Pipeline,
    images: np.ndarray,
    y: Tensor,
    corruptions: list[str],
    severities: list[int],
    draws: int,
    device: torch.device,
    metrics: dict[str, float],
    meta: dict[str, Any],
    notes: list[str],
    bar: Progress,
    cache: UnitStore,
    on_cell: Callable[[str, int, Tensor, Tensor], None] | None = None,
    features: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accuracy over the corruption grid; returns the highest-severity cells' logits of every
    draw, (draws, M, classes), and their labels (M,), the corruptions one after another, and
    with ``features`` their first draw's encoder features (M, D) (else None).
    With ``on_cell``, every cell keeps its logits in its stored unit (else the top severity
    only), and ``on_cell(corruption, severity, logits (draws, N, classes), labels)`` is called
    with each cell's that has them (computed, or read from a store that kept them).

    Each cell is one unit of ``cache``, and draws the purifier's noise from its own stream,
    seeded by (run.seed, corruption, severity), so that a cell computed after a resume sees
    what it would have seen in an uninterrupted run. With ``draws`` > 1 (a stochastic
    purifier), a cell's accuracy is the mean over that many purifications of every image, and
    the spread of the grid mean over the draws is reported beside it.
    """
    s = cfg.shift
    seed = int(cfg.run.seed)
    folder = Path(s.cifar_c_dir) if s.cifar_c_dir else None
    textures = textures_for_frost(str(s.frost)) if folder is None else None
    meta["grid"] = {
        "corruptions": corruptions,
        "severities": severities,
        "source": f"the folder {folder}"
        if folder
        else f"generated on the fly on {device.type} (seed {seed}, rounded to uint8)",
    }
    if "frost" in corruptions:
        meta["grid"]["frost"] = _frost_note(str(s.frost), folder, bool(s.write_cifar_c))
        notes.append(meta["grid"]["frost"])
    task = bar.add_task("corruptions", total=len(corruptions) * len(severities))
    top = max(severities)
    pooled_logits: list[Tensor] = []
    pooled_labels: list[Tensor] = []
    pooled_feats: list[Tensor] = []
    folder_sizes: list[int] = []  # images per severity in the folder, per cell
    cell_accs: dict[tuple[str, int], list[float]] = {}  # per draw
    # Per image: the fraction of draws that classified it right, per cell (None in stores
    # written before these were kept); they give the grid means' intervals over the images.
    cell_hits: dict[tuple[str, int], Tensor | None] = {}
    numbers: dict[str, Any]  # a cell's stored numbers
    kept: dict[str, Tensor]  # and tensors
    logits: Tensor | None
    y_c: Tensor | None
    for c in corruptions:
        for sev in severities:
            unit = f"shift/{c}/{sev}"
            stored = cache.get(unit)
            if stored is not None:
                bar.update(task, description=f"{c} s{sev} {RESTORED}")
                numbers, kept = stored
                accs = [float(a) for a in numbers.get("accs", [numbers["acc"]])]
                logits, y_c = kept.get("logits"), kept.get("labels")
                hits = kept.get("hits")
                feats = kept.get("features")
            else:
                bar.update(task, description=f"{c} s{sev}")
                numbers = {}
                if folder is not None:
                    arr, lab = load_cifar_c(folder, c, sev)
                    numbers["folder_images"] = len(arr)
                    if len(arr) != len(images):
                        idx = _subset(len(arr), cfg.eval.max_images, seed)
                        arr, lab = arr[idx], lab[idx]
                    x_c, y_c = _nchw(arr), torch.from_numpy(lab)
                else:
                    x_c = _generate(images, c, sev, seed, s.batch_size, device, textures)
                    y_c = y
                # One stream for all draws: the first is the one-draw run's purification.
                model.reseed(_corruption_seed(seed + _SEED_SHIFT, c, sev), device)
                # The OOD feature scores need the top cells' features.
                with_feats = features and sev == top
                stacked, feats = _predict_draws(
                    model, x_c, draws, cfg.eval.batch_size, device, with_feats
                )
                outs = list(stacked)
                correct = torch.stack([(out.argmax(1) == y_c).float() for out in outs])
                accs = correct.mean(1).tolist()
                hits = correct.mean(0)
                # Calibration and OOD: every draw, (draws, N, classes); one draw stays (N, classes)
                # as stores written before the draws existed hold it.
                logits = torch.stack(outs) if draws > 1 else outs[0]
                numbers["acc"] = float(np.mean(accs))
                if draws > 1:
                    numbers["accs"] = accs
                # The top severity's logits pool into the shift set of the calibration and
                # OOD sections; with on_cell, every cell's feed the calibration per severity.
                keep = sev == top or on_cell is not None
                kept = {"logits": logits, "labels": y_c} if keep else {}
                kept["hits"] = hits
                if feats is not None:
                    kept["features"] = feats
                cache.put(unit, numbers, kept)
            cell_accs[c, sev] = accs
            cell_hits[c, sev] = hits
            metrics[f"shift/{c}/{sev}/acc"] = float(np.mean(accs))
            if "folder_images" in numbers:
                folder_sizes.append(int(numbers["folder_images"]))
            if logits is not None and y_c is not None:
                per_draw = logits if logits.dim() == 3 else logits[None]
                if on_cell is not None:
                    on_cell(c, sev, per_draw, y_c)
                if sev == top:
                    pooled_logits.append(per_draw)
                    pooled_labels.append(y_c)
                    if feats is not None:
                        pooled_feats.append(feats)
            bar.advance(task)
    if folder_sizes and folder_sizes[0] != len(images):
        notes.append(
            f"{folder} holds {folder_sizes[0]} images per severity, the evaluation set "
            f"{len(images)}; its own images and labels were used"
        )
    cell = {key: float(np.mean(accs)) for key, accs in cell_accs.items()}
    metrics["shift/mean_acc"] = float(np.mean(list(cell.values())))
    if draws > 1:
        per_draw = np.mean(np.array(list(cell_accs.values())), axis=0)  # grid mean per draw
        metrics["shift/mean_acc_std"] = float(per_draw.std(ddof=1))
        metrics["shift/mean_acc_worst"] = float(per_draw.min())
        metrics["shift/draws"] = float(draws)
    for sev in severities:
        metrics[f"shift/severity/{sev}/acc"] = float(np.mean([cell[c, sev] for c in corruptions]))
    metrics.update(_grid_standard_errors(cell_hits, corruptions, severities))
    if 5 in severities:
        metrics["shift/severity5_acc"] = metrics["shift/severity/5/acc"]
    groups: dict[str, list[float]] = {}
    for (c, _), v in cell.items():
        groups.setdefault(group_of(c), []).append(v)
    for g, values in groups.items():
        metrics[f"shift/group/{g}/acc"] = float(np.mean(values))
    meta["calib_shift_set"] = f"severity {top} of the {len(corruptions)} corruptions"
    if set(corruptions) != set(CORRUPTIONS) or severities != list(SEVERITIES):
        notes.append(
            f"Corruption grid: {len(corruptions)} corruptions x {len(severities)} severities, "
            "not the full 15 x 5 CIFAR-10-C benchmark; means are over this grid."
        )
    # Features of every top cell, or none (a cell stored before they were kept lacks them).
    every = features and len(pooled_feats) == len(pooled_logits)
    return (
        torch.cat(pooled_logits, dim=1),
        torch.cat(pooled_labels),
        torch.cat(pooled_feats) if every else None,
    )


def load_ce_reference(
    path: str | Path, corruptions: Sequence[str], severities: Sequence[int], data: dict[str, Any]
) -> dict[str, Any]:
    """The reference evaluation of ``shift.ce_reference`` (a run directory or its
    metrics.json): its cell accuracies on this grid (``cells``), clean accuracy (``clean``,
    None when it did not run), image count, and how its data differ from ``data`` (this
    evaluation's description) where its report.json says (``differences``: split settings).

    Raises:
        FileNotFoundError: No metrics.json there.
        ConfigError: It lacks cells of this grid, or it evaluated another dataset or size.
    """
    given = Path(path)
    file = given / "metrics.json" if given.is_dir() else given
    if not file.is_file():
        raise FileNotFoundError(
            f"shift.ce_reference: no evaluation metrics at {str(given)!r} (expected an "
            "evaluation run directory holding metrics.json, or that file)"
        )
    try:
        metrics = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"shift.ce_reference: {file} is not valid JSON ({err})") from err
    cells = grid_accuracies(metrics)
    missing = [f"{c}/{s}" for c in corruptions for s in severities if (c, s) not in cells]
    if missing:
        have = sorted({c for c, _ in cells}) or "none"
        raise ConfigError(
            f"shift.ce_reference: {file} has no accuracy for {len(missing)} cells of this grid "
            f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); its corruptions: "
            f"{have}. Evaluate the reference on the same shift.corruptions and "
            "shift.severities."
        )
    report_file = file.parent / "report.json"
    meta = {}
    if report_file.is_file():
        try:
            meta = json.loads(report_file.read_text()).get("meta", {})
        except json.JSONDecodeError:
            meta = {}
    ref_data = meta.get("data_config") or {}
    for key in ("name", "image_size"):
        if key in ref_data and ref_data[key] != data.get(key):
            raise ConfigError(
                f"shift.ce_reference: {file.parent} evaluated {ref_data.get('name')!r} at "
                f"{ref_data.get('image_size')} px, this evaluation {data.get('name')!r} at "
                f"{data.get('image_size')} px; corruption errors compare models on the same data"
            )
    # The split (which images are evaluated) may still differ: said in a note.
    differences = [
        f"{key} {ref_data[key]!r} there, {data.get(key)!r} here"
        for key in ("seed", "val_fraction", "root")
        if key in ref_data and ref_data[key] != data.get(key)
    ]
    return {
        "differences": differences,
        "run": str(file.parent),
        "cells": {key: cells[key] for key in cells if key[0] in corruptions},
        "clean": metrics.get("test/acc"),
        "images": metrics.get("shift/n", meta.get("num_images")),
        "title": meta.get("title", file.parent.name),
        "mean_acc": metrics.get("shift/mean_acc"),
    }


def _ce_section(
    reference: dict[str, Any], metrics: dict[str, float], meta: dict[str, Any], notes: list[str]
) -> None:
    """mCE and relative mCE of this evaluation's grid against ``reference``
    (:func:`load_ce_reference`), into ``metrics``; what they were measured against into
    ``meta["ce_reference"]``."""
    cells = grid_accuracies(metrics)
    errors = corruption_errors(
        cells, reference["cells"], metrics.get("test/acc"), reference["clean"]
    )
    metrics.update(errors)
    meta["ce_reference"] = {
        k: reference[k] for k in ("run", "title", "clean", "mean_acc", "images")
    }
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    undefined = [c for c in corruptions if f"shift/{c}/ce" not in errors]
    if undefined:
        notes.append(
            f"Corruption error undefined for {', '.join(undefined)}: the reference "
            f"({reference['run']}) made no errors there; no mCE."
        )
    if reference["clean"] is None or "test/acc" not in metrics:
        notes.append(
            "No relative corruption errors: they need the clean accuracy of both this "
            "evaluation and the reference (clean.enabled)."
        )
    else:
        flat = [c for c in corruptions if f"shift/{c}/relative_ce" not in errors]
        if flat:
            notes.append(
                f"Relative corruption error undefined for {', '.join(flat)}: the reference "
                "lost no accuracy there relative to its clean accuracy; no relative mCE."
            )
    if reference["differences"]:
        notes.append(
            "The corruption-error reference evaluated the same dataset split otherwise ("
            + "; ".join(reference["differences"])
            + "): its errors may be over other images."
        )
    n, ref_n = metrics.get("shift/n"), reference["images"]
    if n is not None and ref_n is not None and int(n) != int(ref_n):
        notes.append(
            f"The corruption-error reference was evaluated on {int(ref_n)} images, this "
            f"evaluation on {int(n)}; the errors compare different image samples."
        )


def _grid_standard_errors(
    cell_hits: dict[tuple[str, int], Tensor | None], corruptions: list[str], severities: list[int]
) -> dict[str, float]:
    """Standard errors over the images of the grid mean and of each severity's and group's mean
    (``metrics.standard_error`` of each image's accuracy averaged over those cells), and the
    image count; nothing when a cell has no per-image results (a store from before they were
    kept) or the cells hold different images (a CIFAR-10-C folder of another size)."""
    hits = {key: h for key, h in cell_hits.items() if h is not None}
    if len(hits) < len(cell_hits) or len({len(h) for h in hits.values()}) != 1:
        return {}
    n = len(next(iter(hits.values())))
    if n < 2:
        return {}

    def se(cells: list[tuple[str, int]]) -> float:
        return standard_error(torch.stack([hits[k] for k in cells]).double().mean(0).numpy())

    out = {"shift/n": float(n), "shift/mean_acc_se": se(list(hits))}
    for sev in severities:
        out[f"shift/severity/{sev}/acc_se"] = se([(c, sev) for c in corruptions])
    for g in dict.fromkeys(group_of(c) for c in corruptions):
        out[f"shift/group/{g}/acc_se"] = se([k for k in hits if group_of(k[0]) == g])
    return out


def _frost_textures_words(photo_folder: str | None) -> str:
    if photo_folder is None:
        return "procedural textures (not the CIFAR-10-C photographs)"
    return f"the CIFAR-10-C frost photographs from {photo_folder}"


def _frost_note(source: str, folder: Path | None, written: bool) -> str:
    """Which frost textures the grid's frost cells were made with, for the report.

    Generated cells (on the fly, or written to ``folder`` first) use ``source``; cells read
    from a folder use what its manifest records (none for the released CIFAR-10-C).
    """
    if folder is None or written:
        photos = None if source == "procedural" else str(frost_texture_folder(source))
        cached = f", cached in {folder}" if folder is not None else ""
        return f"frost: {_frost_textures_words(photos)}{cached}"
    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return (
            f"frost: read from {folder}, which records no frost textures (the released "
            "CIFAR-10-C uses the photographs); shift.frost applies to generated corruptions only"
        )
    photos = None
    if record.get("frost_textures", "procedural") != "procedural":
        photos = str(record.get("frost_folder", "a folder it does not name"))
    return f"frost: read from {folder}, written with {_frost_textures_words(photos)}"


def pgd_unit(threat: str, shard: int, shards: int) -> str:
    """The unit (and relative file) of one threat's PGD, or of one of its ``shards`` blocks."""
    return f"adv/{threat}/pgd" + (f"/shard-{shard}-of-{shards}" if shards > 1 else "")


def shard_block(n: int, shard: int, shards: int) -> slice:
    """Block ``shard`` (1-based) of ``shards`` contiguous, near-equal blocks of n items; the
    first block holds the first items (the examples figure's)."""
    return slice((shard - 1) * n // shards, shard * n // shards)


# Per-image means of a PGD unit, merged across shards weighted by their images.
_PER_IMAGE = (
    "acc",
    "acc_worst",
    "clean_acc",
    "attack_calls_per_image",
    "pipeline_calls_per_image",
    "nfe_per_image",
)


def merge_pgd_shards(parts: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """One threat's PGD numbers from those of its shards: per-image means weighted by each
    shard's images, the images and wall times summed, the settings (steps, EOT, draws) kept."""
    n = sum(part[prefix + "n"] for part in parts)
    merged = dict(parts[0])
    for key in _PER_IMAGE:
        merged[prefix + key] = sum(part[prefix + key] * part[prefix + "n"] for part in parts) / n
    merged[prefix + "n"] = n
    merged[prefix + "wall_s"] = sum(part[prefix + "wall_s"] for part in parts)
    return merged


def _pgd(
    cfg: DictConfig,
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    t: dict[str, Any],
    eot: int,
    draws: int,
    device: torch.device,
    bar: Progress,
    shard: int,
) -> tuple[dict[str, float], Tensor]:
    """PGD(-EOT) with re-scoring of one threat on ``x``: its numbers under ``adv/<threat>/``
    and its first adversarial examples. Shard i > 1 draws from streams of its own; shard 1 (an
    unsharded attack) from those the evaluation always used."""
    a = cfg.adv
    p = f"adv/{t['name']}/"
    seed = int(cfg.run.seed) + _SEED_ADV + 1_000_003 * (shard - 1)
    model.reseed(seed, device)
    model.calls = 0
    # PGD on a purifier runs for hours: a bar of its steps (all batches) beside.
    n_steps = robust_accuracy_steps(len(x), int(cfg.eval.batch_size), int(a.steps))
    steps_task = bar.add_task(f"PGD {t['name']} steps", total=n_steps)
    res = robust_accuracy(
        model,
        (x, y),
        norm=t["norm"],
        eps=t["eps"],
        steps=int(a.steps),
        eot=eot,
        rescore_draws=draws,
        step_size=float(a.step_size) if a.step_size > 0 else None,
        random_start=bool(a.random_start),
        generator=torch.Generator().manual_seed(seed),
        loss=a.loss,
        batch_size=int(cfg.eval.batch_size),
        nfe_per_call=model.nfe,
        on_step=functools.partial(bar.advance, steps_task),
        examples=MAX_EXAMPLES,
    )
    bar.remove_task(steps_task)
    found = {
        p + "acc": res["acc"],
        p + "acc_worst": res["acc_worst"],
        p + "clean_acc": res["clean_acc"],
        p + "n": res["n"],
        p + "steps": float(a.steps),
        p + "eot": float(eot),
        p + "rescore_draws": float(draws),
        p + "attack_calls_per_image": res["attack_calls_per_image"],
        p + "pipeline_calls_per_image": model.calls / res["n"],
        p + "nfe_per_image": res["attack_nfe_per_image"],
        p + "wall_s": res["wall_s"],
    }
    return found, res["x_adv"]


def _pgd_block(
    cfg: DictConfig,
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    t: dict[str, Any],
    shard: int,
    eot: int,
    draws: int,
    device: torch.device,
    bar: Progress,
    cache: UnitStore,
    announce: Callable[[bool], None] = lambda read: None,
) -> tuple[dict[str, float], Tensor | None]:
    """One threat's PGD on block ``shard`` of ``adv.shards`` of the attacked images ``x``: read
    from ``cache`` when stored, else run and stored; ``announce(read)`` is called first (for
    progress). Returns its numbers and its first adversarial examples (None in stores from
    before they were kept)."""
    shards = int(cfg.adv.shards)
    unit = pgd_unit(t["name"], shard, shards)
    stored = cache.get(unit)
    announce(stored is not None)
    if stored is not None:
        return stored[0], stored[1].get("x_adv")
    block = shard_block(len(x), shard, shards)
    found, x_adv = _pgd(cfg, model, x[block], y[block], t, eot, draws, device, bar, shard)
    cache.put(unit, found, {"x_adv": x_adv})
    return found, x_adv


def _attacked(cfg: DictConfig, n: int) -> Tensor:
    """The indices of the attacked images among the n evaluation images (a seeded subset of
    ``adv.max_images``, sorted): the PGD blocks and the example figures take theirs from it."""
    return torch.from_numpy(_subset(n, int(cfg.adv.max_images), int(cfg.run.seed) + _SEED_ADV))


def _shard_worker(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    threats: list[dict[str, Any]],
    device: torch.device,
    cache: UnitStore,
    run_dir: Path,
) -> dict[str, float]:
    """``adv.shard`` = i: PGD on block i of the attacked images for every threat, stored as
    units (a job of a SLURM array, say); no report. The run with ``adv.shard=0`` merges."""
    i, k = int(cfg.adv.shard), int(cfg.adv.shards)
    eot, draws = _attack_budget(cfg, model.stochastic)
    idx = _attacked(cfg, len(y))
    x = _to_float(x_u8[idx], device)
    y_a = y[idx].to(device)
    metrics: dict[str, float] = {}
    with _progress(cfg.eval.progress) as bar:
        for t in threats:
            found, _ = _pgd_block(cfg, model, x, y_a, t, i, eot, draws, device, bar, cache)
            metrics.update(found)
    title = f"evaluate {Path(cfg.classifier.run).resolve().name}: PGD shard {i} of {k}"
    extra = {
        "Stored": str(cache.folder),
        "Next": "once every shard has run, the same config with adv.shard=0 merges them "
        "(and runs whatever is missing) into the report",
    }
    print_summary(title, run_dir, metrics, extra)
    return metrics


def _adv_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    threats: list[dict[str, Any]],
    device: torch.device,
    metrics: dict[str, float],
    report: dict[str, Any],
    bar: Progress,
    cache: UnitStore,
) -> dict[str, Tensor]:
    """PGD(-EOT), AutoAttack and the sanity checks; one unit of ``cache`` per threat's PGD,
    per threat's AutoAttack and per norm's sanity checks, each reseeding every random stream
    it uses, so a unit computed after a resume sees what it would have in an uninterrupted run.

    Returns:
        Threat name -> the PGD adversarial examples of the first (up to
        :data:`MAX_EXAMPLES`) attacked images, for the report's figures (none for PGD units
        stored before they were kept).
    """
    a = cfg.adv
    seed = int(cfg.run.seed)
    notes: list[str] = report["notes"]
    stochastic = model.stochastic
    eot, draws = _attack_budget(cfg, stochastic)
    idx = _attacked(cfg, len(y))
    x = _to_float(x_u8[idx], device)
    y_a = y[idx].to(device)
    purified = model.purifier is not None
    gradients = "exact (autograd through the whole pipeline)"
    if purified and model.purifier is not None and model.purifier.gradient_checkpointing:
        gradients = "exact, through the sampler with gradient checkpointing on the UNet"
    report["meta"]["threats"] = threats
    report["meta"]["attack"] = {
        "steps": int(a.steps),
        "eot": eot,
        "rescore_draws": draws,
        "loss": a.loss,
        "random_start": bool(a.random_start),
        "step_size_rule": f"{a.step_size:g}" if a.step_size > 0 else "2.5 eps / steps",
        "gradients": gradients,
        "num_images": len(y_a),
        "shards": int(a.shards),
    }
    if stochastic and (eot < _MIN_EOT or a.steps < _MIN_STEPS):
        notes.append(
            f"Attack budget below the recommended one for a stochastic purifier (EOT {eot} < "
            f"{_MIN_EOT} or steps {a.steps} < {_MIN_STEPS}): robust accuracy is an upper bound."
        )
    aa_skip = _autoattack_skip(cfg, stochastic)
    if aa_skip is not None:
        notes.append(aa_skip)
    run_aa = bool(a.autoattack) and aa_skip is None
    norms = list(dict.fromkeys(t["norm"] for t in threats))
    n_s = min(int(a.sanity_images), len(y_a))
    sanity_grid = {
        norm: [e / 255 for e in a.sanity_linf_eps] if norm == "linf" else list(a.sanity_l2_eps)
        for norm in norms
    }
    # Progress in image passes through the pipeline (a pass with a backward counts 3), so the
    # time left holds although a norm's sanity checks can cost many times a PGD run. The
    # cost of AutoAttack depends on how many images its first attack leaves; it counts as a PGD.
    pgd_cost = len(y_a) * ((3 * int(a.steps) + 1) * eot + 2 * draws)
    sanity_costs = {  # per attack of the checks, passes per image
        norm: sanity_attack_costs(
            len(sanity_grid[norm]), int(a.steps), eot, draws,
            black_box_queries=int(a.sanity_queries) or None,
        )
        for norm in norms
    }  # fmt: skip
    total = len(threats) * pgd_cost * (2 if run_aa else 1)
    total += n_s * sum(sum(c) for c in sanity_costs.values()) if a.sanity_checks else 0
    task = bar.add_task("attacks, image passes", total=total)
    examples: dict[str, Tensor] = {}
    shards = int(a.shards)
    for t in threats:
        p = f"adv/{t['name']}/"
        parts: list[tuple[dict[str, float], Tensor | None]] = []
        for i in range(1, shards + 1):
            label = f"PGD {t['name']}" + (f" shard {i}/{shards}" if shards > 1 else "")

            def announce(read: bool, label: str = label) -> None:
                bar.update(task, description=f"{label} {RESTORED}" if read else label)

            parts.append(
                _pgd_block(cfg, model, x, y_a, t, i, eot, draws, device, bar, cache, announce)
            )
        if shards == 1:
            metrics.update(parts[0][0])
        else:
            metrics.update(merge_pgd_shards([found for found, _ in parts], p))
        if parts[0][1] is not None:  # stores written before the examples were kept lack them
            examples[t["name"]] = parts[0][1]
        bar.advance(task, pgd_cost)
        if not run_aa:
            continue
        stored = cache.get(p + "autoattack")
        if stored is not None:
            bar.update(task, description=f"AutoAttack {t['name']} {RESTORED}")
            metrics.update(stored[0])
        else:
            bar.update(task, description=f"AutoAttack {t['name']}")
            start = time.perf_counter()
            version = a.autoattack_version
            # A deterministic pipeline ignores the generator; reseeded all the same, so the
            # unit never depends on what ran before it.
            model.reseed(seed + _SEED_ADV, device)
            x_aa = autoattack(
                model,
                x,
                y_a,
                norm=t["norm"],
                eps=t["eps"],
                version=version,
                batch_size=int(cfg.eval.batch_size),
                attacks=list(a.autoattack_attacks) if version == "custom" else None,
                seed=seed,
            )
            with torch.no_grad():
                pred = _predict(model, x_aa, int(cfg.eval.batch_size), device).argmax(1)
            found = {
                p + "autoattack_acc": (pred == y_a.cpu()).float().mean().item(),
                p + "autoattack_wall_s": time.perf_counter() - start,
            }
            metrics.update(found)
            cache.put(p + "autoattack", found)
        bar.advance(task, pgd_cost)
    wide = _wide_interval_note([metrics[f"adv/{t['name']}/acc"] for t in threats], len(y_a))
    if wide:
        notes.append(wide)
    if not a.sanity_checks:
        return examples
    sanity: dict[str, dict[str, dict[str, Any]]] = {}
    tol = float(a.sanity_tol)
    if tol == 0:
        # One image of slack for a deterministic pipeline; about two standard errors of an
        # accuracy estimate (at acc = 0.5) for a stochastic one (attacks.sanity_checks).
        tol = max(0.02, 1.0 / n_s) if not stochastic else max(0.02, math.sqrt(1 / (n_s * draws)))
    for norm in norms:
        stored = cache.get(f"adv/sanity/{norm}")
        if stored is not None:
            bar.update(task, description=f"sanity checks {norm} {RESTORED}")
            checks = stored[0]["checks"]
        else:
            bar.update(task, description=f"sanity checks {norm}")
            grid = sanity_grid[norm]
            model.reseed(seed + _SEED_ADV, device)
            # Progress in pipeline passes, not attacks: their budgets differ up to ~2x.
            costs = sanity_costs[norm]
            attacks_task = bar.add_task(f"sanity checks {norm}, passes/image", total=sum(costs))
            checks = sanity_checks(
                model,
                x[:n_s],
                y_a[:n_s],
                norm=norm,
                eps_grid=list(grid),
                steps=int(a.steps),
                eot=eot,
                rescore_draws=draws,
                tol=tol,
                black_box_queries=int(a.sanity_queries) or None,
                loss=a.loss,
                generator=torch.Generator().manual_seed(seed + _SEED_ADV),
                on_attack=functools.partial(_attack_started, bar, attacks_task, costs),
            )
            bar.update(attacks_task, completed=sum(costs))
            bar.remove_task(attacks_task)
            cache.put(f"adv/sanity/{norm}", {"checks": checks})
        sanity[norm] = checks
        for name, result in checks.items():
            metrics[f"adv/sanity/{norm}/{name}"] = float(bool(result["passed"]))
        metrics[f"adv/sanity/{norm}/passed"] = float(all(r["passed"] for r in checks.values()))
        failed = [k for k, r in checks.items() if not r["passed"]]
        if failed:
            notes.append(
                f"Sanity checks failed for {norm}: {', '.join(failed)} (tolerance {tol:.3f}); "
                "the robust accuracy above may be overestimated."
            )
        bar.advance(task, n_s * sum(sanity_costs[norm]))
    report["sanity"] = sanity
    return examples


def _examples_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    corruptions: list[str],
    severities: list[int],
    threats: list[dict[str, Any]],
    adv_examples: dict[str, Tensor],
    device: torch.device,
    run_dir: Path,
    report: dict[str, Any],
) -> None:
    """The report's example figures, from the first ``eval.examples`` images of the attacked
    subset (so the adversarial examples are the attack's own):

    - ``plots/examples.png``: each image clean, then (behind a purifier) purified, then per
      threat attacked, its perturbation made visible, and purified;
    - ``plots/corruption_examples.png``: the first image under every corruption and severity
      of the grid (generated here, with the grid's frost textures).

    Each classified row shows the pipeline's prediction (one purification, from its own seeded
    stream); nothing here enters a metric.
    """
    k = int(cfg.eval.examples)
    seed = int(cfg.run.seed)
    idx = _attacked(cfg, len(y))[:k]
    x = _to_float(x_u8[idx], device)
    labels = y[idx]
    classes = list(report["meta"].get("classes") or [])
    if not classes:
        classes = [str(c) for c in range(model.classifier.num_classes)]
    purifier = model.purifier
    model.reseed(seed + _SEED_EXAMPLES, device)

    @torch.no_grad()
    def look(inp: Tensor) -> tuple[Tensor | None, Tensor]:
        """What the classifier sees (the purified input, or None) and its predictions."""
        seen: list[Tensor] = []
        preds: list[Tensor] = []
        for start in range(0, len(inp), int(cfg.eval.batch_size)):
            b = inp[start : start + int(cfg.eval.batch_size)].to(device)
            if purifier is not None:
                b = purifier(b, None if purifier.fixed_noise else model.generator)
                seen.append(b.float().cpu())
            preds.append(model.classifier(b).argmax(1).cpu())
        return (torch.cat(seen) if seen else None), torch.cat(preds)

    def rows_for(name: str, inp: Tensor) -> list[ImageRow]:
        purified, preds = look(inp)
        rows = [ImageRow(name, inp.cpu(), preds)]
        if purified is not None:
            rows.append(ImageRow("purified", purified))
        return rows

    rows = rows_for("clean", x)
    for t in threats:
        x_adv = adv_examples.get(t["name"])
        if x_adv is None:
            continue
        x_adv = x_adv[: len(x)]
        name = f"{t['norm']} {t['eps_label']}"
        attacked = rows_for(name, x_adv)
        attacked.insert(
            1, ImageRow("perturbation", perturbation_image(x_adv, x[: len(x_adv)].cpu()))
        )
        rows += attacked
    words = [
        f"The first {len(x)} {'attacked' if threats else 'evaluation'} images"
        + (", one purification each." if purifier is not None else ".")
    ]
    if purifier is not None:
        words.append("purified: the purifier's output, what the classifier sees.")
    if any(t["name"] in adv_examples for t in threats):
        words.append(
            "perturbation: the adversarial change (mid grey: none), scaled per image to its "
            "largest change."
        )
    path = plot_image_grid(
        rows,
        labels,
        classes,
        run_dir / "plots" / "examples.png",
        title="column: true class; under each image: the prediction (green right, red wrong)",
    )
    figures = report.setdefault("figures", {})
    figures["examples"] = {
        "path": str(path.relative_to(run_dir)),
        "text": " ".join(words),
        "labels": labels.tolist(),
        "rows": _rows_json(rows),
    }
    if not corruptions:
        return
    textures = textures_for_frost(str(cfg.shift.frost))
    gen = torch.Generator(device=device).manual_seed(seed + _SEED_EXAMPLES)
    first = x[:1]
    grid = [torch.cat([first, *(corrupt(first, c, s, gen, textures) for s in severities)])
            for c in corruptions]  # fmt: skip
    flat = torch.cat(grid)  # (C * (1 + S), 3, H, W)
    _, preds = look(flat)
    width = 1 + len(severities)
    rows = [
        ImageRow(c, grid[i].cpu(), preds[i * width : (i + 1) * width])
        for i, c in enumerate(corruptions)
    ]
    path = plot_image_grid(
        rows,
        labels[:1].expand(width),
        classes,
        run_dir / "plots" / "corruption_examples.png",
        column_titles=["clean", *(f"severity {s}" for s in severities)],
        title=f"true class: {classes[int(labels[0])]}; under each image: the prediction",
    )
    folder = bool(cfg.shift.cifar_c_dir)
    figures["corruption_examples"] = {
        "path": str(path.relative_to(run_dir)),
        "labels": labels[:1].tolist(),
        "rows": _rows_json(rows),
        "text": "One image under every corruption and severity of the grid"
        + (", each a purification of its own" if purifier is not None else "")
        + (
            " (generated on the fly for the figure; the grid was read from the folder)"
            if folder
            else ""
        )
        + ".",
    }


def _cert_section(
    cfg: DictConfig,
    model: Pipeline,
    x_u8: Tensor,
    y: Tensor,
    device: torch.device,
    metrics: dict[str, float],
    report: dict[str, Any],
    bar: Progress,
    cache: UnitStore,
) -> None:
    """Certified L2 accuracy of the smoothed pipeline (:func:`certify`), one unit of ``cache``
    holding each image's class and radius (so other ``cert.radii`` need no recomputation)."""
    c = cfg.cert
    seed = int(cfg.run.seed)
    idx = torch.from_numpy(_subset(len(y), int(c.max_images), seed + _SEED_CERT))
    labels = y[idx]
    purifier = model.purifier
    sigma = purifier.noise_sigma if purifier is not None else float(c.sigma)
    stored = cache.get("cert")
    if stored is not None:
        pred, radius = stored[1]["pred"], stored[1]["radius"]
        wall = float(stored[0]["wall_s"])
    else:
        model.reseed(seed + _SEED_CERT, device)
        gen = torch.Generator(device=device).manual_seed(seed + _SEED_CERT)

        def bare(xb: Tensor) -> Tensor:
            noise = torch.randn(xb.shape, generator=gen, device=device, dtype=xb.dtype)
            return model.classifier(xb + sigma * noise)

        task = bar.add_task("certify, images", total=len(idx))
        start = time.perf_counter()
        pred, radius = certify(
            model if purifier is not None else bare,  # the purifier draws the noise itself
            _to_float(x_u8[idx], device),
            model.classifier.num_classes,
            sigma,
            n0=int(c.n0),
            n=int(c.samples),
            alpha=float(c.alpha),
            batch_size=int(c.batch_size),
            on_image=functools.partial(bar.advance, task),
        )
        wall = time.perf_counter() - start
        bar.remove_task(task)
        cache.put("cert", {"wall_s": wall}, {"pred": pred, "radius": radius})
    right = pred == labels
    metrics["cert/sigma"] = sigma
    metrics["cert/n"] = float(len(labels))
    metrics["cert/samples"] = float(c.samples)
    metrics["cert/n0"] = float(c.n0)
    metrics["cert/alpha"] = float(c.alpha)
    metrics["cert/acc"] = right.double().mean().item()
    metrics["cert/abstain"] = (pred == ABSTAIN).double().mean().item()
    metrics["cert/acr"] = (radius * right).mean().item()
    for r, acc in certified_accuracy(pred, radius, labels, list(c.radii)).items():
        metrics[f"cert/radius/{r:g}/acc"] = acc
    metrics["cert/nfe_per_image"] = float((c.n0 + c.samples) * model.nfe)
    metrics["cert/wall_s"] = wall
    report["cert"] = {"radius": radius.tolist(), "correct": right.tolist()}
    report["meta"]["cert"] = {
        "sigma": sigma,
        "noise": f"the purifier's diffusion to t*={purifier.t_star}" if purifier else "cert.sigma",
        "n0": int(c.n0),
        "samples": int(c.samples),
        "alpha": float(c.alpha),
        "radii": [float(r) for r in c.radii],
    }


def _rows_json(rows: list[ImageRow]) -> list[dict[str, Any]]:
    """A figure's rows as the report records them: name and predictions (None: unclassified)."""
    return [{"name": r.name, "preds": None if r.preds is None else r.preds.tolist()} for r in rows]


# The weighted kNN of the pretraining monitor (Wu et al. 2018): the 200 nearest bank features
# by cosine similarity vote with weight exp(similarity / 0.1).
REPR_KNN_K, REPR_KNN_T = 200, 0.1


def _representation_section(
    features: _OODFeatures,
    y: Tensor,
    shift_labels: Tensor | None,
    num_classes: int,
    metrics: dict[str, float],
    meta: dict[str, Any],
    device: torch.device,
) -> None:
    """Accuracy of a kNN classifier on the encoder's features against the labeled bank, on the
    clean images (``repr/knn_acc``) and on the top-severity corruptions (``repr/shift/knn_acc``):
    beside the head's accuracy, whether a shift costs the representation or the linear head."""
    bank, bank_labels = features.bank, features.bank_labels
    k = min(REPR_KNN_K, len(bank))
    meta["repr_knn"] = {"k": k, "t": REPR_KNN_T, "bank": len(bank)}

    def acc(query: Tensor, labels: Tensor) -> float:
        return knn_accuracy(
            query, labels, bank, bank_labels, num_classes, k, REPR_KNN_T, device=device
        )

    metrics["repr/knn_acc"] = acc(features.clean, y)
    if features.shift is not None and shift_labels is not None:
        metrics["repr/shift/knn_acc"] = acc(features.shift, shift_labels)


def _ood_section(
    cfg: DictConfig,
    model: Pipeline,
    clean_logits: Tensor,
    y: Tensor,
    shift_logits: Tensor | None,
    outside_logits: dict[str, Tensor],
    features: _OODFeatures | None,
    image_shape: tuple[int, ...],
    device: torch.device,
    report: dict[str, Any],
) -> None:
    """OOD detection from the clean logits (draws, N, classes) against noise images (purified
    as many times as the clean images), the held-out classes, the top-severity corruptions
    (shift_logits, (draws, M, classes)) and the outside datasets (``outside_logits``, by set).
    Behind a stochastic purifier, the scores of every draw are pooled on each side: the AUROC
    of the randomised detector. With ``features``, the feature scores of ``ood.feature_scores``
    score each set's first draw against the bank."""
    o = cfg.ood
    seed = int(cfg.run.seed)
    metrics = report["metrics"]
    _, h, w, c = image_shape
    n_noise = int(o.num_noise) or len(y)
    draws = clean_logits.shape[0]
    feature_scorers = (
        _feature_scorers(cfg, features, report, device) if features is not None else {}
    )

    def score(logits: Tensor, feats: Tensor | None) -> dict[str, Tensor]:
        """Every score of a set, by name: (draws, images) for the logit scores, (1, images)
        for the feature scores (one draw; none without the set's features)."""
        out = {
            k: fn(logits.flatten(0, 1)).view(logits.shape[:2]) for k, fn in LOGIT_SCORERS.items()
        }
        if feats is not None:
            out |= {k: fn(feats)[None] for k, fn in feature_scorers.items()}
        return out

    def images(scores: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {k: v[:, mask] for k, v in scores.items()}

    clean = score(clean_logits, features.clean if features is not None else None)
    # The in-distribution side of every set: the clean images, less the held-out classes (the
    # classifier was fine-tuned without them, so their images are OOD, not in-distribution).
    inside_mask = torch.ones(len(y), dtype=torch.bool)
    # name -> (in-distribution, OOD) scores, by score name
    sets: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    if o.held_out_classes:
        in_mask, out_mask = held_out_class_split(y, list(o.held_out_classes))
        if in_mask.any() and out_mask.any():
            inside_mask = in_mask
            sets["held_out"] = (images(clean, in_mask), images(clean, out_mask))
        else:
            report["notes"].append("OOD held-out set skipped: a side of the split is empty.")
    inside = images(clean, inside_mask)
    noise_sets: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    gen = torch.Generator().manual_seed(seed + _SEED_OOD)
    model.reseed(seed + _SEED_OOD, device)
    bs = int(cfg.eval.batch_size)
    for kind in o.noise_kinds:
        noise = noise_images(n_noise, (c, h, w), kind, generator=gen)
        logits, f = _predict_draws(model, noise, draws, bs, device, features is not None)
        noise_sets[f"noise_{kind}"] = (inside, score(logits, f))
    sets = noise_sets | sets  # the noise sets first, as the report has always listed them
    if o.shift and shift_logits is not None:
        top = max(int(s) for s in cfg.shift.severities)
        shifted = score(shift_logits, features.shift if features is not None else None)
        # (draws, corruptions x N) -> (draws x corruptions, N): an image's corruptions beside
        # each other, so the bootstrap resamples images (less the held-out classes).
        by_image = {
            k: _by_image(v, None, len(cfg.shift.corruptions))[0] for k, v in shifted.items()
        }
        same = all(v.shape[1] == len(y) for v in by_image.values())
        sets[f"shift_s{top}"] = (inside, images(by_image, inside_mask) if same else by_image)
    for name, logits in outside_logits.items():
        f_out = features.outside.get(name) if features is not None else None
        sets[name] = (inside, score(logits, f_out))
    hist: dict[str, dict[str, Any]] = {}
    for name, (scores_in, scores_out) in sets.items():
        hist[name] = {}
        for score_name, s_out in scores_out.items():
            s_in = scores_in[score_name]  # scores per (draw, image); the metrics pool the draws
            key = f"ood/{name}/{score_name}/"
            for k, v in ood_metrics(s_in.flatten(), s_out.flatten()).items():
                metrics[key + k] = v
            if cfg.eval.bootstrap > 0:
                # The corrupted set holds the clean images' corruptions: one side, so that an
                # image's clean and corrupted scores are resampled together.
                paired = name.startswith("shift_s") and s_in.shape[1] == s_out.shape[1]
                sides = [(s_in, s_out)] if paired else [(s_in,), (s_out,)]
                metrics[key + "auroc_low"], metrics[key + "auroc_high"] = bootstrap_interval(
                    auroc, sides, int(cfg.eval.bootstrap), seed + _SEED_BOOTSTRAP, bounds=(0.0, 1.0)
                )
            hist[name][score_name] = _ood_hist(s_in.flatten(), s_out.flatten(), score_name)
    # Each score's mean over the sets it scored: one number per detector to compare runs by.
    for score_name in dict.fromkeys(k for _, out in sets.values() for k in out):
        for k in ("auroc", "fpr95"):
            values = [metrics[f"ood/{name}/{score_name}/{k}"] for name in sets
                      if f"ood/{name}/{score_name}/{k}" in metrics]  # fmt: skip
            metrics[f"ood/mean/{score_name}/{k}"] = float(np.mean(values))
    report["meta"]["ood_sets"] = list(sets)
    report["ood_hist"] = hist


def knn_neighbour(k: int, bank_size: int) -> int:
    """The kNN score's neighbour: ``k``, or for 0 Sun et al.'s ratio of 50 per 50,000 bank
    images (at least 1); never beyond the bank."""
    return min(bank_size, k if k > 0 else max(1, round(50 * bank_size / 50_000)))


def _feature_scorers(
    cfg: DictConfig, features: _OODFeatures, report: dict[str, Any], device: torch.device
) -> dict[str, Callable[[Tensor], Tensor]]:
    """The feature scores of ``ood.feature_scores``, each fitted to the bank: features (M, D)
    -> scores (M,), higher = more in-distribution, computed on ``device``."""
    out: dict[str, Callable[[Tensor], Tensor]] = {}
    bank, bank_labels = features.bank, features.bank_labels
    report["meta"]["ood_feature_scores"] = list(cfg.ood.feature_scores)
    for score in cfg.ood.feature_scores:
        if score == "knn":
            k = knn_neighbour(int(cfg.ood.knn_k), len(bank))
            report["meta"]["ood_knn_k"] = k
            out["knn"] = functools.partial(knn_score, bank, k=k, device=device)
        elif score == "mahalanobis":
            means, precision = fit_mahalanobis(bank, bank_labels)
            out["mahalanobis"] = functools.partial(
                mahalanobis_score, means=means, precision=precision, device=device
            )
    return out


def _perf_section(
    cfg: DictConfig, model: Pipeline, x_u8: Tensor, device: torch.device, metrics: dict
) -> None:
    f = cfg.perf
    reps = math.ceil(f.batch_size / len(x_u8))
    batch = _to_float(x_u8.repeat(reps, 1, 1, 1)[: f.batch_size], device)
    one = batch[:1]
    clf = model.classifier
    metrics["perf/latency_ms"] = measure_latency(clf, one, f.warmup, f.iters)["median_ms"]
    metrics["perf/throughput_ips"] = measure_latency(clf, batch, f.warmup, f.iters)["images_per_s"]
    metrics["perf/batch_size"] = float(batch.shape[0])
    if model.purifier is not None:
        model.reseed(int(cfg.run.seed) + _SEED_PERF, device)
        lat = measure_latency(model, one, f.warmup, f.iters)
        thr = measure_latency(model, batch, f.warmup, f.iters)
        metrics["perf/purified_latency_ms"] = lat["median_ms"]
        metrics["perf/purified_throughput_ips"] = thr["images_per_s"]
        metrics["perf/purifier_nfe"] = float(model.purifier.nfe)


def _log_wandb(
    cfg: DictConfig, run_dir: Path, report: dict[str, Any], plots: dict[str, Path]
) -> None:
    import wandb

    w = cfg.wandb
    run = wandb.init(
        project=w.project,
        entity=w.entity or None,
        group=w.group or None,
        name=w.name or run_dir.name,
        tags=list(w.tags) or None,
        job_type=w.job_type or "evaluate",
        mode=w.mode,
        id=wandb_run_id(run_dir),
        resume="allow",
        dir=str(run_dir),
        config=to_dict(cfg),
        settings=wandb.Settings(init_timeout=w.init_timeout_s),
    )
    try:
        log_to_wandb(run, report, plots)
    finally:
        run.finish()
