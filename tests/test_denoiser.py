"""Tests of DenoiserModule training, its EMA and checkpoints, sampling and the image grids."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.purify import (
    DenoiserModule,
    Purifier,
    build_unet,
    make_scheduler,
    purification_grid,
    save_image_grid,
)
from tests.helpers import blobs

SIZE = 8

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")


def loader(n: int = 64, batch_size: int = 16, labels: bool = True) -> DataLoader:
    x = blobs(n, seed=0)
    dataset = TensorDataset(x, torch.zeros(n, dtype=torch.long)) if labels else TensorDataset(x)
    return DataLoader(dataset, batch_size=batch_size)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_checkpointing": False,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def module(**kwargs: Any) -> DenoiserModule:
    torch.manual_seed(0)
    return DenoiserModule(build_unet("tiny", SIZE), make_scheduler(), **kwargs)


def test_fast_dev_run_logs_train_and_bucketed_val_metrics() -> None:
    model = module(num_timestep_buckets=4)
    tr = trainer(fast_dev_run=True)
    tr.fit(model, loader(), loader(labels=False))  # (x, y) and bare-x batches
    metrics = tr.callback_metrics
    expected = {"val/mse_t0-249", "val/mse_t250-499", "val/mse_t500-749", "val/mse_t750-999"}
    assert {"train/loss", "val/loss"} | expected <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in expected)
    # Stratified buckets with equal counts: val/loss is the mean of the bucket means.
    bucket_mean = torch.stack([metrics[k] for k in expected]).mean()
    torch.testing.assert_close(metrics["val/loss"], bucket_mean, rtol=1e-5, atol=1e-6)
    # After one step the UNet predicts close to nothing, so the MSE is near Var(eps) = 1.
    assert 0.3 < metrics["val/loss"].item() < 3.0


def test_the_forward_process_stays_float32_under_bf16_true() -> None:
    """precision=bf16-true casts the module to bf16: the noise schedule must not follow (in
    bf16, abar rounds to 1 for t < 10 and the smallest noise levels vanish)."""
    m = module().to(torch.bfloat16)  # what Lightning's bf16-true does to the module
    seen: list[torch.Tensor] = []
    m.unet.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = blobs(8, seed=1)
    t = torch.tensor([0, 1, 5, 9, 20, 50, 100, 999])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    m._noise_loss(x.to(torch.bfloat16), t, noise)
    expected = make_scheduler().add_noise(x.to(torch.bfloat16).float() * 2 - 1, noise, t)
    assert seen[0].dtype == torch.bfloat16
    # Only the final rounding of x_t to bf16 (relative 2^-8) separates the two.
    torch.testing.assert_close(seen[0].float(), expected, rtol=2**-7, atol=1e-3)
    assert (seen[0][0].float() - (x[0].to(torch.bfloat16).float() * 2 - 1)).abs().max() > 0.01


def test_validation_is_deterministic() -> None:
    model = module()
    tr = trainer()
    first = tr.validate(model, loader(), verbose=False)[0]["val/loss"]
    second = tr.validate(model, loader(), verbose=False)[0]["val/loss"]
    assert first == second


def test_warmup_then_cosine_learning_rate() -> None:
    lrs: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = module(lr=1e-3, warmup_steps=4)
    trainer(max_epochs=3, callbacks=[RecordLR()]).fit(model, loader(n=64, batch_size=16))
    # 3 epochs x 4 batches = 12 steps, taken from trainer.estimated_stepping_batches.
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))  # cosine decay after warmup
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi))))


def test_warmup_then_constant_learning_rate_and_dropout() -> None:
    lrs: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    unet = build_unet("tiny", SIZE, dropout=0.1)
    model = DenoiserModule(unet, make_scheduler(), lr=1e-3, warmup_steps=4, lr_schedule="constant")
    trainer(max_epochs=2, callbacks=[RecordLR()]).fit(model, loader(n=64, batch_size=16))
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])  # Ho et al.
    # Dropout acts in training only: the exported (eval-mode) UNet is deterministic.
    assert unet.config["dropout"] == 0.1
    x, t = blobs(2, seed=3) * 2 - 1, torch.tensor([10, 500])
    unet.train()
    assert not torch.equal(unet(x, t).sample, unet(x, t).sample)
    unet.eval()
    assert torch.equal(unet(x, t).sample, unet(x, t).sample)
    with pytest.raises(ValueError, match=r"unknown lr_schedule 'linear'; choose from"):
        DenoiserModule(build_unet("tiny", SIZE), make_scheduler(), lr_schedule="linear")


def test_a_warm_up_longer_than_the_run_warns_how_far_the_rate_gets() -> None:
    model = module(lr=1e-3, warmup_steps=16)
    tr = trainer(max_epochs=1)
    with pytest.warns(UserWarning, match=r"warmup_steps=16 is at least the whole run \(4 steps\)"):
        tr.fit(model, loader(n=64, batch_size=16))
    # The schedule is unchanged: after 4 steps the rate is 5/16 of lr, still warming up.
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 5 / 16)


def test_ema_tracks_optimizer_steps_and_survives_checkpoint(tmp_path: Path) -> None:
    model = module(lr=1e-3, warmup_steps=1, ema_decay=0.99)
    tr = trainer(max_steps=6)
    tr.fit(model, loader())
    assert model.ema.optimization_step == 6
    online = torch.cat([p.flatten() for p in model.unet.parameters()])
    ema = torch.cat([p.flatten() for p in model.ema_unet().parameters()])
    assert not torch.allclose(online, ema)

    path = tmp_path / "last.ckpt"
    tr.save_checkpoint(path)
    restored = DenoiserModule.load_from_checkpoint(
        path, unet=build_unet("tiny", SIZE), scheduler=make_scheduler()
    )
    assert restored.ema.optimization_step == 6
    for a, b in zip(model.ema.shadow_params, restored.ema.shadow_params):
        assert torch.equal(a, b)
    assert restored.hparams["ema_decay"] == 0.99

    # Resuming continues the same EMA: two more optimizer steps, not a fresh average.
    resumed = module(lr=1e-3, warmup_steps=1, ema_decay=0.99)
    trainer(max_steps=8).fit(resumed, loader(), ckpt_path=path)
    assert resumed.ema.optimization_step == 8


def test_training_makes_oneshot_purification_denoise() -> None:
    """A real learning check: the one-shot purifier beats the noisy input only after training."""
    clean = blobs(64, seed=123) * 2 - 1  # held-out images, (64, 3, 8, 8) in [-1, 1]
    scheduler = make_scheduler()

    def errors(unet: torch.nn.Module) -> tuple[float, float]:
        purifier = Purifier(unet, scheduler, sigma=0.1, sampler="oneshot")  # t* = 58
        x_t = purifier.diffuse(clean, torch.Generator().manual_seed(1))
        with torch.no_grad():
            denoised = purifier.reverse(x_t)
        noisy = x_t / purifier._abar[purifier.t_star] ** 0.5  # doing nothing: x0 + 0.2 eps
        return ((noisy - clean) ** 2).mean().item(), ((denoised - clean) ** 2).mean().item()

    pl.seed_everything(0, verbose=False)
    model = DenoiserModule(build_unet("tiny", SIZE), scheduler, lr=3e-3, warmup_steps=20)
    noisy_err, before = errors(model.unet)
    assert before > 0.9 * noisy_err  # an untrained UNet does not denoise
    data = DataLoader(TensorDataset(blobs(512, seed=0)), batch_size=32, shuffle=True)
    trainer(max_steps=100).fit(model, data)
    noisy_err_after, after = errors(model.unet)
    assert noisy_err_after == noisy_err
    assert after < 0.6 * noisy_err


def test_sample_shapes_ranges_and_determinism() -> None:
    model = DenoiserModule(
        build_unet("tiny", SIZE), make_scheduler(num_train_timesteps=20, beta_end=0.2)
    )
    ddpm = model.sample(3, torch.Generator().manual_seed(0))
    assert ddpm.shape == (3, 3, SIZE, SIZE) and ddpm.min() >= 0 and ddpm.max() <= 1
    assert torch.equal(ddpm, model.sample(3, torch.Generator().manual_seed(0)))
    ddim = model.sample(3, torch.Generator().manual_seed(0), sampler="ddim", ddim_steps=4)
    assert ddim.shape == ddpm.shape and not torch.equal(ddim, ddpm)
    assert model.unet.training  # sampling left the training flag as it was
    with pytest.raises(ValueError, match="choose from"):
        model.sample(2, sampler="oneshot")


def test_purification_grid_and_png(tmp_path: Path) -> None:
    unet, scheduler = build_unet("tiny", SIZE).eval(), make_scheduler()
    clean = blobs(4, seed=5)
    purifier = Purifier(unet, scheduler, t_star=30, sampler="ddim", ddim_steps=2)
    grid = purification_grid(purifier, clean, torch.Generator().manual_seed(0))
    assert grid.shape == (12, 3, SIZE, SIZE) and grid.min() >= 0 and grid.max() <= 1
    assert torch.equal(grid[:4], clean)
    # The noised row is exactly what the purifier diffuses to with this generator.
    x_t = purifier.diffuse(clean * 2 - 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(grid[4:8], ((x_t + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(
        grid[8:], purifier(clean, torch.Generator().manual_seed(0)), atol=1e-6, rtol=0
    )
    path = save_image_grid(grid, tmp_path / "grids" / "purify.png", nrow=4)
    with Image.open(path) as image:  # 4 x 3 tiles of 8 px with 2 px padding
        assert image.size == (4 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2)


def test_constructor_validation() -> None:
    unet, scheduler = build_unet("tiny", SIZE), make_scheduler()
    with pytest.raises(ValueError, match=r"num_timestep_buckets must be in \[1, 1000\]"):
        DenoiserModule(unet, scheduler, num_timestep_buckets=0)
    with pytest.raises(ValueError, match="ema_decay"):
        DenoiserModule(unet, scheduler, ema_decay=1.5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        DenoiserModule(unet, scheduler, lr=0.0)
