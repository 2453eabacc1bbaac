"""Units of stored work (their fingerprint and specs) and the prediction passes that fill them."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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

from ssl_robust.evaluate.cifar_c import _corruption_seed, frost_identity, params_hash
from ssl_robust.evaluate.corruptions import corrupt
from ssl_robust.evaluate.metrics import wilson_interval
from ssl_robust.evaluate.store import file_stamp, weights_sha256
from ssl_robust.launch.progress import progress_bar
from ssl_robust.pipelines.common import console
from ssl_robust.pipelines.evaluate.setup import Pipeline, attack_budget, autoattack_skip
from ssl_robust.purify.purifier import Purifier

# ---------------------------------------------------------------------------------------------
# Resume: the finished units of work, one file each
# ---------------------------------------------------------------------------------------------

# Bump when what a stored unit holds changes meaning: every unit stored before is then stale.
_PARTIAL_FORMAT = 1


def run_fingerprint(
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
    if model.purifier is not None:
        purifier = {**purifier_settings(model.purifier), **denoiser_desc}
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


def purifier_settings(purifier: Purifier) -> dict[str, Any]:
    """The settings of the built purifier that its outputs depend on, for the fingerprint:
    the resolved t* (also when ``purifier.sigma`` chose it), the sampler, DDIM's steps (for
    DDIM only), frozen or fresh noise and the UNet's precision. Not what leaves every number
    as it is: gradient checkpointing, the ``t_star`` that ``sigma`` overrides, the DDIM steps
    of another sampler, and everything at t* = 0 (the purifier is then the identity). The
    noise seed of ``fixed_noise`` is ``run.seed``, in the fingerprint already; the variance
    type and clipping come from the scheduler's config, hashed beside these."""
    if purifier.t_star == 0:
        return {"t_star": 0}
    settings: dict[str, Any] = {
        "t_star": int(purifier.t_star),
        "sampler": str(purifier.sampler),
        "fixed_noise": bool(purifier.fixed_noise),
        "dtype": "bfloat16" if purifier.dtype == torch.bfloat16 else "float32",
    }
    if purifier.sampler == "ddim":
        settings["ddim_steps"] = int(purifier.ddim_steps)
    return settings


def unit_specs(
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
    eot, draws = attack_budget(cfg, stochastic)
    attack = {
        "steps": int(a.steps),
        "step_size": float(a.step_size),
        "random_start": bool(a.random_start),
        "loss": str(a.loss),
        "eot": eot,
        "rescore_draws": draws,
        "max_images": int(a.max_images),
    }
    run_aa = bool(a.autoattack) and autoattack_skip(cfg, stochastic) is None
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
        # What attacks.sanity_checks is given, no more: the checks run PGD with the default
        # step rule at every radius (adv.step_size is not theirs). Their images are the first
        # of the attacked subset, which adv.max_images chooses.
        sanity = {
            "steps": int(a.steps),
            "random_start": bool(a.random_start),
            "loss": str(a.loss),
            "eot": eot,
            "rescore_draws": draws,
            "max_images": int(a.max_images),
        }
        for norm in dict.fromkeys(t["norm"] for t in threats):
            specs[f"adv/sanity/{norm}"] = {
                "norm": norm,
                "eps_grid": list(a.sanity_linf_eps if norm == "linf" else a.sanity_l2_eps),
                "attack": sanity,
                "images": int(a.sanity_images),
                "queries": int(a.sanity_queries),
                "tol": float(a.sanity_tol),
            }
    if bank is not None:
        specs["features/bank"] = {"images": bank}
    return specs


def unit_kind(unit: str) -> str:
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
# Prediction passes
# ---------------------------------------------------------------------------------------------


def to_float(u8: Tensor, device: torch.device) -> Tensor:
    return u8.to(device).float() / 255.0  # (B, 3, H, W) in [0, 1]


def _on_device(images: Tensor, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Batches of uint8 (N, 3, H, W) or float [0, 1] images as float [0, 1] on ``device``."""
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        yield to_float(batch, device) if batch.dtype == torch.uint8 else batch.to(device)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    device: torch.device,
    advance: Callable[[int], None] | None = None,
) -> Tensor:
    """Logits (N, K) on the CPU for uint8 (N, 3, H, W) or float [0, 1] images; ``advance`` is
    told the size of each batch done."""
    out = []
    for x in _on_device(images, batch_size, device):
        out.append(model(x).float().cpu())
        if advance is not None:
            advance(x.shape[0])
    return torch.cat(out)


@torch.no_grad()
def predict_draws(
    model: Pipeline,
    images: Tensor,
    draws: int,
    batch_size: int,
    device: torch.device,
    features: bool = False,
    progress: bool = False,
    what: str = "image passes",
) -> tuple[Tensor, Tensor | None]:
    """Logits (draws, N, K) of ``draws`` passes over the images (purifications, behind a
    stochastic purifier) and, with ``features``, the encoder's features (N, D) of the first
    pass: the same noise draws as without them. With ``progress``, its own progress bar (a
    line a minute and one at the end in a log file) counts the image passes under ``what``;
    leave it off inside another section's bar."""
    with ExitStack() as stack:
        advance: Callable[[int], None] | None = None
        if progress:
            bar = stack.enter_context(progress_bars(True))
            task = bar.add_task(what, total=draws * images.shape[0])
            advance = functools.partial(bar.advance, task)
        if not features:
            logits = [predict(model, images, batch_size, device, advance) for _ in range(draws)]
            return torch.stack(logits), None
        outs, feats = [], []
        for x in _on_device(images, batch_size, device):
            out, f = model.embed(x)
            outs.append(out.float().cpu())
            feats.append(f.float().cpu())
            if advance is not None:
                advance(x.shape[0])
        rest = [predict(model, images, batch_size, device, advance) for _ in range(draws - 1)]
        return torch.stack([torch.cat(outs), *rest]), torch.cat(feats)


def nchw(images_nhwc: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def generate(
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
        x = to_float(nchw(images_nhwc[start : start + batch]), device)
        y = corrupt(x, name, severity, generator=gen, frost_textures=frost_textures)
        out.append(torch.round(y * 255.0).to(torch.uint8).cpu())
    return torch.cat(out)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Progress]:
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


def stochastic_note(sections: list[str], clean_draws: int, shift_draws: int, attacked: bool) -> str:
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


def wide_interval_note(accs: Sequence[float], n: int, half_width: float = 0.05) -> str:
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


def attack_started(bar: Progress, task: TaskID, costs: Sequence[int], done: int, what: str) -> None:
    """Before an attack of the sanity checks: the cost of those ``done`` is completed."""
    bar.update(task, completed=sum(costs[:done]), description=what)


def pgd_unit(threat: str, shard: int, shards: int) -> str:
    """The unit (and relative file) of one threat's PGD, or of one of its ``shards`` blocks."""
    return f"adv/{threat}/pgd" + (f"/shard-{shard}-of-{shards}" if shards > 1 else "")
