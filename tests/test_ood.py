"""OOD scores and metrics against hand examples and brute-force references; local OOD sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_robust.evaluate.ood import (
    aupr,
    auroc,
    energy_score,
    fit_mahalanobis,
    fpr_at_tpr,
    held_out_class_split,
    knn_score,
    mahalanobis_score,
    msp_score,
    noise_images,
    ood_metrics,
)


def brute_force_auroc(s_in: torch.Tensor, s_out: torch.Tensor) -> float:
    """P(in > out) + P(in == out) / 2 over all pairs."""
    diff = s_in[:, None] - s_out[None, :]  # (m, n)
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


def test_msp_and_energy_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(msp_score(logits), torch.tensor([0.5, 0.75]))
    # Negative free energy T * log sum exp(f / T): log 2 and log 4 at T = 1.
    torch.testing.assert_close(energy_score(logits), torch.tensor([math.log(2), math.log(4)]))
    # At T = 2: 2 * log(exp(0) + exp(0)) = 2 log 2; 2 * log(sqrt(3) + 1).
    torch.testing.assert_close(
        energy_score(logits, T=2.0), torch.tensor([2 * math.log(2), 2 * math.log(3**0.5 + 1)])
    )
    # Shifting all logits by c shifts the energy score by c but leaves MSP unchanged.
    torch.testing.assert_close(energy_score(logits + 5.0), energy_score(logits) + 5.0)
    torch.testing.assert_close(msp_score(logits + 5.0), msp_score(logits))
    with pytest.raises(ValueError, match="T"):
        energy_score(logits, T=0.0)


def test_auroc_hand_example():
    s_in = torch.tensor([0.9, 0.8, 0.4])
    s_out = torch.tensor([0.7, 0.4, 0.1])
    # 0.9 and 0.8 beat all three (6 pairs); 0.4 ties 0.4 (1/2) and beats 0.1 (1): 7.5 / 9.
    assert auroc(s_in, s_out) == pytest.approx(7.5 / 9)


def test_auroc_extremes_and_chance():
    assert auroc(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 4.0, 5.0])) == 0.0
    assert auroc(torch.ones(4), torch.ones(7)) == 0.5
    gen = torch.Generator().manual_seed(0)
    same = auroc(torch.randn(3000, generator=gen), torch.randn(3000, generator=gen))
    assert same == pytest.approx(0.5, abs=0.03)


def test_auroc_matches_brute_force_with_ties():
    gen = torch.Generator().manual_seed(1)
    s_in = torch.randint(0, 10, (57,), generator=gen).float()
    s_out = torch.randint(0, 8, (31,), generator=gen).float()
    assert auroc(s_in, s_out) == pytest.approx(brute_force_auroc(s_in, s_out), abs=1e-12)


def test_auroc_exact_for_large_scores():
    """Energy scores of ~100 differing by less than 1: no sigmoid saturation into ties."""
    s_in = torch.tensor([100.2, 100.5, 101.0])
    s_out = torch.tensor([99.0, 100.1, 100.3])
    assert auroc(s_in, s_out) == pytest.approx(brute_force_auroc(s_in, s_out))
    assert auroc(s_in, s_out) == pytest.approx(8 / 9)


def test_fpr_at_tpr_hand_examples():
    s_in = torch.arange(1, 21).float()  # 1..20
    # TPR >= 0.95 needs 19 of 20 in-scores above the threshold: threshold = 2.
    s_out = torch.tensor([0.0, 1.5, 2.0, 3.0, 25.0])
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(3 / 5)  # 2.0, 3.0 and 25.0
    # TPR >= 0.5 of [4, 3, 2, 1]: threshold 3; out-scores 3.5 pass, 2.5 and 0 do not.
    assert fpr_at_tpr(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([3.5, 2.5, 0.0]), 0.5) == (
        pytest.approx(1 / 3)
    )
    # Perfect separation: no false positives; tpr = 1 takes the lowest in-score.
    assert fpr_at_tpr(s_in, torch.tensor([-1.0, 0.5])) == 0.0
    assert fpr_at_tpr(s_in, torch.tensor([0.5, 1.0]), tpr=1.0) == 0.5
    # 0.07 * 100 is 7.000000000000001 in floating point: the threshold is still the 7th largest
    # of 1..100 (94), not the 8th (93), so 93.5 is no false positive.
    assert 0.07 * 100 > 7
    assert fpr_at_tpr(torch.arange(1.0, 101.0), torch.tensor([93.5]), tpr=0.07) == 0.0
    assert fpr_at_tpr(torch.arange(1.0, 101.0), torch.tensor([94.0]), tpr=0.07) == 1.0
    metrics = ood_metrics(s_in, s_out)
    assert metrics["fpr95"] == pytest.approx(3 / 5)
    assert metrics["auroc"] == pytest.approx(brute_force_auroc(s_in, s_out))
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(s_in, s_out, tpr=0.0)


def test_aupr_hand_example_and_scikit_learn_reference():
    # Positives 3 and 1, negative 2: thresholds 3 (P 1/1, R 1/2), 2 (P 1/2, R 1/2),
    # 1 (P 2/3, R 1): AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3.
    assert aupr(torch.tensor([3.0, 1.0]), torch.tensor([2.0])) == pytest.approx(0.5 + 1 / 3)
    assert aupr(torch.tensor([5.0, 4.0]), torch.tensor([1.0, 0.0])) == 1.0
    # Against scikit-learn's average precision, ties included, both directions.
    from sklearn.metrics import average_precision_score

    gen = torch.Generator().manual_seed(0)
    s_in = torch.randint(0, 8, (60,), generator=gen).double()
    s_out = torch.randint(0, 6, (45,), generator=gen).double()
    y = [1] * 60 + [0] * 45
    scores = torch.cat([s_in, s_out]).numpy()
    metrics = ood_metrics(s_in, s_out)
    assert metrics["aupr_in"] == pytest.approx(average_precision_score(y, scores))
    assert metrics["aupr_out"] == pytest.approx(
        average_precision_score([1 - v for v in y], -scores)
    )
    # Chance: the positives' share.
    flat = aupr(torch.ones(30), torch.ones(70))
    assert flat == pytest.approx(0.3)


def test_score_validation():
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(ValueError, match="1-D"):
        auroc(torch.ones(2, 2), torch.ones(3))


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "blobs"])
def test_noise_images_range_and_reproducibility(kind):
    a = noise_images(64, (3, 16, 16), kind, generator=torch.Generator().manual_seed(0))
    b = noise_images(64, (3, 16, 16), kind, generator=torch.Generator().manual_seed(0))
    assert a.shape == (64, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_noise_image_statistics():
    gen = torch.Generator().manual_seed(0)
    uniform = noise_images(200, (1, 8, 8), "uniform", generator=gen)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    gaussian = noise_images(200, (1, 8, 8), "gaussian", generator=gen)
    # N(0.5, 1) clipped: P(x <= 0) = Phi(-0.5) = 0.3085 of the pixels sit exactly at 0.
    assert (gaussian == 0).float().mean().item() == pytest.approx(0.3085, abs=0.01)
    with pytest.raises(ValueError, match="'gaussian'"):
        noise_images(2, (1, 4, 4), "pink")


def test_blobs_are_outlier_exposures_blobs():
    """Against the paper's recipe: scipy's gaussian_filter (what skimage's gaussian calls) with
    sigma 1.5 over an (H, W, C) array, edges replicated, values below 0.75 zeroed."""
    from scipy.ndimage import gaussian_filter

    blobs = noise_images(4, (3, 16, 16), "blobs", generator=torch.Generator().manual_seed(1))
    draws = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    bits = (draws < 0.7).double().numpy()
    for got, x in zip(blobs, bits):
        ref = gaussian_filter(x.transpose(1, 2, 0), sigma=1.5, mode="nearest", truncate=4.0)
        ref[ref < 0.75] = 0.0
        np.testing.assert_allclose(got.numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    assert 0.1 < (blobs > 0).float().mean().item() < 0.4  # sparse shapes, not a carpet


def test_held_out_class_split():
    labels = torch.tensor([0, 1, 2, 3, 1, 3, 0])
    in_mask, out_mask = held_out_class_split(labels, [1, 3])
    assert out_mask.tolist() == [False, True, False, True, True, True, False]
    assert torch.equal(in_mask, ~out_mask)
    with pytest.raises(ValueError, match="at least one"):
        held_out_class_split(labels, [])


def test_knn_score_is_the_negative_distance_to_the_kth_nearest_unit_feature():
    gen = torch.Generator().manual_seed(0)
    bank, feats = torch.randn(40, 6, generator=gen), torch.randn(25, 6, generator=gen)
    unit_bank = bank / bank.norm(dim=1, keepdim=True)
    for k in (1, 3, 40):
        expected = []
        for f in feats:
            d = sorted(float((f / f.norm() - b).norm()) for b in unit_bank)
            expected.append(-d[k - 1])
        # Chunked like a large evaluation: chunk boundaries change nothing.
        got = knn_score(bank, feats, k, chunk=7)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    # Only directions count (Sun et al. normalise): rescaling either side changes nothing.
    torch.testing.assert_close(knn_score(5 * bank, feats * 0.1, 2), knn_score(bank, feats, 2))
    # A bank feature scores 0 (its own nearest neighbour at distance 0).
    assert knn_score(bank, bank[:4], 1).abs().max() < 1e-6
    # Near-duplicates 1e-4 apart, below what float32 ranks reliably: the float64 distances.
    queries = torch.randn(20, 64, generator=gen)
    near = torch.cat([queries + 1e-4 * torch.randn(20, 64, generator=gen) for _ in range(3)])
    dup_bank = torch.cat([near, torch.randn(200, 64, generator=gen)])
    for k in (1, 2, 3):
        exact = (
            torch.cdist(F.normalize(queries.double(), dim=1), F.normalize(dup_bank.double(), dim=1))
            .kthvalue(k, dim=1)
            .values
        )
        got = knn_score(dup_bank, queries, k)
        torch.testing.assert_close(got.double(), -exact, atol=1e-9, rtol=1e-6)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.40"):
        knn_score(bank, feats, 41)
    with pytest.raises(ValueError, match="share D"):
        knn_score(bank, feats[:, :5], 1)


def test_mahalanobis_matches_the_shared_covariance_gaussian_fit():
    from sklearn.covariance import LedoitWolf

    gen = torch.Generator().manual_seed(0)
    d, per_class = 4, 2000
    centres = torch.tensor([[0.0, 0, 0, 0], [4, 0, 0, 0], [0, 4, 0, 0]])
    labels = torch.arange(3).repeat_interleave(per_class)
    mix = torch.tensor([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0.5]])
    feats = centres[labels] + torch.randn(len(labels), d, generator=gen) @ mix
    means, precision = fit_mahalanobis(feats, labels)
    # Reference: per-class means, and Ledoit-Wolf on the class-centred features.
    ref_means = torch.stack([feats[labels == c].double().mean(0) for c in range(3)])
    torch.testing.assert_close(means, ref_means)
    centred = (feats.double() - ref_means[labels]).numpy()
    lw = LedoitWolf(assume_centered=True).fit(centred)
    torch.testing.assert_close(precision, torch.from_numpy(lw.precision_))
    # With many samples per dimension the shrinkage is small: close to the true covariance.
    covariance = torch.linalg.inv(precision)
    torch.testing.assert_close(covariance, (mix.T @ mix).double(), atol=0.1, rtol=0.05)
    # The score: minus the smallest quadratic form over the classes, by an explicit loop.
    queries = torch.randn(9, d, generator=gen) * 3
    expected = [
        -min(float((q.double() - m) @ precision @ (q.double() - m)) for m in means) for q in queries
    ]
    got = mahalanobis_score(queries, means, precision)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(mahalanobis_score(queries, means, precision, chunk=4), got)
    # A far-away cluster scores far below the training clusters.
    far = torch.randn(50, d, generator=gen) + torch.tensor([0.0, 0, 12, 0])
    inside = mahalanobis_score(feats, means, precision)
    outside = mahalanobis_score(far, means, precision)
    assert auroc(inside, outside) > 0.99


def test_mahalanobis_handles_fewer_features_than_dimensions():
    # A 1% labeled subset with 512-d features: the sample covariance is singular, the
    # shrunk one is not, and the scores are finite.
    gen = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(20, 64, generator=gen), torch.arange(20) % 4
    means, precision = fit_mahalanobis(feats, labels)
    assert means.shape == (4, 64) and torch.isfinite(precision).all()
    # Labels need not be 0..C-1: a subset whose classes are [2, 7].
    m2, _ = fit_mahalanobis(feats[:6], torch.tensor([7, 2, 7, 2, 7, 2]))
    torch.testing.assert_close(m2[0], feats[[1, 3, 5]].double().mean(0))
    assert torch.isfinite(mahalanobis_score(torch.randn(5, 64), means, precision)).all()
    with pytest.raises(ValueError, match="at least 2"):
        fit_mahalanobis(feats[:1], labels[:1])
