"""OOD feature scores at evaluation scale: ours against a float64 reference, same inputs.

The kNN score (Sun et al. 2022) finds each feature's k-th nearest bank feature. Ours ranks
the bank in float32 and takes the found neighbour's distance in float64
(``ood.knn_score``); the reference is the plain float64 route (``torch.cdist`` + k-th
value). The Mahalanobis score (Lee et al. 2018) is timed too (float64, chunked). Sizes
default to a full CIFAR-10 evaluation's top-severity shift set: 15 corruptions x 10,000
images against a bank of 5,000 ResNet-18 features (512-d). Prints the speed-up and the
largest score difference.

    python benchmarks/ood_bench.py --device cuda --json runs/bench/ood.json
    python benchmarks/ood_bench.py --smoke          # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssl_robust.benchmarking import median_seconds
from ssl_robust.evaluate.ood import fit_mahalanobis, knn_score, mahalanobis_score


def reference_knn(
    bank: torch.Tensor, features: torch.Tensor, k: int, chunk: int = 1024
) -> torch.Tensor:
    """The float64 route: every distance in float64, then the k-th smallest."""
    b = F.normalize(bank.double(), dim=1)
    out = []
    for start in range(0, len(features), chunk):
        f = F.normalize(features[start : start + chunk].double(), dim=1)
        out.append(-torch.cdist(f, b).kthvalue(k, dim=1).values.float().cpu())
    return torch.cat(out)


def bench_ood(
    queries: int, bank_size: int, dim: int, k: int, device: str, repeats: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(bank_size, dim, generator=gen).to(device)
    feats = torch.randn(queries, dim, generator=gen).to(device)
    labels = torch.randint(10, (bank_size,), generator=gen)
    ours = knn_score(bank, feats, k, device=device)
    ref = reference_knn(bank, feats, k)
    t_ours = median_seconds(lambda: knn_score(bank, feats, k, device=device), device, repeats)
    t_ref = median_seconds(lambda: reference_knn(bank, feats, k), device, repeats)
    means, precision = fit_mahalanobis(bank.cpu(), labels)
    t_maha = median_seconds(
        lambda: mahalanobis_score(feats, means, precision, device=device), device, repeats
    )
    row = {
        "device": device,
        "queries": queries,
        "bank": bank_size,
        "dim": dim,
        "k": k,
        "knn_ours_s": t_ours,
        "knn_reference_s": t_ref,
        "knn_speedup": t_ref / t_ours,
        "knn_max_abs_diff": float((ours - ref).abs().max()),
        "mahalanobis_s": t_maha,
    }
    print(
        f"kNN score, {queries} x {bank_size} x {dim} on {device}: ours {t_ours:.3f} s, float64 "
        f"reference {t_ref:.3f} s, speed-up {row['knn_speedup']:.2f}x, largest score "
        f"difference {row['knn_max_abs_diff']:.1e}; Mahalanobis {t_maha:.3f} s"
    )
    return row


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--queries", type=int, default=150_000)
    parser.add_argument("--bank", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="small sizes, seconds")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    sizes = (2000, 500, 64) if args.smoke else (args.queries, args.bank, args.dim)
    repeats = 1 if args.smoke else args.repeats
    row = bench_ood(*sizes, k=args.k, device=args.device, repeats=repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "ood", **row}, indent=2))
    return row


if __name__ == "__main__":
    main()
