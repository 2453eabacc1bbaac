"""CIFAR-10-C common corruptions as batched torch ops.

A port of the corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), with the 32-px
parameters of their ``make_cifar_c.py`` (not the ImageNet-C parameters that the
``imagecorruptions`` packages use, which are 2-5x harsher on 32-px images).

Every corruption takes float images ``(B, 3, H, W)`` in [0, 1] on any device and
returns float32 images of the same shape clamped to [0, 1]. Randomness comes only
from the ``generator`` argument: random numbers are drawn on the generator's device
(the tensor's device when no generator is given) and moved to the tensor's device,
so a seeded CPU generator gives the same corruption on CPU and GPU.

Images of other sizes than 32 px: parameters measured in pixels (kernel radii, blur
sigmas, pixel-shuffle distance, displacement amplitudes) are multiplied by
``spatial_scale(H, W) = min(H, W) / 32``; photometric parameters, zoom factors,
pixelate factors and JPEG qualities are unchanged. ``severity_params`` applies this rule
to the table; the two sizes not in the table follow the image in place: the fog plasma
map is the next power of two >= max(H, W) (32 at 32 px, cropped to the image), and the
frost texture's feature sizes scale with ``spatial_scale`` (the frost photographs are
resized by ``0.2 * spatial_scale``). Below 32 px, the two blurs built on small sampled
Gaussians (defocus, Gaussian blur) would shrink to less than a pixel and vanish (defocus at
16 px changes nothing); they are rendered at 32 px instead (pixel replication, the 32-px
corruption, area downsampling), which keeps their extent relative to the image.

Deliberate differences from ``make_cifar_c.py`` are stated in each function; the
largest is frost, which by default replaces the photographs of frost on glass by procedural
textures. ``load_frost_textures`` reads the original photographs (from the optional
``imagecorruptions`` package, ``pip install -e ".[bench]"``, or from a folder), and
``frost(..., textures=...)`` / ``corrupt(..., frost_textures=...)`` then crop them as
``make_cifar_c.py`` does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_robust.files import write_atomic

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_GROUPS",
    "DETERMINISTIC",
    "EXTRA_CORRUPTIONS",
    "FROST_SOURCES",
    "PARAMS",
    "SEVERITIES",
    "corrupt",
    "frost_texture_folder",
    "frost_textures_sha256",
    "load_frost_textures",
    "severity_params",
    "spatial_scale",
]

SEVERITIES = (1, 2, 3, 4, 5)


def _zoom_factors(stop: float) -> tuple[float, ...]:
    # np.arange(1, stop, 0.01) exactly as make_cifar_c.py builds it: numpy fills
    # start + i * (a[1] - a[0]) with a[1] - a[0] = 0.010000000000000009. Float round-off
    # makes arange(1, 1.06, .01) and arange(1, 1.11, .01) include their stop value (7 and
    # 12 factors) while the larger three stop one short (16, 21, 26). The factors stay
    # unrounded because clipped_zoom rounds crop * factor: round(26 * 1.25) = 32 but
    # round(26 * 1.2500000000000002) = 33.
    count = math.ceil((stop - 1.0) / 0.01)
    delta = (1.0 + 0.01) - 1.0
    return tuple(1.0 + i * delta for i in range(count))


# The CIFAR-10-C parameter table (make_cifar_c.py), one entry per severity 1..5.
# Values are at 32 px; ``severity_params`` applies the image-size rule.
PARAMS: dict[str, tuple[Any, ...]] = {
    # noise
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # sigma
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate c: Poisson(x * c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt & pepper amount
    # blur
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": tuple(_zoom_factors(stop) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),
    # weather: snow = (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost coef
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, wibble decay
    # digital
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # blend factor toward the per-channel mean
    # (alpha, sigma, affine) in pixels: the paper's fractions times IMSIZE = 32
    "elastic_transform": tuple(
        (32 * a, 32 * s, 32 * f)
        for a, s, f in (
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        )
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scale factor (box down, box up)
    "jpeg_compression": (80, 65, 58, 50, 40),  # quality
    # extras (held out for tuning in the paper)
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # x + x * N(0, c)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),  # sigma
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # S * a + b
}

# Which fields of each PARAMS entry are lengths in pixels (scaled with the image size).
_SPATIAL_FIELDS: dict[str, tuple[int, ...]] = {
    "defocus_blur": (0, 1),
    "glass_blur": (0, 1),
    "motion_blur": (0, 1),
    "snow": (4, 5),
    "elastic_transform": (0, 1, 2),
    "gaussian_blur": (0,),
}
# Spatial fields that must stay integers (tap counts, shuffle distance).
_INTEGER_FIELDS: dict[str, tuple[int, ...]] = {
    "glass_blur": (1,),
    "motion_blur": (0,),
    "snow": (4,),
}


def spatial_scale(height: int, width: int) -> float:
    """Factor applied to pixel-valued parameters: ``min(height, width) / 32``."""
    return min(height, width) / 32.0


def severity_params(name: str, severity: int, height: int = 32, width: int = 32) -> tuple:
    """Parameters of one corruption at one severity for an image size.

    This is the single place where the image-size rule is applied: fields that are
    lengths in pixels are multiplied by ``spatial_scale(height, width)`` (integer
    fields are rounded and kept >= 1); everything else is returned as in ``PARAMS``.

    Args:
        name: Corruption name, a key of ``PARAMS``.
        severity: 1..5.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        The parameter entry as a tuple (scalar entries become 1-tuples).
    """
    if name not in PARAMS:
        raise ValueError(f"unknown corruption {name!r}; choose from {list(PARAMS)}")
    _check_severity(severity)
    entry = PARAMS[name][severity - 1]
    values = tuple(entry) if isinstance(entry, tuple) else (entry,)
    scale = spatial_scale(height, width)
    if scale == 1.0 or name not in _SPATIAL_FIELDS:
        return values
    scaled = list(values)
    for i in _SPATIAL_FIELDS[name]:
        scaled[i] = values[i] * scale
        if i in _INTEGER_FIELDS.get(name, ()):
            scaled[i] = max(1, round(scaled[i]))
    return tuple(scaled)


def _check_severity(severity: int) -> None:
    ok = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    if not ok or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}")


# --------------------------------------------------------------------------- random draws


def _rand(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device, returned on ``device``."""
    src = g.device if g is not None else device
    return torch.rand(shape, generator=g, device=src).to(device)


def _randn(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    src = g.device if g is not None else device
    return torch.randn(shape, generator=g, device=src).to(device)


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    g: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    return low + (high - low) * _rand(shape, g, device)


def _randint(
    low: int, high: int, shape: tuple[int, ...], g: torch.Generator | None, device: torch.device
) -> Tensor:
    src = g.device if g is not None else device
    return torch.randint(low, high, shape, generator=g, device=src).to(device)


# --------------------------------------------------------------------------- filters


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a padded axis of length ``before + n + after``.

    ``replicate`` repeats the edge (scipy/skimage "nearest"), ``symmetric`` mirrors with
    the edge repeated (scipy "reflect"), ``reflect101`` mirrors about the edge pixel
    (OpenCV's default border and torch's "reflect"). Any pad width works.
    """
    i = torch.arange(-before, n + after, device=device)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        i = i.remainder(2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"unknown padding mode {mode!r}; choose from replicate, symmetric, reflect101")


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``."""
    radius = int(truncate * sigma + 0.5) if sigma > 0 else 0
    if radius == 0:
        return torch.ones(1, dtype=torch.float64)
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    return k / k.sum()


def _filter_matrix(n: int, kernel: Tensor, mode: str) -> Tensor:
    """(n, n) matrix of correlating a length-n axis with an odd 1-D kernel.

    The border rule is folded into the matrix, so a separable filter becomes two small
    matmuls (``_resample``), which on CPU is several times faster than conv2d with one
    channel and on GPU is a single batched GEMM.
    """
    r = (kernel.numel() - 1) // 2
    band = torch.zeros(n, n + 2 * r, dtype=torch.float64)
    for i in range(n):
        band[i, i : i + 2 * r + 1] = kernel
    src = _pad_index(n, r, r, mode, torch.device("cpu"))  # padded position -> source pixel
    m = torch.zeros(n, n, dtype=torch.float64)
    return m.index_add_(1, src, band)


@functools.lru_cache(maxsize=256)
def _gaussian_matrix(n: int, sigma: float, truncate: float, mode: str) -> Tensor:
    return _filter_matrix(n, _gaussian_kernel1d(sigma, truncate), mode)


def _gaussian_blur(
    x: Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate"
) -> Tensor:
    """Separable Gaussian over the last two axes.

    The defaults are skimage.filters.gaussian's (scipy mode "nearest", truncate 4).
    """
    h, w = x.shape[-2:]
    rows = _gaussian_matrix(h, sigma, truncate, mode)
    return _resample(x, rows, _gaussian_matrix(w, sigma, truncate, mode))


@functools.lru_cache(maxsize=64)
def _separable_terms(
    kernel: tuple[tuple[float, ...], ...], h: int, w: int, mode: str
) -> list[tuple[Tensor, Tensor]]:
    """Write a 2-D kernel as a sum of separable ones (SVD) and each as a matrix pair.

    The small disk kernels have rank <= 3, so this is exact and costs a few matmuls.
    """
    k = torch.tensor(kernel, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(k)
    terms = []
    for i in range(len(s)):
        if s[i] <= 1e-9 * s[0]:
            break
        col, row = u[:, i] * s[i], vh[i]
        terms.append((_filter_matrix(h, col, mode), _filter_matrix(w, row, mode)))
    return terms


def _filter2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel of ``x`` (B, C, H, W) with one odd-sized 2-D kernel.

    As cv2.filter2D, whose default border is ``reflect101``.
    """
    h, w = x.shape[-2:]
    key = tuple(tuple(float(v) for v in row) for row in kernel.tolist())
    out = torch.zeros_like(x)
    for rows, cols in _separable_terms(key, h, w, mode):
        out += _resample(x, rows, cols)
    return out


@functools.lru_cache(maxsize=64)
def _cv2_gaussian_kernel1d(ksize: int, sigma: float) -> Tensor:
    # cv2.getGaussianKernel for sigma > 0: exp(-i^2 / (2 sigma^2)), normalised.
    i = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """make_cifar_c.py's ``disk``: a normalised disk anti-aliased by a small Gaussian.

    The original draws the disk on a 17 x 17 grid and blurs it with cv2.GaussianBlur
    (3 x 3, or 5 x 5 for radius > 8); we draw it on the smallest grid that holds the
    disk plus the blur's reach, which gives the same non-zero taps.
    """
    ksize = 3 if radius <= 8 else 5
    half = math.floor(radius) + ksize // 2
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    g = _cv2_gaussian_kernel1d(ksize, alias_blur)
    # The disk sits well inside its grid, so the blur's border mode never matters.
    out = F.conv2d(disk.view(1, 1, *disk.shape), g.view(1, 1, 1, -1), padding=(0, ksize // 2))
    out = F.conv2d(out, g.view(1, 1, -1, 1), padding=(ksize // 2, 0))
    return out[0, 0]


@functools.lru_cache(maxsize=256)
def _zoom_matrix(n: int, zoom: float) -> Tensor:
    """(n, n) linear map of make_cifar_c.py's ``clipped_zoom`` along one axis.

    Crop the central ``ceil(n / zoom)`` pixels, resize them by ``zoom`` with
    scipy.ndimage.zoom(order=1) (corner-aligned linear interpolation onto
    ``round(ceil(n / zoom) * zoom)`` samples), and keep the central n samples.
    """
    ch = math.ceil(n / zoom)
    top = (n - ch) // 2
    zoomed = round(ch * zoom)
    trim = (zoomed - n) // 2
    m = torch.zeros(n, n, dtype=torch.float64)
    for p in range(n):
        src = (p + trim) * (ch - 1) / (zoomed - 1) if zoomed > 1 else 0.0
        i0 = min(math.floor(src), ch - 1)
        frac = src - i0
        m[p, top + i0] += 1.0 - frac
        if frac > 0:
            m[p, top + min(i0 + 1, ch - 1)] += frac
    return m


@functools.lru_cache(maxsize=256)
def _pil_box_matrix(in_size: int, out_size: int) -> Tensor:
    """(out, in) linear map of PIL's ``Image.resize(..., Image.BOX)`` along one axis.

    A direct port of Pillow's ``precompute_coeffs`` with the box filter (support 0.5,
    widened by the down-scale factor): each output pixel averages the input pixels whose
    centres fall in its footprint; up-scaling picks the nearest input pixel.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for x in range(xmin, xmax):
            t = (x - center + 0.5) / filterscale
            if -0.5 < t <= 0.5:
                m[xx, x] = 1.0
        total = m[xx].sum()
        if total > 0:
            m[xx] /= total
    return m


def _resample(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Separable linear resampling: ``rows @ x @ cols^T`` over the last two axes."""
    rows = rows.to(device=x.device, dtype=x.dtype)
    cols = cols.to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    h, w = x.shape[-2:]
    return _resample(x, _zoom_matrix(h, zoom), _zoom_matrix(w, zoom))


def _motion_blur(x: Tensor, radius: int, sigma: float, angles: Tensor) -> Tensor:
    """ImageMagick's MotionBlurImage with one angle (degrees) per image.

    Follows MagickMotionBlurImage as make_cifar_c.py calls it through Wand (and as the
    imagecorruptions package re-implements it): ``2 * radius + 1`` taps with one-sided
    Gaussian weights ``exp(-i^2 / (2 sigma^2))``, tap i reading the pixel
    ``(ceil(i sin a - 0.5), ceil(i cos a - 0.5))`` ahead, edge pixels replicated, and the
    taps from the first one that leaves the image onwards dropped (not renormalised).

    Args:
        x: Images (B, C, H, W).
        radius: Kernel radius in pixels.
        sigma: Gaussian sigma of the tap weights.
        angles: (B,) angles in degrees.
    """
    b, c, h, w = x.shape
    width = 2 * radius + 1
    taps = torch.arange(width, dtype=torch.float64, device=x.device)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(x.dtype)  # (T,)
    rad = torch.deg2rad(angles.to(device=x.device, dtype=torch.float64))
    oy = torch.ceil(taps[None] * torch.sin(rad)[:, None] - 0.5).long()  # (B, T)
    ox = torch.ceil(taps[None] * torch.cos(rad)[:, None] - 0.5).long()  # (B, T)
    inside = (oy.abs() < h) & (ox.abs() < w)
    keep = torch.cumprod(inside.long(), dim=1).to(x.dtype)  # (B, T): stop at the first miss
    yy = torch.arange(h, device=x.device).view(1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, w)
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for i in range(width):
        src_y = (yy + oy[:, i].view(b, 1, 1)).clamp(0, h - 1)
        src_x = (xx + ox[:, i].view(b, 1, 1)).clamp(0, w - 1)
        idx = (src_y * w + src_x).view(b, 1, h * w).expand(b, c, h * w)
        out += (weights[i] * keep[:, i]).view(b, 1, 1) * flat.gather(2, idx)
    return out.view(b, c, h, w)


# --------------------------------------------------------------------------- colour


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """skimage.color.rgb2hsv on (B, 3, H, W); hue in [0, 1)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = delta.clamp_min(1e-12)
    h = torch.where(
        v == r, (g - b) / safe, torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h = torch.where(delta > 0, (h / 6.0).remainder(1.0), torch.zeros_like(h))
    return torch.stack((h, s, v), 1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """skimage.color.hsv2rgb on (B, 3, H, W)."""
    h, s, v = hsv.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    choices = torch.stack(
        (
            torch.stack((v, t, p), 1),
            torch.stack((q, v, p), 1),
            torch.stack((p, v, t), 1),
            torch.stack((p, q, v), 1),
            torch.stack((t, p, v), 1),
            torch.stack((v, p, q), 1),
        ),
        0,
    )  # (6, B, 3, H, W)
    idx = i.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)
    return choices.gather(0, idx)[0]


# --------------------------------------------------------------------------- corruptions


def _prepare(x: Tensor, name: str, severity: int) -> tuple[Tensor, tuple]:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
    params = severity_params(name, severity, x.shape[-2], x.shape[-1])
    return x.to(torch.float32), params


def _finish(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise, ``x + N(0, sigma^2)``."""
    x, (sigma,) = _prepare(x, "gaussian_noise", severity)
    return _finish(x + sigma * _randn(tuple(x.shape), generator, x.device))


def shot_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Poisson (photon) noise, ``Poisson(x * c) / c``; variance x / c."""
    x, (c,) = _prepare(x, "shot_noise", severity)
    src = generator.device if generator is not None else x.device
    counts = torch.poisson((x * c).to(src), generator=generator).to(x.device)
    return _finish(counts / c)


def impulse_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Salt-and-pepper noise as skimage's ``random_noise(mode="s&p")``.

    Each channel value independently becomes 0 or 1 (even odds) with probability ``amount``.
    """
    x, (amount,) = _prepare(x, "impulse_noise", severity)
    flip = _rand(tuple(x.shape), generator, x.device) < amount
    salt = _rand(tuple(x.shape), generator, x.device) < 0.5
    return _finish(torch.where(flip, salt.to(x.dtype), x))


def speckle_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Multiplicative noise, ``x + x * N(0, c^2)``."""
    x, (c,) = _prepare(x, "speckle_noise", severity)
    return _finish(x + x * c * _randn(tuple(x.shape), generator, x.device))


def _rendered_at_reference_size(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` applied to images smaller than 32 px as seen at 32 px: pixel-replicating
    upsampling to a 32-px short side, ``fn``, area downsampling back to the input size. With
    an integer factor (16 -> 32) the round trip alone is the identity, so what changes the
    image is ``fn`` only."""
    height, width = x.shape[-2:]
    factor = 32 / min(height, width)
    size = (round(height * factor), round(width * factor))
    big = F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(fn(big), size=(height, width), mode="area")


def defocus_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Correlation with an anti-aliased disk (cv2.filter2D, reflect-101 border).

    At 32 px the disks of severities 1-3 (radius < 1) are a single pixel, so those
    severities are 3 x 3 Gaussians of sigma .4/.5/.6; 4 is a 5-pixel cross, 5 a 3 x 3 box.
    """
    if spatial_scale(x.shape[-2], x.shape[-1]) < 1.0:
        return _finish(_rendered_at_reference_size(lambda big: defocus_blur(big, severity), x))
    x, (radius, alias) = _prepare(x, "defocus_blur", severity)
    return _finish(_filter2d(x, _disk_kernel(float(radius), float(alias)), "reflect101"))


@functools.lru_cache(maxsize=32)
def _shuffle_waves(height: int, width: int, delta: int) -> tuple[Tensor, tuple[int, ...]]:
    """Group glass blur's sequential steps into waves of independent steps.

    Step (h, w) copies pixel (h + dy, w + dx) into (h, w), dy, dx in [-d, d - 1] (see
    :func:`_glass_shuffle`); steps run row by row from the bottom-right. Two steps touch a
    common pixel only when their rows
    and columns both differ by less than 2d, so ordering them by the key
    ``2d * (rows done) + (columns done)`` keeps every touching pair in its original order
    while steps with equal keys touch disjoint pixels and can run at once: 88 waves
    instead of 900 steps at 32 px, and the result equals the sequential loop for the same
    draws.

    Returns:
        The step indices (sequential numbering) sorted by wave, and the wave sizes.
    """
    rows = range(height - delta, delta, -1)
    cols = range(width - delta, delta, -1)
    waves: dict[int, list[int]] = {}
    for a in range(len(rows)):
        for b in range(len(cols)):
            waves.setdefault(2 * delta * a + b, []).append(a * len(cols) + b)
    keys = sorted(waves)
    order = torch.tensor([i for k in keys for i in waves[k]], dtype=torch.long)
    return order, tuple(len(waves[k]) for k in keys)


def _glass_shuffle(x: Tensor, dy: Tensor, dx: Tensor, delta: int) -> Tensor:
    """Glass blur's local pixel "swaps" with explicit offsets, as make_cifar_c.py runs them.

    Its line ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` swaps nothing: on a numpy array
    both right-hand sides are views, so pixel (h', w') is copied into (h, w) and then
    (h', w') is given (h, w)'s new value, its own. Each step is therefore a copy, which is
    what the released CIFAR-10-C (and ImageNet-C) glass blur holds, and what this does.

    Args:
        x: Images (B, C, H, W).
        dy: (iterations, B, steps) row offsets in [-delta, delta - 1], in the sequential
            order of make_cifar_c.py's loops (h, then w, both descending).
        dx: Column offsets, same shape.
        delta: The maximal displacement.
    """
    b, c, h, w = x.shape
    dev = x.device
    order, sizes = _shuffle_waves(h, w, delta)
    order = order.to(dev)
    rows = torch.arange(h - delta, delta, -1, device=dev)
    cols = torch.arange(w - delta, delta, -1, device=dev)
    step_h = rows.repeat_interleave(len(cols))[order]  # (S,), in wave order
    step_w = cols.repeat(len(rows))[order]
    # Pixels as rows of a (B * H * W, C) table: index_select/index_copy_ of whole rows is
    # several times faster than gather/scatter along a channel-last axis.
    base = (torch.arange(b, device=dev) * (h * w))[:, None]  # (B, 1)
    p_all = base + (step_h * w + step_w)[None]  # (B, S)
    p_waves = [p.reshape(-1) for p in p_all.split(sizes, dim=1)]
    table = x.permute(0, 2, 3, 1).reshape(b * h * w, c).clone()
    for it in range(dy.shape[0]):
        qy = step_h + dy[it].to(dev)[:, order]  # (B, S)
        qx = step_w + dx[it].to(dev)[:, order]
        q_all = base + qy * w + qx
        for p, q in zip(p_waves, q_all.split(sizes, dim=1)):
            q = q.reshape(-1)  # (B * n,)
            table.index_copy_(0, p, table.index_select(0, q))
    return table.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def glass_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur, local pixel shuffles, Gaussian blur again.

    As make_cifar_c.py: the first blur is truncated to uint8 (``np.uint8(... * 255)``)
    before the shuffle, and offsets come from ``np.random.randint(-d, d)``, i.e. from
    [-d, d - 1] (for d = 1 pixels only move up/left), and each "swap" copies one pixel over
    another (see ``_glass_shuffle``). The sequential steps are run as waves of independent
    steps, batched over images (see ``_shuffle_waves``).
    """
    x, (sigma, delta, iterations) = _prepare(x, "glass_blur", severity)
    b, _, h, w = x.shape
    x = torch.floor(_gaussian_blur(x, sigma).clamp(0, 1) * 255.0) / 255.0
    steps = max(0, h - 2 * delta) * max(0, w - 2 * delta)
    offsets = _randint(-delta, delta, (iterations, b, steps, 2), generator, x.device)
    x = _glass_shuffle(x, offsets[..., 1], offsets[..., 0], delta)
    return _finish(_gaussian_blur(x, sigma))


def motion_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """ImageMagick motion blur at an angle drawn from U(-45, 45) degrees per image.

    make_cifar_c.py round-trips through PNG and ImageMagick, so its output is uint8;
    ours stays float.
    """
    x, (radius, sigma) = _prepare(x, "motion_blur", severity)
    angles = _uniform((x.shape[0],), -45.0, 45.0, generator, x.device)
    return _finish(_motion_blur(x, int(radius), float(sigma), angles))


def zoom_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Mean of the image and its centre zooms by each factor of the severity."""
    x, factors = _prepare(x, "zoom_blur", severity)
    out = x.clone()
    for z in factors:
        out += _clipped_zoom(x, float(z))
    return _finish(out / (len(factors) + 1))


def snow(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Snow: a thresholded, zoomed Gaussian layer streaked by motion blur, over a
    grey-lightened image.

    Steps of make_cifar_c.py: layer ~ N(loc, scale) per pixel, centre zoom, zero below the
    threshold, uint8 (PNG) quantisation, motion blur at U(-135, -45) degrees, blend the
    image toward ``max(x, 1.5 * gray + 0.5)``, add the layer and its 180-degree rotation.
    """
    x, (loc, scale, zoom, thresh, radius, sigma, blend) = _prepare(x, "snow", severity)
    b, _, h, w = x.shape
    layer = loc + scale * _randn((b, 1, h, w), generator, x.device)
    layer = _clipped_zoom(layer, float(zoom))
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255.0) / 255.0  # PIL "L" image from float
    angles = _uniform((b,), -135.0, -45.0, generator, x.device)
    layer = _motion_blur(layer, int(radius), float(sigma), angles)
    layer = torch.round(layer * 255.0) / 255.0  # ImageMagick writes uint8
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # cv2 RGB2GRAY
    x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
    return _finish(x + layer + torch.rot90(layer, 2, dims=(2, 3)))


def _frost_texture(
    b: int, h: int, w: int, scale: float, g: torch.Generator | None, device: torch.device
) -> Tensor:
    """Procedural frost, (B, 3, H, W) in [0, 1].

    Stands in for make_cifar_c.py's photographs of frost on glass (``load_frost_textures``
    and ``frost(..., textures=...)`` use the photographs themselves): a per-image base level
    ~ U(0.3, 0.8) (the photos' 32-px crops average 0.3-0.85), cloudy multi-octave noise, and
    crystal needles grown from sparse seeds by motion-blur streaks along three random
    directions per image, saturated; tinted toward blue as the photos are (red ~ 0.55-0.95,
    green ~ 0.85-1.0 of blue). Within a 32-px crop it has a standard deviation of roughly 0.1
    like the photos' crops.
    """
    level = _uniform((b, 1, 1, 1), 0.3, 0.8, g, device)
    cloud = torch.zeros(b, 1, h, w, device=device)
    for cells, weight in ((4, 1.0), (8, 0.5), (16, 0.25)):
        ch, cw = max(2, round(h / (cells * scale))), max(2, round(w / (cells * scale)))
        octave = _randn((b, 1, ch, cw), g, device)
        cloud += weight * F.interpolate(octave, size=(h, w), mode="bicubic", align_corners=False)
    cloud = (cloud - cloud.mean((2, 3), keepdim=True)) / cloud.std((2, 3), keepdim=True).clamp_min(
        1e-6
    )
    length = max(1, round(3 * scale))
    seeds_per_dir = 0.025
    needles = torch.zeros(b, 1, h, w, device=device)
    for _ in range(3):
        seeds = (_rand((b, 1, h, w), g, device) < seeds_per_dir).to(torch.float32)
        seeds = seeds * _uniform((b, 1, h, w), 0.5, 1.0, g, device)
        angles = _uniform((b,), 0.0, 360.0, g, device)
        needles += _motion_blur(seeds, length, 2.0 * length, angles) * (2 * length + 1)
    needles = 1.0 - torch.exp(-1.5 * needles)  # saturate where needles cross
    tex = level + 0.06 * cloud + 0.35 * (needles - needles.mean((2, 3), keepdim=True))
    red = _uniform((b, 1, 1, 1), 0.55, 0.95, g, device)
    green = _uniform((b, 1, 1, 1), 0.85, 1.0, g, device)
    tint = torch.cat((red, green, torch.ones_like(red)), 1)  # (B, 3, 1, 1)
    return (tex * tint).clamp(0, 1)


# make_cifar_c.py lists six photographs but draws np.random.randint(5): frost6 is never used.
_FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
# Accepted frost texture sources besides a folder path (the evaluation job's ``shift.frost``).
FROST_SOURCES = ("procedural", "package")
_BENCH_HINT = 'pip install -e ".[bench]"'


def frost_texture_folder(source: str) -> Path:
    """The folder that holds the frost photographs of a texture source.

    Args:
        source: ``"package"`` for the ``frost/`` folder of the installed ``imagecorruptions``
            package (shipped by ``imagecorruptions-imaug``, the ``bench`` extra), or the path
            of a folder holding frost1..frost5 (png or jpg).

    Raises:
        ImportError: ``"package"`` without the ``imagecorruptions`` package installed.
        ValueError: ``"procedural"`` or an empty string (nothing to load), or a path that is
            not a folder; the message names the valid choices.
    """
    if source == "package":
        # find_spec locates the package without importing it (its import pulls numba/opencv).
        spec = importlib.util.find_spec("imagecorruptions")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "frost textures from 'package' need the imagecorruptions package, which ships "
                f"the CIFAR-10-C frost photographs: {_BENCH_HINT}, or give the path of a folder "
                "holding frost1..frost5"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "frost"
    if source in ("", "procedural"):
        raise ValueError(
            f"frost texture source {source!r} has no photographs to load; procedural frost "
            "is frost(..., textures=None)"
        )
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(
            f"unknown frost texture source {source!r}: not a folder; choose from "
            f"{list(FROST_SOURCES)} or the path of a folder holding frost1..frost5"
        )
    return folder


@functools.lru_cache(maxsize=8)
def load_frost_textures(source: str) -> tuple[Tensor, ...]:
    """The five frost photographs that make_cifar_c.py draws from, as uint8 RGB tensors.

    Read with Pillow, alpha dropped (as cv2.imread does by default; the photographs that
    have an alpha channel are opaque). Cached per source: treat the tensors as read-only.

    Args:
        source: ``"package"`` or a folder, as for ``frost_texture_folder``. In a folder,
            ``frost<i>`` may be a .png, .jpg or .jpeg file, i = 1..5.

    Returns:
        Five uint8 tensors (3, H_i, W_i), frost1 first.

    Raises:
        ImportError: ``"package"`` without the package installed.
        ValueError: An unknown source (see ``frost_texture_folder``).
        FileNotFoundError: The folder lacks some of frost1..frost5 (named in the message).
    """
    from PIL import Image

    folder = frost_texture_folder(source)
    paths: list[Path] = []
    missing: list[str] = []
    for name in _FROST_PHOTOS:
        stem = name.split(".")[0]
        candidates = dict.fromkeys([name, f"{stem}.png", f"{stem}.jpg", f"{stem}.jpeg"])
        found = [folder / c for c in candidates if (folder / c).is_file()]
        if found:
            paths.append(found[0])
        else:
            missing.append(f"{stem} (.png/.jpg/.jpeg)")
    if missing:
        hint = f" (reinstall it: {_BENCH_HINT})" if source == "package" else ""
        raise FileNotFoundError(
            f"the frost texture folder {folder} lacks {', '.join(missing)}{hint}; it must hold "
            "frost1..frost5, the CIFAR-10-C frost photographs"
        )
    textures = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        array = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        textures.append(array.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous())
    return tuple(textures)


def frost_textures_sha256(textures: Sequence[Tensor]) -> str:
    """SHA-256 of frost textures (shapes and pixels), to tie a cache to the photographs."""
    digest = hashlib.sha256()
    for texture in textures:
        t = texture.detach().to("cpu", torch.uint8).contiguous()
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _cv2_linear_taps(in_size: int, factor: float) -> tuple[int, Tensor, Tensor, Tensor]:
    """One axis of ``cv2.resize(..., fx=factor, interpolation=cv2.INTER_LINEAR)``.

    cv2 takes the output size ``round(in_size * factor)`` and maps output pixel d to the
    source position ``(d + 0.5) / factor - 0.5`` (half-pixel centres, the given factor, not
    the ratio of the sizes), computed in float32; two taps, no antialiasing; positions
    before the first or from the last pixel on read that edge pixel alone.

    Returns:
        The output size, the first and second tap indices and the second tap's weight.
    """
    out_size = max(1, round(in_size * factor))
    pos = ((torch.arange(out_size, dtype=torch.float64) + 0.5) / factor - 0.5).float()
    i0 = torch.floor(pos)
    frac = pos - i0
    i0 = i0.long()
    edge = (i0 < 0) | (i0 >= in_size - 1)
    frac = torch.where(edge, torch.zeros_like(frac), frac)
    i0 = i0.clamp(0, in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return out_size, i0, i1, frac


def _cv2_linear_resize(texture: Tensor, factor: float) -> Tensor:
    """``cv2.resize(photo, (0, 0), fx=factor, fy=factor)`` of a uint8 (3, H, W) texture.

    In OpenCV's 8-bit INTER_LINEAR arithmetic, so that the result is cv2's to the level:
    11-bit tap weights; the horizontal pass exact in integers; the vertical pass as cv2's
    vector kernel computes it (operands shifted right by 4, the high 16 bits of each
    product, a rounding shift by 2). Equal to cv2.resize (OpenCV 5.0) for the photographs at
    every reduction factor we tried; at 32 px (factor 0.2) every position is a pixel centre
    and any bilinear resize agrees. Enlargements (images over 160 px) differ from cv2 by one
    level in some pixels of the edge rows. Integer arithmetic also makes the textures
    identical on every device.

    Returns:
        Float (3, h, w) holding the uint8 values.
    """
    _, h, w = texture.shape
    dev = texture.device
    one = 1 << 11  # INTER_RESIZE_COEF_SCALE

    def taps(size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _, i0, i1, frac = _cv2_linear_taps(size, factor)
        # saturate_cast<short>(float weight * 2048): round half to even, as torch.round
        w0, w1 = torch.round((1 - frac) * one).long(), torch.round(frac * one).long()
        return i0.to(dev), i1.to(dev), w0.to(dev), w1.to(dev)

    r0, r1, b0, b1 = taps(h)
    c0, c1, a0, a1 = taps(w)
    t = texture.long()
    rows = t[:, :, c0] * a0 + t[:, :, c1] * a1  # (3, H, w'): horizontal pass, scale 2048
    top, bottom = rows[:, r0] >> 4, rows[:, r1] >> 4  # (3, h', w') each
    v = ((top * b0[:, None]) >> 16) + ((bottom * b1[:, None]) >> 16)
    return ((v + 2) >> 2).clamp(0, 255).float()


def _photo_frost(
    b: int,
    h: int,
    w: int,
    textures: Sequence[Tensor],
    g: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Random (h, w) crops of the resized frost photographs, (B, 3, H, W) in [0, 1].

    Per image, as make_cifar_c.py: a photograph index uniform over the textures, then the
    top row and left column uniform over ``[0, size - h)`` and ``[0, size - w)`` of the
    resized photograph (np.random.randint's exclusive upper bound).
    """
    if len(textures) == 0:
        raise ValueError("frost needs at least one texture; load them with load_frost_textures")
    factor = 0.2 * spatial_scale(h, w)  # make_cifar_c.py resizes by 0.2 at 32 px
    resized = []
    for i, texture in enumerate(textures):
        if texture.dtype != torch.uint8 or texture.dim() != 3 or texture.shape[0] != 3:
            raise ValueError(
                f"frost texture {i} must be uint8 RGB of shape (3, H, W), got "
                f"{texture.dtype} {tuple(texture.shape)}"
            )
        r = _cv2_linear_resize(texture, factor).to(device)  # small: resize where it lies
        if r.shape[1] <= h or r.shape[2] <= w:
            raise ValueError(
                f"frost texture {i} is {tuple(r.shape[1:])} px after resizing by {factor:g}, "
                f"too small for a random {h} x {w} crop"
            )
        resized.append(r)
    which = _randint(0, len(resized), (b,), g, device)  # (B,)
    u = _rand((b, 2), g, device).double()  # (B, 2): row, then column offset
    room = torch.tensor(
        [[r.shape[1] - h, r.shape[2] - w] for r in resized], device=device
    )  # (K, 2): number of valid offsets per photograph
    span = room[which]  # (B, 2)
    offsets = torch.minimum(torch.floor(u * span).long(), span - 1)  # (B, 2)
    rows = offsets[:, 0:1] + torch.arange(h, device=device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=device)  # (B, W)
    out = torch.empty(b, 3, h, w, device=device)
    for k, r in enumerate(resized):
        sel = (which == k).nonzero().squeeze(1)  # images cropping photograph k
        if sel.numel():
            crops = r[:, rows[sel][:, :, None], cols[sel][:, None, :]]  # (3, n, H, W)
            out[sel] = crops.permute(1, 0, 2, 3)
    return out / 255.0


def frost(
    x: Tensor,
    severity: int,
    generator: torch.Generator | None = None,
    textures: Sequence[Tensor] | None = None,
) -> Tensor:
    """``a * x + b * frost_texture`` with the CIFAR-10-C mixing coefficients.

    Without ``textures`` the textures are procedural, generated deterministically from the
    generator (see ``_frost_texture``). With the photographs (``load_frost_textures``) it is
    make_cifar_c.py's frost: per image a photograph drawn uniformly from the five, resized by
    0.2 (times ``spatial_scale``) with cv2's INTER_LINEAR and rounded to uint8, a random
    crop of the image's size. make_cifar_c.py reads the photographs as BGR and flips them to
    RGB; ours are RGB from the start.

    Args:
        x: Float images (B, 3, H, W) in [0, 1].
        severity: 1..5.
        generator: Source of randomness (texture draws, crop offsets).
        textures: uint8 RGB photographs (3, H_i, W_i), or None for procedural frost.
    """
    x, (a, coef) = _prepare(x, "frost", severity)
    b, _, h, w = x.shape
    if textures is None:
        tex = _frost_texture(b, h, w, spatial_scale(h, w), generator, x.device)
    else:
        tex = _photo_frost(b, h, w, textures, generator, x.device)
    return _finish(a * x + coef * tex)


def _plasma_fractal(
    b: int, mapsize: int, decay: float, g: torch.Generator | None, device: torch.device
) -> Tensor:
    """Diamond-square height maps (B, mapsize, mapsize) in [0, 1], one per image.

    The batched form of make_cifar_c.py's ``plasma_fractal`` (after FLHerne/mapgen):
    the same square and diamond steps with periodic neighbours, and wibble (the noise
    amplitude, ``wibble * U(-wibble, wibble)``) divided by ``decay`` at every level.
    """
    m = torch.zeros(b, mapsize, mapsize, device=device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        noise = _uniform(tuple(total.shape), -wibble, wibble, g, device)
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        # squares: centre of each square = mean of its four corners + noise
        corners = m[:, ::step, ::step]
        acc = corners + torch.roll(corners, -1, dims=1)
        acc = acc + torch.roll(acc, -1, dims=2)
        m[:, half::step, half::step] = wibbled_mean(acc)
        # diamonds: edge midpoints = mean of the two corners and two centres + noise
        centres = m[:, half::step, half::step]
        corners = m[:, ::step, ::step]
        on_rows = (
            centres + torch.roll(centres, 1, dims=1) + corners + torch.roll(corners, -1, dims=2)
        )
        m[:, ::step, half::step] = wibbled_mean(on_rows)
        on_cols = (
            centres + torch.roll(centres, 1, dims=2) + corners + torch.roll(corners, -1, dims=1)
        )
        m[:, half::step, ::step] = wibbled_mean(on_cols)
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)


def fog(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Add a plasma-fractal haze and renormalise by the image maximum.

    ``(x + s * plasma) * max(x) / (max(x) + s)``; the max is over the whole image.
    """
    x, (strength, decay) = _prepare(x, "fog", severity)
    b, _, h, w = x.shape
    mapsize = 1 << max(1, (max(h, w) - 1).bit_length())  # 32 at 32 px
    plasma = _plasma_fractal(b, mapsize, float(decay), generator, x.device)[:, None, :h, :w]
    max_val = x.amax((1, 2, 3), keepdim=True)
    return _finish((x + strength * plasma) * max_val / (max_val + strength))


def brightness(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Add c to the HSV value channel (clipped to 1), keeping hue and saturation.

    With H and S fixed every RGB component is proportional to V, so the HSV round trip
    of make_cifar_c.py reduces exactly to scaling RGB by ``V' / V`` (grey ``V'`` for black).
    """
    x, (c,) = _prepare(x, "brightness", severity)
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    scaled = x * (v_new / v.clamp_min(1e-12))
    return _finish(torch.where(v > 0, scaled, v_new.expand_as(x)))


def saturate(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Scale and shift the HSV saturation: ``S' = clip(S * a + b, 0, 1)``."""
    x, (a, shift) = _prepare(x, "saturate", severity)
    hsv = _rgb_to_hsv(x)
    s = (hsv[:, 1] * a + shift).clamp(0, 1)
    return _finish(_hsv_to_rgb(torch.stack((hsv[:, 0], s, hsv[:, 2]), 1)))


def contrast(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Blend toward the per-image, per-channel mean: ``(x - mean) * c + mean``."""
    x, (c,) = _prepare(x, "contrast", severity)
    mean = x.mean((2, 3), keepdim=True)
    return _finish((x - mean) * c + mean)


def elastic_transform(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Random affine warp followed by a smooth random displacement field.

    make_cifar_c.py: move the three points ``centre + (s, s)``, ``centre + (s, -s)``,
    ``centre - (s, s)`` (s = size // 3) by U(-affine, affine), warp with that affine map
    (bilinear, reflect-101 border), then displace by ``alpha * gaussian(U(-1, 1), sigma)``
    per axis and resample bilinearly (scipy map_coordinates, order 1, mode "reflect").
    Both resamplings are grid_sample calls with the same border rules.
    """
    x, (alpha, sigma, affine) = _prepare(x, "elastic_transform", severity)
    b, _, h, w = x.shape
    dev = x.device
    # Affine: pts1 -> pts2 (cv2 point order is (x, y)); warpAffine samples the source at
    # M^-1(p), so solve directly for the inverse map pts2 -> pts1.
    cy, cx = float(h // 2), float(w // 2)
    sq = float(min(h, w) // 3)
    pts1 = torch.tensor(
        [[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], device=dev
    )  # (3, 2)
    pts2 = pts1 + _uniform((b, 3, 2), -affine, affine, generator, dev)  # (B, 3, 2)
    ones = torch.ones(b, 3, 1, device=dev)
    inv = torch.linalg.solve(
        torch.cat((pts2, ones), 2).double(), pts1.double().expand(b, 3, 2)
    ).float()  # (B, 3, 2): [x y 1] @ inv = source (x, y)
    yy, xx = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    pix = torch.stack((xx, yy, torch.ones_like(xx)), -1).view(1, h * w, 3)
    src = torch.bmm(pix.expand(b, -1, -1), inv).view(b, h, w, 2)  # (B, H, W, (x, y))
    x = _sample(x, src, "reflect101")
    # Elastic displacement: smoothed U(-1, 1) fields (skimage gaussian, mode "reflect",
    # truncate 3), scaled by alpha.
    field = _uniform((b, 2, h, w), -1.0, 1.0, generator, dev)
    field = _gaussian_blur(field, float(sigma), truncate=3.0, mode="symmetric")
    field = alpha * field  # (B, 2, H, W): (dx, dy)
    src = torch.stack((xx, yy), -1)[None] + field.permute(0, 2, 3, 1)
    return _finish(_sample(x, src, "symmetric"))


def _sample(x: Tensor, src: Tensor, mode: str) -> Tensor:
    """Bilinear sampling of ``x`` at pixel coordinates ``src`` (B, H, W, (x, y)).

    ``mode`` is the rule outside the image: ``reflect101`` mirrors about the edge pixels
    (cv2.BORDER_REFLECT_101), ``symmetric`` about the image edge (scipy's "reflect").
    """
    h, w = x.shape[-2:]
    size = torch.tensor([w, h], device=x.device, dtype=src.dtype)
    padding = "reflection"
    if mode == "symmetric":
        # Fold the coordinates into [-0.5, n - 0.5]; the half pixel beyond the edge
        # pixel's centre then reads the edge value, as scipy's mirrored signal does.
        c = (src + 0.5).remainder(2 * size)
        src = torch.where(c > size, 2 * size - c, c) - 0.5
        padding = "border"
    grid = src * (2.0 / (size - 1).clamp_min(1)) - 1.0
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def pixelate(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """PIL box down-scale to ``int(size * c)`` and box up-scale back.

    The resamplings are exact ports of Pillow's box filter applied in float; Pillow
    rounds to uint8 after each pass, so values differ from it by under 1/255.
    """
    x, (c,) = _prepare(x, "pixelate", severity)
    h, w = x.shape[-2:]
    sh, sw = int(h * c), int(w * c)
    small = _resample(x, _pil_box_matrix(h, sh), _pil_box_matrix(w, sw))
    return _finish(_resample(small, _pil_box_matrix(sh, h), _pil_box_matrix(sw, w)))


def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """JPEG encode/decode at the table quality (libjpeg through torchvision, on CPU).

    Images are rounded to uint8 first. torchvision's libjpeg settings (4:2:0 chroma
    subsampling, standard tables) give byte-identical results to PIL's JPEG as used by
    make_cifar_c.py. CPU coding keeps results identical across devices.
    """
    x, (quality,) = _prepare(x, "jpeg_compression", severity)
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    images = list(torch.round(x.clamp(0, 1) * 255.0).to(torch.uint8).cpu().unbind(0))
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_jpeg(images, quality=int(quality))
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB)
    out = torch.stack(decoded).to(device=x.device, dtype=torch.float32) / 255.0
    return _finish(out)


def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """skimage Gaussian blur (edge replicated, truncated at 4 sigma); rendered at 32 px below
    that size, like ``defocus_blur``."""
    if spatial_scale(x.shape[-2], x.shape[-1]) < 1.0:
        return _finish(_rendered_at_reference_size(lambda big: gaussian_blur(big, severity), x))
    x, (sigma,) = _prepare(x, "gaussian_blur", severity)
    return _finish(_gaussian_blur(x, float(sigma)))


# --------------------------------------------------------------------------- registries

Corruption = Callable[..., Tensor]

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}

EXTRA_CORRUPTIONS: dict[str, Corruption] = {
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "saturate": saturate,
}

CORRUPTION_GROUPS: dict[str, list[str]] = {
    "noise": ["gaussian_noise", "shot_noise", "impulse_noise"],
    "blur": ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"],
    "weather": ["snow", "frost", "fog", "brightness"],
    "digital": ["contrast", "elastic_transform", "pixelate", "jpeg_compression"],
}

# Corruptions whose output does not depend on the generator.
DETERMINISTIC: frozenset[str] = frozenset(
    {
        "defocus_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
        "gaussian_blur",
        "saturate",
    }
)


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    frost_textures: Sequence[Tensor] | None = None,
) -> Tensor:
    """Apply one corruption at one severity to a batch of images.

    Args:
        x: Float images (B, 3, H, W) in [0, 1], on any device.
        name: A key of ``CORRUPTIONS`` or ``EXTRA_CORRUPTIONS``.
        severity: 1..5.
        generator: Source of randomness; the same seeded generator state gives the same
            output. Draws happen on the generator's device.
        frost_textures: The frost photographs (``load_frost_textures``) for ``"frost"``;
            None gives procedural frost. Ignored by the other corruptions, so a loop over
            names can pass it to every call.

    Returns:
        Corrupted float32 images of the same shape in [0, 1], on ``x``'s device.
    """
    fn = CORRUPTIONS.get(name) or EXTRA_CORRUPTIONS.get(name)
    if fn is None:
        raise ValueError(
            f"unknown corruption {name!r}; choose from {list(CORRUPTIONS)} "
            f"or the extras {list(EXTRA_CORRUPTIONS)}"
        )
    _check_severity(severity)
    if name == "frost":
        return frost(x, severity, generator, textures=frost_textures)
    return fn(x, severity, generator)


def _corruption_picks(n: int, k: int, seed: int, severity: int) -> Any:
    """Which of ``k`` corruptions each of ``n`` images gets: balanced (counts differ by at most
    one), in a seeded random order."""
    import numpy as np

    rng = np.random.default_rng([seed, severity])
    return rng.permutation(np.resize(np.arange(k), n))


def corrupted_source(
    source: Any,
    severity: int,
    seed: int = 0,
    names: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """A shifted twin of a labeled image source (``ImageSource``), e.g. of a validation split:
    each image under one corruption at ``severity``, the corruptions spread evenly over the
    images in a seeded order (default: the 15 CIFAR-10-C ones, procedural frost).

    Image i of the twin is a pure function of (image i, ``seed``, ``severity``): its
    corruption draws from a generator seeded by those, so the twin is the same on every rank
    and after every restart, whichever way it is read. An in-memory source (an
    ``ArraySource``) gets an in-memory twin, made once; any other is corrupted as it is read
    (:class:`CorruptedSource`), at the size its images come in.

    ``cache_dir``: keep an in-memory twin there (``twin-<key>.npy``, keyed by the images, the
    labels, the settings and the corruption parameters' hash), so a restarted or requeued run
    reads it instead of making it again (10-40 s for a 10k-image split).

    Raises:
        ValueError: An unknown corruption, no corruption, a severity outside 1..5.
    """
    import numpy as np

    from ssl_robust.data.datasets import ArraySource

    twin = CorruptedSource(source, severity, seed, names)
    if not isinstance(source, ArraySource):
        return twin
    labels = np.asarray(source.labels)
    path = None
    if cache_dir is not None:
        from ssl_robust.evaluate.cifar_c import params_hash

        digest = hashlib.sha256(np.ascontiguousarray(source.images).tobytes())
        digest.update(np.ascontiguousarray(labels).tobytes())
        digest.update(f"{severity} {seed} {twin.names} {params_hash()}".encode())
        path = Path(cache_dir) / f"twin-{digest.hexdigest()[:20]}.npy"
        if path.is_file():
            cached = np.load(path)
            if cached.shape == source.images.shape and cached.dtype == source.images.dtype:
                return ArraySource(cached, labels, list(source.classes))
    images = np.empty_like(source.images)
    for i in range(len(twin)):
        images[i] = twin.array(i)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh: np.save(fh, images))
    return ArraySource(images, labels, list(source.classes))


class CorruptedSource:
    """The images of ``source``, each corrupted as it is loaded (see :func:`corrupted_source`);
    an ``ImageSource`` (``load``, ``labels``, ``classes``, items ``(PIL image, label)``)."""

    def __init__(
        self, source: Any, severity: int, seed: int = 0, names: Sequence[str] | None = None
    ) -> None:
        _check_severity(severity)
        names = list(CORRUPTIONS) if names is None else list(names)
        if not names:
            raise ValueError(f"no corruptions given; choose from {list(CORRUPTIONS)}")
        known = [*CORRUPTIONS, *EXTRA_CORRUPTIONS]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}; choose from {known}")
        self.source = source
        self.severity = severity
        self.seed = seed
        self.names = names
        self.labels = source.labels
        self.classes = list(source.classes)
        self.picks = _corruption_picks(len(source), len(names), seed, severity)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.array(index))

    def array(self, index: int) -> Any:
        """Image ``index``, corrupted, as a uint8 (H, W, 3) array."""
        import numpy as np

        image = np.array(self.source.load(index).convert("RGB"))  # writable, for torch
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        state = np.random.SeedSequence([self.seed, self.severity, index]).generate_state(1)
        generator = torch.Generator().manual_seed(int(state[0]))
        y = corrupt(x, self.names[int(self.picks[index])], self.severity, generator)[0]
        return (y * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.load(index), int(self.labels[index])
