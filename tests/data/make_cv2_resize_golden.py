"""Writes cv2_resize_golden.npz: OpenCV's INTER_LINEAR reductions of a small random "photograph",
the reference of tests/test_corruptions.py::test_photo_resize_equals_cv2_golden (CI has no cv2).

Run once, with OpenCV in a throwaway folder (it is not a dependency of the project):

    pip install --target /tmp/cv2pkg opencv-python-headless numpy==<the venv's numpy>
    PYTHONPATH=/tmp/cv2pkg python tests/data/make_cv2_resize_golden.py

Made with opencv-python-headless 5.0.0 (cv2.__version__ is stored in the file).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# The reduction factors of test_photo_resize_equals_cv2 (fx = fy = f).
FACTORS = (0.05, 0.1, 0.2, 0.25, 0.3, 0.45, 0.6)
SIZE = (40, 56)  # (H, W): small, so that the file stays a few KB


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image with noise, as the test's _write_frost_photos draws one."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
    big = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    noisy = np.asarray(big).astype(int) + rng.integers(-20, 21, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return np.asarray(Image.open(buf).convert("RGB"))


def main() -> None:
    src = photo(*SIZE)
    arrays = {"photo": src, "factors": np.array(FACTORS)}
    for f in FACTORS:
        arrays[f"resized_{f}"] = cv2.resize(src, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    # fx = 1 is a copy in cv2 (checked here, so the test asserts it without a stored array).
    assert np.array_equal(cv2.resize(src, (0, 0), fx=1.0, fy=1.0), src)
    out = Path(__file__).with_name("cv2_resize_golden.npz")
    np.savez_compressed(out, cv2_version=np.array(cv2.__version__), **arrays)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
