"""Tests of DenoisedViews: one-shot denoised SSL views from a frozen DDPM UNet."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.purify import DenoiserModule, Purifier, build_unet, make_scheduler, save_denoiser
from ssl_robust.purify.views import MODES, DenoisedViews, load_denoised_views
from tests.helpers import blobs

SIZE = 8
MEAN = (0.3, 0.4, 0.5)
STD = (0.2, 0.25, 0.3)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", SIZE)


def views_module(unet: torch.nn.Module, **kwargs: object) -> DenoisedViews:
    args: dict[str, object] = {"t_min": 10, "t_max": 60, "mean": MEAN, "std": STD, **kwargs}
    return DenoisedViews(unet, make_scheduler(), **args)  # type: ignore[arg-type]


def two_views(n: int = 6) -> list[torch.Tensor]:
    return [normalise(blobs(n, seed=1)), normalise(blobs(n, seed=2))]


def test_second_mode_replaces_only_the_second_view(unet: torch.nn.Module) -> None:
    views = two_views()
    out = views_module(unet)(views, torch.Generator().manual_seed(0))
    assert len(out) == 2
    assert out[0] is views[0]  # untouched
    assert out[1].shape == views[1].shape and out[1].dtype == views[1].dtype
    assert not torch.allclose(out[1], views[1], atol=1e-3)
    assert not out[1].requires_grad
    # The output is a normalised view of a [0, 1] image: the predicted x0 is clipped to [-1, 1].
    x01 = unnormalise(out[1])
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5


def test_both_mode_replaces_both_views_with_independent_noise(unet: torch.nn.Module) -> None:
    views = [normalise(blobs(4, seed=1))] * 2  # the same images in both views
    out = views_module(unet, mode="both")(views, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], views[0], atol=1e-3)
    assert not torch.allclose(out[1], views[1], atol=1e-3)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # own t and noise per view


def test_extra_views_pass_through(unet: torch.nn.Module) -> None:
    views = [*two_views(), normalise(blobs(6, seed=3))]
    out = views_module(unet, mode="both")(views, torch.Generator().manual_seed(0))
    assert len(out) == 3 and out[2] is views[2]


def test_t_zero_is_the_identity(unet: torch.nn.Module) -> None:
    views = two_views()
    out = views_module(unet, t_min=0, t_max=0, mode="both")(views)
    for a, b in zip(out, views):
        torch.testing.assert_close(a, b)


def test_generator_determinism(unet: torch.nn.Module) -> None:
    module = views_module(unet)
    a = module(two_views(), torch.Generator().manual_seed(5))[1]
    b = module(two_views(), torch.Generator().manual_seed(5))[1]
    c = module(two_views(), torch.Generator().manual_seed(6))[1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("t", [1, 40, 1000])
def test_matches_the_oneshot_purifier_at_a_fixed_step(unet: torch.nn.Module, t: int) -> None:
    """Reference: Purifier's one-shot x0 prediction (itself checked against diffusers)."""
    clean = blobs(5, seed=4)  # (5, 3, 8, 8) in [0, 1]
    out = views_module(unet, t_min=t, t_max=t)(
        [normalise(clean)] * 2, torch.Generator().manual_seed(3)
    )

    g = torch.Generator().manual_seed(3)  # the same draws: the steps, then the noise
    torch.randint(t, t + 1, (5,), generator=g)
    eps = torch.randn(clean.shape, generator=g)
    purifier = Purifier(unet, make_scheduler(), t_star=t, sampler="oneshot")
    abar = purifier._abar[t]
    x_t = math.sqrt(abar) * (clean * 2 - 1) + math.sqrt(1 - abar) * eps
    with torch.no_grad():
        expected = (purifier.reverse(x_t) + 1) / 2
    torch.testing.assert_close(unnormalise(out[1]), expected, rtol=1e-4, atol=1e-4)


def test_steps_are_drawn_per_image_in_range(unet: torch.nn.Module) -> None:
    """t ~ U{t_min..t_max}: larger steps leave the output further from the input on average."""
    steps: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        steps.append(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).clone())

    views = [normalise(blobs(64, seed=1))] * 2
    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        low = views_module(unet, t_min=1, t_max=2)(views, torch.Generator().manual_seed(0))[1]
        high = views_module(unet, t_min=900, t_max=1000)(views, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # One UNet call per view batch, conditioned per image on the diffusers index t - 1 of its
    # own step t, t_min <= t <= t_max with both ends drawn.
    assert len(steps) == 2 and all(s.shape == (64,) for s in steps)
    assert set(steps[0].tolist()) == {0, 1}
    assert steps[1].min() >= 899 and steps[1].max() <= 999
    assert len(set(steps[1].tolist())) > 30
    assert (low - views[1]).abs().mean() < 0.2 * (high[1] - views[1]).abs().mean()


def test_unet_is_frozen_and_stays_in_eval(unet: torch.nn.Module) -> None:
    module = views_module(unet).train()
    assert not module.unet.training
    assert not any(p.requires_grad for p in module.parameters())


def test_bf16_autocast_runs(unet: torch.nn.Module) -> None:
    calls: list[tuple[bool, Any, Any]] = []

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        on = torch.is_autocast_enabled("cpu")
        calls.append((on, torch.get_autocast_dtype("cpu") if on else None, out.sample.dtype))

    views = two_views()
    handle = unet.register_forward_hook(hook)
    try:
        ref = views_module(unet)(views, torch.Generator().manual_seed(0))[1]
        fp32_calls = calls[:]
        calls.clear()
        out = views_module(unet, dtype=torch.bfloat16)(views, torch.Generator().manual_seed(0))[1]
    finally:
        handle.remove()
    # The UNet call of the bf16 module runs under bf16 autocast and returns bf16; the default
    # module's runs in fp32. The views come back in their own dtype.
    assert fp32_calls == [(False, None, torch.float32)]
    assert calls == [(True, torch.bfloat16, torch.bfloat16)]
    assert out.dtype == torch.float32
    # bf16 rounding changes the views, a little.
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "first"}, r"unknown mode 'first'; choose from \['both', 'second'\]"),
        ({"t_min": 50, "t_max": 10}, r"0 <= t_min <= t_max <= 1000"),
        ({"t_min": -1}, r"t_min=-1"),
        ({"t_max": 1001}, r"t_max=1001"),
        ({"mean": (0.5, 0.5)}, r"one value per channel \(3\)"),
        ({"std": (0.2, 0.0, 0.3)}, r"std must be positive"),
        ({"dtype": torch.float16}, r"unsupported dtype"),
    ],
)
def test_bad_arguments_raise(unet: torch.nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        views_module(unet, **kwargs)


def test_bad_views_raise(unet: torch.nn.Module) -> None:
    module = views_module(unet)
    with pytest.raises(ValueError, match="at least two views"):
        module([normalise(blobs(2, seed=0))])
    with pytest.raises(ValueError, match=r"expects views of shape \(B, 3, 8, 8\)"):
        module([torch.zeros(2, 3, 16, 16)] * 2)


def test_modes_match_the_pretraining_config() -> None:
    from ssl_robust.config import job_choices

    assert set(job_choices("pretrain")["denoise.mode"]) == set(MODES)


def test_load_from_a_denoiser_folder(unet: torch.nn.Module, tmp_path: Path) -> None:
    save_denoiser(unet, make_scheduler(), tmp_path / "run")
    loaded = load_denoised_views(tmp_path / "run", t_min=5, t_max=20, mean=MEAN, std=STD)
    assert (loaded.t_min, loaded.t_max, loaded.mode) == (5, 20, "second")
    views = two_views()
    expected = views_module(unet, t_min=5, t_max=20)(views, torch.Generator().manual_seed(1))
    got = loaded(views, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got[1], expected[1])
    with pytest.raises(FileNotFoundError):
        load_denoised_views(tmp_path / "missing", t_min=0, t_max=1)


def test_trained_denoiser_brings_views_closer_to_the_clean_image() -> None:
    """Learning check: after brief training the denoised view beats the noisy one."""
    pl.seed_everything(0, verbose=False)
    scheduler = make_scheduler()
    model = DenoiserModule(build_unet("tiny", SIZE), scheduler, lr=3e-3, warmup_steps=20)
    data = DataLoader(TensorDataset(blobs(512, seed=0)), batch_size=32, shuffle=True)
    pl.Trainer(
        accelerator="cpu",
        max_steps=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, data)

    t = 58  # sigma = 0.1 on [0, 1] images (t_star_from_sigma)
    clean = blobs(64, seed=123)
    module = DenoisedViews(model.unet, scheduler, t, t, mean=MEAN, std=STD)
    denoised = unnormalise(module([normalise(clean)] * 2, torch.Generator().manual_seed(1))[1])
    g = torch.Generator().manual_seed(1)
    torch.randint(t, t + 1, (64,), generator=g)
    eps = torch.randn(clean.shape, generator=g)
    abar = float(scheduler.alphas_cumprod[t - 1])
    noisy = clean + math.sqrt((1 - abar) / abar) / 2 * eps  # the same noise, not denoised
    noisy_err = ((noisy - clean) ** 2).mean()
    assert ((denoised - clean) ** 2).mean() < 0.6 * noisy_err
