"""Throughput of the batched view transforms against lightly's PIL pipeline, same run.

The reference is what a lightly user runs: ``SimCLRTransform`` (or ``BYOLTransform``) on PIL
images inside a DataLoader with N worker processes, producing two views per image. Ours is
``BatchViewTransform`` on a uint8 tensor that already lives on the device (the datamodule
keeps the dataset there). Both rows count images per second, two views each; ``ratio`` is
ours / lightly. On CPU ours runs with ``--threads`` intra-op threads (default 1): these small
elementwise ops gain little from intra-op threading and it collapses when the cores are
shared, so one thread against lightly's N worker processes is the conservative comparison.

    python benchmarks/views_bench.py --device cuda --workers 8 --json runs/bench/views.json
    python benchmarks/views_bench.py --smoke          # tiny CPU run, a few seconds
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
)
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_robust.benchmarking import median_seconds
from ssl_robust.data.gpu_views import byol_views, simclr_views


class _PILViews(Dataset):
    """PIL images through a lightly multi-view transform, as a lightly user's dataset is."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], Any]) -> None:
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.images[index])


def _lightly_transform(method: str, view_size: int) -> Callable[[Image.Image], Any]:
    # The CIFAR settings of lightly's benchmarks; the batched factories default to the same.
    if method == "simclr":
        return SimCLRTransform(input_size=view_size, gaussian_blur=0.0)
    return BYOLTransform(
        BYOLView1Transform(input_size=view_size, gaussian_blur=0.0),
        BYOLView2Transform(input_size=view_size, gaussian_blur=0.0),
    )


def bench_views(
    device: str = "cpu",
    batch: int = 512,
    image_size: int = 32,
    n_images: int = 8192,
    repeats: int = 3,
    workers: int = 2,
    method: str = "simclr",
    seed: int = 0,
    threads: int = 1,
    view_size: int | None = None,
    compile_views: bool = False,
) -> dict[str, Any]:
    """Images/s of lightly's DataLoader pipeline and of the batched views on ``device``.

    Args:
        device: Where the batched views run ("cpu", "cuda", ...).
        batch: Batch size of both pipelines.
        image_size: Side of the square input images.
        view_size: Side of the views; defaults to ``image_size``. Smaller than ``image_size``
            (e.g. 96 -> 64, STL-10) exercises the antialiased downscaling path.
        compile_views: ``torch.compile`` the batched views (``data.compile_views=true``);
            compilation happens in the untimed warm-up epoch.
        n_images: Images per timed epoch.
        repeats: Timed epochs per pipeline (median reported), after one warm-up epoch.
        workers: DataLoader workers of the lightly pipeline.
        method: "simclr" or "byol" (sets both pipelines' view transforms).
        seed: Seed of the random images and of the batched views' generator.
        threads: Intra-op CPU threads of the batched pipeline when ``device`` is the CPU.

    Returns:
        Settings plus ``lightly_images_per_s``, ``batched_images_per_s`` and ``ratio``.
    """
    if method not in ("simclr", "byol"):
        raise ValueError(f"unknown method {method!r}; choose from ['byol', 'simclr']")
    view_size = image_size if view_size is None else view_size
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=gen)
    images = images.to(torch.uint8)

    # (a) lightly: PIL transforms in DataLoader workers, default collate.
    loader = DataLoader(
        _PILViews(images, _lightly_transform(method, view_size)),
        batch_size=batch,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def lightly_epoch() -> None:
        for _views in loader:
            pass

    lightly_s = median_seconds(lightly_epoch, torch.device("cpu"), repeats)

    # (b) ours: uint8 dataset already on the device, two views per batch.
    saved_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    views = simclr_views(view_size) if method == "simclr" else byol_views(view_size)
    views = [v.to(dev) for v in views]
    if compile_views:
        views = [v.compile_apply() for v in views]
    data = images.to(dev)
    view_gen = torch.Generator(device=dev).manual_seed(seed)

    @torch.inference_mode()
    def batched_epoch() -> None:
        for start in range(0, n_images, batch):
            x = data[start : start + batch]
            for view in views:
                view(x, view_gen)

    batched_s = median_seconds(batched_epoch, dev, repeats)
    used_threads = torch.get_num_threads()
    torch.set_num_threads(saved_threads)

    lightly_ips, batched_ips = n_images / lightly_s, n_images / batched_s
    return {
        "method": method,
        "device": str(dev),
        "batch": batch,
        "image_size": image_size,
        "view_size": view_size,
        "compiled_views": compile_views,
        "n_images": n_images,
        "repeats": repeats,
        "workers": workers,
        "batched_cpu_threads": used_threads if dev.type == "cpu" else None,
        "lightly_images_per_s": lightly_ips,
        "batched_images_per_s": batched_ips,
        "ratio": batched_ips / lightly_ips,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", default="simclr", choices=["simclr", "byol"])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--view-size", type=int, default=None, help="default: --image-size")
    parser.add_argument("--n-images", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the batched path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the batched views")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, a few seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.batch, args.n_images, args.repeats, args.workers = "cpu", 32, 128, 1, 0
    result = bench_views(
        args.device,
        batch=args.batch,
        image_size=args.image_size,
        n_images=args.n_images,
        repeats=args.repeats,
        workers=args.workers,
        method=args.method,
        threads=args.threads,
        view_size=args.view_size,
        compile_views=args.compile,
    )
    threads = result["batched_cpu_threads"]
    print(
        f"{result['method']} views, {result['n_images']} images of {result['image_size']} px "
        f"-> {result['view_size']} px, "
        f"batch {result['batch']}\n"
        f"  lightly PIL, {result['workers']} workers: "
        f"{result['lightly_images_per_s']:9.0f} images/s\n"
        f"  batched on {result['device']:<12}: {result['batched_images_per_s']:9.0f} images/s"
        f"{' (compiled)' if result['compiled_views'] else ''}"
        f"{f' ({threads} CPU threads)' if threads else ''}\n"
        f"  ratio batched / lightly: {result['ratio']:.2f}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
