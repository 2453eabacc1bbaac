"""Throughput of the Purifier against raw diffusers UNet calls, measured in the same run.

The reference is the UNet called directly through diffusers (``unet(x, t).sample``), in the
same precision mode; its image-NFE/s is the ceiling a purifier can reach. Each purifier row
reports images/s, image-NFE/s (images/s x network evaluations per image) and the ratio of its
image-NFE/s to the raw UNet's, so sampler overhead shows up directly. Weights are random: speed
does not depend on them.

    python benchmarks/purify_bench.py --device cuda --json runs/bench/purify.json
    python benchmarks/purify_bench.py --smoke          # tiny CPU run, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssl_robust.benchmarking import median_seconds
from ssl_robust.purify import Purifier, build_unet, make_scheduler

# How the UNet runs: (autocast dtype or None, dtype the weights are cast to or None).
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype | None]] = {
    "fp32": (None, None),
    "bf16": (torch.bfloat16, None),  # bf16 autocast, fp32 weights: the Purifier's dtype=bf16
    "bf16-weights": (None, torch.bfloat16),  # the UNet itself cast to bf16
}


def bench_purify(
    device: str,
    preset: str = "ddpm-cifar10",
    batch: int = 256,
    image_size: int = 32,
    samplers: Sequence[tuple[str, int | None]] = (("oneshot", None), ("ddim", 5), ("ddpm", 100)),
    dtypes: Sequence[str] = ("fp32", "bf16"),
    repeats: int = 3,
    t_star: int = 100,
    raw_calls: int = 20,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Measures raw UNet and Purifier throughput and prints a table.

    Args:
        device: Torch device string ("cuda", "cuda:1", "cpu").
        preset: UNet preset (``ssl_robust.purify.UNET_PRESETS``).
        batch: Images per call.
        image_size: Image side.
        samplers: ``(sampler, n)`` pairs: for ``"ddim"`` n is the number of steps (from
            ``t_star``), for ``"ddpm"`` n is t* itself (the DDPM sampler makes t* calls), for
            ``"oneshot"`` n is unused (one call at ``t_star``).
        dtypes: Keys of ``PRECISIONS``.
        repeats: Timed repetitions per row (the median is reported).
        t_star: Diffusion depth for the one-shot and DDIM rows (DiffPure's t* = 0.1 is 100).
        raw_calls: UNet calls per timed repetition of the raw reference.
        warmup: Untimed repetitions before timing (cuDNN autotuning, allocator warm-up).

    Returns:
        One dict per row: kind ("raw" or "purifier"), sampler, nfe, t_star, dtype, batch,
        seconds (per repetition), images_per_s, image_nfe_per_s, ratio (purifier over raw
        image-NFE/s at the same dtype; 1.0 for the raw rows).
    """
    unknown = [d for d in dtypes if d not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}; choose from {sorted(PRECISIONS)}")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    scheduler = make_scheduler()
    torch.manual_seed(0)
    base_unet = build_unet(preset, image_size).eval()
    x = torch.rand(batch, base_unet.config["in_channels"], image_size, image_size, device=dev)
    rows: list[dict[str, Any]] = []

    for dtype_name in dtypes:
        autocast_dtype, weight_dtype = PRECISIONS[dtype_name]
        # nn.Module.to (in place): ModelMixin.to warns about fp32-only modules this UNet lacks.
        unet = torch.nn.Module.to(base_unet, device=dev, dtype=weight_dtype or torch.float32)

        # (a) the reference: diffusers UNet calls, nothing else.
        x_in = (x * 2 - 1).to(unet.dtype)
        timesteps = torch.full((batch,), t_star - 1, device=dev, dtype=torch.long)

        def raw(
            unet: Any = unet,
            x_in: torch.Tensor = x_in,
            ts: torch.Tensor = timesteps,
            autocast: bool = autocast_dtype is not None,
        ) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                for _ in range(raw_calls):
                    _ = unet(x_in, ts).sample

        with torch.inference_mode():
            seconds = median_seconds(raw, dev, repeats, warmup)
        raw_rate = batch * raw_calls / seconds
        rows.append(
            {
                "kind": "raw",
                "sampler": "-",
                "nfe": raw_calls,
                "t_star": t_star,
                "dtype": dtype_name,
                "batch": batch,
                "seconds": seconds,
                "images_per_s": raw_rate,
                "image_nfe_per_s": raw_rate,
                "ratio": 1.0,
            }
        )

        # (b) the purifier, per sampler setting.
        for sampler, n in samplers:
            kwargs: dict[str, Any] = {"sampler": sampler, "t_star": t_star}
            if sampler == "ddim":
                kwargs["ddim_steps"] = n
            elif sampler == "ddpm" and n is not None:
                kwargs["t_star"] = n
            purifier = Purifier(unet, scheduler, dtype=autocast_dtype, **kwargs)
            # Enough forwards per repetition that ~raw_calls UNet calls are timed.
            loops = max(1, math.ceil(raw_calls / max(purifier.nfe, 1)))
            generator = torch.Generator(device=dev).manual_seed(0)

            def run(p: Purifier = purifier, g: torch.Generator = generator, k: int = loops) -> None:
                for _ in range(k):
                    p(x, g)

            with torch.inference_mode():
                seconds = median_seconds(run, dev, repeats, warmup) / loops
            images_per_s = batch / seconds
            rows.append(
                {
                    "kind": "purifier",
                    "sampler": sampler,
                    "nfe": purifier.nfe,
                    "t_star": purifier.t_star,
                    "dtype": dtype_name,
                    "batch": batch,
                    "seconds": seconds,
                    "images_per_s": images_per_s,
                    "image_nfe_per_s": images_per_s * purifier.nfe,
                    "ratio": images_per_s * purifier.nfe / raw_rate,
                }
            )
        base_unet = unet.float()  # undo a bf16-weights cast for the next precision

    _print_table(rows, preset, device)
    return rows


def _print_table(rows: list[dict[str, Any]], preset: str, device: str) -> None:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"purify_bench  preset={preset}  device={device} ({name})  batch={rows[0]['batch']}")
    header = f"{'kind':<9}{'sampler':<9}{'dtype':<14}{'t*':>5}{'NFE':>5}"
    header += f"{'s/batch':>10}{'images/s':>11}{'img-NFE/s':>11}{'vs raw':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['kind']:<9}{r['sampler']:<9}{r['dtype']:<14}{r['t_star']:>5}{r['nfe']:>5}"
            f"{r['seconds']:>10.4f}{r['images_per_s']:>11.1f}{r['image_nfe_per_s']:>11.1f}"
            f"{r['ratio']:>8.3f}"
        )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that takes seconds")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = bench_purify(
            "cpu",
            preset="tiny",
            batch=4,
            image_size=16,
            samplers=(("oneshot", None), ("ddim", 2), ("ddpm", 4)),
            dtypes=("fp32", "bf16"),
            repeats=1,
            t_star=4,
            raw_calls=2,
        )
    else:
        rows = bench_purify(
            args.device,
            preset=args.preset,
            batch=args.batch,
            image_size=args.image_size,
            dtypes=args.dtypes,
            repeats=args.repeats,
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
