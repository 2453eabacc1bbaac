"""The device data path on a real GPU: no host synchronisation, same views as on the CPU.

A blocking operation on the view path (a ``torch.tensor(list, device="cuda")`` copy, a boolean
mask, an ``.item()``) makes the host wait for the previous training step before it can queue
the next batch's views, and the GPU then idles while they are dispatched. These tests run
the path under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any such call.
Skipped without CUDA; ``benchmarks/device_session.sh`` runs them first on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from ssl_robust.data import gpu_views as gv
from ssl_robust.data.datamodule import SSLDataModule
from ssl_robust.data.datasets import ArraySource
from ssl_robust.methods.monitor import OnlineMonitor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


@contextmanager
def no_sync() -> Iterator[None]:
    """Raise on any synchronising CUDA call inside the block (warm up outside it)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _images(n: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def _all_views() -> list[tuple[str, gv.BatchViewTransform]]:
    simclr = gv.simclr_views(32, gaussian_blur=0.5)
    byol = gv.byol_views(32, gaussian_blur=0.5)
    return [("simclr", simclr[0]), ("byol_view1", byol[0]), ("byol_view2", byol[1])]


@pytest.mark.parametrize("size", [32, 48])  # 48 -> 32: the antialiased downscaling path
def test_device_views_do_not_synchronise(size: int) -> None:
    x = _images(256, size).to(CUDA)
    for _name, view in _all_views():
        view.to(CUDA)
        gen = torch.Generator(device=CUDA).manual_seed(1)
        view(x, gen)  # warm-up: lazy initialisation may synchronise once
        with no_sync():
            out = view(x, gen)
        assert out.shape == (256, 3, 32, 32) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("size", [32, 48])
def test_device_views_match_cpu_views(size: int) -> None:
    x = _images(128, size)
    for name, view in _all_views():
        params = view.sample_params(128, size, size, torch.Generator().manual_seed(2))
        cpu = view.apply_params(x, params)
        gpu = view.to(CUDA).apply_params(x.to(CUDA), {k: v.to(CUDA) for k, v in params.items()})
        view.to("cpu")
        err = (gpu.cpu() - cpu).abs()
        # float32 on different kernels; normalised units (1/255 ~ 0.017 after /std).
        assert err.max() < 2e-3 and err.mean() < 1e-4, (name, err.max(), err.mean())


def test_compiled_device_views_match_eager_and_do_not_synchronise() -> None:
    x = _images(256, 32).to(CUDA)
    for name, view in _all_views():
        view.to(CUDA)
        eager = view(x, torch.Generator(device=CUDA).manual_seed(3))
        view.compile_apply()
        compiled = view(x, torch.Generator(device=CUDA).manual_seed(3))
        torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=0, msg=name)
        with no_sync():
            view(x, torch.Generator(device=CUDA).manual_seed(4))


def test_datamodule_device_batch_does_not_synchronise() -> None:
    images = _images(512, 32).permute(0, 2, 3, 1).numpy()
    source = ArraySource(images, np.arange(512) % 10, [str(i) for i in range(10)])
    views = gv.simclr_views(32)
    dm = SSLDataModule(source, source, views, gv.eval_transform(32), batch_size=128, augment="gpu")
    batch = next(iter(dm.train_dataloader()))
    on_device = {
        k: v.to(CUDA, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    dm.on_after_batch_transfer(dict(on_device), 0)  # warm-up: uploads images and buffers once
    with no_sync():
        out_views, labels = dm.on_after_batch_transfer(dict(on_device), 0)
    assert [v.device.type for v in out_views] == [CUDA.type] * 2 and labels.shape == (128,)
    assert views[0].normalize.mean.device.type == CUDA.type  # moved once, not copied per batch


def test_datamodule_device_validation_batch_does_not_synchronise() -> None:
    images = _images(512, 32).permute(0, 2, 3, 1).numpy()
    source = ArraySource(images, np.arange(512) % 10, [str(i) for i in range(10)])
    val = ArraySource(images[:300], np.arange(300) % 10, source.classes)
    dm = SSLDataModule(
        source, val, gv.simclr_views(32), lambda x: x, batch_size=128, augment="gpu",
        eval_batch_size=128, device_eval_transform=gv.eval_transform(32),
    )  # fmt: skip
    assert dm.device_validation
    for loader_idx, loader in enumerate(dm.val_dataloader()):
        batch = next(iter(loader))
        on_device = {k: v.to(CUDA, non_blocking=True) for k, v in batch.items()}
        dm.on_after_batch_transfer(dict(on_device), loader_idx)  # warm-up: uploads once
        with no_sync():
            x, labels = dm.on_after_batch_transfer(dict(on_device), loader_idx)
        assert x.device.type == CUDA.type and x.shape == (128, 3, 32, 32)
        assert torch.equal(labels.cpu(), batch["label"])
        expected = gv.eval_transform(32).to(CUDA)(
            torch.from_numpy(images[batch["eval_index"].numpy()]).permute(0, 3, 1, 2).to(CUDA)
        )
        torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_online_probe_step_does_not_synchronise() -> None:
    monitor = OnlineMonitor(feat_dim=16, num_classes=10).to(CUDA)
    features = torch.randn(64, 16, device=CUDA)
    labels = torch.arange(64, device=CUDA) % 11 - 1  # some unlabeled (-1)
    monitor.probe_step(features, labels)[0].backward()  # warm-up (cuBLAS handles)
    with no_sync():
        loss, _acc = monitor.probe_step(features, labels)
        loss.backward()


def _step_is_sync_free(model: Any, before_step: Callable[[], None]) -> None:
    """One whole training step outside Lightning (``before_step``, both views through the
    model, loss, probe, backward and SGD), after a warm-up, under ``no_sync``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    views = [torch.randn(64, 3, 32, 32, device=CUDA) for _ in range(2)]
    labels = torch.arange(64, device=CUDA) % 10

    def step() -> None:
        before_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, features = model.ssl_loss(views)
            probe_loss, _ = model.monitor.probe_step(features, labels)
        opt.zero_grad(set_to_none=True)
        (loss + probe_loss).backward()
        opt.step()

    step()  # warm-up: cuDNN and cuBLAS handles, optimizer state
    with no_sync():
        step()


def test_byol_step_does_not_synchronise() -> None:
    # With the momentum update of the target network before the step.
    from lightly.models.utils import update_momentum

    from ssl_robust.methods import BYOL
    from ssl_robust.methods.optim import OptimizerSpec
    from ssl_robust.models.backbones import build_backbone

    model = BYOL(build_backbone("resnet18_cifar", 8), 10, 64, OptimizerSpec(), 64, 32, 64).to(CUDA)

    def momentum_update() -> None:
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)

    _step_is_sync_free(model, momentum_update)


def test_simclr_step_does_not_synchronise() -> None:
    # The NT-Xent loss of methods.losses: no boolean mask.
    from ssl_robust.methods import SimCLR
    from ssl_robust.methods.optim import OptimizerSpec
    from ssl_robust.models.backbones import build_backbone

    model = SimCLR(build_backbone("resnet18_cifar", 8), 10, 64, OptimizerSpec(), 0.5, 64, 32)
    _step_is_sync_free(model.to(CUDA), lambda: None)
