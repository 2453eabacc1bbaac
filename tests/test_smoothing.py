"""Randomized smoothing: the Clopper-Pearson bound, and CERTIFY against the exact radius of a
smoothed linear classifier (its certified radius is the distance to the hyperplane)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ssl_robust.evaluate.smoothing import (
    ABSTAIN,
    certified_accuracy,
    certify,
    lower_confidence_bound,
    sample_counts,
    top_classes,
)


def test_clopper_pearson_known_answers() -> None:
    # k = n: the bound solves p^n = alpha.
    assert lower_confidence_bound(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))
    # k = 1: 1 - (1 - p)^n = alpha.
    assert lower_confidence_bound(1, 20, 0.01) == pytest.approx(1 - 0.99 ** (1 / 20))
    assert lower_confidence_bound(0, 50, 0.01) == 0.0
    # Coverage: over many binomial draws, the bound is above the true p at most alpha of times.
    gen = torch.Generator().manual_seed(0)
    p, n, alpha = 0.7, 200, 0.05
    ks = torch.binomial(torch.full((2000,), float(n)), torch.full((2000,), p), generator=gen)
    misses = sum(lower_confidence_bound(int(k), n, alpha) > p for k in ks)
    assert misses / 2000 <= alpha
    with pytest.raises(ValueError, match="0 <= k <= n"):
        lower_confidence_bound(5, 4, 0.1)


def _linear(gen: torch.Generator, sigma: float):  # type: ignore[no-untyped-def]
    """Two classes split by the hyperplane w.x = 2 through the grey image (||w|| = 1), under
    N(0, sigma^2) noise drawn from ``gen``."""
    w = torch.full((16,), 0.25)

    def noisy_predict(x: Tensor) -> Tensor:
        z = x + sigma * torch.randn(x.shape, generator=gen)
        score = z.flatten(1) @ w - 2.0
        return torch.stack([-score, score], dim=1)

    return w, noisy_predict


def test_certify_recovers_the_distance_to_a_linear_boundary() -> None:
    sigma, n, alpha = 0.5, 20_000, 0.001
    gen = torch.Generator().manual_seed(0)
    w, noisy_predict = _linear(gen, sigma)
    distances = [0.6, 0.25, 0.0, -0.4]  # signed: which side of the hyperplane
    x = torch.stack([(0.5 + d * w).view(1, 4, 4) for d in distances])
    calls = []
    pred, radius = certify(
        noisy_predict, x, 2, sigma, n0=100, n=n, alpha=alpha, batch_size=4096,
        on_image=lambda: calls.append(1),
    )  # fmt: skip
    assert len(calls) == 4
    assert pred.tolist() == [1, 1, ABSTAIN, 0]
    assert radius[2] == 0.0
    # A lower bound on the exact radius |d| = sigma Phi^-1(p_A), below it by the bound's
    # z_alpha = 3.09 standard errors of p_A plus up to 3 of sampling noise, mapped through
    # d(sigma Phi^-1)/dp = sigma / phi(|d| / sigma).
    for r, d in zip(radius.tolist(), distances, strict=True):
        if d == 0:
            continue
        t = abs(d) / sigma
        p = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        density = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        slack = sigma * (3.09 + 3) * math.sqrt(p * (1 - p) / n) / density
        assert abs(d) - slack < r <= abs(d), (r, d, slack)


def test_guessing_draws_of_several_images_share_a_call() -> None:
    # A base classifier that answers with the image's first pixel (0, 1 or 2) as its class,
    # except on every fourth call row: class 2 (noise that flips some draws).
    calls: list[int] = []

    def noisy_predict(b: torch.Tensor) -> torch.Tensor:
        calls.append(len(b))
        cls = b.flatten(1)[:, 0].long()
        cls[::4] = 2
        return torch.eye(3)[cls]

    x = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0]).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    assert top_classes(noisy_predict, x, 8, 3).tolist() == [0, 1, 2, 1, 0]
    assert calls == [40]
    # certify: n0 = 8 draws of 4 images per call of 32, then n = 64 per image in calls of 32.
    calls.clear()
    pred, _ = certify(noisy_predict, x, 3, 0.25, n0=8, n=64, alpha=0.01, batch_size=32)
    assert calls == [32, 32, 32, 32, 32, 32, 32, 32, 32, 8, 32, 32]
    # Each image's true class wins its 64 draws (3 of 4 rows), so the class is certified.
    assert pred.tolist() == [0, 1, 2, 1, 0]
    # More guessing draws than a call holds: one image at a time, over several calls.
    calls.clear()
    certify(noisy_predict, x[:1], 3, 0.25, n0=40, n=32, alpha=0.01, batch_size=32)
    assert calls == [32, 8, 32]


def test_sample_counts_and_certified_accuracy() -> None:
    counts = sample_counts(lambda b: torch.eye(3)[[2] * len(b)], torch.zeros(1, 2, 2), 10, 3, 4)
    assert counts.tolist() == [0, 0, 10]
    pred = torch.tensor([0, 1, ABSTAIN, 2])
    radius = torch.tensor([0.3, 0.8, 0.0, 0.1], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    acc = certified_accuracy(pred, radius, labels, [0.0, 0.25, 0.5, 1.0])
    assert acc == {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 1.0: 0.0}
    with pytest.raises(ValueError, match="sigma must be > 0"):
        certify(lambda b: b, torch.zeros(1, 1, 2, 2), 2, 0.0)
