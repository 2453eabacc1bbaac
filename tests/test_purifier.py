"""Tests of the Purifier, its step rules, the noise schedule and the denoiser folder format."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from ssl_robust.purify import (
    SAMPLERS,
    UNET_PRESETS,
    Purifier,
    build_unet,
    ddim_schedule,
    ddim_step,
    ddpm_step,
    load_denoiser,
    make_scheduler,
    save_denoiser,
    t_star_from_sigma,
)

SIZE = 8  # image side; the tiny UNet downsamples once


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=SIZE).eval()


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return make_scheduler()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SETTINGS = [
    {"sampler": "ddpm", "t_star": 4},
    {"sampler": "ddim", "t_star": 50, "ddim_steps": 3},
    {"sampler": "oneshot", "t_star": 50},
]


# ----------------------------------------------------------------------------- schedule


def _hand_alphas_cumprod(num_steps: int = 1000) -> list[float]:
    """prod_{i<=t} (1 - beta_i) with linear betas 1e-4..0.02 (Ho et al. 2020, Sec. 4)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (num_steps - 1) for i in range(num_steps)]
    out, acc = [], 1.0
    for beta in betas:
        acc *= 1.0 - beta
        out.append(acc)
    return out


def test_alphas_cumprod_match_hand_computed_linear_schedule(scheduler: DDPMScheduler) -> None:
    hand = _hand_alphas_cumprod()
    for t in (0, 1, 99, 499, 999):
        assert scheduler.alphas_cumprod[t].item() == pytest.approx(hand[t], rel=1e-5)
    # Pinned numbers: abar_0 = 1 - 1e-4; abar at DiffPure's t* = 0.1 (index 99) is ~0.8970.
    assert hand[0] == pytest.approx(0.9999)
    assert scheduler.alphas_cumprod[99].item() == pytest.approx(0.89702, abs=2e-5)
    assert scheduler.config["clip_sample"] and scheduler.config["prediction_type"] == "epsilon"


def test_t_star_from_sigma_picks_nearest_noise_level(scheduler: DDPMScheduler) -> None:
    hand = _hand_alphas_cumprod()
    ratios = [math.sqrt((1 - a) / a) for a in hand]
    best = min(range(len(ratios)), key=lambda i: abs(ratios[i] - 0.5))
    t_star = t_star_from_sigma(scheduler.alphas_cumprod, 0.25)
    assert t_star == best + 1 == 145  # 1-based: abar_{t*} = alphas_cumprod[t* - 1]
    assert abs(ratios[t_star - 1] - 0.5) < abs(ratios[t_star - 2] - 0.5)
    assert abs(ratios[t_star - 1] - 0.5) < abs(ratios[t_star] - 0.5)
    assert t_star_from_sigma(scheduler.alphas_cumprod, 0.0) == 0
    assert Purifier(build_unet("tiny", SIZE), scheduler, sigma=0.25).t_star == 145


def test_diffuse_matches_diffusers_add_noise(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    # x_{t*} = sqrt(abar) x0 + sqrt(1 - abar) eps with abar = alphas_cumprod[t* - 1] (t* is
    # 1-based, diffusers' timestep index is t* - 1), the noise drawn from the generator.
    purifier = Purifier(unet, scheduler, t_star=100)
    x0 = _images(2, seed=5) * 2 - 1
    noise = torch.randn(x0.shape, generator=_gen(1))
    ref = scheduler.add_noise(x0, noise, torch.tensor([99]))
    torch.testing.assert_close(purifier.diffuse(x0, _gen(1)), ref, atol=1e-6, rtol=1e-6)


def test_noise_sigma_is_the_pixel_noise_of_t_star(scheduler: DDPMScheduler) -> None:
    # sigma = sqrt((1 - abar) / abar) / 2: noise of that std on [0, 1] images is diffusing to t*
    # (the factor 2 of the [0, 1] -> [-1, 1] map), so it maps back to the same t*.
    ac = scheduler.alphas_cumprod
    for t_star in (1, 100, 145, 500):
        purifier = Purifier(build_unet("tiny", SIZE), scheduler, t_star=t_star)
        abar = ac[t_star - 1].item()
        assert purifier.noise_sigma == pytest.approx(math.sqrt((1 - abar) / abar) / 2, rel=1e-6)
        assert t_star_from_sigma(ac, purifier.noise_sigma) == t_star
    assert Purifier(build_unet("tiny", SIZE), scheduler, sigma=0.25).noise_sigma == (
        pytest.approx(0.25, abs=0.002)
    )


def test_ddim_schedule_trailing_spacing() -> None:
    assert ddim_schedule(100, 5) == [100, 80, 60, 40, 20]
    assert ddim_schedule(10, 3) == [10, 7, 3]
    assert ddim_schedule(5, 5) == [5, 4, 3, 2, 1]
    assert ddim_schedule(7, 1) == [7]


# ----------------------------------------------------------------------------- steps vs diffusers


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(scheduler: DDPMScheduler, variance_type: str) -> None:
    # In float64: diffusers forms beta_t = 1 - abar_t / abar_prev in the tensors' dtype, which in
    # float32 loses ~1e-3 of beta_t to cancellation; the step rule itself must agree exactly.
    g = _gen(1)
    shape = (2, 3, SIZE, SIZE)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    ac = scheduler.alphas_cumprod.double()
    ref_sched = DDPMScheduler.from_config(scheduler.config, variance_type=variance_type)
    ref_sched.alphas_cumprod, ref_sched.one = ac, torch.tensor(1.0, dtype=torch.float64)
    for t in (1, 2, 50, 400, 1000):  # 1-based step; diffusers index t - 1
        abar_prev = 1.0 if t == 1 else ac[t - 2].item()
        mine = ddpm_step(
            x_t, eps, ac[t - 1].item(), abar_prev, _gen(7), variance_type=variance_type
        )
        ref = ref_sched.step(eps, t - 1, x_t, generator=_gen(7)).prev_sample
        torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)


def test_ddim_step_matches_diffusers(scheduler: DDPMScheduler) -> None:
    g = _gen(2)
    x_t, eps = (
        torch.randn(2, 3, SIZE, SIZE, generator=g),
        torch.randn(2, 3, SIZE, SIZE, generator=g),
    )
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(50)  # step ratio 20: index 99 -> 79, ..., 19 -> final (abar = 1)
    ac = scheduler.alphas_cumprod.double()
    for t in (100, 20):
        abar_prev = 1.0 if t == 20 else ac[t - 21].item()
        mine = ddim_step(x_t, eps, ac[t - 1].item(), abar_prev)
        ref = ddim.step(eps, t - 1, x_t, eta=0.0).prev_sample
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_ddpm_reverse_matches_diffusers_loop(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    purifier = Purifier(unet, scheduler, t_star=6, sampler="ddpm")
    x_t = torch.randn(2, 3, SIZE, SIZE, generator=_gen(3))
    with torch.no_grad():
        mine = purifier.reverse(x_t, _gen(11))
        ref_sched, g, x = make_scheduler(), _gen(11), x_t.clone()
        for index in range(5, -1, -1):
            eps = unet(x, index).sample
            x = ref_sched.step(eps, index, x, generator=g).prev_sample
    # float32 beta cancellation in diffusers (see the single-step test) bounds the agreement.
    torch.testing.assert_close(mine, x, atol=2e-4, rtol=1e-4)


def test_ddim_reverse_matches_diffusers_loop(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    purifier = Purifier(unet, scheduler, t_star=100, sampler="ddim", ddim_steps=5)
    x_t = torch.randn(2, 3, SIZE, SIZE, generator=_gen(4))
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    with torch.no_grad():
        mine = purifier.reverse(x_t)
        x = x_t.clone()
        for index in (99, 79, 59, 39, 19):
            x = ddim.step(unet(x, index).sample, index, x, eta=0.0).prev_sample
    torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5)


def test_oneshot_equals_single_step_ddim(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    x = _images()
    one = Purifier(unet, scheduler, t_star=40, sampler="oneshot")(x, _gen(5))
    ddim = Purifier(unet, scheduler, t_star=40, sampler="ddim", ddim_steps=1)(x, _gen(5))
    torch.testing.assert_close(one, ddim)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_noise_is_exact_identity(
    unet: UNet2DModel, scheduler: DDPMScheduler, sampler: str
) -> None:
    x = _images()
    for kwargs in ({"t_star": 0}, {"sigma": 0.0}):
        purifier = Purifier(unet, scheduler, sampler=sampler, **kwargs)
        assert purifier.nfe == 0
        assert torch.equal(purifier(x, _gen(0)), x)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: k["sampler"])
def test_output_shape_range_and_seeding(
    unet: UNet2DModel, scheduler: DDPMScheduler, kwargs: dict
) -> None:
    purifier = Purifier(unet, scheduler, **kwargs)
    x = _images(3)
    out = purifier(x, _gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x, atol=1e-3)  # it did something
    assert torch.equal(out, purifier(x, _gen(0)))
    assert not torch.allclose(out, purifier(x, _gen(1)), atol=1e-4)


def test_fixed_noise_repeats_and_rejects_generator(
    unet: UNet2DModel, scheduler: DDPMScheduler
) -> None:
    x = _images()
    fixed = Purifier(unet, scheduler, t_star=4, sampler="ddpm", fixed_noise=True, seed=3)
    assert torch.equal(fixed(x), fixed(x))
    other_seed = Purifier(unet, scheduler, t_star=4, sampler="ddpm", fixed_noise=True, seed=4)
    assert not torch.allclose(fixed(x), other_seed(x), atol=1e-4)
    free = Purifier(unet, scheduler, t_star=4, sampler="ddpm")
    assert not torch.allclose(free(x), free(x), atol=1e-4)
    with pytest.raises(ValueError, match="do not pass a generator"):
        fixed(x, _gen(0))


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: k["sampler"])
def test_gradients_reach_input_with_and_without_checkpointing(
    unet: UNet2DModel, scheduler: DDPMScheduler, kwargs: dict
) -> None:
    grads = []
    for checkpointing in (False, True):
        purifier = Purifier(unet, scheduler, gradient_checkpointing=checkpointing, **kwargs)
        x = _images().requires_grad_(True)
        (purifier(x, _gen(9)) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        grads.append(x.grad)
    # Checkpointing recomputes the same UNet calls: the gradient is unchanged.
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"sampler": "ddpm", "t_star": 7}, 7),
        ({"sampler": "ddim", "t_star": 100, "ddim_steps": 5}, 5),
        ({"sampler": "ddim", "t_star": 3, "ddim_steps": 3}, 3),
        ({"sampler": "oneshot", "t_star": 300}, 1),
        ({"sampler": "ddpm", "t_star": 0}, 0),
    ],
)
def test_nfe_matches_counted_unet_calls(
    unet: UNet2DModel, scheduler: DDPMScheduler, kwargs: dict, expected: int
) -> None:
    purifier = Purifier(unet, scheduler, **kwargs)
    timesteps: list[int] = []
    handle = unet.register_forward_hook(lambda m, args, out: timesteps.append(int(args[1][0])))
    try:
        with torch.no_grad():
            purifier(_images(4), _gen(0))  # one batched call per network evaluation
    finally:
        handle.remove()
    assert purifier.nfe == expected == len(timesteps)
    assert timesteps == [t - 1 for t in purifier.schedule]  # diffusers indices


def _unet_precision(unet: torch.nn.Module, run: Any) -> tuple[Any, list[tuple[bool, Any, Any]]]:
    """``run()``'s result and, per UNet call, (autocast on, its dtype, the output's dtype)."""
    calls: list[tuple[bool, Any, Any]] = []

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        on = torch.is_autocast_enabled("cpu")
        calls.append((on, torch.get_autocast_dtype("cpu") if on else None, out.sample.dtype))

    handle = unet.register_forward_hook(hook)
    try:
        return run(), calls
    finally:
        handle.remove()


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["sampler"] for s in SETTINGS])
def test_bf16_autocast_runs_close_to_fp32(
    unet: UNet2DModel, scheduler: DDPMScheduler, setting: dict[str, Any]
) -> None:
    x = _images()
    fp32, calls32 = _unet_precision(unet, lambda: Purifier(unet, scheduler, **setting)(x, _gen(0)))
    purifier = Purifier(unet, scheduler, dtype=torch.bfloat16, **setting)
    bf16, calls16 = _unet_precision(unet, lambda: purifier(x, _gen(0)))
    # Every UNet call of the bf16 purifier runs under bf16 autocast and returns bf16; the fp32
    # purifier's calls run in fp32. The sampler around them stays fp32.
    assert len(calls16) == len(calls32) == purifier.nfe
    assert calls16 == [(True, torch.bfloat16, torch.bfloat16)] * purifier.nfe
    assert calls32 == [(False, None, torch.float32)] * purifier.nfe
    assert bf16.dtype == torch.float32
    # bf16 rounding changes the result, a little.
    assert not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().mean() < 0.02


# ----------------------------------------------------------------------------- validation


def test_constructor_validation(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    with pytest.raises(ValueError, match=r"t_star must be in \[0, 1000\]"):
        Purifier(unet, scheduler, t_star=1001)
    with pytest.raises(ValueError, match=r"t_star must be in \[0, 1000\]"):
        Purifier(unet, scheduler, t_star=-1)
    with pytest.raises(ValueError, match="exactly one of t_star and sigma"):
        Purifier(unet, scheduler, t_star=10, sigma=0.1)
    with pytest.raises(ValueError, match="exactly one of t_star and sigma"):
        Purifier(unet, scheduler)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        Purifier(unet, scheduler, sigma=-0.1)
    with pytest.raises(ValueError, match="ddim_steps must be <= t_star"):
        Purifier(unet, scheduler, t_star=4, sampler="ddim", ddim_steps=5)
    with pytest.raises(ValueError, match="ddim_steps must be >= 1"):
        Purifier(unet, scheduler, t_star=4, sampler="ddim", ddim_steps=0)
    with pytest.raises(ValueError, match=r"unknown sampler 'ddpmm'.*'ddim'.*'oneshot'"):
        Purifier(unet, scheduler, t_star=4, sampler="ddpmm")
    with pytest.raises(ValueError, match="unsupported dtype"):
        Purifier(unet, scheduler, t_star=4, dtype=torch.int8)
    v_pred = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon-prediction"):
        Purifier(unet, v_pred, t_star=4)


def test_forward_validation(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    purifier = Purifier(unet, scheduler, t_star=4)
    with pytest.raises(ValueError, match="expects 3 channels, got 1"):
        purifier(torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="built for 8x8 images, got 16x16"):
        purifier(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        purifier(torch.rand(3, SIZE, SIZE))


def test_purifier_keeps_unet_in_eval_mode(unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    purifier = Purifier(unet, scheduler, t_star=4).train()
    assert purifier.training and not purifier.unet.training


# ----------------------------------------------------------------------------- presets and folders


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets() -> None:
    assert 5_000 <= _n_params(build_unet("tiny", 16)) <= 100_000
    assert 0.9e6 <= _n_params(build_unet("small", 32)) <= 1.3e6
    with pytest.raises(ValueError, match=r"unknown UNet preset 'huge'.*'ddpm-cifar10'"):
        build_unet("huge", 32)


def test_ddpm_cifar10_preset_is_the_google_architecture() -> None:
    # Instantiating the 35.7M model on CPU is slow; the meta device builds it without memory.
    with torch.device("meta"):
        unet = build_unet("ddpm-cifar10", 32)
    assert _n_params(unet) == 35_746_307
    cfg = unet.config
    assert tuple(cfg["block_out_channels"]) == (128, 256, 256, 256)
    assert cfg["layers_per_block"] == 2 and cfg["sample_size"] == 32
    assert tuple(cfg["down_block_types"]) == UNET_PRESETS["ddpm-cifar10"]["down_block_types"]
    assert cfg["flip_sin_to_cos"] is False and cfg["freq_shift"] == 1


def test_save_load_round_trip_is_bit_exact(unet: UNet2DModel, tmp_path: Path) -> None:
    scheduler = make_scheduler(num_train_timesteps=500, beta_end=0.03)
    save_denoiser(unet, scheduler, tmp_path / "den")
    assert (tmp_path / "den" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # The folder is also a diffusers DDPMPipeline.
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "den", local_files_only=True)
    assert torch.equal(pipeline.unet.conv_in.weight, unet.conv_in.weight)
    loaded, loaded_sched = load_denoiser(tmp_path / "den")
    ref, got = unet.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded_sched.config) == public(scheduler.config)
    assert torch.equal(loaded_sched.alphas_cumprod, scheduler.alphas_cumprod)


def test_load_bare_unet_folder_uses_default_schedule(unet: UNet2DModel, tmp_path: Path) -> None:
    unet.save_pretrained(tmp_path / "bare")
    loaded, scheduler = load_denoiser(tmp_path / "bare")
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(scheduler.alphas_cumprod, make_scheduler().alphas_cumprod)
    # A model snapshot keeps its schedule next to the UNet config.
    make_scheduler(num_train_timesteps=100).save_pretrained(tmp_path / "bare")
    assert load_denoiser(tmp_path / "bare")[1].config["num_train_timesteps"] == 100


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_denoiser(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_denoiser(tmp_path / "empty")
    (tmp_path / "noweights" / "unet").mkdir(parents=True)
    (tmp_path / "noweights" / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="noweights"):
        load_denoiser(tmp_path / "noweights")


# ----------------------------------------------------------------------------- benchmark


def _bench_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "purify_bench.py"
    spec = importlib.util.spec_from_file_location("purify_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_purify_smoke_rows(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _bench_module().bench_purify(
        "cpu",
        preset="tiny",
        batch=2,
        image_size=SIZE,
        samplers=(("oneshot", None), ("ddim", 2), ("ddpm", 3)),
        dtypes=("fp32",),
        repeats=1,
        t_star=4,
        raw_calls=2,
        warmup=0,
    )
    assert [(r["kind"], r["sampler"], r["nfe"]) for r in rows] == [
        ("raw", "-", 2),
        ("purifier", "oneshot", 1),
        ("purifier", "ddim", 2),
        ("purifier", "ddpm", 3),
    ]
    for r in rows[1:]:
        assert r["image_nfe_per_s"] == pytest.approx(r["images_per_s"] * r["nfe"])
        assert r["ratio"] == pytest.approx(r["image_nfe_per_s"] / rows[0]["image_nfe_per_s"])
    assert "img-NFE/s" in capsys.readouterr().out
