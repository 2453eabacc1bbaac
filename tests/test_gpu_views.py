"""Batched view transforms against torchvision's functional ops and lightly's PIL transforms."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from lightly.transforms import BYOLView1Transform, BYOLView2Transform, SimCLRTransform
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.simclr_transform import SimCLRViewTransform
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.utils import IMAGENET_NORMALIZE as LIGHTLY_IMAGENET_NORMALIZE
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2 as T

from ssl_robust.data import gpu_views as gv

# Two-sample KS tests below use fixed seeds, so they are deterministic; this p-value floor
# flags distributions that differ, not unlucky draws.
KS_P_MIN = 1e-3


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) uint8 colourful images: 4x4 random colours upsampled, plus texture."""
    gen = torch.Generator().manual_seed(seed)
    base = 0.1 + 0.8 * torch.rand(n, 3, 4, 4, generator=gen)
    img = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.04 * torch.randn(n, 3, size, size, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def _plain(**kwargs: Any) -> gv.BatchViewTransform:
    """A transform with every augmentation off unless switched on in ``kwargs``."""
    base: dict[str, Any] = dict(
        input_size=16,
        cj_prob=0.0,
        min_scale=1.0,
        random_gray_scale=0.0,
        gaussian_blur=0.0,
        hf_prob=0.0,
        normalize=None,
    )
    return gv.BatchViewTransform(**{**base, **kwargs})


def _ks_ok(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    return bool(stats.ks_2samp(np.asarray(a), np.asarray(b)).pvalue > KS_P_MIN)


# ---------------------------------------------------------------------------------------------
# crop sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_crop_params_follow_torchvision_distribution(height: int, width: int) -> None:
    n, scale = 4000, (0.08, 1.0)
    ours = gv.sample_crop_params(
        n, height, width, scale=scale, generator=torch.Generator().manual_seed(0)
    ).double()
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=torch.float64,
    )
    for params in (ours, ref):  # every crop lies inside the image
        top, left, h, w = params.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    area = lambda p: p[:, 2] * p[:, 3] / (height * width)  # noqa: E731
    log_ratio = lambda p: torch.log(p[:, 3] / p[:, 2])  # noqa: E731
    centre_x = lambda p: (p[:, 1] + p[:, 3] / 2) / width  # noqa: E731
    for stat in (area, log_ratio, centre_x):
        a, b = stat(ours), stat(ref)
        assert _ks_ok(a, b)
        standard_error = math.sqrt((a.var() + b.var()) / n)
        assert abs(a.mean() - b.mean()) < 4 * standard_error


@pytest.mark.parametrize("height,width", [(32, 64), (64, 32), (32, 32)])
def test_crop_fallback_is_torchvision_centre_crop(height: int, width: int) -> None:
    # With scale (1, 1) a non-square image never fits a ratio in (3/4, 4/3): every draw
    # takes torchvision's centred fallback, a known answer.
    ours = gv.sample_crop_params(64, height, width, scale=(1.0, 1.0))
    ref = RandomResizedCrop.get_params(torch.empty(1, height, width), [1.0, 1.0], [3 / 4, 4 / 3])
    assert (ours == torch.tensor(ref)).all()


def _uniforms_for(area: float, log_ratio: float, top: float, left: float) -> torch.Tensor:
    """Crop uniforms whose 10 tries all draw ``area`` (fraction of the image, scale
    (0.08, 1)) and ``log_ratio`` (fraction of [log 3/4, log 4/3]), then ``top`` and ``left``."""
    u = torch.empty(1, 22, dtype=torch.float64)
    u[:, :10] = (area - 0.08) / 0.92
    u[:, 10:20] = log_ratio
    u[:, 20], u[:, 21] = top, left
    return u


def test_crop_params_known_answers_at_the_edges() -> None:
    def crop(u: torch.Tensor) -> list[int]:
        return gv._crop_params_from_uniforms(u, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3))[0].tolist()

    # Area 0.75 of 32 x 32 at ratio 4/3: 32 wide (the whole width still fits) and 24 high.
    assert crop(_uniforms_for(0.75, 1 - 1e-12, 0.0, 0.0)) == [0, 0, 24, 32]
    # Area 0.25 at ratio 1: 16 x 16; offsets uniform on {0, ..., 32 - 16}, the last included.
    assert crop(_uniforms_for(0.25, 0.5, 0.999, 0.999)) == [16, 16, 16, 16]
    assert crop(_uniforms_for(0.25, 0.5, 0.0, 0.5)) == [0, 8, 16, 16]


# ---------------------------------------------------------------------------------------------
# resized crop, flips, rotation
# ---------------------------------------------------------------------------------------------


def _upscaled_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth (3, 20, 24) image and crops no larger than the 32-px output."""
    image = _smooth_images(1, 24, seed=1)[0][:, :20, :]
    return image, torch.tensor([[3, 5, 10, 13], [0, 0, 20, 24], [7, 2, 9, 9], [1, 11, 19, 13]])


def _downscaled_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A noise (3, 45, 48) image and crops mostly larger than the 32-px output (STL-10's
    96 -> 64 case): Pillow's widened filter is needed, and noise shows any aliasing."""
    gen = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (3, 45, 48), generator=gen, dtype=torch.uint8)
    return image, torch.tensor([[0, 0, 45, 48], [3, 5, 40, 35], [7, 2, 15, 20], [10, 1, 33, 32]])


@pytest.mark.parametrize("case", [_upscaled_case, _downscaled_case], ids=["up", "down"])
@pytest.mark.parametrize(
    "hflip,vflip,rot", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1)]
)
def test_resized_crop_matches_torchvision_and_pil(
    case: Any, hflip: int, vflip: int, rot: int
) -> None:
    image, params = case()  # non-square images
    x = image.float()[None] / 255
    n = params.shape[0]
    flag = lambda v: torch.full((n,), bool(v))  # noqa: E731
    out = gv.resized_crop(x.expand(n, -1, -1, -1), params, 32, flag(hflip), flag(vflip), flag(rot))
    pil = _to_pil(image)
    for k, (top, left, h, w) in enumerate(params.tolist()):
        ref = TF.resized_crop(x[0], top, left, h, w, [32, 32], antialias=True)
        ref_pil = TF.resized_crop(pil, top, left, h, w, [32, 32])
        if hflip:
            ref, ref_pil = TF.horizontal_flip(ref), TF.horizontal_flip(ref_pil)
        if vflip:
            ref, ref_pil = TF.vertical_flip(ref), TF.vertical_flip(ref_pil)
        if rot:
            ref, ref_pil = TF.rotate(ref, 90), TF.rotate(ref_pil, 90)  # lightly's RandomRotate
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)
        # PIL rounds to uint8 (after each pass) with fixed-point weights: within a grey level.
        assert (out[k] - _from_pil(ref_pil)).abs().max() <= 1.01 / 255


def test_antialiasing_known_answer_on_stripes() -> None:
    # 1-px vertical stripes downscaled 3x: plain bilinear sampling lands on single columns and
    # keeps full-contrast stripes (aliasing); the antialiased resize averages them to grey.
    stripes = (torch.arange(48) % 2).float().expand(1, 3, 48, 48)
    whole = torch.tensor([[0, 0, 48, 48]])
    smooth = gv.resized_crop(stripes, whole, 16)
    aliased = gv.resized_crop(stripes, whole, 16, antialias=False)
    # Interior columns: triangle weights of support 3 over 5 alternating taps, 4/9 or 5/9.
    interior = smooth[..., 1:-1]
    assert ((interior - 0.5).abs() <= 1 / 18 + 1e-6).all()
    assert set(aliased.unique().tolist()) <= {0.0, 1.0}
    assert aliased.std() > 0.45


def test_resampling_paths_agree_when_upscaling() -> None:
    x = _smooth_images(64, 24, seed=5).float() / 255
    gen = torch.Generator().manual_seed(6)
    params = gv.sample_crop_params(64, 24, 24, generator=gen)
    hflip, vflip, rot = (torch.rand(64, generator=gen) < 0.5 for _ in range(3))
    grid = gv.resized_crop(x, params, 32, hflip, vflip, rot, antialias=False)
    matrix = gv.resized_crop(x, params, 32, hflip, vflip, rot, antialias=True)
    torch.testing.assert_close(matrix, grid, atol=1e-5, rtol=0)


def test_resample_weights_rows_are_normalised_and_inside_the_crop() -> None:
    start = torch.tensor([0.0, 5.0, 30.0])
    length = torch.tensor([48.0, 20.0, 10.0])
    w = gv.resample_weights(start, length, 48, 16)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 16))
    cols = torch.arange(48)
    for k in range(3):
        outside = (cols < start[k]) | (cols >= start[k] + length[k])
        assert (w[k][:, outside] == 0).all()


def test_full_image_crop_is_a_resize() -> None:
    x = _smooth_images(4, 16, seed=2)
    up = _plain(input_size=32)(x)
    torch.testing.assert_close(up, TF.resize(x.float() / 255, [32, 32], antialias=True))
    same = _plain(input_size=16)(x)
    assert torch.equal(same, x.float() / 255)


# ---------------------------------------------------------------------------------------------
# colour ops: exact against torchvision for fixed parameters
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def colour_batch() -> torch.Tensor:
    """Mixed images: continuous, uint8-quantised, and with gray (zero-chroma) pixels."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(24, 3, 8, 8, generator=gen)
    x[8:16] = (x[8:16] * 255).round() / 255
    x[16:, :, :4] = x[16:, :1, :4]  # gray pixels exercise the hue special case
    x[20:, :, 4:] = 1.0
    return x


@pytest.mark.parametrize(
    "ours,theirs,low,high",
    [
        (gv.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (gv.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (gv.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (gv.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_match_torchvision(
    colour_batch: torch.Tensor, ours: Any, theirs: Any, low: float, high: float
) -> None:
    factors = torch.linspace(low, high, colour_batch.shape[0])
    out = ours(colour_batch, factors)
    ref = torch.stack([theirs(img, float(f)) for img, f in zip(colour_batch, factors)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hue_by_index", [True, False])
def test_color_jitter_applies_ops_in_per_sample_order(
    colour_batch: torch.Tensor, hue_by_index: bool
) -> None:
    gen = torch.Generator().manual_seed(4)
    n = colour_batch.shape[0]
    factors = torch.rand(n, 4, generator=gen) * torch.tensor([1.6, 1.6, 1.6, 0.8])
    factors += torch.tensor([0.2, 0.2, 0.2, -0.4])
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    out = gv.color_jitter(colour_batch, factors, order, hue_by_index=hue_by_index)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(n):
        ref = colour_batch[k]
        for op in order[k].tolist():
            ref = ops[op](ref, float(factors[k, op]))
        torch.testing.assert_close(out[k], ref, atol=1e-5, rtol=0)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return gv.rgb_to_grayscale(x).flatten(1)  # (B, H * W)


def _saturation(x: torch.Tensor) -> torch.Tensor:
    maxc, minc = x.amax(1), x.amin(1)
    return ((maxc - minc) / maxc.clamp_min(1e-6)).flatten(1).mean(1)


def _hue_angle(x: torch.Tensor) -> torch.Tensor:
    """Chroma-weighted circular mean hue in turns, (B,)."""
    h6, _, chroma = gv._hue_sextant(x)
    angle = h6 * (math.pi / 3)
    z = torch.complex((chroma * angle.cos()).sum((1, 2)), (chroma * angle.sin()).sum((1, 2)))
    return torch.angle(z) / (2 * math.pi)


def _jitter_stats(out: torch.Tensor, inp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image change of brightness, contrast, saturation and hue from ``inp`` to ``out``."""
    shift = _hue_angle(out) - _hue_angle(inp)
    return {
        "brightness": _luma(out).mean(1) - _luma(inp).mean(1),
        "contrast": _luma(out).std(1) / _luma(inp).std(1),
        "saturation": _saturation(out) - _saturation(inp),
        "hue": torch.remainder(shift + 0.5, 1.0) - 0.5,
    }


@pytest.mark.parametrize(
    "jitter",
    [
        dict(cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2),  # SimCLR
        dict(cj_bright=0.4, cj_contrast=0.4, cj_sat=0.2, cj_hue=0.1),  # BYOL
    ],
)
def test_color_jitter_distribution_matches_lightly(jitter: dict[str, float]) -> None:
    images = _smooth_images(8, 16, seed=5)
    reps = 150
    inp = images.repeat(reps, 1, 1, 1)  # (1200, 3, 16, 16)
    ours = _plain(cj_prob=1.0, **jitter)(inp, torch.Generator().manual_seed(6))
    # lightly's own view transform on PIL images, crop/flip/gray/blur disabled.
    reference = SimCLRViewTransform(
        input_size=16,
        cj_prob=1.0,
        min_scale=1.0,
        random_gray_scale=0.0,
        gaussian_blur=0.0,
        hf_prob=0.0,
        normalize=None,
        **jitter,
    )
    torch.manual_seed(6)
    pils = [_to_pil(img) for img in images]
    theirs = torch.stack([reference(pils[k % len(pils)]) for k in range(inp.shape[0])])
    base = inp.float() / 255
    ours_stats, their_stats = _jitter_stats(ours, base), _jitter_stats(theirs, base)
    for name in ours_stats:
        a, b = ours_stats[name], their_stats[name]
        assert _ks_ok(a, b), name
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / len(a)), name
        assert abs(a.std() / b.std() - 1) < 0.1, name


# ---------------------------------------------------------------------------------------------
# whole views against lightly
# ---------------------------------------------------------------------------------------------


def _view_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": _luma(x).mean(1), "std": _luma(x).std(1), "saturation": _saturation(x)}


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (
            lambda: gv.simclr_views(32, normalize=None, gaussian_blur=0.5)[0],
            lambda: SimCLRTransform(input_size=32, normalize=None).transforms[0],
        ),
        (
            lambda: gv.byol_views(32, normalize=None)[1],
            lambda: BYOLView2Transform(input_size=32, normalize=None),
        ),
    ],
    ids=["simclr", "byol_view2"],
)
def test_view_statistics_match_lightly(ours: Any, theirs: Any) -> None:
    images = _smooth_images(8, 32, seed=7)
    n = 1000
    inp = images.repeat(n // 8, 1, 1, 1)
    out = ours()(inp, torch.Generator().manual_seed(8))
    torch.manual_seed(8)
    np.random.seed(8)  # lightly's blur and solarization draw from numpy
    reference = theirs()
    pils = [_to_pil(img) for img in images]
    ref = torch.stack([reference(pils[k % 8]) for k in range(n)])
    ours_stats, their_stats = _view_stats(out), _view_stats(ref)
    for name in ours_stats:
        assert _ks_ok(ours_stats[name], their_stats[name]), name


def test_downscaled_view_statistics_match_lightly(monkeypatch: pytest.MonkeyPatch) -> None:
    # STL-10-like setting: views smaller than the images, on fine texture, where the pixel
    # statistics depend on antialiasing. Aliased resampling must fail the same comparison.
    gen = torch.Generator().manual_seed(9)
    base = _smooth_images(8, 48, seed=9).float()
    texture = 60 * (torch.rand(8, 1, 48, 48, generator=gen) - 0.5)
    images = (base + texture).clamp(0, 255).round().to(torch.uint8)
    n = 1000
    inp = images.repeat(n // 8, 1, 1, 1)
    torch.manual_seed(10)
    reference = SimCLRTransform(input_size=24, normalize=None, gaussian_blur=0.0).transforms[0]
    pils = [_to_pil(img) for img in images]
    ref = torch.stack([reference(pils[k % 8]) for k in range(n)])

    def roughness(x: torch.Tensor) -> torch.Tensor:
        """Mean neighbour difference over spread of the luma: high-frequency content, blind
        to brightness and contrast jitter."""
        luma = rgb(x)
        diff = (luma[..., 1:] - luma[..., :-1]).abs().mean(dim=(1, 2, 3))
        return diff / luma.std(dim=(1, 2, 3)).clamp(min=1e-3)

    def ours() -> torch.Tensor:
        return gv.simclr_views(24, normalize=None)[0](inp, torch.Generator().manual_seed(11))

    rgb = gv.rgb_to_grayscale
    for stat in (roughness, lambda x: _view_stats(x)["std"]):
        assert _ks_ok(stat(ours()), stat(ref))
    monkeypatch.setattr(gv, "resized_crop", functools.partial(gv.resized_crop, antialias=False))
    assert not _ks_ok(roughness(ours()), roughness(ref))


# ---------------------------------------------------------------------------------------------
# rates of the Bernoulli augmentations
# ---------------------------------------------------------------------------------------------


def _within_binomial(hits: torch.Tensor, p: float) -> bool:
    n = hits.numel()
    return abs(hits.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_flip_rotation_gray_jitter_rates() -> None:
    n = 2000
    image = _smooth_images(1, 16, seed=9)
    x = image.expand(n, -1, -1, -1)
    base = image.float() / 255
    gen = torch.Generator().manual_seed(10)

    flips = _plain(hf_prob=0.3, vf_prob=0.6)(x, gen)
    h_only = (flips == base.flip(-1)).flatten(1).all(1)
    v_only = (flips == base.flip(-2)).flatten(1).all(1)
    both = (flips == base.flip(-1, -2)).flatten(1).all(1)
    none = (flips == base).flatten(1).all(1)
    assert (h_only | v_only | both | none).all()
    assert _within_binomial(h_only | both, 0.3) and _within_binomial(v_only | both, 0.6)

    rotated = _plain(rr_prob=0.25)(x, gen)
    is_rot = (rotated == torch.rot90(base, 1, (-2, -1))).flatten(1).all(1)
    assert ((rotated == base).flatten(1).all(1) | is_rot).all() and _within_binomial(is_rot, 0.25)

    gray = _plain(random_gray_scale=0.2)(x, gen)
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(
        1
    ).all(1)
    assert _within_binomial(is_gray, 0.2)
    expected = gv.rgb_to_grayscale(base).expand(int(is_gray.sum()), 3, -1, -1)
    torch.testing.assert_close(gray[is_gray], expected)

    jittered = _plain(cj_prob=0.8)(x, gen)
    assert _within_binomial(~(jittered == base).flatten(1).all(1), 0.8)

    blurred = _plain(gaussian_blur=0.5, sigmas=(0.5, 2.0))(x, gen)
    assert _within_binomial(~(blurred == base).flatten(1).all(1), 0.5)

    solarized = _plain(solarization_prob=0.2)(x, gen)
    assert _within_binomial(~(solarized == base).flatten(1).all(1), 0.2)


def test_sampled_params_follow_torchvision_and_lightly() -> None:
    n = 3000
    view = gv.BatchViewTransform(
        input_size=32, gaussian_blur=0.5, solarization_prob=0.2, vf_prob=0.1, rr_prob=0.3
    )  # SimCLR's jitter defaults
    params = view.sample_params(n, 32, 32, torch.Generator().manual_seed(15))

    # jitter factors and op order against torchvision's ColorJitter.make_params
    jitter = T.ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    torch.manual_seed(15)
    ref = [jitter.make_params([]) for _ in range(n)]
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    ref_factors = torch.tensor([[r[name] for name in names] for r in ref])
    for k in range(4):
        assert _ks_ok(params["jitter_factors"][:, k], ref_factors[:, k]), names[k]
    code = torch.tensor([64, 16, 4, 1])  # one integer per permutation of 0..3
    ours_codes = (params["jitter_order"] * code).sum(1)
    ref_codes = (torch.stack([r["fn_idx"] for r in ref]) * code).sum(1)
    assert set(ours_codes.tolist()) == set(ref_codes.tolist()) and ours_codes.unique().numel() == 24
    counts = torch.stack([(ours_codes == c).sum() for c in ours_codes.unique()])
    assert stats.chisquare(counts.numpy()).pvalue > KS_P_MIN  # uniform over the 24 orders

    # blur sigma ~ U(sigmas) like lightly's np.random.uniform, where blurred
    sigma = params["sigma"][params["sigma"] > 0]
    assert _ks_ok(sigma, np.random.default_rng(0).uniform(0.1, 2.0, n))

    masks = {
        "hflip": 0.5,
        "vflip": 0.1,
        "rot90": 0.3,
        "jitter": 0.8,
        "gray": 0.2,
        "solarize": 0.2,
    }
    params["blur"] = params["sigma"] > 0
    masks["blur"] = 0.5
    for name, p in masks.items():
        assert _within_binomial(params[name], p), name
    # independent draws: joint rates are products
    pairs = [("hflip", "gray"), ("jitter", "blur"), ("gray", "solarize"), ("vflip", "rot90")]
    for a, b in [*pairs, ("jitter", "gray")]:
        assert _within_binomial(params[a] & params[b], masks[a] * masks[b]), (a, b)
    # The op order is drawn apart from the factors: where brightness comes in the order does
    # not depend on its factor (nor does any op's).
    for k in range(4):
        position = (params["jitter_order"] == k).float().argmax(1).double()
        r = np.corrcoef(position.numpy(), params["jitter_factors"][:, k].double().numpy())[0, 1]
        assert abs(r) < 0.1, (names[k], r)


# ---------------------------------------------------------------------------------------------
# blur and solarization against Pillow
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_blur_matches_pillow(sigma: float) -> None:
    image = torch.randint(0, 256, (3, 20, 24), generator=torch.Generator().manual_seed(11))
    image = image.to(torch.uint8)
    ref = _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
    out = gv.gaussian_blur(image.float()[None] / 255, torch.tensor([sigma]))[0]
    # Pillow rounds to uint8 after each of its 6 box passes; we do not.
    assert (out - ref).abs().mean() < 1.2 / 255
    assert (out - ref).abs().max() < 4 / 255


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0, 2.0])
def test_blur_kernel_has_the_gaussian_variance(sigma: float) -> None:
    # Extended box filtering (Gwosdek et al. 2011) matches the variance sigma² exactly.
    impulse = torch.zeros(1, 1, 1, 41)
    impulse[..., 20] = 1.0
    response = gv.gaussian_blur(impulse, torch.tensor([sigma]), max_sigma=2.0)[0, 0, 0]
    taps = torch.arange(41.0) - 20
    assert response.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (response * taps**2).sum().item() == pytest.approx(sigma**2, abs=1e-5)


def test_solarization_matches_pillow() -> None:
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    out = _plain(solarization_prob=1.0)(values)
    ref = _from_pil(ImageOps.solarize(_to_pil(values[0]), threshold=128))
    torch.testing.assert_close(out[0], ref)


# ---------------------------------------------------------------------------------------------
# API, determinism, validation
# ---------------------------------------------------------------------------------------------


def test_deterministic_given_seed_and_shapes() -> None:
    x = _smooth_images(6, 24, seed=12)[:, :, :, :20]  # non-square input
    view = gv.simclr_views(16, gaussian_blur=0.5)[0]
    a = view(x, torch.Generator().manual_seed(0))
    b = view(x, torch.Generator().manual_seed(0))
    c = view(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    # float input in [0, 1] gives the same views as uint8 input
    d = view(x.float() / 255, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, d)
    assert view(x).shape == (6, 3, 16, 16)  # global RNG


def test_normalisation_and_gray_input() -> None:
    x = _smooth_images(3, 16, seed=13)
    norm = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    out = _plain(normalize=norm)(x)
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    gray = _plain(cj_prob=1.0, random_gray_scale=0.5)(x[:, :1])
    assert gray.shape == (3, 3, 16, 16)
    # a gray image stays gray under jitter (saturation and hue act on colour only)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_eval_transform() -> None:
    x = _smooth_images(2, 16, seed=14)
    same = gv.eval_transform(16, normalize=None)(x)
    assert torch.equal(same, x.float() / 255)
    up = gv.eval_transform(32, normalize=gv.IMAGENET_NORMALIZE)(x)
    mean = torch.tensor(gv.IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(gv.IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)
    ref = TF.resize(x.float() / 255, [32, 32], antialias=True)
    torch.testing.assert_close(up, (ref - mean) / std)
    # Downscaling is antialiased too, like torchvision's Resize.
    big = _smooth_images(2, 64, seed=15)
    down = gv.eval_transform(32, normalize=None)(big)
    ref = TF.resize(big.float() / 255, [32, 32], antialias=True)
    torch.testing.assert_close(down, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(cj_prob=1.5),
        dict(hf_prob=-0.1),
        dict(solarization_prob=2.0),
        dict(min_scale=0.0),
        dict(min_scale=1.5),
        dict(cj_bright=-1.0),
        dict(cj_hue=0.6),
        dict(sigmas=(2.0, 1.0)),
        dict(input_size=0),
        dict(normalize={"mean": [0.5]}),
        dict(normalize={"mean": [0.5] * 3, "std": [0.0, 1.0, 1.0]}),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        gv.BatchViewTransform(**kwargs)


def test_arbitrary_rotation_not_implemented() -> None:
    with pytest.raises(NotImplementedError):
        gv.BatchViewTransform(rr_prob=0.5, rr_degrees=15.0)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 2, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 3, 8, 8, dtype=torch.int32),
    ],
)
def test_invalid_inputs_raise(x: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        _plain()(x)


# ---------------------------------------------------------------------------------------------
# factories carry lightly's defaults
# ---------------------------------------------------------------------------------------------


def _lightly_settings(view: Any) -> dict[str, Any]:
    """The settings of a lightly view transform, read from its Compose."""
    out: dict[str, Any] = {"solarization_prob": 0.0, "normalize": None, "rr_prob": 0.0}
    for t in view.transform.transforms:
        if isinstance(t, T.RandomResizedCrop):
            out["input_size"], out["min_scale"] = t.size[0], t.scale[0]
        elif isinstance(t, T.RandomHorizontalFlip):
            out["hf_prob"] = t.p
        elif isinstance(t, T.RandomVerticalFlip):
            out["vf_prob"] = t.p
        elif isinstance(t, T.RandomApply):
            jitter = t.transforms[0]
            out["cj_prob"] = t.p
            out["brightness"] = jitter.brightness or (1.0, 1.0)
            out["contrast"] = jitter.contrast or (1.0, 1.0)
            out["saturation"] = jitter.saturation or (1.0, 1.0)
            out["hue"] = jitter.hue or (0.0, 0.0)
        elif isinstance(t, T.RandomGrayscale):
            out["random_gray_scale"] = t.p
        elif isinstance(t, GaussianBlur):
            out["gaussian_blur"], out["sigmas"] = t.prob, tuple(float(s) for s in t.sigmas)
        elif isinstance(t, RandomSolarization):
            out["solarization_prob"] = t.prob
        elif isinstance(t, T.Normalize):
            out["normalize"] = (list(t.mean), list(t.std))
        elif hasattr(t, "prob"):  # lightly's RandomRotate
            out["rr_prob"] = t.prob
    return out


def _our_settings(view: gv.BatchViewTransform) -> dict[str, Any]:
    norm = view.normalize
    return {
        "input_size": view.input_size,
        "min_scale": view.min_scale,
        "hf_prob": view.hf_prob,
        "vf_prob": view.vf_prob,
        "rr_prob": view.rr_prob,
        "cj_prob": view.cj_prob,
        "brightness": view.brightness,
        "contrast": view.contrast,
        "saturation": view.saturation,
        "hue": view.hue,
        "random_gray_scale": view.random_gray_scale,
        "gaussian_blur": view.gaussian_blur,
        "sigmas": view.sigmas,
        "solarization_prob": view.solarization_prob,
        "normalize": (norm.mean.flatten().tolist(), norm.std.flatten().tolist())
        if norm.enabled
        else None,
    }


def _approx_equal(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if value is None:
            assert ours[key] is None, key
        else:
            assert np.allclose(np.asarray(ours[key], float), np.asarray(value, float)), key


def test_factories_carry_lightly_defaults() -> None:
    assert gv.IMAGENET_NORMALIZE == LIGHTLY_IMAGENET_NORMALIZE
    simclr = SimCLRTransform(input_size=32, gaussian_blur=0.0)
    for ours, theirs in zip(gv.simclr_views(), simclr.transforms):
        _approx_equal(_our_settings(ours), _lightly_settings(theirs))
    byol = [BYOLView1Transform(input_size=32), BYOLView2Transform(input_size=32)]
    for ours, theirs in zip(gv.byol_views(), byol):
        _approx_equal(_our_settings(ours), _lightly_settings(theirs))
    custom = gv.byol_views(64, normalize=None, gaussian_blur=0.0, cj_strength=0.5)
    reference = BYOLView2Transform(
        input_size=64, normalize=None, gaussian_blur=0.0, cj_strength=0.5
    )
    _approx_equal(_our_settings(custom[1]), _lightly_settings(reference))


@pytest.mark.slow
def test_compiled_views_match_eager_views_without_graph_breaks() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = _smooth_images(32, 24, seed=12)
    # BYOL's second view runs every op: crop, flip, jitter with hue, gray, blur, solarize.
    for view in gv.byol_views(16, gaussian_blur=0.5):
        eager = view(x, torch.Generator().manual_seed(13))
        compiled = view.compile_apply()(x, torch.Generator().manual_seed(13))
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_failing_compiler_falls_back_to_eager_views(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiler failure on the first call (a platform's compiler bug) must not stop training:
    # the view warns once and runs eagerly, giving the eager result for the same draw.
    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def call(*args: Any) -> Any:
            raise RuntimeError("backend compiler failed\ndetails")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = _smooth_images(16, 24, seed=14)
    view = gv.simclr_views(16)[0]
    eager = view(x, torch.Generator().manual_seed(15))
    view.compile_apply()
    with pytest.warns(RuntimeWarning, match="compile of the views failed .*backend compiler"):
        fallback = view(x, torch.Generator().manual_seed(15))
    torch.testing.assert_close(fallback, eager)
    again = view(x, torch.Generator().manual_seed(15))  # eager now, no second warning
    torch.testing.assert_close(again, eager)
