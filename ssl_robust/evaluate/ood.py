"""Out-of-distribution detection: scores, metrics and local OOD sets.

Scores are "higher = more in-distribution"; the metrics treat the in-distribution set as
the positive class. Logit scores (MSP, energy) read the classifier's output; feature scores
(kNN distance, Mahalanobis) read its encoder's features against a bank of training features,
which a self-supervised encoder supplies without labels (kNN) or with the labeled subset's
class means (Mahalanobis). OOD sets are made locally, without downloads: synthetic
noise (Hendrycks et al. 2019, Outlier Exposure, App. B) and held-out classes; corrupted
images from ``corruptions`` can be passed as any other tensor set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

NOISE_KINDS = ("gaussian", "uniform", "blobs")
# Scores of the encoder's features (against a bank); the logit scores are LOGIT_SCORES below.
FEATURE_SCORES = ("knn", "mahalanobis")


def msp_score(logits: Tensor) -> Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel 2017), (N, K) -> (N,)."""
    return logits.softmax(dim=1).amax(dim=1)


def energy_score(logits: Tensor, T: float = 1.0) -> Tensor:
    """Negative free energy T * logsumexp(f(x) / T) (Liu et al. 2020, Eq. 5), (N, K) -> (N,).

    Args:
        logits: Classifier logits (N, K).
        T: Temperature (> 0); the paper uses 1.
    """
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    return T * torch.logsumexp(logits / T, dim=1)


# The scores of the classifier's logits, by name, and their names.
LOGIT_SCORERS: dict[str, Callable[[Tensor], Tensor]] = {"msp": msp_score, "energy": energy_score}
LOGIT_SCORES = tuple(LOGIT_SCORERS)


def knn_score(
    bank: Tensor,
    features: Tensor,
    k: int,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Negative distance to the k-th nearest bank feature, both L2-normalised (Sun et al.
    2022, "Out-of-distribution detection with deep nearest neighbors"), (N, D) -> (N,) on the
    CPU.

    The bank is ranked in float32, on ``device`` (default: the features'): 15 corruptions of
    10,000 images against a bank of 5,000 is 4e11 multiply-adds, minutes in float64 on a few
    CPU cores. The nearest ``k + 8`` of that ranking are then measured again in float64 and
    the k-th of those taken: float32 rounding (about 1e-7 in squared distance) only reorders
    near-ties, and the exact distances put them back in order.

    Args:
        bank: In-distribution (training) features (M, D).
        features: Features to score (N, D).
        k: Which neighbour (1 = the nearest); at most M.
        chunk: Rows of ``features`` per distance matrix, bounding memory at chunk x M.
        device: Where to compute.
    """
    if bank.dim() != 2 or features.dim() != 2 or bank.shape[1] != features.shape[1]:
        raise ValueError(
            f"bank (M, D) and features (N, D) must share D, got {tuple(bank.shape)} and "
            f"{tuple(features.shape)}"
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in 1..{bank.shape[0]} (the bank's size), got {k}")
    device = features.device if device is None else device
    b64 = F.normalize(bank.to(device, torch.float64), dim=1)
    b32 = b64.float()
    out = []
    for start in range(0, features.shape[0], chunk):
        f64 = F.normalize(features[start : start + chunk].to(device, torch.float64), dim=1)
        # |f - b|^2 = 2 - 2 f.b for unit vectors, to rank the bank.
        d2 = 2 - 2 * f64.float() @ b32.T
        candidates = d2.topk(min(k + 8, len(b64)), dim=1, largest=False).indices  # (c, k + 8)
        exact = (f64[:, None, :] - b64[candidates]).norm(dim=2)
        out.append(-exact.kthvalue(k, dim=1).values.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def fit_mahalanobis(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the precision (D, D) of one covariance shared by the classes
    (Lee et al. 2018, Eq. 1), from labeled training features (N, D) and labels (N,).

    The covariance of the class-centred features is the Ledoit-Wolf shrinkage estimate
    (scikit-learn's ``LedoitWolf``): with fewer features than dimensions (a 1% labeled
    subset, 512-d features) the sample covariance is singular, and the shrinkage picks its
    own amount. Classes without a feature get no mean and are never the nearest.
    """
    from sklearn.covariance import LedoitWolf

    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if features.shape[0] < 2:
        raise ValueError(f"at least 2 features are needed, got {features.shape[0]}")
    f = features.double()
    classes = torch.unique(labels)
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    centred = f - means[torch.searchsorted(classes, labels)]
    lw = LedoitWolf(assume_centered=True).fit(centred.numpy())
    return means, torch.from_numpy(lw.precision_)


def mahalanobis_score(
    features: Tensor,
    means: Tensor,
    precision: Tensor,
    chunk: int = 4096,
    device: torch.device | str | None = None,
) -> Tensor:
    """Negative Mahalanobis distance (squared) to the nearest class mean under a shared
    precision (Lee et al. 2018, Eq. 2, without input preprocessing), (N, D) -> (N,) on the
    CPU; ``chunk`` rows at a time (memory: chunk x D), in float64 (the expansion below
    cancels large terms) on ``device`` (default: the features')."""
    device = features.device if device is None else device
    p = precision.to(device, torch.float64)
    mu = means.to(device, torch.float64)
    mu_term = ((mu @ p) * mu).sum(1)  # (C,)
    out = []
    for start in range(0, features.shape[0], chunk):
        f = features[start : start + chunk].to(device, torch.float64)
        # (f - mu)^T P (f - mu) = f^T P f - 2 f^T P mu + mu^T P mu, for every class at once.
        fp = f @ p
        d2 = (fp * f).sum(1, keepdim=True) - 2 * fp @ mu.T + mu_term
        out.append(-d2.amin(dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _check_scores(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    if scores_in.dim() != 1 or scores_out.dim() != 1:
        raise ValueError("scores must be 1-D")
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError("both score sets must be non-empty")
    return scores_in.double(), scores_out.double()


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve with in-distribution samples as positives.

    Computed exactly from ranks (Mann-Whitney U / (m n), ties counting one half) rather than
    with torchmetrics' ``BinaryAUROC``, which squashes scores outside [0, 1] through a sigmoid:
    in float32 that saturates for energy scores of a few tens and turns distinct scores into
    ties.

    Args:
        scores_in: Scores of in-distribution samples (m,), higher = more in-distribution.
        scores_out: Scores of OOD samples (n,).
    """
    s_in, s_out = _check_scores(scores_in, scores_out)
    m, n = s_in.numel(), s_out.numel()
    _, inverse, counts = torch.unique(
        torch.cat([s_in, s_out]), sorted=True, return_inverse=True, return_counts=True
    )  # over the distinct values, ascending: (m + n,), (U,)
    # Mid-rank of each distinct value: ranks start..start+count-1 share their mean (1-based).
    ends = counts.cumsum(0).double()  # (U,)
    mid_rank = ends - (counts.double() - 1) / 2
    rank_sum_in = mid_rank[inverse[:m]].sum().item()
    u = rank_sum_in - m * (m + 1) / 2
    return u / (m * n)


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate is >= ``tpr``.

    The threshold is the ceil(tpr * m)-th largest in-distribution score; OOD samples scoring
    at or above it are the false positives. This matches reading the FPR off the first point
    of the ROC curve with TPR >= ``tpr``.

    Args:
        scores_in: Scores of in-distribution samples (m,), higher = more in-distribution.
        scores_out: Scores of OOD samples (n,).
        tpr: Target true-positive rate in (0, 1].
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = _check_scores(scores_in, scores_out)
    # The 1e-9 keeps e.g. 0.95 * 20 = 19.000000000000004 from rounding up to 20.
    k = max(1, math.ceil(tpr * s_in.numel() - 1e-9))
    threshold = s_in.sort(descending=True).values[k - 1]
    return (s_out >= threshold).double().mean().item()


def aupr(scores_pos: Tensor, scores_neg: Tensor) -> float:
    """Area under the precision-recall curve of the first set as positives, as average
    precision: sum over the distinct thresholds, from the highest, of the recall gained times
    the precision there (tied scores enter together; scikit-learn's
    ``average_precision_score``).

    Args:
        scores_pos: Scores of the positives (m,), higher = more positive.
        scores_neg: Scores of the negatives (n,).
    """
    s_pos, s_neg = _check_scores(scores_pos, scores_neg)
    m = s_pos.numel()
    values, inverse = torch.unique(torch.cat([s_pos, s_neg]), sorted=True, return_inverse=True)
    pos = torch.bincount(inverse[:m], minlength=len(values)).flip(0).cumsum(0).double()
    neg = torch.bincount(inverse[m:], minlength=len(values)).flip(0).cumsum(0).double()
    precision, recall = pos / (pos + neg), pos / m
    gained = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return float((gained * precision).sum())


def ood_metrics(scores_in: Tensor, scores_out: Tensor) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` for one in-distribution / OOD pair of
    score sets: AUPR with the in-distribution samples as positives, and with the OOD ones
    (scores negated) as positives (Hendrycks & Gimpel 2017)."""
    return {
        "auroc": auroc(scores_in, scores_out),
        "fpr95": fpr_at_tpr(scores_in, scores_out),
        "aupr_in": aupr(scores_in, scores_out),
        "aupr_out": aupr(-scores_out, -scores_in),
    }


def noise_images(
    n: int,
    shape: tuple[int, int, int],
    kind: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Synthetic OOD images in [0, 1] (Hendrycks et al. 2019, Outlier Exposure, App. B).

    - ``gaussian``: i.i.d. N(0.5, 1) per pixel, clipped to [0, 1].
    - ``uniform``: i.i.d. U[0, 1] per pixel.
    - ``blobs``: Bernoulli(0.7) values, Gaussian-blurred (sigma 1.5) across rows, columns
      and channels alike, values below 0.75 set to 0: amorphous shapes with sharp edges. As
      the paper's code (``gblur(x, sigma=1.5, multichannel=False)`` on an (H, W, C) array,
      i.e. scipy's ``gaussian_filter`` with edge-replicating padding and 4-sigma kernels).

    Args:
        n: Number of images.
        shape: (C, H, W) of one image.
        kind: ``"gaussian"``, ``"uniform"`` or ``"blobs"``.
        generator: Randomness (CPU); the result is on the CPU.

    Returns:
        Images (n, C, H, W), float32 in [0, 1].
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose from {list(NOISE_KINDS)}")
    if n < 0 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected n >= 0 and shape (C, H, W), got n={n}, shape={shape}")
    size = (n, *shape)
    if kind == "gaussian":
        return (0.5 + torch.randn(size, generator=generator)).clamp(0.0, 1.0)
    if kind == "uniform":
        return torch.rand(size, generator=generator)
    blurred = (torch.rand(size, generator=generator) < 0.7).float()
    sigma = 1.5
    radius = int(4 * sigma + 0.5)  # scipy's truncate=4
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)  # (1, 1, 2r + 1)
    for dim in (1, 2, 3):  # channels, rows, columns: one 3-D Gaussian
        moved = blurred.movedim(dim, -1)
        lines = moved.reshape(-1, 1, moved.shape[-1])  # (*, 1, L)
        lines = F.conv1d(F.pad(lines, (radius, radius), mode="replicate"), kernel)
        blurred = lines.reshape(moved.shape).movedim(-1, dim)
    return torch.where(blurred < 0.75, 0.0, blurred).clamp(0.0, 1.0)


def held_out_class_split(labels: Tensor, held_out_classes: list[int]) -> tuple[Tensor, Tensor]:
    """Masks splitting a labelled set into seen classes (in) and held-out classes (OOD).

    Args:
        labels: Integer labels (N,).
        held_out_classes: Classes treated as out-of-distribution (non-empty).

    Returns:
        ``(in_mask, out_mask)``, complementary bool masks of shape (N,).
    """
    if not held_out_classes:
        raise ValueError("held_out_classes must name at least one class")
    held = torch.as_tensor(held_out_classes, dtype=labels.dtype, device=labels.device)
    out_mask = torch.isin(labels, held)
    return ~out_mask, out_mask
