"""Tests of the batched CIFAR-10-C corruptions against the parameter table and against
hand-written numpy/scipy ports of make_cifar_c.py."""

from __future__ import annotations

import colorsys
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_robust.evaluate import corruptions as C
from ssl_robust.evaluate.corruptions import (
    CORRUPTION_GROUPS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    PARAMS,
    corrupt,
    severity_params,
)

ndimage = pytest.importorskip("scipy.ndimage")

ALL_NAMES = list(CORRUPTIONS) + list(EXTRA_CORRUPTIONS)
STOCHASTIC = [n for n in ALL_NAMES if n not in C.DETERMINISTIC]

# Corruptions whose mean absolute change must grow with severity 1 -> 5.
MONOTONE = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "zoom_blur",
    "gaussian_blur",
    "fog",
    "brightness",
    "contrast",
    "jpeg_compression",
]
# Excluded, because the table does not order them:
# - glass_blur: sigma drops from .4 (severity 3) to .25 (4) while the iterations double.
# - motion_blur: severities 3 and 4 share sigma 2; the larger radius only adds taps of
#   weight < exp(-36/8), so their change is equal up to the random angle.
# - snow: thresholds (.6, .5, .55, .6, .65) and zooms (1, 1, 1.75, 2.25, 1.25) are not ordered.
# - frost: the change is (a - 1) x + b * texture, which depends on the image brightness.
# - elastic_transform: the affine amplitude falls (2.56 -> .96 px) as the displacement rises.
# - pixelate: sizes 30, 28, 27, 24, 20 px; how well the reduced grid aligns with the
#   32-px grid matters as much as the factor (24 = 3/4 changes smooth images less than 27).
# - saturate: factors (.3, .1, 1.5, 2, 2.5) move saturation down and then up.

CANONICAL = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]


def synthetic_images(b: int = 4, h: int = 32, w: int = 32) -> torch.Tensor:
    """Smooth colour gradients with a disc and a dark bar, (B, 3, H, W) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for i in range(b):
        img = torch.stack(
            (
                0.2 + 0.6 * xx,
                0.3 + 0.5 * yy * (0.5 + (i % 3) / 3),
                0.5 + 0.3 * torch.sin(6 * xx + i),
            )
        )
        disc = (yy * h - (8 + i)) ** 2 + (xx * w - (10 + 3 * i)) ** 2 < 30
        img[:, disc] = torch.tensor([0.9, 0.1, 0.25])[:, None]
        img[:, h // 2 : h // 2 + 4, 4:20] = 0.05
        images.append(img.clamp(0, 1))
    return torch.stack(images)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grey(value: float = 0.5, b: int = 8, size: int = 32) -> torch.Tensor:
    return torch.full((b, 3, size, size), value)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return synthetic_images()


# ----------------------------------------------------------------------------- registry


def test_registries_follow_the_benchmark() -> None:
    assert list(CORRUPTIONS) == CANONICAL
    assert [n for group in CORRUPTION_GROUPS.values() for n in group] == CANONICAL
    assert [len(v) for v in CORRUPTION_GROUPS.values()] == [3, 4, 4, 4]
    assert list(EXTRA_CORRUPTIONS) == ["speckle_noise", "gaussian_blur", "saturate"]
    assert set(PARAMS) == set(ALL_NAMES)
    assert all(len(PARAMS[n]) == 5 for n in PARAMS)
    # make_cifar_c.py's np.arange zoom factors, float round-off included.
    assert [len(z) for z in PARAMS["zoom_blur"]] == [
        len(np.arange(1, stop, 0.01)) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)
    ]
    for ours, stop in zip(PARAMS["zoom_blur"], (1.06, 1.11, 1.16, 1.21, 1.26)):
        assert list(ours) == np.arange(1, stop, 0.01).tolist()


def test_params_are_the_cifar10c_table() -> None:
    """The 32-px table of make_cifar_c.py, written out independently of PARAMS."""
    table = {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "snow": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "elastic_transform": [
            (32 * 0, 32 * 0, 32 * 0.08),
            (32 * 0.05, 32 * 0.2, 32 * 0.07),
            (32 * 0.08, 32 * 0.06, 32 * 0.06),
            (32 * 0.1, 32 * 0.04, 32 * 0.05),
            (32 * 0.1, 32 * 0.03, 32 * 0.03),
        ],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    }
    for name, rows in table.items():
        for severity, row in enumerate(rows, start=1):
            expected = row if isinstance(row, tuple) else (row,)
            assert severity_params(name, severity) == pytest.approx(expected), (name, severity)


def test_invalid_arguments_name_the_choices(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"gaussian_noise.*jpeg_compression.*saturate"):
        corrupt(images, "rain", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5\]"):
            corrupt(images, "fog", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        corrupt(images[0], "fog", 1)
    with pytest.raises(ValueError, match="float"):
        corrupt((images * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="choose from"):
        severity_params("rain", 1)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shape_range_and_reproducibility(images: torch.Tensor, name: str) -> None:
    for severity in range(1, 6):
        out = corrupt(images, name, severity, gen(0))
        assert out.shape == images.shape
        assert out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, images)
        torch.testing.assert_close(corrupt(images, name, severity, gen(0)), out, rtol=0, atol=0)
        other = corrupt(images, name, severity, gen(1))
        if name in STOCHASTIC:
            assert not torch.equal(other, out)
        else:
            torch.testing.assert_close(other, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_other_image_sizes_and_dtypes(name: str) -> None:
    x = synthetic_images(2, 48, 40)
    # Other float dtypes are the same images converted to float32 first: the same draws, the
    # same arithmetic, to the bit.
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        out = corrupt(xd, name, 3, gen(0))
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, corrupt(xd.float(), name, 3, gen(0)), rtol=0, atol=0)
    # No generator: torch's global RNG, the same stream as a generator seeded alike.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = corrupt(x.double(), name, 3)
    torch.testing.assert_close(out, corrupt(x, name, 3, gen(0)), rtol=0, atol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_size_rule_scales_only_pixel_parameters() -> None:
    assert severity_params("defocus_blur", 5, 64, 64) == (3.0, 0.2)
    assert severity_params("glass_blur", 2, 64, 96) == (0.5, 2, 1)
    assert severity_params("motion_blur", 1, 16, 16) == (3, 0.5)
    assert severity_params("motion_blur", 5, 48, 48) == (14, 3.75)  # radius 9 * 1.5 rounded
    assert severity_params("snow", 1, 64, 64)[4:] == (16, 6.0, 0.95)
    assert severity_params("gaussian_noise", 3, 224, 224) == (0.08,)
    assert severity_params("pixelate", 3, 224, 224) == (0.85,)
    assert severity_params("zoom_blur", 1, 224, 224) == PARAMS["zoom_blur"][0]
    assert severity_params("elastic_transform", 2, 32, 32) == pytest.approx((1.6, 6.4, 2.24))
    assert severity_params("elastic_transform", 2, 64, 64) == pytest.approx((3.2, 12.8, 4.48))


@pytest.mark.parametrize("name", MONOTONE)
def test_change_grows_with_severity(images: torch.Tensor, name: str) -> None:
    change = [(corrupt(images, name, s, gen(0)) - images).abs().mean().item() for s in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(change)), change


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_sigma() -> None:
    x = grey()
    for severity, sigma in enumerate(PARAMS["gaussian_noise"], start=1):
        noise = corrupt(x, "gaussian_noise", severity, gen(severity)) - x
        assert noise.std().item() == pytest.approx(sigma, rel=0.03)
        assert abs(noise.mean().item()) < 0.003


def test_shot_noise_variance_is_x_over_c() -> None:
    for value in (0.2, 0.5):
        x = grey(value)
        for severity in (1, 5):
            c = PARAMS["shot_noise"][severity - 1]
            out = corrupt(x, "shot_noise", severity, gen(severity))
            assert out.var().item() == pytest.approx(value / c, rel=0.06)
            assert out.mean().item() == pytest.approx(value, abs=0.003)
            # Poisson counts: every value is a multiple of 1 / c.
            torch.testing.assert_close(out * c, torch.round(out * c), rtol=0, atol=1e-3)


def test_impulse_noise_amount() -> None:
    x = grey(0.4)
    for severity, amount in enumerate(PARAMS["impulse_noise"], start=1):
        out = corrupt(x, "impulse_noise", severity, gen(severity))
        changed = out != x
        assert changed.float().mean().item() == pytest.approx(amount, abs=0.004)
        assert set(out[changed].unique().tolist()) <= {0.0, 1.0}
        assert (out[changed] == 1).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_speckle_noise_scales_with_the_pixel() -> None:
    x = grey(0.4)
    c = PARAMS["speckle_noise"][4]
    noise = corrupt(x, "speckle_noise", 5, gen(0)) - x
    assert noise.std().item() == pytest.approx(0.4 * c, rel=0.03)


# ----------------------------------------------------------------------------- blur


def _correlate(x: torch.Tensor, kernel: np.ndarray, mode: str) -> np.ndarray:
    arr = x.double().numpy()
    return np.stack([[ndimage.correlate(ch, kernel, mode=mode) for ch in img] for img in arr]).clip(
        0, 1
    )


def test_defocus_blur_known_kernels(images: torch.Tensor) -> None:
    # Severity 1: the disk of radius .3 is one pixel, so the kernel is cv2's 3 x 3
    # Gaussian of sigma .4 (outer product); OpenCV's default border is scipy's "mirror".
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * 0.4**2))
    g /= g.sum()
    ref = _correlate(images, np.outer(g, g), "mirror")
    np.testing.assert_allclose(corrupt(images, "defocus_blur", 1).numpy(), ref, atol=1e-6)
    # Severity 5: radius 1.5 covers the 3 x 3 square; sigma .1 barely blurs it.
    ref = _correlate(images, np.full((3, 3), 1 / 9), "mirror")
    np.testing.assert_allclose(corrupt(images, "defocus_blur", 5).numpy(), ref, atol=1e-6)


def test_gaussian_blur_matches_scipy(images: torch.Tensor) -> None:
    for severity, sigma in enumerate(PARAMS["gaussian_blur"], start=1):
        ref = ndimage.gaussian_filter(images.double().numpy(), (0, 0, sigma, sigma), mode="nearest")
        out = corrupt(images, "gaussian_blur", severity).numpy()
        np.testing.assert_allclose(out, ref.clip(0, 1), atol=1e-6)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    # make_cifar_c.py's clipped_zoom on an (H, W) array.
    h = img.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top : top + ch, top : top + ch], factor, order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim : trim + h, trim : trim + h]


def test_zoom_blur_matches_scipy_port(images: torch.Tensor) -> None:
    x = images[:2]
    for severity, stop in zip((1, 5), (1.06, 1.26)):
        factors = np.arange(1, stop, 0.01)
        ref = np.stack(
            [
                [
                    (ch + sum(_clipped_zoom(ch, z) for z in factors)) / (len(factors) + 1)
                    for ch in im
                ]
                for im in x.double().numpy()
            ]
        )
        np.testing.assert_allclose(corrupt(x, "zoom_blur", severity).numpy(), ref, atol=1e-6)


def _motion_blur_reference(img: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    # ImageMagick's MotionBlurImage as a loop over taps (edge pixels replicated).
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    k /= k.sum()
    h, w = img.shape[-2:]
    out = np.zeros_like(img)
    for i in range(width):
        oy = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
        ox = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
        if abs(oy) >= h or abs(ox) >= w:
            break
        rows = np.clip(np.arange(h) + oy, 0, h - 1)
        cols = np.clip(np.arange(w) + ox, 0, w - 1)
        out += k[i] * img[..., rows[:, None], cols[None, :]]
    return out


def test_motion_blur_matches_tap_loop(images: torch.Tensor) -> None:
    angles = torch.tensor([-44.0, -7.5, 0.0, 38.2])
    for radius, sigma in (PARAMS["motion_blur"][0], PARAMS["motion_blur"][4]):
        out = C._motion_blur(images, radius, sigma, angles).numpy()
        for b, angle in enumerate(angles.tolist()):
            ref = _motion_blur_reference(images[b].double().numpy(), radius, sigma, angle)
            np.testing.assert_allclose(out[b], ref, atol=1e-6)


def test_motion_blur_angles_are_uniform_in_range() -> None:
    # A single bright pixel smears along the drawn angle: recover it from the centroid.
    x = torch.zeros(256, 3, 32, 32)
    x[:, :, 16, 16] = 1.0
    out = corrupt(x, "motion_blur", 5, gen(0))[:, 0]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    dy = ((out * yy).sum((1, 2)) / out.sum((1, 2))) - 16
    dx = ((out * xx).sum((1, 2)) / out.sum((1, 2))) - 16
    angle = torch.rad2deg(torch.atan2(-dy, -dx))  # the blur reads ahead, so it smears back
    assert angle.abs().max() <= 46
    assert angle.min() < -30 and angle.max() > 30


def _sequential_shuffle(img: np.ndarray, dy: np.ndarray, dx: np.ndarray, d: int) -> np.ndarray:
    """make_cifar_c.py's loop verbatim, on an (H, W, C) numpy array as it holds the image."""
    x = np.ascontiguousarray(img.transpose(1, 2, 0))
    h, w = x.shape[:2]
    for it in range(dy.shape[0]):
        k = 0
        for r in range(h - d, d, -1):
            for c in range(w - d, d, -1):
                r2, c2 = r + dy[it, k], c + dx[it, k]
                x[r, c], x[r2, c2] = x[r2, c2], x[r, c]
                k += 1
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("delta", [1, 2])
def test_glass_shuffle_waves_equal_the_sequential_loop(images: torch.Tensor, delta: int) -> None:
    steps = (32 - 2 * delta) ** 2
    off = torch.randint(-delta, delta, (2, len(images), steps, 2), generator=gen(3))
    out = C._glass_shuffle(images, off[..., 0], off[..., 1], delta).numpy()
    for b in range(len(images)):
        ref = _sequential_shuffle(
            images[b].numpy(), off[:, b, :, 0].numpy(), off[:, b, :, 1].numpy(), delta
        )
        np.testing.assert_array_equal(out[b], ref)


def test_glass_blur_severity_1_copies_pixels_as_the_reference_does(images: torch.Tensor) -> None:
    # sigma .05 is below scipy's one-tap radius, so severity 1 is quantise + shuffle, and the
    # reference's "swap" of numpy views copies: every output pixel is an input pixel, but
    # some are now doubled and others gone.
    x = torch.round(images * 255) / 255
    out = corrupt(x, "glass_blur", 1, gen(0))
    assert not torch.equal(out, x)
    flat_in = (x * 255).round().flatten(2).permute(0, 2, 1)  # (B, HW, 3)
    flat_out = (out * 255).round().flatten(2).permute(0, 2, 1)
    for a, b in zip(flat_in, flat_out):
        seen = set(map(tuple, a.tolist()))
        assert set(map(tuple, b.tolist())) <= seen
        assert sorted(map(tuple, a.tolist())) != sorted(map(tuple, b.tolist()))


# ----------------------------------------------------------------------------- weather


def _plasma_reference(mapsize: int, decay: float, draws: list[np.ndarray]) -> np.ndarray:
    """make_cifar_c.py's plasma_fractal with its uniform draws supplied."""
    m = np.zeros((mapsize, mapsize))
    step, wibble, it = mapsize, 100.0, iter(draws)

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * (-wibble + 2 * wibble * next(it).reshape(a.shape))

    while step >= 2:
        half = step // 2
        corners = m[0::step, 0::step]
        acc = corners + np.roll(corners, -1, axis=0)
        acc += np.roll(acc, -1, axis=1)
        m[half::step, half::step] = wibbled_mean(acc)
        dr, ul = m[half::step, half::step], m[0::step, 0::step]
        m[0::step, half::step] = wibbled_mean(dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1))
        m[half::step, 0::step] = wibbled_mean(dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0))
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


def test_plasma_fractal_matches_diamond_square() -> None:
    ours = C._plasma_fractal(2, 32, 2.0, gen(3), torch.device("cpu")).double().numpy()
    g, draws, step = gen(3), [], 32
    while step >= 2:
        draws += [torch.rand((2, 32 // step, 32 // step), generator=g).double() for _ in range(3)]
        step //= 2
    for b in range(2):
        ref = _plasma_reference(32, 2.0, [d[b].numpy() for d in draws])
        np.testing.assert_allclose(ours[b], ref, atol=1e-5)


def test_fog_adds_a_normalised_plasma() -> None:
    x = grey(0.3, b=4)
    strength, _ = PARAMS["fog"][2]
    out = corrupt(x, "fog", 3, gen(0)).double()
    max_val = 0.3
    plasma = (out * (max_val + strength) / max_val - x.double()) / strength
    assert plasma.amin((1, 2, 3)).abs().max() < 1e-5
    assert (plasma.amax((1, 2, 3)) - 1).abs().max() < 1e-5
    torch.testing.assert_close(plasma[:, 0], plasma[:, 2])  # one grey map for all channels


def test_snow_never_darkens(images: torch.Tensor) -> None:
    for severity in range(1, 6):
        out = corrupt(images, "snow", severity, gen(severity))
        assert (out >= images - 1e-6).all()
        assert (out > images + 0.2).any()  # some flakes


def test_snow_matches_reference_port(images: torch.Tensor) -> None:
    """Reproduce the draws (layer, then angles) and run make_cifar_c.py's snow steps."""
    x = images[:2]
    for severity in (1, 3, 5):
        loc, scale, zoom, thresh, radius, sigma, blend = PARAMS["snow"][severity - 1]
        out = corrupt(x, "snow", severity, gen(7)).double().numpy()
        g = gen(7)
        layers = (loc + scale * torch.randn((2, 1, 32, 32), generator=g)).double().numpy()
        angles = (-135 + 90 * torch.rand((2,), generator=g)).tolist()
        for b in range(2):
            layer = _clipped_zoom(layers[b, 0], zoom)
            layer[layer < thresh] = 0
            layer = np.floor(np.clip(layer, 0, 1) * 255) / 255  # PIL "L" image
            layer = _motion_blur_reference(layer, radius, sigma, angles[b])
            layer = np.round(layer * 255) / 255
            img = x[b].double().numpy()
            gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
            img = blend * img + (1 - blend) * np.maximum(img, gray * 1.5 + 0.5)
            ref = np.clip(img + layer + np.rot90(layer, 2), 0, 1)
            np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_frost_mixes_a_bluish_texture() -> None:
    x = grey(0.3, b=16)
    for severity, (a, coef) in enumerate(PARAMS["frost"], start=1):
        out = corrupt(x, "frost", severity, gen(severity))
        texture = (out - a * x) / coef
        assert texture.min() >= -1e-5 and texture.max() <= 1 + 1e-5
        assert texture.std((2, 3)).mean() > 0.03  # textured, not a flat veil
        mean_rgb = texture.mean((0, 2, 3))
        assert mean_rgb[2] >= mean_rgb[1] >= mean_rgb[0]


def test_elastic_transform_matches_scipy_port(images: torch.Tensor) -> None:
    """Reproduce the draws (affine offsets, then displacement fields) and run the
    make_cifar_c.py algorithm with scipy: affine warp with reflect-101 ("mirror"),
    displacement with map_coordinates(order=1, mode="reflect")."""
    x = images[:1]
    for severity in (1, 4):
        alpha, sigma, affine = PARAMS["elastic_transform"][severity - 1]
        out = corrupt(x, "elastic_transform", severity, gen(5))[0].double().numpy()
        g = gen(5)
        offsets = (-affine + 2 * affine * torch.rand((1, 3, 2), generator=g))[0].double().numpy()
        field = (-1 + 2 * torch.rand((1, 2, 32, 32), generator=g))[0].double().numpy()
        pts1 = np.array([[16 + 10, 16 + 10], [16 + 10, 16 - 10], [16 - 10, 16 - 10]], float)
        pts2 = pts1 + offsets
        # inverse map dst -> src in (x, y): [x y 1] @ inv = src
        inv = np.linalg.solve(np.hstack([pts2, np.ones((3, 1))]), pts1)
        yy, xx = np.mgrid[0:32, 0:32].astype(float)
        src = np.stack([xx, yy, np.ones_like(xx)], -1) @ inv
        warped = np.stack(
            [
                ndimage.map_coordinates(ch, [src[..., 1], src[..., 0]], order=1, mode="mirror")
                for ch in x[0].double().numpy()
            ]
        )
        if sigma > 0:
            dx, dy = (
                ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=3) * alpha for f in field
            )
        else:
            dx = dy = np.zeros((32, 32))
        ref = np.stack(
            [
                ndimage.map_coordinates(ch, [yy + dy, xx + dx], order=1, mode="reflect")
                for ch in warped
            ]
        ).clip(0, 1)
        np.testing.assert_allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- digital


def test_contrast_is_an_exact_blend_to_the_mean(images: torch.Tensor) -> None:
    for severity, c in enumerate(PARAMS["contrast"], start=1):
        mean = images.mean((2, 3), keepdim=True)
        expected = ((images - mean) * c + mean).clamp(0, 1)
        torch.testing.assert_close(corrupt(images, "contrast", severity), expected)


def _hsv_reference(x: torch.Tensor, fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    arr = x.double().permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arr)
    for idx in np.ndindex(arr.shape[:3]):
        h, s, v = fn(*colorsys.rgb_to_hsv(*arr[idx]))
        out[idx] = colorsys.hsv_to_rgb(h, s, v)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def test_brightness_raises_the_value_channel(images: torch.Tensor) -> None:
    x = torch.cat([images[:2, :, ::2, ::2], torch.zeros(1, 3, 16, 16)])  # include black
    for severity, c in enumerate(PARAMS["brightness"], start=1):
        out = corrupt(x, "brightness", severity)
        torch.testing.assert_close(out.amax(1), (x.amax(1) + c).clamp(max=1))
        ref = _hsv_reference(x, lambda h, s, v, c=c: (h, s, min(v + c, 1.0)))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_saturate_matches_colorsys(images: torch.Tensor) -> None:
    x = images[:2, :, ::2, ::2]
    for severity, (a, b) in enumerate(PARAMS["saturate"], start=1):
        ref = _hsv_reference(x, lambda h, s, v, a=a, b=b: (h, min(max(s * a + b, 0), 1), v))
        torch.testing.assert_close(corrupt(x, "saturate", severity), ref, atol=1e-5, rtol=0)


def test_jpeg_equals_torchvision_codec(images: torch.Tensor) -> None:
    from torchvision.io import decode_jpeg, encode_jpeg

    x8 = torch.round(images * 255).to(torch.uint8)
    for severity, quality in enumerate(PARAMS["jpeg_compression"], start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ref = torch.stack(decode_jpeg(encode_jpeg(list(x8), quality=quality)))
        out = corrupt(x8.float() / 255, "jpeg_compression", severity)
        torch.testing.assert_close(torch.round(out * 255).to(torch.uint8), ref, rtol=0, atol=0)


def test_pixelate_block_size_and_pil_box(images: torch.Tensor) -> None:
    from PIL import Image

    # A horizontal ramp: after box down/up-scaling the image has int(32 c) distinct columns.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    x8 = torch.round(images * 255).to(torch.uint8)
    for severity, c in enumerate(PARAMS["pixelate"], start=1):
        out = corrupt(ramp, "pixelate", severity)
        assert len(torch.unique(out[0, 0, 0])) == int(32 * c)
        size = int(32 * c)
        ref = np.stack(
            [
                np.array(
                    Image.fromarray(im)
                    .resize((size, size), Image.Resampling.BOX)
                    .resize((32, 32), Image.Resampling.BOX)
                )
                for im in x8.permute(0, 2, 3, 1).numpy()
            ]
        )
        ours = corrupt(x8.float() / 255, "pixelate", severity).permute(0, 2, 3, 1).numpy() * 255
        # Pillow rounds to uint8 after each of its passes; we stay in float.
        assert np.abs(ours - ref).max() <= 1.0 + 1e-4


# ----------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_cuda_matches_cpu_for_a_cpu_generator(images: torch.Tensor, name: str) -> None:
    for severity in (1, 5):
        cpu = corrupt(images, name, severity, gen(0))
        cuda = corrupt(images.cuda(), name, severity, gen(0)).cpu()
        # float reduction order differs; glass/snow quantise to uint8 levels internally
        atol = 1.5 / 255 if name in ("glass_blur", "snow", "jpeg_compression") else 1e-4
        assert (cuda - cpu).abs().max() <= atol, (cuda - cpu).abs().max()


@pytest.mark.parametrize("size", [16, 24])
@pytest.mark.parametrize("name", ["defocus_blur", "gaussian_blur"])
def test_small_images_are_blurred_as_seen_at_32_px(name: str, size: int) -> None:
    # At 16 px the scaled kernels would fall under a pixel (defocus used to be a no-op):
    # the blur is the 32-px blur of the pixel-replicated image, area-averaged back (at 24 px,
    # a factor 4/3, area averaging differs from bilinear sampling; at 16 px it does not).
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, size, size, generator=gen)
    changes = []
    for sev in C.SEVERITIES:
        out = corrupt(x, name, sev)
        big = F.interpolate(x, size=(32, 32), mode="nearest-exact")
        ref = F.adaptive_avg_pool2d(corrupt(big, name, sev), (size, size))
        torch.testing.assert_close(out, ref.clamp(0, 1))
        changes.append(float((out - x).abs().mean()))
    assert changes[0] > 1e-3 and all(a < b for a, b in itertools.pairwise(changes))


# ----------------------------------------------------------------------------- frost photographs

FROST_COEFS = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)]  # make_cifar_c.py


def _write_frost_photos(
    folder: Path, sizes: list[tuple[int, int]], jpeg: bool = False, seed: int = 0
) -> list[np.ndarray]:
    """Random smooth "photographs" frost1..frost5 in ``folder`` (frost4 and frost5 as JPEG
    when ``jpeg``, as in the package); returns them as read back, RGB (H, W, 3) uint8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for i, (h, w) in enumerate(sizes, start=1):
        coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
        big = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        noisy = np.asarray(big).astype(int) + rng.integers(-20, 21, (h, w, 3))
        path = folder / (f"frost{i}.jpg" if jpeg and i >= 4 else f"frost{i}.png")
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB")))
    return photos


def _cv2_resize_reference(img: np.ndarray, f: float) -> np.ndarray:
    """cv2.resize(img, (0, 0), fx=f, fy=f) with INTER_LINEAR, written out: output size
    round(n * f), source position (d + 0.5) / f - 0.5, two taps, edge pixel alone outside,
    rounded half up to uint8."""
    h, w = img.shape[:2]
    out = np.empty((round(h * f), round(w * f), 3))
    for dy in range(out.shape[0]):
        for dx in range(out.shape[1]):
            taps = []
            for d, n in ((dy, h), (dx, w)):
                pos = (d + 0.5) / f - 0.5
                i0 = math.floor(pos)
                t = pos - i0
                if i0 < 0 or i0 >= n - 1:
                    i0, t = min(max(i0, 0), n - 1), 0.0
                taps.append((i0, min(i0 + 1, n - 1), t))
            (y0, y1, ty), (x0, x1, tx) = taps
            top = (1 - tx) * img[y0, x0].astype(float) + tx * img[y0, x1]
            bottom = (1 - tx) * img[y1, x0].astype(float) + tx * img[y1, x1]
            out[dy, dx] = (1 - ty) * top + ty * bottom
    return np.floor(out + 0.5).astype(np.uint8)


def _make_cifar_c_frost(
    x: np.ndarray, severity: int, photo_bgr: np.ndarray, x_start: int, y_start: int, f: float
) -> np.ndarray:
    """make_cifar_c.py's frost on one uint8-range image (H, W, 3), the draws given."""
    c = FROST_COEFS[severity - 1]
    frost = _cv2_resize_reference(photo_bgr, f)
    h, w = x.shape[:2]
    frost = frost[x_start : x_start + h, y_start : y_start + w][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(x) + c[1] * frost, 0, 255)


# 0.2 x these sizes: (44, 60), (41, 52), (48, 42), (52, 46), (42, 56); 0.25 x: all > 48 x 40.
PHOTO_SIZES = [(220, 300), (205, 260), (240, 210), (260, 230), (210, 280)]


@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 40)])
def test_photo_frost_matches_make_cifar_c(tmp_path: Path, h: int, w: int) -> None:
    photos = _write_frost_photos(tmp_path, PHOTO_SIZES, jpeg=True)
    textures = C.load_frost_textures(str(tmp_path))
    for texture, photo in zip(textures, photos):
        np.testing.assert_array_equal(texture.permute(1, 2, 0).numpy(), photo)
    f = 0.2 * C.spatial_scale(h, w)
    b = 6
    x = synthetic_images(b, h, w)
    for severity in (1, 3, 5):
        out = corrupt(x, "frost", severity, gen(11), frost_textures=textures).double().numpy()
        # The draws: a photograph per image, then row and column offsets per image.
        g = gen(11)
        which = torch.randint(0, 5, (b,), generator=g).tolist()
        u = torch.rand((b, 2), generator=g).double().numpy()
        for i in range(b):
            photo_bgr = photos[which[i]][..., ::-1]  # as cv2.imread returns it
            size = (round(photo_bgr.shape[0] * f), round(photo_bgr.shape[1] * f))
            x_start, y_start = int(u[i, 0] * (size[0] - h)), int(u[i, 1] * (size[1] - w))
            img = x[i].permute(1, 2, 0).double().numpy() * 255
            ref = _make_cifar_c_frost(img, severity, photo_bgr, x_start, y_start, f)
            np.testing.assert_allclose(out[i].transpose(1, 2, 0), ref / 255, atol=1e-5)


def test_photo_frost_draws_every_photo_and_every_offset(tmp_path: Path) -> None:
    # Photograph k holds (row // 5, column // 5, 40 k + 1): after the 0.2 resize (which reads
    # source pixel 5 d + 2) a crop tells its photograph and offsets.
    from PIL import Image

    sizes = [(200, 300), (180, 240), (170, 175), (250, 200), (190, 260)]
    for k, (h, w) in enumerate(sizes):
        rr, cc = np.mgrid[0:h, 0:w]
        photo = np.stack((rr // 5, cc // 5, np.full_like(rr, 40 * k + 1)), -1).astype(np.uint8)
        Image.fromarray(photo).save(tmp_path / f"frost{k + 1}.png")
    textures = C.load_frost_textures(str(tmp_path))
    b = 2000
    out = corrupt(torch.zeros(b, 3, 32, 32), "frost", 1, gen(3), frost_textures=textures)
    tex = torch.round(out * 255 / 0.2).long()  # (B, 3, 32, 32), a = 1 and x = 0
    k = (tex[:, 2, 0, 0] - 1) // 40
    assert sorted(k.unique().tolist()) == [0, 1, 2, 3, 4]
    counts = torch.bincount(k, minlength=5)
    assert counts.min() > 0.15 * b and counts.max() < 0.25 * b  # uniform: 400 each
    rows, cols = tex[:, 0, 0, 0], tex[:, 1, 0, 0]
    ar = torch.arange(32)
    assert torch.equal(tex[:, 0], (rows[:, None] + ar)[:, :, None].expand(b, 32, 32))
    assert torch.equal(tex[:, 1], (cols[:, None] + ar)[:, None, :].expand(b, 32, 32))
    assert torch.equal(tex[:, 2], (40 * k + 1)[:, None, None].expand(b, 32, 32))
    for j, (h, w) in enumerate(sizes):
        # randint(0, size - 32): every offset in [0, size - 33] occurs, and none beyond.
        span_rows, span_cols = round(0.2 * h) - 32, round(0.2 * w) - 32
        assert sorted(rows[k == j].unique().tolist()) == list(range(span_rows))
        assert sorted(cols[k == j].unique().tolist()) == list(range(span_cols))


def test_photo_frost_is_seeded_and_other_corruptions_ignore_textures(tmp_path: Path) -> None:
    textures = C.load_frost_textures(str(_photo_folder(tmp_path)))
    x = synthetic_images()
    out = corrupt(x, "frost", 4, gen(0), frost_textures=textures)
    torch.testing.assert_close(corrupt(x, "frost", 4, gen(0), frost_textures=textures), out)
    assert not torch.equal(corrupt(x, "frost", 4, gen(1), frost_textures=textures), out)
    assert not torch.equal(corrupt(x, "frost", 4, gen(0)), out)  # procedural differs
    torch.testing.assert_close(corrupt(x, "frost", 4, gen(0)), C.frost(x, 4, gen(0)))
    fog = corrupt(x, "fog", 2, gen(0), frost_textures=textures)
    torch.testing.assert_close(fog, corrupt(x, "fog", 2, gen(0)), rtol=0, atol=0)


def _photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _write_frost_photos(folder, PHOTO_SIZES)
    return folder


def test_frost_texture_sources_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    _write_frost_photos(partial, PHOTO_SIZES[:2])
    with pytest.raises(FileNotFoundError, match=r"lacks frost3 .*, frost4 .*, frost5 "):
        C.load_frost_textures(str(partial))
    with pytest.raises(ValueError, match=r"unknown frost texture source.*'procedural', 'package'"):
        C.load_frost_textures(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="procedural"):
        C.load_frost_textures("procedural")
    real = C.importlib.util.find_spec
    monkeypatch.setattr(
        C.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "imagecorruptions" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r'pip install -e "\.\[bench\]"'):
        C.frost_texture_folder("package")
    x = synthetic_images(2)
    small = (torch.zeros(3, 100, 100, dtype=torch.uint8),)  # 20 x 20 after the resize
    with pytest.raises(ValueError, match="too small"):
        corrupt(x, "frost", 1, frost_textures=small)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x, "frost", 1, frost_textures=(torch.zeros(3, 300, 300),))


def test_frost_from_the_package_is_make_cifar_c_frost() -> None:
    pytest.importorskip("imagecorruptions")
    textures = C.load_frost_textures("package")
    assert C.frost_texture_folder("package").name == "frost"
    assert [tuple(t.shape) for t in textures] == [
        (3, 600, 900),
        (3, 315, 560),
        (3, 315, 560),
        (3, 350, 527),
        (3, 495, 660),
    ]
    x = grey(0.3, b=16)
    for severity, (a, coef) in enumerate(PARAMS["frost"], start=1):
        out = corrupt(x, "frost", severity, gen(severity), frost_textures=textures)
        texture = (out - a * x) / coef
        assert texture.min() >= -1e-5 and texture.max() <= 1 + 1e-5
        mean_rgb = texture.mean((0, 2, 3))
        assert mean_rgb[2] >= mean_rgb[1] >= mean_rgb[0]  # the photographs are bluish
    # With OpenCV (the bench extra pulls it in), the original code path itself.
    cv2 = pytest.importorskip("cv2")
    folder = C.frost_texture_folder("package")
    x = synthetic_images(8)
    out = corrupt(x, "frost", 5, gen(5), frost_textures=textures).double().numpy()
    g = gen(5)
    which = torch.randint(0, 5, (8,), generator=g).tolist()
    u = torch.rand((8, 2), generator=g).double().numpy()
    names = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
    for i in range(8):
        frost = cv2.imread(str(folder / names[which[i]]))
        frost = cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)
        x_start = int(u[i, 0] * (frost.shape[0] - 32))
        y_start = int(u[i, 1] * (frost.shape[1] - 32))
        frost = frost[x_start : x_start + 32, y_start : y_start + 32][..., [2, 1, 0]]
        img = x[i].permute(1, 2, 0).double().numpy() * 255
        ref = np.clip(0.75 * img + 0.45 * frost, 0, 255)
        np.testing.assert_allclose(out[i].transpose(1, 2, 0), ref / 255, atol=1e-5)


# cv2.resize's outputs for a small photograph, made by tests/data/make_cv2_resize_golden.py with
# opencv-python-headless 5.0.0 installed in a throwaway folder (see there): CI has no OpenCV.
CV2_GOLDEN = Path(__file__).parent / "data" / "cv2_resize_golden.npz"


def test_photo_resize_equals_cv2_golden() -> None:
    golden = np.load(CV2_GOLDEN)
    photo = golden["photo"]  # (40, 56, 3) uint8
    texture = torch.from_numpy(photo.copy()).permute(2, 0, 1)
    factors = [float(f) for f in golden["factors"]]
    assert factors == [0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.6]
    for f in factors:
        ref = golden[f"resized_{f}"]
        assert ref.shape == (round(40 * f), round(56 * f), 3)
        ours = C._cv2_linear_resize(texture, f)
        assert ours.dtype == torch.float32
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), ref, err_msg=f"fx={f}")
    # cv2 copies the image at fx = 1 (checked when the file was made).
    np.testing.assert_array_equal(C._cv2_linear_resize(texture, 1.0).permute(1, 2, 0), photo)
    # The written-out reference of the known-answer test agrees with cv2 where it is used (at
    # 0.3 and above its float arithmetic is off by one level in places: cv2's is fixed-point).
    for f in (0.2, 0.25):
        np.testing.assert_array_equal(_cv2_resize_reference(photo, f), golden[f"resized_{f}"])


def test_photo_resize_equals_cv2(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    # The stored outputs are still this cv2's.
    golden = np.load(CV2_GOLDEN)
    for f in golden["factors"]:
        ref = cv2.resize(golden["photo"], (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(golden[f"resized_{f}"], ref, err_msg=f"fx={f}")
    photo = _write_frost_photos(tmp_path, PHOTO_SIZES)[0]
    texture = torch.from_numpy(photo.copy()).permute(2, 0, 1)
    for f in (0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.6, 1.0):  # reductions: images <= 160 px
        ref = cv2.resize(photo, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        ours = C._cv2_linear_resize(texture, f).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"fx={f}")
    # The written-out reference of the known-answer test agrees with cv2 where it is used.
    for f in (0.2, 0.25):
        ref = cv2.resize(photo, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(_cv2_resize_reference(photo, f), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_photo_frost_cuda_matches_cpu(tmp_path: Path) -> None:
    textures = C.load_frost_textures(str(_photo_folder(tmp_path)))
    x = synthetic_images(64)
    for severity in (1, 5):
        cpu = corrupt(x, "frost", severity, gen(0), frost_textures=textures)
        cuda = corrupt(x.cuda(), "frost", severity, gen(0), frost_textures=textures).cpu()
        assert (cuda - cpu).abs().max() <= 1e-5


def test_corrupted_source_draws_apart_for_each_image() -> None:
    # Identical images at the same severity get different noise: the image index is part
    # of each image's seed.
    from ssl_robust.data.datasets import ArraySource
    from ssl_robust.evaluate.corruptions import CorruptedSource

    source = ArraySource(np.full((2, 8, 8, 3), 128, np.uint8), np.array([0, 0]), ["a"])
    twin = CorruptedSource(source, 3, seed=0, names=["gaussian_noise"])
    assert not np.array_equal(twin.array(0), twin.array(1))
    assert np.array_equal(twin.array(1), twin.array(1))


def test_corrupted_source_is_a_seeded_shifted_twin() -> None:
    from ssl_robust.data.datasets import ArraySource, ImageSource
    from ssl_robust.evaluate.corruptions import CorruptedSource, corrupted_source

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(40) % 4, ["a", "b", "c", "d"])
    # One deterministic corruption: every image is exactly that corruption, rounded.
    twin = corrupted_source(source, 3, seed=1, names=["contrast"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    want = (corrupt(x, "contrast", 3) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert isinstance(twin, ArraySource) and np.array_equal(twin.images, want)
    assert np.array_equal(twin.labels, source.labels) and twin.classes == source.classes
    # Several: spread evenly, each image under one; the same for the same seed, not another.
    names = ["gaussian_noise", "contrast", "brightness"]
    a = corrupted_source(source, 5, seed=1, names=names)
    assert np.array_equal(a.images, corrupted_source(source, 5, seed=1, names=names).images)
    assert not np.array_equal(a.images, corrupted_source(source, 5, seed=2, names=names).images)
    as_contrast = (corrupt(x, "contrast", 5) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    picked = [bool(np.array_equal(a.images[i], as_contrast[i])) for i in range(40)]
    assert sum(picked) in (13, 14)  # 40 images over 3 corruptions
    # The in-memory twin is the lazy one, made once.
    lazy_twin = CorruptedSource(source, 5, seed=1, names=names)
    assert all(np.array_equal(np.asarray(lazy_twin.load(i)), a.images[i]) for i in range(40))

    # A source read image by image is corrupted as it is read, at the size its images come
    # in, into the same images.
    class Lazy(ImageSource):
        classes = source.classes
        labels = source.labels

        def load(self, index: int) -> Image.Image:  # every third image larger
            image = Image.fromarray(images[index])
            return image.resize((24, 24)) if index % 3 == 0 else image

    lazy = corrupted_source(Lazy(), 5, seed=1, names=names)
    assert isinstance(lazy, CorruptedSource) and len(lazy) == 40
    for i in range(40):
        got, label = lazy[i]
        assert label == i % 4
        if i % 3:
            assert np.array_equal(np.asarray(got), a.images[i])
        else:
            assert got.size == (24, 24)
    with pytest.raises(ValueError, match="unknown corruptions \\['fogg'\\]; choose from"):
        corrupted_source(source, 3, names=["fogg"])
    with pytest.raises(ValueError, match="no corruptions given"):
        corrupted_source(source, 3, names=[])
    with pytest.raises(ValueError, match="severity"):
        corrupted_source(source, 0)


def test_an_in_memory_twin_is_kept_in_its_cache_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted run read the twin from its cache instead of corrupting every image again."""
    from ssl_robust.data.datasets import ArraySource

    rng = np.random.default_rng(0)
    source = ArraySource(
        rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 3, ["a", "b", "c"]
    )
    made = C.corrupted_source(source, 3, seed=0, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("twin-*.npy")
    np.testing.assert_array_equal(np.load(cached), made.images)

    def never(self: object, index: int) -> np.ndarray:
        raise AssertionError("the twin was made again")

    monkeypatch.setattr(C.CorruptedSource, "array", never)
    again = C.corrupted_source(source, 3, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, made.images)
    np.testing.assert_array_equal(again.labels, source.labels)
    monkeypatch.undo()
    # Another severity, seed or set of images is another twin.
    C.corrupted_source(source, 4, seed=0, cache_dir=tmp_path)
    C.corrupted_source(source, 3, seed=1, cache_dir=tmp_path)
    other = ArraySource(source.images[::-1].copy(), source.labels, list(source.classes))
    C.corrupted_source(other, 3, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("twin-*.npy"))) == 4
