"""Pretraining throughput: the lightly-style CPU pipeline, ours, and the compute floor.

All three run the same model, batch and training step (forward + backward + SGD step of the
project's SimCLR/BYOL module) in the same process:

(a) ``lightly``: lightly's PIL ``SimCLRTransform``/``BYOLTransform`` in DataLoader workers,
    pinned host batches copied to the device (what a lightly user runs);
(b) ``ours``: the project's device path (``data.augment=gpu``): uint8 images on the device,
    index-only loader, batched views made in ``on_after_batch_transfer``;
(c) ``floor``: the step on views already on the device (eager, and with torch.compile).

With compilation on (the default; ``--no-compile`` turns it off), (a), (b) and the headline
b/c use the compiled step, and (b) compiled views, as a ``model.compile=true
data.compile_views=true`` run does; (b) and (c) are also measured eager (``eager b/c``).

Prints images/s for each and the ratios b/a and b/c; ``--json`` writes the result.

    python benchmarks/pretrain_bench.py --device cuda --workers 15 --json runs/bench/pretrain.json
    python benchmarks/pretrain_bench.py --smoke     # tiny CPU model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_robust.benchmarking import sync
from ssl_robust.data.datamodule import SSLDataModule
from ssl_robust.data.datasets import ArraySource, TransformDataset
from ssl_robust.data.transforms import (
    ViewParams,
    eval_transform,
    gpu_view_transforms,
    view_transform,
)
from ssl_robust.methods import METHODS, compile_backbones
from ssl_robust.methods.optim import OptimizerSpec
from ssl_robust.models.backbones import build_backbone

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour images, uint8 (N, S, S, 3) (real images: pass ``images``)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")
    img = (img + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return (img.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


class _Step:
    """One optimisation step of the method on a list of views."""

    def __init__(
        self,
        method: str,
        backbone: str,
        width: int,
        device: torch.device,
        precision: str,
        channels_last: bool,
        compile_model: bool,
    ) -> None:
        torch.manual_seed(0)
        extra: dict[str, Any] = {"temperature": 0.5} if method == "simclr" else {}
        self.model = METHODS[method](
            backbone=build_backbone(backbone, width),
            num_classes=10,
            batch_size_per_device=1,
            optimizer=OptimizerSpec(),
            **extra,
        ).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile_model:
            compile_backbones(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        self.device = device
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        self.channels_last = channels_last

    def __call__(self, views: list[torch.Tensor]) -> None:
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with self.autocast:
            loss, _ = self.model.ssl_loss(views)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _rate(
    batches: Iterator[list[torch.Tensor]], step: _Step, batch: int, steps: int, warmup: int
) -> float:
    for views in itertools.islice(batches, warmup):
        step(views)
    sync(step.device)
    start = time.perf_counter()
    n = 0
    for views in itertools.islice(batches, steps):
        step(views)
        n += 1
    sync(step.device)
    if n < steps:
        raise ValueError(f"only {n} batches available; use more images or fewer steps")
    return n * batch / (time.perf_counter() - start)


def _cycle(loader_factory: Callable[[], Any]) -> Iterator[Any]:
    """Epoch after epoch of one loader (its persistent workers are not forked again)."""
    loader = loader_factory()
    while True:
        yield from loader


def bench_pretrain(
    device: str = "cuda",
    method: str = "simclr",
    backbone: str = "resnet18_cifar",
    width: int = 32,
    batch: int = 512,
    image_size: int = 32,
    n_images: int = 8192,
    steps: int = 20,
    warmup: int = 5,
    workers: int = 8,
    precision: str = "bf16",
    channels_last: bool = True,
    compile_floor: bool = True,
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    """Images/s of (a) the lightly pipeline, (b) ours, (c) the floor, eager and compiled."""
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True  # as training runs (trainer.cudnn_benchmark)
    imgs = images if images is not None else synthetic_images(n_images, image_size)
    source = ArraySource(imgs, np.zeros(len(imgs), dtype=np.int64), [str(i) for i in range(10)])
    params = ViewParams(
        input_size=image_size, mean=CIFAR_MEAN, std=CIFAR_STD, min_scale=0.08, hf_prob=0.5
    )
    ev = eval_transform(image_size, CIFAR_MEAN, CIFAR_STD)
    eager = _Step(method, backbone, width, dev, precision, channels_last, compile_model=False)
    # With compilation on, (a) and (b) run the compiled step too, as training with
    # model.compile=true does: the pipelines then differ only in how views are made.
    compiled = (
        _Step(method, backbone, width, dev, precision, channels_last, compile_model=True)
        if compile_floor
        else None
    )
    step = compiled or eager
    result: dict[str, Any] = {
        "device": str(dev),
        "method": method,
        "backbone": backbone,
        "batch": batch,
        "image_size": image_size,
        "precision": precision,
        "channels_last": channels_last,
        "compiled": compiled is not None,
        "workers": workers,
        "steps": steps,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }
    warm = warmup + (3 if compiled is not None else 0)  # compilation happens in the warm-up

    # (a) lightly, as its users write it: lightly's PIL transform in a plain dataset (indexed by
    # int, TransformDataset seeds nothing), a shuffling DataLoader with workers and the default
    # collate, host batches to the device. (Not data.augment=cpu's seeded (epoch, index) keys,
    # which also seed each image's views.)
    lightly_set = TransformDataset(source, view_transform(method, params))

    def lightly_loader() -> DataLoader:
        return DataLoader(
            lightly_set,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=workers > 0,
        )

    def lightly_batches() -> Iterator[list[torch.Tensor]]:
        for views, _labels in _cycle(lightly_loader):
            yield [v.to(dev, non_blocking=True) for v in views]

    # Its workers fill their prefetch queues while the step compiles: untimed, so the timed
    # steps wait for batches made at the workers' own pace.
    drain = workers * 2 if workers > 0 else 0  # DataLoader's prefetch_factor
    result["lightly_ips"] = _rate(lightly_batches(), step, batch, steps, warm + drain)

    # (b) ours: the device path of the datamodule, exactly as training runs it
    # (data.augment=gpu, plus data.compile_views=true when compiling).
    def our_batches(compile_views: bool) -> Iterator[list[torch.Tensor]]:
        views = gpu_view_transforms(method, params)  # the datamodule moves them to dev
        if compile_views:
            views = [t.compile_apply() for t in views]
        dm = SSLDataModule(source, source, views, ev, batch, augment="gpu")
        for raw in _cycle(dm.train_dataloader):
            raw = {
                k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in raw.items()
            }
            yield dm.on_after_batch_transfer(raw, 0)[0]

    result["ours_eager_ips"] = _rate(our_batches(False), eager, batch, steps, warmup)
    if compiled is not None:
        result["ours_ips"] = _rate(our_batches(True), compiled, batch, steps, warm)
    else:
        result["ours_ips"] = result["ours_eager_ips"]

    # (c) the floor: ready views on the device.
    ready = next(our_batches(False))
    result["floor_eager_ips"] = _rate(itertools.repeat(ready), eager, batch, steps, warmup)
    floor = result["floor_eager_ips"]
    if compiled is not None:
        result["floor_compiled_ips"] = _rate(itertools.repeat(ready), compiled, batch, steps, warm)
        floor = result["floor_compiled_ips"]
    result["ratio_ours_vs_lightly"] = result["ours_ips"] / result["lightly_ips"]
    result["ratio_ours_vs_floor"] = result["ours_ips"] / floor
    result["ratio_ours_vs_floor_eager"] = result["ours_eager_ips"] / result["floor_eager_ips"]
    return result


def print_result(r: dict[str, Any]) -> None:
    print(
        f"pretraining throughput: {r['method']} {r['backbone']} batch {r['batch']} "
        f"{r['image_size']}px {r['precision']} on {r['gpu'] or r['device']}"
    )
    mode = "compiled" if r.get("compiled") else "eager"
    rows = [
        (f"(a) lightly pipeline, {mode}", r["lightly_ips"]),
        (f"(b) ours (device views), {mode}", r["ours_ips"]),
    ]
    if r.get("compiled"):
        rows.append(("(b) ours, eager", r["ours_eager_ips"]))
    rows.append(("(c) floor, eager", r["floor_eager_ips"]))
    if "floor_compiled_ips" in r:
        rows.append(("(c) floor, compiled", r["floor_compiled_ips"]))
    for name, ips in rows:
        print(f"  {name:<34} {ips:>10.0f} images/s")
    print(
        f"  b/a = {r['ratio_ours_vs_lightly']:.2f}   b/c = {r['ratio_ours_vs_floor']:.2f}"
        f"   (eager b/c = {r['ratio_ours_vs_floor_eager']:.2f})"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="simclr", choices=sorted(METHODS))
    p.add_argument("--backbone", default="resnet18_cifar")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--n-images", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    # One worker per core but one, as the reference measurement ran lightly (15 on 16 cores).
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run for CI (seconds)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.smoke:
        r = bench_pretrain(
            "cpu", a.method, "convnet", 4, 32, 16, 256, 3, 1, 0, "fp32", False, False
        )
    else:
        r = bench_pretrain(
            a.device,
            a.method,
            a.backbone,
            32,
            a.batch,
            a.image_size,
            a.n_images,
            a.steps,
            5,
            a.workers,
            a.precision,
            True,
            not a.no_compile,
        )
    print_result(r)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
