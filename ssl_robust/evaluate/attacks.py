"""White- and black-box attacks on whole inference pipelines, and robust-accuracy protocols.

Every attack here targets a ``model`` that maps images ``x`` in [0, 1] of shape (B, C, H, W)
to logits (B, K), with normalisation and any purifier *inside* it: attacking the bare
classifier behind a purifier measures nothing (Athalye et al. 2018). The pipeline may be
stochastic (a diffusion purifier draws fresh noise on every call); the protocol for that case
(Athalye et al. 2018; Lee & Kim 2023 for diffusion purifiers) is

1. :func:`pgd` with Expectation over Transformation (EOT, Athalye et al. 2018): average the
   input gradient over ``eot`` independent calls per step;
2. :func:`rescore` each final adversarial example over several independent calls and report
   the mean and the worst case;
3. :func:`sanity_checks`: accuracy falls to ~0 as eps grows, more steps / more EOT never help
   the defence, and a black-box attack (:func:`random_search`) does not beat the white-box one.

The caller puts modules in eval mode; nothing here touches parameters or their ``.grad``
(input gradients come from :func:`torch.autograd.grad`).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_robust.benchmarking import sync

Pipeline = Callable[[Tensor], Tensor]

NORMS = ("linf", "l2")
KEEP = ("best", "last")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
# AutoAttack names its norms with capitals.
_AA_NORM = {"linf": "Linf", "l2": "L2"}


def _ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")  # (B,)


def _margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    # Carlini & Wagner (2017), Eq. (f6) without the clamp: max_{j != y} z_j - z_y, > 0 iff fooled.
    return -_margin(logits, y)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": _ce_loss, "margin": _margin_loss}


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per sample: positive iff the prediction is y."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)  # (B,)
    others = logits.scatter(1, y[:, None], float("-inf"))  # (B, K), true class masked out
    return z_y - others.amax(dim=1)  # (B,)


def _per_sample_view(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norms(t: Tensor, norm: str) -> Tensor:
    flat = t.flatten(1)  # (B, D)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)  # (B,)


def _project(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    """Project ``x_adv`` onto the eps ball around ``x`` intersected with the [0, 1] box.

    Clamping to [0, 1] after the ball projection never leaves the ball: every coordinate of
    ``x`` is in [0, 1], so the clamp only shrinks |delta| coordinate-wise.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        d_norm = delta.flatten(1).norm(dim=1)  # (B,)
        factor = (eps / d_norm.clamp_min(1e-12)).clamp(max=1.0)  # (B,)
        delta = delta * _per_sample_view(factor, delta)
    return (x + delta).clamp(0.0, 1.0)


def _rand(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) noise drawn on the generator's device, then moved next to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.rand(tuple(shape), generator=generator, device=device).to(like)


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device).to(like)


def _random_start(x: Tensor, norm: str, eps: float, generator: torch.Generator | None) -> Tensor:
    """A uniform sample from the eps ball around ``x`` (Madry et al. 2018), clamped to [0, 1]."""
    if norm == "linf":
        delta = (2.0 * _rand(x.shape, generator, x) - 1.0) * eps
    else:
        # Uniform in the L2 ball: isotropic direction, radius eps * U^(1/D).
        direction = _randn(x.shape, generator, x)
        direction = direction / _per_sample_view(direction.flatten(1).norm(dim=1), x)
        dim = x[0].numel()
        radius = eps * _rand((x.shape[0],), generator, x) ** (1.0 / dim)  # (B,)
        delta = direction * _per_sample_view(radius, x)
    return (x + delta).clamp(0.0, 1.0)


def _validate_attack_args(
    x: Tensor, y: Tensor, norm: str, eps: float, steps: int, eot: int, loss: str
) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {list(NORMS)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eot < 1:
        raise ValueError(f"eot must be >= 1, got {eot}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    _validate_inputs(x, y)


def _validate_inputs(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected x of shape (B, ...) and y of shape (B,), got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1]; normalisation belongs inside the pipeline")


def eot_grad(
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    eot: int = 1,
    loss: str = "ce",
    targeted: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Expectation-over-Transformation estimate of the input gradient of the attack objective.

    The objective is the per-sample ``loss`` (summed over the batch, so each sample's gradient
    does not depend on the batch size), negated when ``targeted`` (then ``y`` holds the target
    classes). Athalye et al. (2018, Sec. 4): for a randomised pipeline f, ascend
    E_r[L(f_r(x))], estimated by averaging ``eot`` independent forward/backward passes. The
    passes run one after another and only the running sum of gradients is kept, so memory is
    that of a single pass.

    Args:
        model: Pipeline from images in [0, 1] to logits; fresh randomness on every call.
        x: Points to differentiate at, (B, C, H, W).
        y: True labels (untargeted) or target labels (targeted), (B,).
        eot: Number of independent passes to average.
        loss: Key of :data:`LOSSES`.
        targeted: Descend the loss towards ``y`` instead of ascending it away from ``y``.

    Returns:
        The averaged gradient (B, C, H, W), the averaged objective (B,) and the averaged
        softmax probabilities (B, K), all detached.
    """
    if eot < 1:
        raise ValueError(f"eot must be >= 1, got {eot}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    loss_fn = LOSSES[loss]
    sign = -1.0 if targeted else 1.0
    grad_sum = torch.zeros_like(x)
    obj_sum = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    prob_sum: Tensor | None = None
    with torch.enable_grad():
        for _ in range(eot):
            x_req = x.detach().requires_grad_(True)
            logits = model(x_req)  # (B, K)
            obj = sign * loss_fn(logits, y)  # (B,)
            (grad,) = torch.autograd.grad(obj.sum(), x_req)
            grad_sum += grad
            obj_sum += obj.detach()
            probs = logits.detach().softmax(dim=1)
            prob_sum = probs if prob_sum is None else prob_sum + probs
    assert prob_sum is not None
    return grad_sum / eot, obj_sum / eot, prob_sum / eot


@torch.no_grad()
def _eot_objective(
    model: Pipeline, x: Tensor, y: Tensor, eot: int, loss: str, targeted: bool
) -> tuple[Tensor, Tensor]:
    """Averaged objective (B,) and softmax probabilities (B, K) without gradients."""
    sign = -1.0 if targeted else 1.0
    obj_sum = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    prob_sum: Tensor | None = None
    for _ in range(eot):
        logits = model(x)
        obj_sum += sign * LOSSES[loss](logits, y)
        probs = logits.softmax(dim=1)
        prob_sum = probs if prob_sum is None else prob_sum + probs
    assert prob_sum is not None
    return obj_sum / eot, prob_sum / eot


def pgd(
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    step_size: float | None = None,
    steps: int = 20,
    eot: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss: str = "ce",
    targeted: bool = False,
    keep: str = "best",
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Projected gradient ascent (Madry et al. 2018) with EOT gradients, inputs kept in [0, 1].

    Linf steps move by ``step_size * sign(g)`` and clip to the eps box; L2 steps move by
    ``step_size * g / ||g||_2`` and rescale onto the L2 ball. ``g`` is the EOT gradient from
    :func:`eot_grad`, so one step costs ``eot`` forward/backward passes of the pipeline.

    With ``keep="best"`` (default) the returned point is, per sample, the worst case among all
    visited iterates: the first preference is an iterate the EOT-averaged prediction gets wrong
    (right, for targeted attacks), the second a higher averaged objective. Scoring the final
    iterate costs ``eot`` extra forward passes, so the attack makes ``(steps + 1) * eot``
    pipeline calls, ``steps * eot`` of them with a backward pass. ``keep="last"`` returns the
    last iterate and makes ``steps * eot`` calls.

    Args:
        model: Pipeline from images in [0, 1] to logits (normalisation and purifier inside).
        x: Clean images in [0, 1], (B, C, H, W).
        y: True labels, or target labels when ``targeted``, (B,).
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the threat model; 0 returns a copy of ``x`` without calling the model.
        step_size: Step length; defaults to 2.5 * eps / steps, the rule of Madry et al. (2018)
            that lets the iterate cross the ball ~2.5 times.
        steps: Number of gradient steps.
        eot: Forward/backward passes averaged per step (>= 20 for diffusion purifiers, §4.3).
        random_start: Start from a uniform sample of the eps ball instead of ``x``.
        generator: Randomness of the random start (the pipeline keeps its own).
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner logit margin).
        targeted: Push predictions towards ``y`` instead of away from it.
        keep: ``"best"`` (per-sample worst case over iterates) or ``"last"``.
        on_step: Called after each gradient step (progress of long attacks).

    Returns:
        Adversarial images (B, C, H, W) in [0, 1] within the eps ball around ``x``, detached.
    """
    _validate_attack_args(x, y, norm, eps, steps, eot, loss)
    if keep not in KEEP:
        raise ValueError(f"unknown keep {keep!r}; choose from {list(KEEP)}")
    if step_size is not None and step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size

    x_adv = _random_start(x, norm, eps, generator) if random_start else x.clone()
    best_x = x_adv.clone()
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_obj = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)

    def track(point: Tensor, obj: Tensor, probs: Tensor) -> None:
        pred = probs.argmax(dim=1)  # (B,)
        fooled = pred == y if targeted else pred != y  # (B,)
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (obj > best_obj))  # (B,)
        best_x[better] = point[better]
        best_fooled[better] = fooled[better]
        best_obj[better] = obj[better]

    for _ in range(steps):
        grad, obj, probs = eot_grad(model, x_adv, y, eot=eot, loss=loss, targeted=targeted)
        if keep == "best":
            track(x_adv, obj, probs)
        if norm == "linf":
            step = alpha * grad.sign()
        else:
            g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
            step = alpha * grad / _per_sample_view(g_norm, grad)
        x_adv = _project(x_adv + step, x, norm, eps)
        if on_step is not None:
            on_step()

    if keep == "last":
        return x_adv.detach()
    obj, probs = _eot_objective(model, x_adv, y, eot, loss, targeted)
    track(x_adv, obj, probs)
    return best_x.detach()


@torch.no_grad()
def random_search(
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    queries: int = 100,
    p_init: float = 0.3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score-based black-box random search, a simplified Square Attack (Andriushchenko et al. 2020).

    Keeps one perturbation per sample and proposes changes in a random square window whose
    area shrinks with the Square Attack schedule (Sec. 3.1); a proposal is accepted when it
    lowers the logit margin z_y - max_{j != y} z_j. Linf proposals set the window to +-eps per
    channel (the vertices of the box, Sec. 3.2); L2 proposals add Gaussian noise in the window
    and rescale the whole perturbation onto the eps sphere. Only model outputs are used, so
    gradient masking cannot hide adversarial examples from it: if it beats :func:`pgd`, the
    gradients are unreliable. Each query is one pipeline call per image.

    Args:
        model: Pipeline from images in [0, 1] to logits.
        x: Clean images in [0, 1], (B, C, H, W).
        y: True labels, (B,).
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the threat model.
        queries: Pipeline calls per image (the initial point counts as one).
        p_init: Initial fraction of pixels in the window.
        generator: Randomness of the proposals.

    Returns:
        Images (B, C, H, W) in [0, 1] within the eps ball around ``x``.
    """
    _validate_attack_args(x, y, norm, eps, 1, 1, "margin")
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    b, c, h, w = x.shape

    # Square Attack initialisation: vertical stripes of +-eps (Linf), a random point on the
    # sphere (L2).
    if norm == "linf":
        delta = eps * (2.0 * (_rand((b, c, 1, w), generator, x) > 0.5).to(x) - 1.0)
        delta = delta.expand(b, c, h, w).clone()
    else:
        delta = _randn(x.shape, generator, x)
        delta = eps * delta / _per_sample_view(delta.flatten(1).norm(dim=1), x)
    x_best = _project(x + delta, x, norm, eps)
    delta = x_best - x
    margin_best = _margin(model(x_best), y)  # (B,)

    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    # Iterations (out of 10,000) at which the window area halves (Square Attack, App. A).
    halvings = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    for i in range(1, queries):
        progress = int(i / queries * 10_000)
        p = p_init / 2 ** sum(progress > t for t in halvings)
        side = max(1, min(h, w, round(math.sqrt(p * h * w))))
        top = (_rand((b,), generator, x) * (h - side + 1)).long().clamp(max=h - side)  # (B,)
        left = (_rand((b,), generator, x) * (w - side + 1)).long().clamp(max=w - side)
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)  # (B, H)
        in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)  # (B, W)
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(x)  # (B, 1, H, W)
        if norm == "linf":
            signs = 2.0 * (_rand((b, c, 1, 1), generator, x) > 0.5).to(x) - 1.0
            proposal = delta * (1 - window) + eps * signs * window
        else:
            proposal = delta + window * _randn(x.shape, generator, x) * eps / side
            p_norm = proposal.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
            proposal = eps * proposal / _per_sample_view(p_norm, x)
        x_new = _project(x + proposal, x, norm, eps)
        margin_new = _margin(model(x_new), y)
        # Stop moving samples that are already misclassified.
        accept = (margin_new < margin_best) & (margin_best > 0)  # (B,)
        x_best[accept] = x_new[accept]
        delta[accept] = (x_new - x)[accept]
        margin_best[accept] = margin_new[accept]
    return x_best


@torch.no_grad()
def rescore(model: Pipeline, x_adv: Tensor, y: Tensor, draws: int = 1) -> dict[str, Any]:
    """Score fixed (adversarial) inputs over independent calls of a stochastic pipeline.

    An adversarial example found against one purification may fail against
    the next, so each final example is classified ``draws`` times, each call drawing fresh
    randomness. The mean accuracy is the expected accuracy of the deployed pipeline; the
    worst-case accuracy counts a sample as robust only if it is correct in every draw.

    Args:
        model: Pipeline from images in [0, 1] to logits.
        x_adv: Inputs to score, (B, C, H, W).
        y: True labels, (B,).
        draws: Independent calls of the pipeline.

    Returns:
        ``correct``: bool (draws, B); ``acc``: mean accuracy over draws and samples;
        ``acc_worst``: fraction of samples correct in all draws; ``acc_per_draw``: (draws,).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    correct = torch.stack([model(x_adv).argmax(dim=1) == y for _ in range(draws)])  # (draws, B)
    return {
        "correct": correct,
        "acc": correct.float().mean().item(),
        "acc_worst": correct.all(dim=0).float().mean().item(),
        "acc_per_draw": correct.float().mean(dim=1),
    }


def _batches(
    data: tuple[Tensor, Tensor] | Iterable[Sequence[Tensor]], batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x_all, y_all = data
        assert isinstance(x_all, Tensor) and isinstance(y_all, Tensor)
        for start in range(0, x_all.shape[0], batch_size):
            yield x_all[start : start + batch_size], y_all[start : start + batch_size]
    else:
        for batch in data:
            yield batch[0], batch[1]


def robust_accuracy_steps(n_images: int, batch_size: int, steps: int) -> int:
    """How many PGD steps :func:`robust_accuracy` makes on ``n_images`` given as a pair of
    tensors (its ``on_step`` calls): ``steps`` for each chunk of ``batch_size``."""
    return steps * math.ceil(n_images / batch_size)


def robust_accuracy(
    model: Pipeline,
    data: tuple[Tensor, Tensor] | Iterable[Sequence[Tensor]],
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 20,
    eot: int = 1,
    rescore_draws: int = 1,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss: str = "ce",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    nfe_per_call: int = 1,
    on_step: Callable[[], None] | None = None,
    examples: int = 0,
) -> dict[str, Any]:
    """PGD-EOT robust accuracy with re-scoring, over batches, with its cost.

    Args:
        model: Pipeline from images in [0, 1] to logits.
        data: ``(x, y)`` tensors (split into ``batch_size`` chunks) or an iterable of
            ``(x, y, ...)`` batches such as a DataLoader.
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the threat model.
        steps: PGD steps.
        eot: Gradient passes averaged per PGD step.
        rescore_draws: Independent pipeline calls used to score clean and adversarial inputs.
        step_size: PGD step length (default 2.5 * eps / steps).
        random_start: PGD random start.
        generator: Randomness of the random starts.
        loss: PGD objective, a key of :data:`LOSSES`.
        batch_size: Chunk size when ``data`` is a pair of tensors.
        device: Where to move batches; default leaves them where they are.
        nfe_per_call: Network evaluations inside one pipeline call (e.g. the purifier's
            denoiser calls + 1 for the classifier), to report the attack's NFE per image.
        on_step: Called after each PGD step of each batch (:func:`robust_accuracy_steps`
            calls for a pair of tensors), for progress.
        examples: Also return the first ``examples`` adversarial examples (for a figure).

    Returns:
        ``acc`` (mean over draws), ``acc_worst`` (correct in all draws), ``clean_acc``,
        ``clean_acc_worst``, ``n``, ``attack_calls_per_image`` (pipeline calls made by the
        attack), ``attack_grad_calls_per_image`` (those with a backward pass),
        ``attack_nfe_per_image``, ``attack_wall_s`` and ``wall_s`` (attack + scoring); with
        ``examples``, ``x_adv``: the first ``examples`` adversarial examples, float32 on the CPU.
    """
    if rescore_draws < 1:
        raise ValueError(f"rescore_draws must be >= 1, got {rescore_draws}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    counts = {"calls": 0, "grad_calls": 0}

    def counted(inp: Tensor) -> Tensor:
        counts["calls"] += inp.shape[0]
        if torch.is_grad_enabled() and inp.requires_grad:
            counts["grad_calls"] += inp.shape[0]
        return model(inp)

    n = 0
    sums = {"acc": 0.0, "acc_worst": 0.0, "clean_acc": 0.0, "clean_acc_worst": 0.0}
    attack_wall = 0.0
    kept: list[Tensor] = []
    start = time.perf_counter()
    for x, y in _batches(data, batch_size):
        if device is not None:
            x, y = x.to(device), y.to(device)
        b = x.shape[0]
        clean = rescore(model, x, y, rescore_draws)
        sync(x.device)
        t0 = time.perf_counter()
        x_adv = pgd(
            counted,
            x,
            y,
            norm=norm,
            eps=eps,
            step_size=step_size,
            steps=steps,
            eot=eot,
            random_start=random_start,
            generator=generator,
            loss=loss,
            on_step=on_step,
        )
        sync(x.device)
        attack_wall += time.perf_counter() - t0
        if n < examples:
            kept.append(x_adv[: examples - n].detach().float().cpu())
        adv = rescore(model, x_adv, y, rescore_draws)
        sums["acc"] += adv["acc"] * b
        sums["acc_worst"] += adv["acc_worst"] * b
        sums["clean_acc"] += clean["acc"] * b
        sums["clean_acc_worst"] += clean["acc_worst"] * b
        n += b
    if n == 0:
        raise ValueError("data holds no samples")
    calls = counts["calls"] / n
    return {
        **{k: v / n for k, v in sums.items()},
        "n": float(n),
        "attack_calls_per_image": calls,
        "attack_grad_calls_per_image": counts["grad_calls"] / n,
        "attack_nfe_per_image": calls * nfe_per_call,
        "attack_wall_s": attack_wall,
        "wall_s": time.perf_counter() - start,
    } | ({"x_adv": torch.cat(kept)} if examples > 0 else {})


def autoattack(
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    version: str = "standard",
    batch_size: int = 250,
    attacks: list[str] | None = None,
    seed: int = 0,
) -> Tensor:
    """AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package.

    Only for deterministic pipelines: APGD, FAB and Square assume the same input always gives
    the same logits, and a stochastic purifier makes them report inflated robustness. A
    pipeline whose outputs differ between two calls is refused unless ``version="rand"``
    (APGD with 20 EOT passes and no re-scoring); prefer :func:`pgd` with EOT plus
    :func:`rescore` for stochastic pipelines.

    Targeted APGD and FAB try min(9, K - 1) target classes so that K < 10 works; APGD with the
    targeted DLR loss needs K >= 4 and the untargeted one K >= 3, and L2 Square images of at
    least 5 x 5 pixels; attacks that cannot run are dropped.

    Args:
        model: Deterministic pipeline from images in [0, 1] to logits.
        x: Clean images in [0, 1], (B, C, H, W).
        y: True labels, (B,).
        norm: ``"linf"`` or ``"l2"``.
        eps: Radius of the threat model.
        version: ``"standard"``, ``"plus"``, ``"rand"`` or ``"custom"`` (then ``attacks``
            names the attacks, from ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``,
            ``square``).
        batch_size: Samples per attack batch.
        attacks: Attacks for ``version="custom"``.
        seed: Seed of AutoAttack's random restarts.

    Returns:
        Adversarial images (B, C, H, W); samples AutoAttack could not break are returned clean.

    Raises:
        ImportError: ``pyautoattack`` is not installed.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise ImportError(
            "autoattack() needs the AutoAttack package: `pip install pyautoattack`"
        ) from err
    if norm not in _AA_NORM:
        raise ValueError(f"unknown norm {norm!r}; choose from {list(NORMS)}")
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose from {list(AUTOATTACK_VERSIONS)}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("pass `attacks` exactly when version='custom'")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _validate_inputs(x, y)
    x = x.detach()
    with torch.no_grad():
        probe = x[:batch_size]
        out_a, out_b = model(probe), model(probe)
    if version != "rand" and not torch.equal(out_a, out_b):
        raise ValueError(
            "the pipeline is stochastic (two calls gave different logits); use pgd(..., eot=...) "
            "with rescore(), or version='rand'"
        )
    if eps == 0:
        return x.clone()
    adversary = AutoAttack(
        model,  # type: ignore[arg-type]  # any callable works; the type hint says nn.Module
        norm=_AA_NORM[norm],
        eps=eps,
        version=version,
        attacks=attacks,  # type: ignore[arg-type]
        seed=seed,
        device=x.device,
    )
    n_classes = out_a.shape[1]
    n_targets = min(9, n_classes - 1)
    adversary.apgd_targeted.n_target_classes = n_targets
    adversary.fab.n_target_classes = n_targets
    # The DLR losses divide by z_(1) - z_(3) (untargeted) and z_(1) - (z_(3) + z_(4)) / 2
    # (targeted) (Croce & Hein 2020, Eqs. 5 and 7), so they need 3 and 4 classes.
    unusable = {"apgd-t"} if n_classes < 4 else set()
    if n_classes < 3:
        unusable.add("apgd-dlr")
    # L2 Square initialises with 5 x 5 tiles of squares of side H // 5 (Andriushchenko et al.
    # 2020, Sec. 4), which is 0 below 5 pixels.
    if norm == "l2" and min(x.shape[-2:]) < 5:
        unusable.add("square")
    adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a not in unusable]
    # pyautoattack's dynamic-defence check calls sys.settrace(None), which would switch off
    # whatever tracer was installed (coverage, a debugger): put it back afterwards.
    tracer = sys.gettrace()
    try:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        sys.settrace(tracer)
    return x_adv.detach()


def _acc(model: Pipeline, x_adv: Tensor, y: Tensor, draws: int) -> float:
    return float(rescore(model, x_adv, y, draws)["acc"])


def sanity_attack_costs(
    n_eps: int,
    steps: int,
    eot: int,
    rescore_draws: int = 1,
    steps_factor: int = 2,
    eot_factor: int = 2,
    black_box_queries: int | None = None,
    eot_check: bool = True,
) -> list[int]:
    """The cost of each attack :func:`sanity_checks` runs, in its order, in pipeline passes
    per image (a pass with a backward counts as 3, the backward costing about two forwards):
    PGD at each of the ``n_eps`` radii, at the large radius, with more steps and (with
    ``eot_check``) with more EOT (each re-scored); black-box at each radius (re-scored); the
    gradients. Progress in these units makes a time-left estimate hold across attacks of
    different budgets."""
    queries = _black_box_budget(black_box_queries, steps, eot)

    def pgd_cost(n_steps: int, n_eot: int) -> int:
        # A step per EOT pass, the final EOT objective (pgd keeps the best iterate), re-scoring.
        return (3 * n_steps + 1) * n_eot + rescore_draws

    return [
        *[pgd_cost(steps, eot)] * (n_eps + 1),
        pgd_cost(steps * steps_factor, eot),
        *([pgd_cost(steps, eot * eot_factor)] if eot_check else []),
        *[queries + rescore_draws] * n_eps,
        3 * eot,
    ]


def _black_box_budget(queries: int | None, steps: int, eot: int) -> int:
    """Queries per image of the black-box check: as given, else max(100, steps * eot)."""
    return queries if queries is not None else max(100, steps * eot)


def sanity_checks(
    model: Pipeline,
    x: Tensor,
    y: Tensor,
    norm: str = "linf",
    eps_grid: Sequence[float] = (2 / 255, 4 / 255, 8 / 255, 16 / 255),
    steps: int = 20,
    eot: int = 1,
    rescore_draws: int = 1,
    steps_factor: int = 2,
    eot_factor: int = 2,
    large_eps: float | None = None,
    large_eps_max_acc: float = 0.05,
    tol: float = 0.02,
    black_box_queries: int | None = None,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    on_attack: Callable[[int, str], None] | None = None,
    random_start: bool = True,
    eot_check: bool = True,
) -> dict[str, dict[str, Any]]:
    """Sanity checks (Carlini et al. 2019) against gradient masking and weak attacks.

    Checks (each ``{"passed": bool, "values": ...}``):

    - ``eps_monotone``: PGD accuracy never rises (beyond ``tol``) along the sorted ``eps_grid``.
    - ``large_eps``: at ``large_eps`` (default: the whole [0, 1] box, eps = 1 for Linf and
      sqrt(D) for L2, where any image can be reached) accuracy is at most ``large_eps_max_acc``.
    - ``more_steps`` / ``more_eot``: ``steps_factor`` times the steps, or ``eot_factor``
      times the EOT passes, never raise accuracy by more than ``tol``. They run at the grid
      eps whose accuracy is closest to half the clean accuracy, where a stronger attack has
      room to show. ``more_eot`` runs only with ``eot_check``: a deterministic pipeline
      gives every EOT pass the same gradient, so more of them cannot change the attack.
    - ``black_box``: at every grid eps, :func:`random_search` with ``black_box_queries``
      pipeline calls per image (default max(100, steps * eot), the white-box budget's order)
      does not reach an accuracy lower than PGD's by more than ``tol``.
    - ``nonzero_gradients``: no sample has an all-zero input gradient of the logit margin
      (Athalye et al. 2018, shattered gradients; AutoAttack's ``check_zero_gradients``).

    All PGD runs share one random-start seed, so for a deterministic pipeline the comparisons
    differ only in the quantity varied. For a stochastic pipeline set ``tol`` to about twice
    the standard error of an accuracy estimate, sqrt(acc * (1 - acc) / (B * rescore_draws)).

    Args:
        model: Pipeline from images in [0, 1] to logits.
        x: Clean images in [0, 1], (B, C, H, W); a few hundred suffice.
        y: True labels, (B,).
        norm: ``"linf"`` or ``"l2"``.
        eps_grid: Radii to sweep (positive).
        steps: Baseline PGD steps.
        eot: Baseline EOT passes.
        rescore_draws: Pipeline calls used to score each adversarial example.
        steps_factor: Multiplier of ``steps`` in the ``more_steps`` check.
        eot_factor: Multiplier of ``eot`` in the ``more_eot`` check.
        large_eps: Radius of the ``large_eps`` check.
        large_eps_max_acc: Highest accuracy that counts as ~0 at ``large_eps``.
        tol: Slack for the comparisons.
        black_box_queries: Query budget of the black-box attack.
        loss: PGD objective.
        generator: Source of the shared random-start seed and of the black-box proposals.
        on_attack: Called as ``on_attack(i, what)`` before each attack (``i`` of them
            done), for progress; :func:`sanity_attack_costs` lists them with their costs.
        random_start: Whether every PGD run starts from a random point of its ball (as the
            attack being checked does). The step size is always PGD's default rule,
            2.5 * eps / steps, so that it fits every radius and step count swept.
        eot_check: Run the ``more_eot`` check (False for a deterministic pipeline, where it
            would repeat the baseline attack).

    Returns:
        Mapping from check name to ``{"passed": bool, "values": ...}``.
    """
    _validate_attack_args(x, y, norm, 1.0, steps, eot, loss)
    grid = sorted(float(e) for e in eps_grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"eps_grid must hold positive radii, got {list(eps_grid)}")
    if steps_factor < 2 or eot_factor < 2:
        raise ValueError("steps_factor and eot_factor must be >= 2")
    if large_eps is None:
        large_eps = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    queries = _black_box_budget(black_box_queries, steps, eot)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())

    done = [0]

    def starting(what: str) -> None:
        if on_attack is not None:
            on_attack(done[0], what)
        done[0] += 1

    def attack(eps: float, n_steps: int, n_eot: int) -> float:
        starting(f"PGD eps {eps:.4g}, {n_steps} steps, EOT {n_eot}")
        gen = torch.Generator().manual_seed(seed)
        x_adv = pgd(
            model,
            x,
            y,
            norm=norm,
            eps=eps,
            steps=n_steps,
            eot=n_eot,
            generator=gen,
            loss=loss,
            random_start=random_start,
        )
        return _acc(model, x_adv, y, rescore_draws)

    clean = _acc(model, x, y, rescore_draws)
    accs = [attack(e, steps, eot) for e in grid]
    checks: dict[str, dict[str, Any]] = {}
    curve = [clean, *accs]
    checks["eps_monotone"] = {
        "passed": all(b <= a + tol for a, b in itertools.pairwise(curve)),
        "values": {"eps": [0.0, *grid], "acc": curve},
    }
    acc_large = attack(large_eps, steps, eot)
    checks["large_eps"] = {
        "passed": acc_large <= large_eps_max_acc,
        "values": {"eps": large_eps, "acc": acc_large},
    }
    ref = min(range(len(grid)), key=lambda i: abs(accs[i] - clean / 2))
    eps_ref = grid[ref]
    acc_steps = attack(eps_ref, steps * steps_factor, eot)
    checks["more_steps"] = {
        "passed": acc_steps <= accs[ref] + tol,
        "values": {
            "eps": eps_ref,
            "steps": [steps, steps * steps_factor],
            "acc": [accs[ref], acc_steps],
        },
    }
    if eot_check:
        acc_eot = attack(eps_ref, steps, eot * eot_factor)
        checks["more_eot"] = {
            "passed": acc_eot <= accs[ref] + tol,
            "values": {
                "eps": eps_ref,
                "eot": [eot, eot * eot_factor],
                "acc": [accs[ref], acc_eot],
            },
        }
    bb_gen = torch.Generator().manual_seed(seed + 1)

    def black_box(eps: float) -> float:
        starting(f"black-box eps {eps:.4g}, {queries} queries")
        x_bb = random_search(model, x, y, norm, eps, queries, generator=bb_gen)
        return _acc(model, x_bb, y, rescore_draws)

    black = [black_box(e) for e in grid]
    checks["black_box"] = {
        "passed": all(w <= b + tol for w, b in zip(accs, black)),
        "values": {"eps": grid, "white_box_acc": accs, "black_box_acc": black, "queries": queries},
    }
    # The margin's gradient does not vanish when the softmax saturates, unlike the CE's, so a
    # zero here is the pipeline's doing.
    starting("gradients")
    grad, _, _ = eot_grad(model, x, y, eot=eot, loss="margin")
    zero = (grad.flatten(1).abs().sum(dim=1) == 0).float().mean().item()
    checks["nonzero_gradients"] = {"passed": zero == 0.0, "values": {"zero_grad_fraction": zero}}
    return checks
