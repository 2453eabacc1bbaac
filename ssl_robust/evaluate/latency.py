"""Latency and throughput of an inference function, measured honestly.

CUDA kernels run asynchronously: a timer read right after a call measures the launch, not the
work. Every timed call here is bracketed by ``torch.cuda.synchronize`` on CUDA inputs, and a few
untimed warm-up calls first absorb one-off costs (cuDNN autotuning, lazy allocations, kernel
compilation).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ssl_robust.benchmarking import sync


def measure_latency(
    fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int = 3, iters: int = 10
) -> dict[str, float]:
    """Wall time of ``fn(x)`` under ``torch.no_grad``.

    Args:
        fn: The inference function (e.g. purifier + classifier), images in, logits out.
        x: One input batch (B, C, H, W) on the device ``fn`` runs on.
        warmup: Untimed calls before measuring.
        iters: Timed calls.

    Returns:
        ``median_ms``, ``mean_ms``, ``min_ms``, ``p90_ms`` (per call), ``batch_size`` and
        ``images_per_s`` (batch size over the median call time).
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        sync(x.device)
        for _ in range(iters):
            start = time.perf_counter()
            fn(x)
            sync(x.device)
            times.append(time.perf_counter() - start)
    ordered = sorted(times)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "median_ms": 1e3 * median,
        "mean_ms": 1e3 * statistics.fmean(ordered),
        "min_ms": 1e3 * ordered[0],
        "p90_ms": 1e3 * p90,
        "batch_size": float(x.shape[0]),
        "images_per_s": x.shape[0] / max(median, 1e-12),
    }
