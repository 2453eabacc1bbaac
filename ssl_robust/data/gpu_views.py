"""Batched view augmentations on tensors, matching lightly's SimCLR/BYOL view transforms.

lightly builds each view image by image on PIL images in DataLoader workers:
RandomResizedCrop -> RandomHorizontalFlip -> RandomVerticalFlip -> RandomRotate(90) ->
RandomApply(ColorJitter) -> RandomGrayscale -> GaussianBlur -> RandomSolarization -> ToTensor
-> Normalize. At CIFAR resolution that pipeline, not the training step, bounds SSL throughput.
`BatchViewTransform` runs the same chain on a whole (B, C, H, W) batch where it already lives
(typically uint8 on the GPU), as a handful of batched ops whose random parameters differ per
sample and are drawn with the same distributions as torchvision/lightly:

1. crop + flips + 90° rotation are folded into one resampling step per image: a single
   ``grid_sample`` when crops can only be upscaled (the output is at least as large as the
   input, as at CIFAR size), else two batched matrix products with Pillow's antialiasing
   bilinear weights (crops larger than the output, e.g. 96 px STL-10 images -> 64);
2. colour jitter applies brightness/contrast/saturation/hue in a per-sample random order
   (4 positions, each picking its op per sample by mask);
3. grayscale, 4. blur (Pillow's box approximation of a Gaussian as a grouped depthwise conv),
5. solarization and 6. normalisation are per-sample masks or elementwise ops.

Known differences from the PIL reference (all documented where they arise):
- everything is computed in float; PIL rounds to uint8 after every step (and between the
  horizontal and vertical resampling passes).
- random rotation supports only lightly's default 90° rotation (``rr_degrees=None``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_NORMALIZE: dict[str, list[float]] = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
"""Same values as ``lightly.transforms.utils.IMAGENET_NORMALIZE``."""

# ITU-R 601-2 luma weights, as torchvision's tensor `rgb_to_grayscale` uses them.
_LUMA = (0.2989, 0.587, 0.114)

# torchvision RandomResizedCrop defaults: aspect ratio range and number of rejection tries.
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

# Pillow's GaussianBlur approximates a Gaussian by this many box-blur passes per axis.
_BOX_PASSES = 3

# Column layout of the single (B, _N_UNIFORMS) uniform draw that parameterises one forward.
_N_CROP = 2 * _CROP_TRIES + 2  # area and log-ratio per try, then top and left offsets
_COL_HFLIP = _N_CROP
_COL_VFLIP = _COL_HFLIP + 1
_COL_ROT = _COL_VFLIP + 1
_COL_CJ = _COL_ROT + 1
_COL_CJ_FACTORS = _COL_CJ + 1  # 4 columns: brightness, contrast, saturation, hue
_COL_CJ_ORDER = _COL_CJ_FACTORS + 4  # 4 columns, argsort gives a uniform random permutation
_COL_GRAY = _COL_CJ_ORDER + 4
_COL_BLUR = _COL_GRAY + 1
_COL_SIGMA = _COL_BLUR + 1
_COL_SOLARIZE = _COL_SIGMA + 1
_N_UNIFORMS = _COL_SOLARIZE + 1


def _uniforms(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U[0, 1) float64 draws on ``device`` from ``generator`` (which may live elsewhere)."""
    draw_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64)
    # Non-blocking only towards an accelerator: a copy to the CPU may otherwise return before
    # its data has arrived.
    return u.to(device, non_blocking=torch.device(device).type != "cpu")


# ---------------------------------------------------------------------------------------------
# 1. RandomResizedCrop + flips + rotation as one sampling grid
# ---------------------------------------------------------------------------------------------


def _crop_params_from_uniforms(
    u: Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch, given the uniforms.

    Args:
        u: (B, 2 * 10 + 2) uniforms in [0, 1): per try an area and a log-ratio draw, then the
            top and left offset draws.
        height: Input image height.
        width: Input image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).

    Returns:
        (B, 4) int64 ``(top, left, height, width)`` of each crop.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # All 10 rejection-sampling tries at once; float64 and round-half-to-even like Python's
    # round() so the integer sizes match torchvision's scalar code.
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, :_CROP_TRIES])  # (B, 10)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _CROP_TRIES : 2 * _CROP_TRIES])
    w = torch.round(torch.sqrt(target_area * aspect))  # (B, 10)
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, 10)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid try, 0 if none
    w_try = w.gather(1, first).squeeze(1)  # (B,)
    h_try = h.gather(1, first).squeeze(1)

    # Fallback after 10 failed tries: the largest centred crop whose ratio is within range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w_fb, h_fb = float(width), float(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w_fb, h_fb = float(round(height * max(ratio))), float(height)
    else:
        w_fb, h_fb = float(width), float(height)
    found = valid.any(dim=1)  # (B,)
    w_out = torch.where(found, w_try, w_fb)
    h_out = torch.where(found, h_try, h_fb)
    # torch.randint(0, n) is uniform on {0, ..., n - 1}: floor(U * n) has the same law.
    top_try = torch.floor(u[:, -2] * (height - h_out + 1))
    left_try = torch.floor(u[:, -1] * (width - w_out + 1))
    top = torch.where(found, top_try, torch.div(height - h_out, 2, rounding_mode="floor"))
    left = torch.where(found, left_try, torch.div(width - w_out, 2, rounding_mode="floor"))
    return torch.stack((top, left, h_out, w_out), dim=1).to(torch.int64)


def sample_crop_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = _RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Samples crop boxes with the law of torchvision's ``RandomResizedCrop.get_params``.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to 10 tries per image,
    keeping the first that fits, else the centred fallback crop. The tries are drawn for all
    images at once, which gives the same distribution as torchvision's sequential loop.

    Args:
        batch: Number of crops to draw.
        height: Input image height.
        width: Input image width.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        generator: Source of randomness; the global RNG if None.
        device: Device of the returned tensor (default: CPU).

    Returns:
        (B, 4) int64 ``(top, left, height, width)``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    u = _uniforms((batch, _N_CROP), generator, dev)
    return _crop_params_from_uniforms(u, height, width, scale, ratio)


def resized_crop_grid(
    params: Tensor,
    size: int,
    height: int,
    width: int,
    hflip: Tensor | None = None,
    vflip: Tensor | None = None,
    rot90: Tensor | None = None,
) -> Tensor:
    """Sampling grid for ``grid_sample`` that crops, resizes to ``size``, flips and rotates.

    The composite reproduces ``resize(crop(x))`` with bilinear, half-pixel-centre sampling
    (align_corners=False), followed by a horizontal flip, a vertical flip and a 90°
    counter-clockwise rotation, each where its mask is True. Source coordinates are clamped
    to the crop box, not the image, because PIL/torchvision crop before resizing.

    Args:
        params: (B, 4) ``(top, left, height, width)`` crop boxes.
        size: Output side length S.
        height: Input image height.
        width: Input image width.
        hflip: Optional (B,) bool, flip left-right.
        vflip: Optional (B,) bool, flip top-bottom.
        rot90: Optional (B,) bool, rotate by 90° counter-clockwise.

    Returns:
        (B, S, S, 2) grid in ``grid_sample``'s normalised (x, y) coordinates.
    """
    p = params.to(torch.float32)
    top, left, h, w = (t[:, None] for t in p.unbind(dim=1))  # (B, 1) each
    idx = torch.arange(size, device=params.device, dtype=torch.float32)[None]  # (1, S)
    rev = size - 1 - idx
    # Output column c / row r of the (unrotated, flipped) view reads reversed indices.
    cols = idx if hflip is None else torch.where(hflip[:, None], rev, idx)  # (B|1, S)
    rows = idx if vflip is None else torch.where(vflip[:, None], rev, idx)
    # Half-pixel centres: source = offset + (dst + 0.5) * in / out - 0.5, clamped to the box.
    xs = left + (cols + 0.5) * (w / size) - 0.5  # (B, S)
    xs = torch.minimum(torch.maximum(xs, left), left + w - 1)
    ys = top + (rows + 0.5) * (h / size) - 0.5
    ys = torch.minimum(torch.maximum(ys, top), top + h - 1)
    gx = (2 * xs + 1) / width - 1  # pixel index -> align_corners=False normalised coordinate
    gy = (2 * ys + 1) / height - 1
    batch = params.shape[0]
    # out[i, j] = view[i, j]: x varies along j, y along i.
    grid = torch.stack(
        (gx[:, None, :].expand(batch, size, size), gy[:, :, None].expand(batch, size, size)),
        dim=-1,
    )  # (B, S, S, 2)
    if rot90 is not None:
        # Counter-clockwise rotation of a square image: out[i, j] = view[j, S - 1 - i].
        grid_rot = torch.stack(
            (
                gx.flip(1)[:, :, None].expand(batch, size, size),
                gy[:, None, :].expand(batch, size, size),
            ),
            dim=-1,
        )
        grid = torch.where(rot90[:, None, None, None], grid_rot, grid)
    return grid


def resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Pillow's bilinear resampling of the span ``[start, start + length)`` to ``out_size``.

    Row j holds the weights of output pixel j over the ``in_size`` input pixels, as Pillow's
    ``precompute_coeffs`` computes them for ``Image.resize(..., BILINEAR)`` after a crop:
    centre ``c = (j + 0.5) * length / out_size`` (crop coordinates), a triangle filter of
    support ``max(length / out_size, 1)`` (widened when downscaling: the antialiasing), taps
    limited to the span, then normalised to sum 1. When upscaling this is plain bilinear
    interpolation with clamped edges, i.e. ``grid_sample`` with border padding.

    Args:
        start: (B,) first input pixel of each span (crop top or left).
        length: (B,) span lengths in pixels, >= 1.
        in_size: Number of input pixels along the axis (H or W).
        out_size: Number of output pixels.

    Returns:
        (B, out_size, in_size) float32 weights.
    """
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size  # (B, 1, 1) input pixels per output pixel
    inv_support = 1.0 / scale.clamp(min=1.0)
    dev = start.device
    centre = (torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None] + 0.5) * scale
    pos = torch.arange(in_size, device=dev, dtype=torch.float32)[None, None, :] - start  # (B,1,in)
    inside = ((pos >= 0) & (pos < length)).to(torch.float32)  # taps inside the crop only
    # Triangle of the distance between input pixel centres and output pixel centres, in crop
    # coordinates; the small (B, 1, in) and (B, out, 1) factors keep full-size passes few.
    w = (pos + 0.5) * inv_support - centre * inv_support  # (B, out, in)
    w = (1.0 - w.abs_()).clamp_(min=0.0).mul_(inside)
    return w.div_(w.sum(dim=-1, keepdim=True))


def _resized_crop_antialiased(
    x: Tensor,
    params: Tensor,
    size: int,
    hflip: Tensor | None,
    vflip: Tensor | None,
    rot90: Tensor | None,
) -> Tensor:
    """``resized_crop`` as ``R_y @ x @ R_x^T`` with per-image Pillow weights.

    The crop, the antialiased resize and both flips are in the two (B, S, H) and (B, S, W)
    weight matrices (a flip reverses the rows of one of them); the 90° rotation is a transpose
    of the result. Dense weights cost O(H + W) multiply-adds per output pixel instead of
    ``grid_sample``'s 4 taps: negligible on a GPU, several times ``grid_sample`` on a CPU,
    which is why crops that can only be upscaled (CIFAR) keep ``grid_sample``.
    """
    top, left, h, w = params.unbind(dim=1)
    ry = resample_weights(top, h, x.shape[-2], size)  # (B, S, H)
    rx = resample_weights(left, w, x.shape[-1], size)  # (B, S, W)
    # rot90 (counter-clockwise) of a view: out[i, j] = view[j, S - 1 - i], i.e. the transpose
    # of the view with its columns reversed; so a rotation toggles the horizontal flip.
    flip_x = hflip
    if rot90 is not None:
        flip_x = rot90 if flip_x is None else flip_x ^ rot90
    if flip_x is not None:
        rx = torch.where(flip_x[:, None, None], rx.flip(1), rx)
    if vflip is not None:
        ry = torch.where(vflip[:, None, None], ry.flip(1), ry)
    batch, channels, height, width = x.shape
    rows = torch.bmm(x.reshape(batch, channels * height, width), rx.transpose(1, 2))
    out = torch.matmul(ry[:, None], rows.view(batch, channels, height, size))  # (B, C, S, S)
    if rot90 is not None:
        out = torch.where(rot90[:, None, None, None], out.transpose(-1, -2), out)
    return out


def resized_crop(
    x: Tensor,
    params: Tensor,
    size: int,
    hflip: Tensor | None = None,
    vflip: Tensor | None = None,
    rot90: Tensor | None = None,
    antialias: bool | None = None,
) -> Tensor:
    """Crops each image to its box, resizes to (size, size), then flips/rotates where asked.

    Matches torchvision's ``resized_crop`` on PIL images (bilinear, antialiased) and on tensors
    with ``antialias=True``. When every crop is upscaled the antialiasing changes nothing and
    a single ``grid_sample`` does the work; otherwise the Pillow weights are applied as two
    batched matrix products (``resample_weights``).

    Args:
        x: (B, C, H, W) float images.
        params: (B, 4) ``(top, left, height, width)`` crop boxes.
        size: Output side length S.
        hflip: Optional (B,) bool, flip left-right.
        vflip: Optional (B,) bool, flip top-bottom.
        rot90: Optional (B,) bool, rotate by 90° counter-clockwise.
        antialias: True for the antialiased path, False for plain bilinear sampling (aliased
            where a crop is larger than ``size``). None picks from the shapes, with no device
            sync: antialiased iff the image is larger than ``size`` along some axis, so that
            a crop may be downscaled.

    Returns:
        (B, C, S, S) float images.
    """
    if antialias is None:
        antialias = x.shape[-2] > size or x.shape[-1] > size
    if antialias:
        return _resized_crop_antialiased(x, params, size, hflip, vflip, rot90)
    grid = resized_crop_grid(params, size, x.shape[-2], x.shape[-1], hflip, vflip, rot90)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# 2. colour jitter (torchvision.transforms.v2.functional formulas, per-sample factors)
# ---------------------------------------------------------------------------------------------


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of (B, 3, H, W) images, shape (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``factor * x + (1 - factor) * other``, clamped to [0, 1].

    Written as ``lerp(other, x, factor)``: equal up to float rounding, and one fused kernel
    where the broadcast multiply-add is several times slower on CPU.
    """
    f = factor.to(x.dtype).view(-1, 1, 1, 1)
    return torch.lerp(other.expand_as(x), x, f).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Blends each image with black: ``clamp(factor * x)``.

    Args:
        x: (B, C, H, W) float images in [0, 1].
        factor: (B,) non-negative brightness factors.

    Returns:
        (B, C, H, W) adjusted images.
    """
    return _blend(x, torch.zeros((), dtype=x.dtype, device=x.device), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blends each image with the mean of its grayscale version.

    Args:
        x: (B, 3, H, W) float images in [0, 1].
        factor: (B,) non-negative contrast factors.

    Returns:
        (B, 3, H, W) adjusted images.
    """
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blends each image with its grayscale version.

    Args:
        x: (B, 3, H, W) float images in [0, 1].
        factor: (B,) non-negative saturation factors.

    Returns:
        (B, 3, H, W) adjusted images.
    """
    return _blend(x, rgb_to_grayscale(x), factor)


def _hue_sextant(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in sextants (6 h, in [-1, 5)), value and chroma of (B, 3, H, W) images.

    torchvision's ``_rgb_to_hsv`` (after Pillow's Convert.c) with its divisions folded:
    for max = r, (bc - gc) = (g - b) / chroma, and likewise for g and b. Gray pixels
    (chroma 0) get hue 0.

    Returns:
        6 h, value ``max(r, g, b)`` and chroma ``max - min``, each (B, H, W).
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = 1.0 / torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    h6 = torch.where(
        maxc == r,
        (g - b) * inv,
        torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv),
    )
    return h6, maxc, chroma


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotates the hue of each image by ``factor`` turns in HSV space.

    Same result as torchvision's ``adjust_hue`` (RGB -> HSV, shift h, HSV -> RGB) up to
    float rounding, written with fewer full-size ops: HSV -> RGB uses the closed form
    ``c = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for
    R, G, B, which equals torchvision's piecewise (p, q, t) table, and ``v s`` is the chroma.

    Args:
        x: (B, 3, H, W) float images in [0, 1].
        factor: (B,) hue shifts in [-0.5, 0.5].

    Returns:
        (B, 3, H, W) adjusted images.
    """
    h6, value, chroma = _hue_sextant(x)  # (B, H, W) each
    shifted = h6 + 6.0 * factor.to(x.dtype).view(-1, 1, 1)
    # (5, 3, 1) made on the device: torch.tensor(list, device=cuda) would be a blocking copy.
    n = torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + shifted.unsqueeze(1), 6.0)  # (B, 3, H, W)
    part = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * part


def color_jitter(
    x: Tensor,
    factors: Tensor,
    order: Tensor,
    with_hue: bool = True,
    hue_by_index: bool | None = None,
) -> Tensor:
    """Applies brightness, contrast, saturation and hue to each image in its own order.

    Equivalent to torchvision's ``ColorJitter`` with given factors and permutation
    ``fn_idx``: at each of the 4 positions every image applies the op ``order[:, pos]``
    (0 brightness, 1 contrast, 2 saturation, 3 hue). The three blends share one fused
    expression whose blend target (black, grayscale mean, grayscale) is selected per image;
    hue is computed for the batch and kept where selected.

    Args:
        x: (B, 3, H, W) float images in [0, 1].
        factors: (B, 4) brightness, contrast, saturation factors and hue shift; use 1, 1, 1, 0
            for an op that should leave the image unchanged.
        order: (B, 4) int64, a permutation of 0..3 per image.
        with_hue: False skips the (costly) hue op, for a hue range of 0 where every shift is 0.
        hue_by_index: Compute hue only on the images that take it at each position (index
            select, a host sync) instead of on the whole batch followed by a mask. Same
            result; defaults to True on CPU, where compute dominates, and False elsewhere,
            where kernel launches and syncs do.

    Returns:
        (B, 3, H, W) jittered images.
    """
    blend_factors = factors.to(x.dtype).clone()
    blend_factors[:, 3] = 1.0  # the hue slot of the blend is a no-op, its result is replaced
    if hue_by_index is None:
        hue_by_index = x.device.type == "cpu"
    out = x
    for pos in range(4):
        op = order[:, pos]  # (B,)
        gray = rgb_to_grayscale(out)  # (B, 1, H, W)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        is_b = (op == 0).view(-1, 1, 1, 1)
        is_c = (op == 1).view(-1, 1, 1, 1)
        target = torch.where(is_b, torch.zeros_like(mean), torch.where(is_c, mean, gray))
        f = blend_factors.gather(1, op[:, None]).squeeze(1)  # (B,)
        blended = _blend(out, target, f)
        if with_hue:
            is_h = op == 3  # (B,)
            if hue_by_index:
                idx = is_h.nonzero().squeeze(1)
                blended.index_copy_(0, idx, adjust_hue(out[idx], factors[idx, 3]))
            else:
                hued = adjust_hue(out, factors[:, 3])
                blended = torch.where(is_h.view(-1, 1, 1, 1), hued, blended)
        out = blended
    return out


# ---------------------------------------------------------------------------------------------
# 4. Pillow's Gaussian blur: 3 fractional box blurs per axis, per-sample radius
# ---------------------------------------------------------------------------------------------


def _box_radius(sigma: Tensor) -> Tensor:
    """Fractional box radius whose 3-pass box blur has variance sigma².

    Pillow's ``_gaussian_blur_radius`` (Gwosdek et al. 2011, "Theoretical foundations of
    Gaussian convolution by extended box filtering", eqs. 7, 11, 14).
    """
    sigma2 = sigma * sigma / _BOX_PASSES
    length = torch.sqrt(12.0 * sigma2 + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (whole + 1) ** 2))
    return whole + frac


def _box_kernels(sigma: Tensor, half: int) -> Tensor:
    """(B, 2 * half + 1) extended-box kernels ``[a, 1, ..., 1, a] / (2 r + 1)``."""
    radius = _box_radius(sigma)[:, None]  # (B, 1)
    whole = torch.floor(radius)
    frac = radius - whole
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=sigma.dtype).abs()[None]
    weights = torch.where(taps <= whole, torch.ones_like(frac), torch.zeros_like(frac))
    weights = torch.where(taps == whole + 1, frac, weights)  # the two fractional end taps
    return weights / (2 * radius + 1)


def _max_box_half_width(max_sigma: float) -> int:
    """Integer half width of the box kernel for the largest sigma (Pillow's integer radius + 1)."""
    # _box_radius in plain floats: no tensor, so no graph break when compiled.
    sigma2 = max_sigma * max_sigma / _BOX_PASSES
    whole = math.floor((math.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (whole + 1) ** 2))
    return math.floor(whole + frac) + 1


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """Per-image Gaussian blur as Pillow's ``ImageFilter.GaussianBlur(radius=sigma)`` does it.

    Pillow (hence lightly's GaussianBlur) approximates the Gaussian with 3 passes of an
    extended box filter per axis, replicating edge pixels at every pass. We run the same 6
    passes as grouped depthwise convolutions, one kernel per image (sigma = 0 gives the
    identity kernel), without Pillow's uint8 rounding between passes.

    Args:
        x: (B, C, H, W) float images.
        sigma: (B,) non-negative standard deviations.
        max_sigma: Upper bound of ``sigma``, fixes the kernel width without a device sync;
            defaults to ``sigma.max()``.

    Returns:
        (B, C, H, W) blurred images.
    """
    batch, channels, height, width = x.shape
    if max_sigma is None:
        max_sigma = float(sigma.max())
    half = _max_box_half_width(max_sigma)
    kernel = _box_kernels(sigma.to(torch.float64), half).to(x.dtype)  # (B, K)
    # (B * C, K): one filter per channel; expand + reshape rather than repeat_interleave,
    # which may size its output on the host (a device sync).
    kernel = kernel[:, None, :].expand(-1, channels, -1).reshape(batch * channels, -1)
    size = 2 * half + 1
    out = x.reshape(1, batch * channels, height, width)  # grouped conv: a group per channel
    for _ in range(_BOX_PASSES):
        out = F.pad(out, (half, half, 0, 0), mode="replicate")
        out = F.conv2d(out, kernel.view(-1, 1, 1, size), groups=batch * channels)
    for _ in range(_BOX_PASSES):
        out = F.pad(out, (0, 0, half, half), mode="replicate")
        out = F.conv2d(out, kernel.view(-1, 1, size, 1), groups=batch * channels)
    return out.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------------------------
# The view transform
# ---------------------------------------------------------------------------------------------


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_normalize(normalize: Mapping[str, Sequence[float]] | None) -> None:
    if normalize is None:
        return
    if set(normalize) != {"mean", "std"}:
        raise ValueError(
            f"normalize must have exactly the keys 'mean' and 'std', got {set(normalize)}"
        )
    if len(normalize["mean"]) != 3 or len(normalize["std"]) != 3:
        raise ValueError("normalize 'mean' and 'std' must each have 3 values (RGB)")
    if any(s <= 0 for s in normalize["std"]):
        raise ValueError(f"normalize 'std' must be positive, got {normalize['std']}")


def _check_input(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {x.dtype}")


def _to_float_rgb(x: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]; 1 channel is kept (expanded later)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


class _Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with buffers, so it follows ``.to(device)``."""

    mean: Tensor
    std: Tensor

    def __init__(self, normalize: Mapping[str, Sequence[float]] | None) -> None:
        super().__init__()
        self.enabled = normalize is not None
        mean = normalize["mean"] if normalize is not None else [0.0, 0.0, 0.0]
        std = normalize["std"] if normalize is not None else [1.0, 1.0, 1.0]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class BatchViewTransform(nn.Module):
    """One augmented view of a batch, with lightly's ``SimCLRViewTransform`` semantics.

    Arguments and defaults mirror lightly 1.6's ``SimCLRTransform`` / ``BYOLView1Transform``
    (plus ``solarization_prob`` from BYOL); each image gets its own random parameters, drawn
    from the same distributions as the torchvision/lightly transforms, in the same order:
    resized crop, horizontal flip, vertical flip, 90° rotation, colour jitter, grayscale,
    Gaussian blur, solarization, normalisation.

    Args:
        input_size: Side length of the square output view.
        cj_prob: Probability that colour jitter is applied.
        cj_strength: Multiplies ``cj_bright``, ``cj_contrast``, ``cj_sat`` and ``cj_hue``.
        cj_bright: Brightness jitter; factor ~ U(max(0, 1 - b), 1 + b).
        cj_contrast: Contrast jitter; factor ~ U(max(0, 1 - c), 1 + c).
        cj_sat: Saturation jitter; factor ~ U(max(0, 1 - s), 1 + s).
        cj_hue: Hue jitter; shift ~ U(-h, h), h <= 0.5 after ``cj_strength``.
        min_scale: Lower bound of the crop area fraction (upper bound 1).
        random_gray_scale: Probability of conversion to grayscale.
        gaussian_blur: Probability of Gaussian blur.
        sigmas: Range of the blur standard deviation, sampled uniformly per image.
        solarization_prob: Probability of solarization.
        vf_prob: Probability of a vertical flip.
        hf_prob: Probability of a horizontal flip.
        rr_prob: Probability of a 90° counter-clockwise rotation.
        rr_degrees: Only None (lightly's 90° rotation) is supported.
        normalize: ``{"mean": [...], "std": [...]}`` or None for outputs in [0, 1].
        solarize_threshold: Pixels >= threshold are inverted. lightly solarizes uint8 values
            >= 128; 0.5 is the matching cut on the continuous values that PIL would round.

    Raises:
        ValueError: for probabilities outside [0, 1], ``min_scale`` outside (0, 1], negative
            jitter strengths, a hue range above 0.5, bad sigmas, input size or normalisation.
        NotImplementedError: for ``rr_degrees`` other than None with ``rr_prob > 0``.
    """

    def __init__(
        self,
        input_size: int = 224,
        cj_prob: float = 0.8,
        cj_strength: float = 1.0,
        cj_bright: float = 0.8,
        cj_contrast: float = 0.8,
        cj_sat: float = 0.8,
        cj_hue: float = 0.2,
        min_scale: float = 0.08,
        random_gray_scale: float = 0.2,
        gaussian_blur: float = 0.5,
        sigmas: tuple[float, float] = (0.1, 2.0),
        solarization_prob: float = 0.0,
        vf_prob: float = 0.0,
        hf_prob: float = 0.5,
        rr_prob: float = 0.0,
        rr_degrees: float | tuple[float, float] | None = None,
        normalize: Mapping[str, Sequence[float]] | None = IMAGENET_NORMALIZE,
        solarize_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size}")
        for name, value in (
            ("cj_prob", cj_prob),
            ("random_gray_scale", random_gray_scale),
            ("gaussian_blur", gaussian_blur),
            ("solarization_prob", solarization_prob),
            ("vf_prob", vf_prob),
            ("hf_prob", hf_prob),
            ("rr_prob", rr_prob),
        ):
            _check_prob(name, value)
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        strengths = {
            "cj_strength": cj_strength,
            "cj_bright": cj_bright,
            "cj_contrast": cj_contrast,
            "cj_sat": cj_sat,
            "cj_hue": cj_hue,
        }
        for name, value in strengths.items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if cj_strength * cj_hue > 0.5:
            raise ValueError(
                f"cj_strength * cj_hue must be <= 0.5 (hue shifts wrap at half a turn), "
                f"got {cj_strength * cj_hue}"
            )
        if len(sigmas) != 2 or not 0.0 <= sigmas[0] <= sigmas[1]:
            raise ValueError(f"sigmas must be (min, max) with 0 <= min <= max, got {sigmas}")
        if not 0.0 <= solarize_threshold <= 1.0:
            raise ValueError(f"solarize_threshold must be in [0, 1], got {solarize_threshold}")
        if rr_prob > 0 and rr_degrees is not None:
            raise NotImplementedError(
                "only lightly's 90° random rotation (rr_degrees=None) is supported; "
                f"got rr_degrees={rr_degrees}"
            )
        _check_normalize(normalize)

        self.input_size = input_size
        self.cj_prob = cj_prob
        b, c, s, h = (cj_strength * v for v in (cj_bright, cj_contrast, cj_sat, cj_hue))
        # torchvision ColorJitter ranges: factors around 1 clipped at 0, hue around 0.
        self.brightness = (max(0.0, 1.0 - b), 1.0 + b)
        self.contrast = (max(0.0, 1.0 - c), 1.0 + c)
        self.saturation = (max(0.0, 1.0 - s), 1.0 + s)
        self.hue = (-h, h)
        self.min_scale = min_scale
        self.random_gray_scale = random_gray_scale
        self.gaussian_blur = gaussian_blur
        self.sigmas = (float(sigmas[0]), float(sigmas[1]))
        self.solarization_prob = solarization_prob
        self.vf_prob = vf_prob
        self.hf_prob = hf_prob
        self.rr_prob = rr_prob
        self.solarize_threshold = solarize_threshold
        self.normalize = _Normalize(normalize)
        # See color_jitter; None picks per device. compile_apply sets False (static shapes).
        self.hue_by_index: bool | None = None
        self._compiled_apply: Any = None
        self._compile_proven = False  # the compiled function has run once without error

    def compile_apply(self, **compile_kwargs: Any) -> BatchViewTransform:
        """``torch.compile`` the view's per-batch work, fusing its ~400 small ops.

        On a GPU the batched ops are individually tiny (a CIFAR batch is 1.5M values), so
        their number, not their arithmetic, sets the cost; the compiler fuses the parameter
        maths and the colour chain into a few kernels. Only the uniform draw stays eager (it
        takes a generator).
        Shapes are static (``dynamic=False``): a new batch size compiles once more. Should
        the first compiled call fail (a compiler bug on some platform), the view warns and
        runs eagerly from then on, with the same result for the same draw.

        Args:
            **compile_kwargs: Passed to ``torch.compile`` (e.g. ``mode``).

        Returns:
            ``self``, whose ``forward`` now runs ``params_from_uniforms`` and
            ``apply_params`` compiled as one function.
        """
        self.hue_by_index = False  # index_select by a mask has a data-dependent shape
        self._compiled_apply = torch.compile(self._from_uniforms, dynamic=False, **compile_kwargs)
        self._compile_proven = False
        return self

    def _from_uniforms(self, x: Tensor, u: Tensor) -> Tensor:
        """The view given the uniform draw: parameters, then their application."""
        return self.apply_params(x, self.params_from_uniforms(u, x.shape[-2], x.shape[-1]))

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, min_scale={self.min_scale}, hf_prob={self.hf_prob}, "
            f"vf_prob={self.vf_prob}, rr_prob={self.rr_prob}, cj_prob={self.cj_prob}, "
            f"brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, "
            f"random_gray_scale={self.random_gray_scale}, gaussian_blur={self.gaussian_blur}, "
            f"sigmas={self.sigmas}, solarization_prob={self.solarization_prob}"
        )

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draws one view per image.

        Args:
            x: (B, C, H, W) uint8 in [0, 255] or float in [0, 1], C in {1, 3}.
            generator: Source of randomness (may live on another device than ``x``); the
                global RNG of ``x``'s device if None.

        Returns:
            (B, 3, S, S) float32 views, normalised if ``normalize`` was given.
        """
        _check_input(x)
        u = _uniforms((x.shape[0], _N_UNIFORMS), generator, x.device)  # the only RNG call
        if self._compiled_apply is not None:
            if self._compile_proven:
                return self._compiled_apply(x, u)  # type: ignore[no-any-return]
            try:  # the first call compiles
                out = self._compiled_apply(x, u)
            except Exception as err:  # any compiler failure: eager from now on
                warnings.warn(
                    f"torch.compile of the views failed ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); running them eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._compiled_apply = None
                self.hue_by_index = None
            else:
                self._compile_proven = True
                return out  # type: ignore[no-any-return]
        return self._from_uniforms(x, u)

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Tensor]:
        """Draws the random parameters of ``batch`` views of (height, width) images.

        All of them come from one (B, 38) uniform draw: one RNG call and one copy to
        ``device``. Each parameter has the law torchvision/lightly give it.

        Args:
            batch: Number of images.
            height: Input image height.
            width: Input image width.
            generator: Source of randomness; the global RNG of ``device`` if None.
            device: Device of the parameters (default: CPU).

        Returns:
            ``crop`` (B, 4) int64 ``(top, left, height, width)``; bool (B,) masks ``hflip``,
            ``vflip``, ``rot90``, ``jitter``, ``gray``, ``solarize``; ``jitter_factors``
            (B, 4) float32 brightness, contrast, saturation factors and hue shift;
            ``jitter_order`` (B, 4) int64 permutations of 0..3 (op order, as torchvision's
            ``randperm``); ``sigma`` (B,) float32 blur std, 0 where not blurred.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return self.params_from_uniforms(
            _uniforms((batch, _N_UNIFORMS), generator, dev), height, width
        )

    def params_from_uniforms(self, u: Tensor, height: int, width: int) -> dict[str, Tensor]:
        """The parameters of ``sample_params`` from its (B, 38) float64 uniform draw ``u``.

        A pure function of ``u`` (no RNG), so that it can be compiled with ``apply_params``.
        """
        # Affine maps of uniform columns with Python-float bounds: no host-to-device copy (a
        # torch.tensor(list, device=cuda) here would block the host on every batch).
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = torch.stack(
            [lo + (hi - lo) * u[:, _COL_CJ_FACTORS + k] for k, (lo, hi) in enumerate(ranges)],
            dim=1,
        )
        sigma_lo, sigma_hi = self.sigmas
        blur = u[:, _COL_BLUR] < self.gaussian_blur
        sigma = sigma_lo + (sigma_hi - sigma_lo) * u[:, _COL_SIGMA]  # U(sigmas) as lightly
        return {
            "crop": _crop_params_from_uniforms(
                u[:, :_N_CROP], height, width, (self.min_scale, 1.0), _RATIO
            ),
            "hflip": u[:, _COL_HFLIP] < self.hf_prob,
            "vflip": u[:, _COL_VFLIP] < self.vf_prob,
            "rot90": u[:, _COL_ROT] < self.rr_prob,
            "jitter": u[:, _COL_CJ] < self.cj_prob,
            # torchvision ColorJitter: each factor ~ U(range), independently.
            "jitter_factors": factors.to(torch.float32),
            # The argsort of iid uniforms is a uniform random permutation, like randperm(4).
            "jitter_order": u[:, _COL_CJ_ORDER : _COL_CJ_ORDER + 4].argsort(dim=1),
            "gray": u[:, _COL_GRAY] < self.random_gray_scale,
            "sigma": torch.where(blur, sigma, torch.zeros_like(sigma)).to(torch.float32),
            "solarize": u[:, _COL_SOLARIZE] < self.solarization_prob,
        }

    def apply_params(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """Applies the view with given parameters (see ``sample_params``).

        Ops whose probability is 0 are skipped without looking at their parameters.

        Args:
            x: (B, C, H, W) uint8 in [0, 255] or float in [0, 1], C in {1, 3}.
            params: Per-image parameters on ``x``'s device, as ``sample_params`` returns.

        Returns:
            (B, 3, S, S) float32 views.
        """
        _check_input(x)
        batch = x.shape[0]
        size = self.input_size

        # 1. crop + flips + rotation: one grid_sample, or two matmuls when downscaling.
        hflip = params["hflip"] if self.hf_prob > 0 else None
        vflip = params["vflip"] if self.vf_prob > 0 else None
        rot90 = params["rot90"] if self.rr_prob > 0 else None
        out = resized_crop(_to_float_rgb(x), params["crop"], size, hflip, vflip, rot90)
        if out.shape[1] == 1:  # (B, 1, S, S) -> (B, 3, S, S), like PIL's convert("RGB")
            out = out.expand(batch, 3, size, size)

        # 2. colour jitter with probability cj_prob.
        if self.cj_prob > 0:
            jittered = color_jitter(
                out,
                params["jitter_factors"],
                params["jitter_order"],
                with_hue=self.hue[1] > 0,
                hue_by_index=self.hue_by_index,
            )
            out = torch.where(params["jitter"].view(-1, 1, 1, 1), jittered, out)

        # 3. grayscale with probability random_gray_scale.
        if self.random_gray_scale > 0:
            gray = params["gray"].view(-1, 1, 1, 1)
            out = torch.where(gray, rgb_to_grayscale(out).expand_as(out), out)

        # 4. Gaussian blur with probability gaussian_blur (sigma 0 is the identity kernel).
        if self.gaussian_blur > 0 and self.sigmas[1] > 0:
            out = gaussian_blur(out.contiguous(), params["sigma"], max_sigma=self.sigmas[1])

        # 5. solarization with probability solarization_prob.
        if self.solarization_prob > 0:
            solar = params["solarize"].view(-1, 1, 1, 1)
            out = torch.where(solar & (out >= self.solarize_threshold), 1.0 - out, out)

        # 6. normalisation.
        return self.normalize(out)


class EvalTransform(nn.Module):
    """Resize to (size, size) and normalise, for validation batches.

    Bilinear with antialiasing, like torchvision's ``Resize((size, size))``; the identity
    (before normalisation) when the input already has that size.

    Args:
        input_size: Side length of the square output.
        normalize: ``{"mean": [...], "std": [...]}`` or None.
    """

    def __init__(
        self,
        input_size: int,
        normalize: Mapping[str, Sequence[float]] | None = IMAGENET_NORMALIZE,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size}")
        _check_normalize(normalize)
        self.input_size = input_size
        self.normalize = _Normalize(normalize)

    def forward(self, x: Tensor) -> Tensor:
        """Resizes and normalises.

        Args:
            x: (B, C, H, W) uint8 in [0, 255] or float in [0, 1], C in {1, 3}.

        Returns:
            (B, 3, S, S) float32.
        """
        _check_input(x)
        out = _to_float_rgb(x)
        size = self.input_size
        if out.shape[-2:] != (size, size):
            out = F.interpolate(
                out, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        return self.normalize(out)


# Defaults of lightly 1.6's SimCLRTransform and BYOLView{1,2}Transform, kept in one place.
SIMCLR_DEFAULTS: dict[str, float] = {
    "cj_prob": 0.8,
    "cj_strength": 1.0,
    "cj_bright": 0.8,
    "cj_contrast": 0.8,
    "cj_sat": 0.8,
    "cj_hue": 0.2,
    "min_scale": 0.08,
    "random_gray_scale": 0.2,
    "solarization_prob": 0.0,
    "vf_prob": 0.0,
    "hf_prob": 0.5,
    "rr_prob": 0.0,
}
BYOL_DEFAULTS: dict[str, float] = {
    "cj_prob": 0.8,
    "cj_strength": 1.0,
    "cj_bright": 0.4,
    "cj_contrast": 0.4,
    "cj_sat": 0.2,
    "cj_hue": 0.1,
    "min_scale": 0.08,
    "random_gray_scale": 0.2,
    "vf_prob": 0.0,
    "hf_prob": 0.5,
    "rr_prob": 0.0,
}
# BYOL's asymmetric views (Grill et al. 2020, Table 6): blur 1.0 / 0.1, solarization 0 / 0.2.
BYOL_VIEW1 = {"gaussian_blur": 1.0, "solarization_prob": 0.0}
BYOL_VIEW2 = {"gaussian_blur": 0.1, "solarization_prob": 0.2}


def simclr_views(
    input_size: int = 32,
    normalize: Mapping[str, Sequence[float]] | None = IMAGENET_NORMALIZE,
    gaussian_blur: float = 0.0,
    **overrides: Any,
) -> list[BatchViewTransform]:
    """Two views with the defaults of lightly's ``SimCLRTransform``.

    Args:
        input_size: Side length of the views.
        normalize: Normalisation of the views, or None.
        gaussian_blur: Blur probability. lightly's default is 0.5; the CIFAR setting we
            pretrain with (lightly's CIFAR-10 benchmark) passes 0.0, hence the default here.
        **overrides: Any other ``BatchViewTransform`` argument, applied to both views.

    Returns:
        ``[view_1, view_2]``, identically configured.
    """
    kwargs: dict[str, Any] = {**SIMCLR_DEFAULTS, "gaussian_blur": gaussian_blur, **overrides}
    return [
        BatchViewTransform(input_size=input_size, normalize=normalize, **kwargs) for _ in range(2)
    ]


def byol_views(
    input_size: int = 32,
    normalize: Mapping[str, Sequence[float]] | None = IMAGENET_NORMALIZE,
    **overrides: Any,
) -> list[BatchViewTransform]:
    """View 1 and view 2 with the defaults of lightly's ``BYOLView1Transform``/``View2``.

    Args:
        input_size: Side length of the views.
        normalize: Normalisation of the views, or None.
        **overrides: Any ``BatchViewTransform`` argument, applied to both views (e.g.
            ``gaussian_blur=0.0`` for CIFAR).

    Returns:
        ``[view_1, view_2]``; they differ in blur and solarization probability.
    """
    return [
        BatchViewTransform(
            input_size=input_size,
            normalize=normalize,
            **{**BYOL_DEFAULTS, **view, **overrides},
        )
        for view in (BYOL_VIEW1, BYOL_VIEW2)
    ]


def eval_transform(
    input_size: int, normalize: Mapping[str, Sequence[float]] | None = IMAGENET_NORMALIZE
) -> EvalTransform:
    """Resize + normalise for validation batches (see ``EvalTransform``)."""
    return EvalTransform(input_size, normalize)
