"""Calibration metrics against hand-computed examples and a loop reference implementation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ssl_robust.evaluate.metrics import (
    accuracy,
    bootstrap_interval,
    brier,
    calibration_report,
    confusion_matrix,
    corruption_errors,
    cross_fit_temperatures,
    ece,
    fit_temperature,
    fold_of,
    grid_accuracies,
    interval_bars,
    nll,
    normal_interval,
    per_class_accuracy,
    refit_scaled_ece,
    reliability_bins,
    risk_coverage,
    selective_curves,
    selective_report,
    standard_error,
    wilson_interval,
)

# Five samples, three classes. Top-1 confidences 0.70, 0.62, 0.90, 0.50, 0.68 sit inside the
# 15 equal-width bins (edges k / 15), away from the edges:
#   bin 10 [0.667, 0.733): samples 1 and 5, both correct, mean conf 0.69 -> |1 - 0.69| * 2/5
#   bin  9 [0.600, 0.667): sample 2, wrong                          -> |0 - 0.62| * 1/5
#   bin 13 [0.867, 0.933): sample 3, correct                        -> |1 - 0.90| * 1/5
#   bin  7 [0.467, 0.533): sample 4, wrong                          -> |0 - 0.50| * 1/5
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],
        [0.10, 0.62, 0.28],
        [0.05, 0.05, 0.90],
        [0.50, 0.30, 0.20],
        [0.12, 0.68, 0.20],
    ]
)
LABELS = torch.tensor([0, 2, 2, 1, 1])
ECE_HAND = 0.31 * 2 / 5 + 0.62 / 5 + 0.10 / 5 + 0.50 / 5  # = 0.368
NLL_HAND = -(math.log(0.70) + math.log(0.28) + math.log(0.90) + math.log(0.30) + math.log(0.68)) / 5
# Per-sample sum over classes of (p - onehot)^2.
BRIER_HAND = (
    (0.30**2 + 0.20**2 + 0.10**2)
    + (0.10**2 + 0.62**2 + 0.72**2)
    + (0.05**2 + 0.05**2 + 0.10**2)
    + (0.50**2 + 0.70**2 + 0.20**2)
    + (0.12**2 + 0.32**2 + 0.20**2)
) / 5  # = 0.40092


def test_hand_example_values():
    assert ece(PROBS, LABELS) == pytest.approx(ECE_HAND, abs=1e-6)
    assert ece(PROBS, LABELS) == pytest.approx(0.368, abs=1e-6)
    assert nll(PROBS, LABELS, from_probs=True) == pytest.approx(NLL_HAND, abs=1e-6)
    assert brier(PROBS, LABELS) == pytest.approx(BRIER_HAND, abs=1e-6)
    assert brier(PROBS, LABELS) == pytest.approx(0.40092, abs=1e-6)
    assert accuracy(PROBS, LABELS) == pytest.approx(0.6)


def test_report_from_logits_matches_probabilities():
    # softmax(log p + c) = p, so logits log(p) + c describe the same predictions.
    logits = PROBS.log() + 3.0
    report = calibration_report(logits, LABELS)
    assert set(report) == {"ece", "nll", "brier", "acc"}
    assert report["ece"] == pytest.approx(ECE_HAND, abs=1e-5)
    assert report["nll"] == pytest.approx(NLL_HAND, abs=1e-5)
    assert report["brier"] == pytest.approx(BRIER_HAND, abs=1e-5)
    assert report["acc"] == pytest.approx(0.6)
    assert nll(logits, LABELS) == pytest.approx(NLL_HAND, abs=1e-5)


def test_perfect_and_worst_predictions():
    labels = torch.tensor([0, 1, 2])
    onehot = torch.eye(3)
    assert ece(onehot, labels) == pytest.approx(0.0)
    assert brier(onehot, labels) == pytest.approx(0.0)
    assert nll(onehot, labels, from_probs=True) == pytest.approx(0.0, abs=1e-6)
    wrong = onehot[[1, 2, 0]]  # confidently wrong everywhere
    assert ece(wrong, labels) == pytest.approx(1.0)
    assert brier(wrong, labels) == pytest.approx(2.0)  # the maximum
    # A zero probability on the true class is clamped, not infinite.
    assert nll(wrong, labels, from_probs=True) == pytest.approx(-math.log(1e-12), rel=1e-4)


def test_uniform_prediction_brier_and_nll():
    k = 4
    probs = torch.full((6, k), 1 / k)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert brier(probs, labels) == pytest.approx((1 - 1 / k) ** 2 + (k - 1) / k**2)
    assert nll(probs, labels, from_probs=True) == pytest.approx(math.log(k))


def reference_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """Guo et al. (2017), Eq. 3, written as a plain loop."""
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf >= lo) & (conf < hi)
        if in_bin.any():
            gap = (pred[in_bin] == labels[in_bin]).float().mean() - conf[in_bin].mean()
            total += in_bin.float().mean().item() * abs(gap.item())
    return total


@pytest.mark.parametrize("n_bins", [15, 10])
def test_ece_and_bins_match_loop_reference(n_bins):
    gen = torch.Generator().manual_seed(0)
    probs = (2.0 * torch.randn(400, 5, generator=gen)).softmax(1)
    labels = torch.randint(0, 5, (400,), generator=gen)
    expected = reference_ece(probs, labels, n_bins)
    assert ece(probs, labels, n_bins) == pytest.approx(expected, abs=1e-5)
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    from_bins = (
        (bins["count"][filled] / 400)
        * (bins["accuracy"][filled] - bins["confidence"][filled]).abs()
    ).sum()
    assert from_bins.item() == pytest.approx(expected, abs=1e-6)


def test_reliability_bins_hand_example():
    bins = reliability_bins(PROBS, LABELS)
    assert all(v.shape == (15,) for v in bins.values())
    torch.testing.assert_close(bins["lower"][10], torch.tensor(10 / 15, dtype=torch.float64))
    assert bins["count"].tolist() == [0] * 7 + [1, 0, 1, 2, 0, 0, 1, 0]
    assert bins["confidence"][10].item() == pytest.approx(0.69)
    assert bins["accuracy"][10].item() == 1.0
    assert bins["accuracy"][9].item() == 0.0
    assert torch.isnan(bins["confidence"][0]) and torch.isnan(bins["accuracy"][14])
    # A confidence of exactly 1 lands in the last bin.
    last = reliability_bins(torch.eye(3), torch.tensor([0, 1, 2]))
    assert last["count"][-1].item() == 3
    # A confidence on an inner edge belongs to the bin above it: 0.5 and 0.75 on 4 bins.
    edges = reliability_bins(torch.tensor([[0.5, 0.5], [0.75, 0.25]]), torch.tensor([0, 0]), 4)
    assert edges["count"].tolist() == [0, 0, 1, 1]


def test_validation():
    with pytest.raises(ValueError, match="probabilities"):
        ece(PROBS.log(), LABELS)
    with pytest.raises(ValueError, match="probabilities"):
        brier(PROBS * 2, LABELS)
    with pytest.raises(ValueError, match="probabilities"):  # sums to 1.01
        brier(torch.tensor([[0.6, 0.41]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels"):
        ece(PROBS, LABELS[:3])
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(PROBS, LABELS, n_bins=0)


def test_wilson_interval_known_answers():
    # Textbook values (Newcombe 1998, Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605).
    low, high = wilson_interval(81 / 263, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(15 / 148, 148)
    assert (round(low, 4), round(high, 4)) == (0.0624, 0.1605)
    # 0 of 100: no width-zero interval at the edge; the "rule of three" is close (3/100).
    low, high = wilson_interval(0.0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)
    # Symmetric in acc <-> 1 - acc, and narrower with more images.
    low, high = wilson_interval(1.0, 128)
    assert high == pytest.approx(1.0) and low == pytest.approx(128 / (128 + 1.959964**2))
    assert wilson_interval(0.3, 50) == pytest.approx(
        tuple(1 - b for b in wilson_interval(0.7, 50))[::-1]
    )
    assert (
        wilson_interval(0.3, 500)[1] - wilson_interval(0.3, 500)[0]
        < 0.1
        < (wilson_interval(0.3, 50)[1] - wilson_interval(0.3, 50)[0])
    )


def test_intervals_never_exclude_the_accuracy_at_the_edges():
    # Rounding put the Wilson bound of 0 of 6 at +2.8e-17: a negative error bar, which
    # matplotlib refuses.
    for n in range(1, 300):
        for acc in (0.0, 1.0):
            low, high = wilson_interval(acc, n)
            assert low <= acc <= high
    m = {"adv/a/acc": 0.0, "adv/a/n": 6.0, "adv/b/acc": 1.0, "adv/b/n": 6.0}
    assert (interval_bars(m, ["adv/a/acc", "adv/b/acc"]) >= 0).all()


def test_wilson_interval_covers_the_true_accuracy_95_percent_of_the_time():
    gen = torch.Generator().manual_seed(0)
    p, n, trials = 0.3, 60, 4000
    counts = torch.binomial(
        torch.full((trials,), float(n)), torch.full((trials,), p), generator=gen
    )
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(k / n, n) for k in counts.tolist()))
    assert 0.93 <= covered / trials <= 0.97
    with pytest.raises(ValueError, match="n must be > 0"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"acc must be in \[0, 1\]"):
        wilson_interval(1.2, 10)


def test_per_class_accuracy_known_answer_and_draws():
    labels = torch.tensor([0, 0, 1, 1, 1])
    eye = torch.eye(3)
    # Predictions 0, 1, 1, 1, 2: class 0 half right, class 1 two of three, class 2 no images.
    logits = eye[[0, 1, 1, 1, 2]]
    acc, counts = per_class_accuracy(logits, labels, 3)
    assert counts == [2, 3, 0] and acc[2] is None
    assert acc[:2] == [pytest.approx(0.5), pytest.approx(2 / 3)]
    # Two purifications: the second gets image 1 right, so class 0 is right 3 times of 4.
    draws = torch.stack([logits, eye[[0, 0, 1, 1, 2]]])
    acc, counts = per_class_accuracy(draws, labels, 3)
    assert counts == [2, 3, 0] and acc[0] == pytest.approx(0.75) and acc[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="expected logits"):
        per_class_accuracy(logits[:4], labels, 3)


def test_standard_error_and_normal_interval_known_answers() -> None:
    assert standard_error([0.0, 1.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert standard_error([0.5] * 10) == 0.0
    assert normal_interval(0.5, 0.1) == pytest.approx((0.5 - 0.1959964, 0.5 + 0.1959964))
    assert normal_interval(0.98, 0.02) == pytest.approx((0.98 - 0.0391993, 1.0))  # clipped
    with pytest.raises(ValueError, match="at least 2"):
        standard_error([1.0])


def test_a_grid_mean_interval_over_images_covers_95_percent_when_cells_share_images() -> None:
    """Cells of a corruption grid share their images, and an image that is hard in one cell is
    hard in the others. The per-image interval covers the grid's true mean ~95 % of the time;
    a Wilson interval that counts cells x images as independent trials covers far less."""
    gen = torch.Generator().manual_seed(0)
    n, cells, trials, true_mean = 200, 8, 400, 0.6
    beta = torch.distributions.Beta(torch.tensor(1.2), torch.tensor(0.8))  # mean 0.6
    ours = naive = 0
    for _ in range(trials):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        p = beta.sample((n,))  # each image's chance to be right, in every cell
        hits = (torch.rand(cells, n) < p).double()  # (cells, N)
        mean = hits.mean().item()
        low, high = normal_interval(mean, standard_error(hits.mean(0).numpy()))
        ours += low <= true_mean <= high
        low, high = wilson_interval(mean, n * cells)
        naive += low <= true_mean <= high
    assert 0.92 <= ours / trials <= 0.98
    assert naive / trials < 0.8


def test_confusion_matrix_known_answer_and_pooled_draws():
    labels = torch.tensor([0, 0, 1, 1, 1])
    eye = torch.eye(3)
    # Predictions 0, 1, 1, 1, 2: row 0 = [1, 1, 0], row 1 = [0, 2, 1], row 2 empty.
    cm = confusion_matrix(eye[[0, 1, 1, 1, 2]], labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 0]]
    # Two draws of the same images: their predictions add up.
    draws = torch.stack([eye[[0, 1, 1, 1, 2]], eye[[0, 0, 2, 2, 2]]])
    assert confusion_matrix(draws, labels, 3).tolist() == [[3, 1, 0], [0, 2, 4], [0, 0, 0]]
    # Its diagonal over its rows is the per-class accuracy.
    acc, counts = per_class_accuracy(draws, labels, 3)
    pooled = confusion_matrix(draws, labels, 3)
    assert [pooled[k, k].item() / pooled[k].sum().item() for k in (0, 1)] == pytest.approx(acc[:2])
    assert (pooled.sum(1) // 2).tolist() == counts
    with pytest.raises(ValueError, match="expected logits"):
        confusion_matrix(torch.zeros(4, 3), labels, 3)


def test_corruption_errors_known_answer() -> None:
    # Two corruptions x two severities. Errors (1 - acc):
    #   model: fog 0.2 + 0.4 = 0.6, blur 0.3 + 0.5 = 0.8; clean error 0.1
    #   ref:   fog 0.3 + 0.5 = 0.8, blur 0.2 + 0.2 = 0.4; clean error 0.2
    # CE: fog 0.6 / 0.8 = 0.75, blur 0.8 / 0.4 = 2.0, mCE 1.375.
    # Relative: fog (0.6 - 0.2) / (0.8 - 0.4) = 1.0, blur (0.8 - 0.2) / (0.4 - 0.4) undefined.
    acc = {("fog", 1): 0.8, ("fog", 2): 0.6, ("blur", 1): 0.7, ("blur", 2): 0.5}
    ref = {("fog", 1): 0.7, ("fog", 2): 0.5, ("blur", 1): 0.8, ("blur", 2): 0.8, ("snow", 1): 0.1}
    out = corruption_errors(acc, ref, clean_acc=0.9, ref_clean_acc=0.8)
    expected = {"shift/fog/ce": 0.75, "shift/blur/ce": 2.0, "shift/mce": 1.375}
    assert out == pytest.approx(expected | {"shift/fog/relative_ce": 1.0})
    assert "shift/relative_mce" not in out  # one corruption's relative error is undefined
    # With a reference hurt more by blur, both means exist; the reference against itself is 1.
    ref["blur", 2] = 0.6  # ref blur error 0.6, gap 0.6 - 0.4 = 0.2 -> relative (0.6) / 0.2 = 3
    out = corruption_errors(acc, ref, clean_acc=0.9, ref_clean_acc=0.8)
    assert out["shift/relative_mce"] == pytest.approx((1.0 + 3.0) / 2)
    assert out["shift/mce"] == pytest.approx((0.75 + 0.8 / 0.6) / 2)
    same = corruption_errors(acc, acc, clean_acc=0.9, ref_clean_acc=0.9)
    assert list(same.values()) == pytest.approx([1.0] * 6)
    # Without clean accuracies only the plain errors; a perfect reference leaves CE undefined.
    assert set(corruption_errors(acc, ref)) == {"shift/fog/ce", "shift/blur/ce", "shift/mce"}
    perfect = dict(ref) | {("fog", 1): 1.0, ("fog", 2): 1.0}
    assert set(corruption_errors(acc, perfect)) == {"shift/blur/ce"}
    with pytest.raises(ValueError, match=r"no accuracy for the cells \[\('fog', 3\)\]"):
        corruption_errors(acc | {("fog", 3): 0.5}, ref)


def test_grid_accuracies_reads_only_the_cells() -> None:
    metrics = {
        "shift/fog/1/acc": 0.5,
        "shift/zoom_blur/5/acc": 0.25,
        "shift/group/noise/acc": 0.1,
        "shift/severity/5/acc": 0.2,
        "shift/mean_acc": 0.3,
        "shift/fog/ce": 1.2,
        "test/acc": 0.9,
    }
    assert grid_accuracies(metrics) == {("fog", 1): 0.5, ("zoom_blur", 5): 0.25}


def test_bootstrap_interval_of_a_mean_and_of_grouped_draws() -> None:
    # The mean of n standard normals: the interval is about mean +- 1.96 / sqrt(n).
    x = torch.randn(1, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = bootstrap_interval(lambda v: v.mean().item(), [(x,)], resamples=1000, seed=1)
    mean, half = x.mean().item(), 1.96 * x.std().item() / 2000**0.5
    assert low == pytest.approx(mean - half, abs=0.15 * half)
    assert high == pytest.approx(mean + half, abs=0.15 * half)
    # Five identical draws of each image are one sample, not five: the same interval as one
    # draw (the images are resampled with all their draws, by the same random indices).
    five = x.expand(5, -1)
    assert bootstrap_interval(lambda v: v.mean().item(), [(five,)], 1000, seed=1) == (
        pytest.approx((low, high))
    )
    # Two sides resampled apart; a side's tensors together (labels with their logits).
    labels = torch.arange(10).expand(1, 10)
    same = bootstrap_interval(
        lambda a, b: float((a == b).double().mean()), [(labels, labels.clone())], 50
    )
    assert same == (1.0, 1.0)
    with pytest.raises(ValueError, match="share their images"):
        bootstrap_interval(lambda a, b: 0.0, [(labels, labels[:, :5])])
    # One side with other draws per image (an image's clean score and its corrupted ones):
    # resampled by the same images, so the difference of means is that of the paired data.
    clean = torch.randn(1, 500, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    corrupted = (clean - 1.0).expand(3, -1)  # every corruption lowers each image by exactly 1
    paired = bootstrap_interval(lambda a, b: (a.mean() - b.mean()).item(), [(clean, corrupted)])
    assert paired == pytest.approx((1.0, 1.0))
    apart = bootstrap_interval(lambda a, b: (a.mean() - b.mean()).item(), [(clean,), (corrupted,)])
    assert apart[1] - apart[0] > 0.1  # unpaired: the images' own spread


def test_a_bootstrap_interval_holds_its_estimate() -> None:
    # Confidence 0.5 everywhere, half of the images right: ECE 0, every resample's ECE > 0. The
    # bias correction would put the whole interval below 0; it is widened to hold the estimate.
    probs = torch.full((1, 200, 2), 0.5)
    labels = torch.tensor([0, 1] * 100)[None]
    estimate = ece(probs[0], labels[0])
    low, high = bootstrap_interval(
        lambda p, y: ece(p, y), [(probs, labels)], 100, bounds=(0.0, 1.0)
    )
    assert estimate == pytest.approx(0.0, abs=1e-7) and low <= estimate <= high
    # Without bounds to clip at: |mean - 0.5| of 1000 zeros and 1000 ones is 0, and fewer than
    # 2.5 % of the resamples (P(exactly 1000 ones) ~ 1.8 %) give 0, so the basic interval
    # 2 * 0 - q_high .. 2 * 0 - q_low lies wholly below 0 before it is widened.
    x = torch.tensor([0.0, 1.0]).repeat_interleave(1000)[None]
    low, high = bootstrap_interval(lambda v: abs(v.mean().item() - 0.5), [(x,)], 200, seed=0)
    assert low < 0.0 and high == 0.0


def test_bootstrap_interval_is_the_basic_not_the_percentile_interval() -> None:
    # The max of [0, 0, 0, 1] is 1; a resample's max is 0 with probability (3/4)^4 ~ 0.32, so
    # the resampled quantiles are q_0.025 = 0 and q_0.975 = 1: the basic interval is
    # (2 - 1, 2 - 0) = (1, 2), where the percentile one would be (0, 1).
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert bootstrap_interval(lambda v: v.max().item(), [(x,)], resamples=200, seed=0) == (1.0, 2.0)


def _nll_at(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    return torch.nn.functional.cross_entropy(logits.double() / t, labels).item()


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    # Labels drawn from softmax(z / 2.5): the NLL's minimiser is 2.5 up to sampling noise.
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(40_000, 6, generator=gen)
    labels = torch.multinomial((z / 2.5).softmax(1), 1, generator=gen).squeeze(1)
    assert fit_temperature(z, labels) == pytest.approx(2.5, rel=0.03)
    # Scaling the logits scales the temperature.
    assert fit_temperature(4 * z, labels) == pytest.approx(4 * fit_temperature(z, labels))


def test_fit_temperature_is_the_nll_minimum_of_a_grid_search() -> None:
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(500, 4, generator=gen)
    labels = torch.randint(4, (500,), generator=gen)
    labels[:250] = z[:250].argmax(1)  # half right: a temperature between the bounds
    t = fit_temperature(z, labels)
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)  # steps of 0.23 %
    best = min(grid.tolist(), key=lambda g: _nll_at(z, labels, g))
    assert t == pytest.approx(best, rel=3e-3)
    assert _nll_at(z, labels, t) <= min(_nll_at(z, labels, g) for g in (t * 0.99, t * 1.01))


def test_fit_temperature_at_the_bounds_and_on_constant_logits() -> None:
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 10)
    right = z.argmax(1)
    assert fit_temperature(z, right) == 0.01  # every prediction right: T -> 0, clipped
    assert fit_temperature(z, right, bounds=(0.5, 3.0)) == 0.5
    assert fit_temperature(z, 1 - right) == 100.0  # every prediction wrong: T -> infinity
    assert fit_temperature(torch.zeros(8, 3), torch.arange(8) % 3) == 1.0
    assert fit_temperature(torch.full((8, 3), 12345.678), torch.arange(8) % 3) == 1.0
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, right, bounds=(2.0, 1.0))


def test_cross_fit_temperatures_fit_each_fold_on_the_others() -> None:
    gen = torch.Generator().manual_seed(2)
    draws = 3 * torch.randn(2, 60, 5, generator=gen)  # two purifications of 60 images
    labels = torch.randint(5, (60,), generator=gen)
    labels[:40] = draws[0, :40].argmax(1)
    temps, fits = cross_fit_temperatures(draws, labels, folds=3, seed=7)
    fold = fold_of(60, 3, seed=7)
    assert torch.bincount(fold).tolist() == [20, 20, 20]
    assert torch.equal(fold, fold_of(60, 3, seed=7)) and not torch.equal(fold, fold_of(60, 3, 8))
    for k in range(3):
        rest = fold != k
        # The reference: the other folds' images, every draw of each pooled.
        pooled = torch.cat([draws[0, rest], draws[1, rest]])
        expected = fit_temperature(pooled, labels[rest].repeat(2))
        assert fits[k] == pytest.approx(expected)
        assert torch.all(temps[fold == k] == fits[k])
    assert len(set(fits)) == 3  # the folds differ
    # One draw (N, K) is the same as (1, N, K).
    one, _ = cross_fit_temperatures(draws[0], labels, folds=2)
    assert torch.equal(one, cross_fit_temperatures(draws[:1], labels, folds=2)[0])
    with pytest.raises(ValueError, match="folds must be >= 2"):
        cross_fit_temperatures(draws, labels, folds=1)
    with pytest.raises(ValueError, match="cannot be split into 40 folds"):
        cross_fit_temperatures(draws, labels, folds=40)


def test_refit_scaled_ece_is_the_cross_fitted_ece_and_varies_with_the_resample() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(80, 5, generator=gen)
    labels = torch.randint(5, (80,), generator=gen)
    labels[:50] = logits[:50].argmax(1)
    fold = fold_of(80, 2, seed=1)
    # On the clean images themselves: the ECE after cross-fitted temperature scaling.
    temps, _ = cross_fit_temperatures(logits, labels, folds=2, seed=1)
    want = ece((logits / temps[:, None]).softmax(1), labels)
    got = refit_scaled_ece(logits, labels, fold, logits, labels, fold)
    assert got == pytest.approx(want, abs=1e-6)
    # Fold -1: another set scaled by the temperature of every clean image.
    other = 2 * torch.randn(30, 5, generator=gen)
    other_labels = torch.randint(5, (30,), generator=gen)
    t_all = fit_temperature(logits, labels)
    overall = refit_scaled_ece(other, other_labels, torch.full((30,), -1), logits, labels, fold)
    assert overall == pytest.approx(ece((other / t_all).softmax(1), other_labels), abs=1e-6)
    # A bootstrap resample of the clean images refits the temperature: another ECE than the
    # fixed temperature gives on the same resample.
    idx = torch.randint(80, (80,), generator=torch.Generator().manual_seed(0))
    refit = refit_scaled_ece(
        other, other_labels, torch.full((30,), -1), logits[idx], labels[idx], fold[idx]
    )
    assert fit_temperature(logits[idx], labels[idx]) != pytest.approx(t_all)
    assert refit != pytest.approx(overall, abs=1e-9)
    # A resample holding one fold only has nothing to fit that fold on: it stays unscaled.
    ones = fold == 0
    alone = refit_scaled_ece(
        logits[ones], labels[ones], fold[ones], logits[ones], labels[ones], fold[ones]
    )
    assert alone == pytest.approx(ece(logits[ones].softmax(1), labels[ones]), abs=1e-6)


def test_risk_coverage_known_answer_and_selective_report() -> None:
    # Confidences 0.9 > 0.8 > 0.7 > 0.6, the second wrong: risks 0, 1/2, 1/3, 1/4.
    conf = torch.tensor([0.7, 0.9, 0.6, 0.8])
    correct = torch.tensor([True, True, True, False])
    coverage, risk = risk_coverage(conf, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 1 / 2, 1 / 3, 1 / 4])
    best = risk_coverage(correct.double(), correct)[1]  # the error last
    assert best.tolist() == pytest.approx([0, 0, 0, 1 / 4])
    r = selective_report(risk, best)
    assert r["aurc"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert r["eaurc"] == pytest.approx((1 / 2 + 1 / 3) / 4)
    assert r["risk_c50"] == pytest.approx(1 / 2) and r["risk_c80"] == pytest.approx(1 / 4)
    # From logits: the same ranking through the top softmax probability.
    logits = torch.stack([conf.log(), (1 - conf).log()], 1)  # class 0 predicted throughout
    labels = torch.where(correct, 0, 1)
    risk2, best2 = selective_curves(logits, labels)
    assert torch.allclose(risk2, risk) and torch.allclose(best2, best)
    # Errors ranked last: no excess.
    assert selective_report(best, best)["eaurc"] == 0.0
    # Confident predictions keep their order: in float32 the top probability of each of
    # these is exactly 1, in float64 log-probabilities they differ.
    gaps = torch.tensor([30.0, 25.0, 20.0, 18.0])
    assert (torch.stack([gaps, torch.zeros(4)], 1).softmax(1)[:, 0] == 1).all()
    risk3, _ = selective_curves(torch.stack([gaps, torch.zeros(4)], 1), torch.tensor([1, 0, 0, 0]))
    assert risk3.tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])


def test_risk_coverage_averages_over_the_orders_of_tied_confidences() -> None:
    gen = torch.Generator().manual_seed(3)
    conf = torch.randint(3, (7,), generator=gen).float()  # three values: many ties
    correct = torch.rand(7, generator=gen) > 0.4
    _, risk = risk_coverage(conf, correct)
    # The reference: every order that sorts the confidences, each as likely.
    curves = []
    for perm in itertools.permutations(range(7)):
        p = list(perm)
        if all(conf[p[i]] >= conf[p[i + 1]] for i in range(6)):
            err = (~correct[p]).double().cumsum(0)
            curves.append(err / torch.arange(1, 8, dtype=torch.float64))
    assert torch.allclose(risk, torch.stack(curves).mean(0), atol=1e-12)
    # One confidence for all: the overall error at every coverage.
    flat = risk_coverage(torch.ones(7), correct)[1]
    assert torch.allclose(flat, torch.full((7,), (~correct).double().mean().item()).double())


def test_selective_report_coverage_cuts_in_whole_predictions() -> None:
    # 15 predictions: 80 % is 12 of them (0.8 * 15 is 12.000000000000002 in floats).
    risk = torch.arange(1, 16, dtype=torch.float64)
    r = selective_report(risk, torch.zeros(15))
    assert r["risk_c80"] == 12 and r["risk_c50"] == 8
    with pytest.raises(ValueError, match="expected confidence"):
        risk_coverage(torch.ones(3), torch.ones(4))
