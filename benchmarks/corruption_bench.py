"""Corruption throughput: our batched torch ops against the per-image numpy reference.

The reference is the ``imagecorruptions-imaug`` package (Hendrycks & Dietterich's
algorithms with the ImageNet-C parameters; ``pip install imagecorruptions-imaug``),
called image by image on uint8 HWC arrays as its users do. Ours corrupts one batch of
float (B, 3, H, W) images already on ``--device`` (the uint8 -> float conversion is not
timed). Both see the same images in the same run. Parameters differ (ours are the 32-px
CIFAR-10-C ones), which changes the reference's cost only for glass blur (more shuffle
iterations at ImageNet severities) and zoom blur (more zoom factors at low severities).
Without the reference package the ours-only columns are still reported.

    python benchmarks/corruption_bench.py --device cuda --json runs/bench/corruptions.json
    python benchmarks/corruption_bench.py --smoke          # a few corruptions, seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl_robust.benchmarking import median_seconds
from ssl_robust.evaluate.corruptions import CORRUPTIONS, corrupt

SMOKE_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "jpeg_compression")


def make_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields with a few hard edges, uint8 (N, size, size, 3)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    edges = torch.rand((n, 1, 8, 8), generator=g) > 0.7
    x = torch.where(F.interpolate(edges.float(), size=(size, size)) > 0, 1 - x, x)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _load_reference() -> tuple[Callable[..., np.ndarray] | None, str]:
    try:
        from imagecorruptions import corrupt as reference_corrupt
    except Exception as err:  # missing package, or one of its deps failing on import
        return None, f"reference imagecorruptions-imaug unavailable ({type(err).__name__}: {err})"
    return reference_corrupt, "imagecorruptions-imaug"


def bench_corruptions(
    device: str = "cpu",
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severity: int = 3,
    batch: int = 1000,
    ref_images: int = 50,
    image_size: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    reference: bool = True,
) -> list[dict[str, Any]]:
    """Times each corruption, ours (batched) and the reference (per image), and prints a table.

    Args:
        device: Torch device string for our corruptions ("cpu", "cuda").
        corruptions: Corruption names.
        severity: Severity used for both implementations.
        batch: Images per call of ours.
        ref_images: Images the reference corrupts per timed repetition.
        image_size: Image side in pixels (>= 32, the reference's minimum).
        repeats: Timed repetitions (median reported).
        warmup: Untimed runs first (compiles numba in the reference's glass blur).
        seed: Seed of the images and of both implementations' randomness.
        reference: Also time the reference when it is installed.

    Returns:
        One dict per corruption: name, severity, device, batch, ours_img_s, ref_img_s,
        ratio (ours / reference, None without the reference), reference (its name or why
        it is missing).
    """
    dev = torch.device(device)
    images = make_images(max(batch, ref_images), image_size, seed)
    x = torch.from_numpy(images[:batch]).to(dev).permute(0, 3, 1, 2).float() / 255.0
    ref_fn, ref_note = _load_reference() if reference else (None, "not requested")
    if ref_fn is None:
        print(ref_note)
    rows: list[dict[str, Any]] = []
    for name in corruptions:
        gen = torch.Generator(device=dev).manual_seed(seed)

        def ours(name: str = name, gen: torch.Generator = gen) -> torch.Tensor:
            return corrupt(x, name, severity, generator=gen)

        ours_s = median_seconds(ours, dev, repeats, warmup)
        row: dict[str, Any] = {
            "corruption": name,
            "severity": severity,
            "device": str(dev),
            "batch": batch,
            "ours_img_s": batch / ours_s,
            "ref_img_s": None,
            "ratio": None,
            "reference": ref_note,
        }
        if ref_fn is not None:
            np.random.seed(seed)
            subset = images[:ref_images]

            def ref(name: str = name, subset: np.ndarray = subset) -> None:
                for img in subset:
                    ref_fn(img, corruption_name=name, severity=severity)

            ref_s = median_seconds(ref, torch.device("cpu"), repeats, warmup)
            row["ref_img_s"] = ref_images / ref_s
            row["ratio"] = row["ours_img_s"] / row["ref_img_s"]
        rows.append(row)
    _print_table(rows, dev)
    return rows


def _print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    def fmt(v: float | None, spec: str) -> str:
        return "-".rjust(12) if v is None else format(v, spec)

    print(
        f"\ncorruption throughput, images/s (ours on {device}, {torch.get_num_threads()} threads)"
    )
    print(f"{'corruption':<18} {'ours':>12} {'reference':>12} {'ratio':>9}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        print(
            f"{r['corruption']:<18} {fmt(r['ours_img_s'], '12.0f')} "
            f"{fmt(r['ref_img_s'], '12.0f')} {ratio:>9}"
        )
    ours_ms = sum(1e3 / r["ours_img_s"] for r in rows)
    line = f"total per image over {len(rows)} corruptions: ours {ours_ms:.3f} ms"
    if all(r["ref_img_s"] for r in rows):
        line += f", reference {sum(1e3 / r['ref_img_s'] for r in rows):.2f} ms"
    print(line)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--ref-images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="few images, few corruptions")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {
        "device": args.device,
        "corruptions": args.corruptions,
        "severity": args.severity,
        "batch": args.batch,
        "ref_images": args.ref_images,
        "repeats": args.repeats,
        "reference": not args.no_reference,
    }
    if args.smoke:
        kwargs.update(corruptions=SMOKE_CORRUPTIONS, batch=32, ref_images=4, repeats=1)
    rows = bench_corruptions(**kwargs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "corruptions", "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
