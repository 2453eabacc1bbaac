"""Certified L2 robustness by randomized smoothing.

The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), is robust
within an L2 ball of radius sigma * Phi^-1(p_A) around x, where p_A is the probability of its
top class (Cohen et al. 2019, Theorem 1). ``certify`` is their CERTIFY procedure: guess the top
class from ``n0`` noisy samples, then lower-bound p_A from ``n`` fresh ones with a one-sided
Clopper-Pearson bound at level 1 - ``alpha``; abstain when that bound is not above 1/2. With
probability at least 1 - alpha over the sampling, a returned class is g(x) and g is constant
within the returned radius.

Behind a diffusion purifier the pipeline is itself a smoothed classifier: diffusing x to t* is
sqrt(abar) (2 (x + sigma eps) - 1) with sigma = sqrt((1 - abar) / abar) / 2 on [0, 1] images,
so the purifier's own noise is the smoothing noise (denoised smoothing, Carlini et al. 2023).
Extra randomness inside f (a DDPM reverse pass) keeps the certificate valid: the bound holds
for the soft classifier E[1{f(.) = c}] (Salman et al. 2019, Lemma 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ABSTAIN",
    "certified_accuracy",
    "certify",
    "lower_confidence_bound",
    "sample_counts",
    "top_classes",
]

ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - ``alpha``) Clopper-Pearson lower bound on a binomial proportion seen as
    ``k`` successes in ``n`` trials (scipy's beta quantile; 0 when k = 0)."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


@torch.no_grad()
def sample_counts(
    noisy_predict: Callable[[Tensor], Tensor],
    x: Tensor,
    num: int,
    num_classes: int,
    batch_size: int,
) -> Tensor:
    """How often each class wins over ``num`` noisy predictions of one image.

    Args:
        noisy_predict: Logits of one noise draw per row of a batch of clean images (the
            function adds the noise).
        x: One image, (C, H, W).
        num: Noise draws.
        num_classes: K.
        batch_size: Draws per call.

    Returns:
        Counts (K,), summing to ``num``.
    """
    counts = torch.zeros(num_classes, dtype=torch.long)
    done = 0
    while done < num:
        b = min(batch_size, num - done)
        pred = noisy_predict(x[None].expand(b, *x.shape)).argmax(1).cpu()
        counts += torch.bincount(pred, minlength=num_classes)[:num_classes]
        done += b
    return counts


@torch.no_grad()
def top_classes(
    noisy_predict: Callable[[Tensor], Tensor],
    x: Tensor,
    num: int,
    num_classes: int,
) -> Tensor:
    """The class that wins most often over ``num`` noisy predictions of each image (ties: the
    lowest class), every image's draws in one call: ``len(x) * num`` rows.

    Args:
        noisy_predict: As in :func:`sample_counts`.
        x: Images (N, C, H, W).
        num: Noise draws per image.
        num_classes: K.

    Returns:
        Classes (N,).
    """
    pred = noisy_predict(x.repeat_interleave(num, dim=0)).argmax(1).cpu()
    image = torch.arange(len(x)).repeat_interleave(num)
    counts = torch.bincount(image * num_classes + pred, minlength=len(x) * num_classes)
    return counts.view(len(x), num_classes).argmax(1)


def certify(
    noisy_predict: Callable[[Tensor], Tensor],
    x: Tensor,
    num_classes: int,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    on_image: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """CERTIFY (Cohen et al. 2019, Algorithm) for every image of a batch.

    Args:
        noisy_predict: The base classifier under noise: logits of one N(0, sigma^2) draw per
            row of a batch of clean images in [0, 1].
        x: Images, (N, C, H, W).
        num_classes: K.
        sigma: The noise std the base classifier draws with, on [0, 1] images.
        n0: Draws to guess the top class.
        n: Draws to bound its probability.
        alpha: Failure probability of each certificate.
        batch_size: Draws per call of ``noisy_predict``.
        on_image: Called after each image, for progress.

    Returns:
        ``pred`` (N,): the smoothed classifier's class, or :data:`ABSTAIN`; ``radius`` (N,):
        the certified L2 radius on [0, 1] images (0 where it abstains).

    The ``n0`` guessing draws of several images share a call (as many images as fit in
    ``batch_size``): with the usual n0 = 100 against batches of 1000, one call instead of ten
    small ones. Every draw is still independent, so the guarantee is unchanged.
    """
    from scipy.stats import norm

    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be >= 1, got n0={n0}, n={n}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    preds, radii = [], []
    per_call = max(1, batch_size // n0)  # images whose guessing draws fit in one call
    guesses = torch.empty(0, dtype=torch.long)
    for i, image in enumerate(x):
        if i % per_call == 0:
            chunk = x[i : i + per_call]
            if n0 <= batch_size:
                guesses = top_classes(noisy_predict, chunk, n0, num_classes)
            else:  # one image's guessing draws take several calls
                guesses = sample_counts(noisy_predict, image, n0, num_classes, batch_size)
                guesses = guesses.argmax().view(1)
        guess = int(guesses[i % per_call])
        k = int(sample_counts(noisy_predict, image, n, num_classes, batch_size)[guess])
        p_lower = lower_confidence_bound(k, n, alpha)
        if p_lower > 0.5:
            preds.append(guess)
            radii.append(sigma * float(norm.ppf(p_lower)))
        else:
            preds.append(ABSTAIN)
            radii.append(0.0)
        if on_image is not None:
            on_image()
    return torch.tensor(preds, dtype=torch.long), torch.tensor(radii, dtype=torch.float64)


def certified_accuracy(
    pred: Tensor, radius: Tensor, labels: Tensor, radii: Sequence[float]
) -> dict[float, float]:
    """The fraction of images classified right with a certified radius of at least r, per r
    (r = 0: the smoothed classifier's accuracy, abstentions counted wrong)."""
    right = pred.cpu() == labels.cpu()
    return {float(r): (right & (radius.cpu() >= r)).double().mean().item() for r in radii}
