"""What an evaluation is given: the config checks, the evaluation data, the outside and natural
sets, the purifier and the deployed pipeline."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl_robust.config import ConfigError, job_ranges
from ssl_robust.config.loader import validate_ranges
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
from ssl_robust.evaluate.cifar_c import textures_for_frost
from ssl_robust.evaluate.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    FROST_SOURCES,
    SEVERITIES,
)
from ssl_robust.evaluate.ood import FEATURE_SCORES, NOISE_KINDS
from ssl_robust.evaluate.report import threat_name
from ssl_robust.finetune.features import source_images
from ssl_robust.finetune.model import Classifier
from ssl_robust.pipelines.common import check_denoiser_size, check_phase
from ssl_robust.purify.purifier import Purifier
from ssl_robust.purify.unet import load_denoiser

# Offsets of the per-section random streams from run.seed, so that switching one section off
# does not change the numbers of another.
SEED_CLEAN, SEED_SHIFT, SEED_ADV, SEED_OOD, SEED_PERF, SEED_EXAMPLES = 1, 2, 3, 4, 5, 6


SEED_CERT, SEED_NATURAL, SEED_BOOTSTRAP, SEED_TEMPERATURE = 7, 8, 9, 10


# The minimum attack budget for a stochastic purifier: EOT >= 20 draws per step, >= 100 steps.
MIN_EOT, MIN_STEPS = 20, 100


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


def threat_specs(cfg: DictConfig) -> list[dict[str, Any]]:
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
    # The numeric ranges the loader checks, again for a config built in code.
    validate_ranges(cfg, job_ranges("evaluate"))
    p = cfg.purifier
    s = cfg.shift
    if s.enabled:
        valid = [*CORRUPTIONS, *EXTRA_CORRUPTIONS]
        need(len(s.corruptions) > 0, f"shift.corruptions is empty; choose from {valid}")
        for name in s.corruptions:
            need(
                name in valid,
                f"unknown corruption {name!r} in shift.corruptions; choose from {valid}",
            )
        why = " (the grid means would count it twice in some means and once in others)"
        need(*_once("shift.corruptions", s.corruptions, "corruption", why))
        need(len(s.severities) > 0, f"shift.severities is empty; choose from {list(SEVERITIES)}")
        for sev in s.severities:
            need(
                sev in SEVERITIES,
                f"invalid severity {sev!r} in shift.severities; choose from {list(SEVERITIES)}",
            )
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
        need(
            0 <= a.shard <= a.shards,
            f"adv.shard must be in 0..adv.shards ({a.shards}): 0 runs every block, i one block; "
            f"got {a.shard}",
        )
        need(
            a.shard == 0 or a.shards > 1,
            f"adv.shard={a.shard} runs one block of the attacked images: set adv.shards > 1",
        )
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
            len(c.radii) > 0 and all(r >= 0 for r in c.radii),
            f"cert.radii must hold radii >= 0, got {list(c.radii)}",
        )
    natural_set_names([str(p) for p in cfg.natural.sets])
    o = cfg.ood
    if o.enabled:
        for kind in o.noise_kinds:
            need(
                kind in NOISE_KINDS,
                f"unknown noise kind {kind!r} in ood.noise_kinds; choose from {list(NOISE_KINDS)}",
            )
        need(*_once("ood.noise_kinds", o.noise_kinds, "noise kind"))
        for score in o.feature_scores:
            need(
                score in FEATURE_SCORES,
                f"unknown score {score!r} in ood.feature_scores; choose from "
                f"{list(FEATURE_SCORES)}",
            )
        ood_set_names([str(spec) for spec in o.datasets])


def _once(key: str, values: Sequence[Any], noun: str, why: str = "") -> tuple[bool, str]:
    """``(ok, message)`` for ``need``: whether ``key`` names each of its ``values`` once, and
    the values it repeats (in order of their first repeat)."""
    seen: set[Any] = set()
    twice: dict[Any, None] = {}
    for v in values:
        if v in seen:
            twice[v] = None
        seen.add(v)
    names = ", ".join(map(repr, twice))
    return not twice, f"{key} names {names} more than once; give each {noun} once{why}"


def attacked_count(cfg: DictConfig, n: int) -> int:
    """How many of the n evaluation images the attacks take (``adv.max_images``, 0: all)."""
    cap = int(cfg.adv.max_images)
    return n if cap <= 0 else min(cap, n)


def check_shards(cfg: DictConfig, n: int) -> None:
    """Once the n evaluation images are known: every PGD block of ``adv.shards`` holds an
    attacked image. Raises ConfigError (before anything is written) otherwise."""
    if not cfg.adv.enabled:
        return
    attacked = attacked_count(cfg, n)
    shards, cap = int(cfg.adv.shards), int(cfg.adv.max_images)
    if shards > attacked:
        which = f"min(adv.max_images={cap}, {n} evaluation images)"
        if cap <= 0:
            which = f"adv.max_images=0: all {n} evaluation images"
        raise ConfigError(
            f"adv.shards={shards} splits the attacked images into more blocks than there are "
            f"images: {attacked} are attacked ({which}), so some blocks would be empty; set "
            f"adv.shards in 1..{attacked}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``run.dir`` or ``runs/evaluate-<classifier run>[-purified]``; refused (ConfigError) when
    it holds another job's run."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    else:
        name = Path(cfg.classifier.run).resolve().name
        run_dir = Path("runs") / f"evaluate-{name}{'-purified' if cfg.purifier.run else ''}"
    check_phase(run_dir, "evaluate")
    return run_dir


def seeded_subset(n: int, cap: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``cap`` indices out of n (all when cap is 0 or >= n), sorted."""
    if cap <= 0 or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def eval_data(cfg: DictConfig, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict, Splits]:
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
    idx = seeded_subset(len(images), cfg.eval.max_images, cfg.run.seed)
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


def bank_images(
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
    idx = idx[_balanced(labels[idx], int(cfg.ood.bank_size), int(cfg.run.seed) + SEED_OOD)]
    if len(idx) < 2:
        raise ConfigError(
            f"the OOD feature bank would hold {len(idx)} image(s) ({what}); set "
            "ood.feature_scores=[] to score the logits only"
        )
    images = source_images(train.subset(idx))
    return np.ascontiguousarray(images), labels[idx], f"{len(idx)} of {what}"


def build_purifier(cfg: DictConfig, image_size: int) -> tuple[Purifier | None, dict[str, Any]]:
    """The purifier (None without ``purifier.run``) and the denoiser's UNet and noise-schedule
    configs (for the resume fingerprint; private ``_`` keys such as the load path dropped)."""
    p = cfg.purifier
    if not p.run:
        return None, {}
    unet, scheduler = load_denoiser(p.run)
    fix = "give a denoiser trained at the classifier's image size"
    check_denoiser_size(unet, image_size, "purifier.run", p.run, "evaluation images", fix)
    desc = {
        name: {k: v for k, v in dict(c).items() if not k.startswith("_")}
        for name, c in (("unet", unet.config), ("scheduler", scheduler.config))
    }
    try:
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
    except ValueError as err:  # t_star or sigma beyond the denoiser's schedule
        raise ConfigError(f"purifier (run {p.run!r}): {err}") from err
    return purifier, desc


def attack_budget(cfg: DictConfig, stochastic: bool) -> tuple[int, int]:
    """EOT passes per gradient and scoring draws: 1 and 1 for a deterministic pipeline."""
    if not stochastic:
        return 1, 1
    return int(cfg.adv.eot), int(cfg.adv.rescore_draws)


def autoattack_skip(cfg: DictConfig, stochastic: bool) -> str | None:
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


def natural_sets(
    cfg: DictConfig, classes: Sequence[str], image_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """The images, labels and description of every ``natural.sets`` set by name (a seeded
    subset of ``natural.max_images``), loaded before the run writes anything."""
    out = {}
    for name, path in natural_set_names([str(p) for p in cfg.natural.sets]).items():
        images, labels = load_labeled_set(path, classes, image_size)
        idx = seeded_subset(
            len(images), int(cfg.natural.max_images), int(cfg.run.seed) + SEED_NATURAL
        )
        data = labeled_set_file(path)
        where = f"{data}" if data is not None and Path(path).is_dir() else str(path)
        desc = f"{where}, {len(idx)} of {len(images)} images at {image_size} px"
        out[name] = (np.ascontiguousarray(images[idx]), labels[idx], desc)
    return out


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


def outside_sets(
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
        idx = seeded_subset(len(images), n, int(cfg.run.seed) + SEED_OOD)
        what = f"{name} test split" if name != "imagefolder" else "the image folder"
        desc = f"{what} ({root}), {len(idx)} of {len(images)} images at {size} px"
        if {name, data["name"]} == {"cifar10", "stl10"}:
            desc += (
                f" (it shares 9 of its 10 classes with {data['name']}: mostly images of the "
                "classifier's own classes, not OOD)"
            )
        out[set_name] = (np.ascontiguousarray(images[idx]), desc)
    return out


def images_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape} {array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()
