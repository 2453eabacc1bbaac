"""Tests of the CIFAR-10-C cache writer and loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ssl_robust
from ssl_robust.evaluate import cifar_c
from ssl_robust.evaluate.cifar_c import available_corruptions, load_cifar_c, write_cifar_c
from ssl_robust.evaluate.corruptions import corrupt, load_frost_textures
from tests.helpers import frost_photos

N = 6
NAMES = ["gaussian_noise", "contrast", "fog"]


def clean_images(n: int = N) -> np.ndarray:
    """Smooth gradients with a bright square, uint8 (N, 32, 32, 3)."""
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * np.sin(5 * xx + i)], -1)
        img[4 + i : 12 + i, 6:14] = (0.95, 0.9, 0.1)
        images[i] = np.round(img.clip(0, 1) * 255).astype(np.uint8)
    return images


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clean_images(), np.arange(N, dtype=np.int64) % 10


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, data: tuple[np.ndarray, np.ndarray]) -> Path:
    images, labels = data
    folder = tmp_path_factory.mktemp("cifar_c")
    write_cifar_c(folder, images, labels, corruptions=NAMES, seed=3, batch_size=4)
    return folder


def test_layout_matches_the_release(written: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = data
    assert sorted(p.name for p in written.iterdir()) == sorted(
        [f"{n}.npy" for n in NAMES] + ["labels.npy", "manifest.json"]
    )
    for name in NAMES:
        arr = np.load(written / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (5 * N, 32, 32, 3)
    all_labels = np.load(written / "labels.npy")
    assert all_labels.dtype == np.int64
    np.testing.assert_array_equal(all_labels, np.tile(labels, 5))
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["corruptions"] == NAMES
    assert manifest["severities"] == [1, 2, 3, 4, 5]
    assert manifest["seed"] == 3 and manifest["num_images"] == N
    assert manifest["image_size"] == [32, 32]
    assert manifest["version"] == ssl_robust.__version__
    assert manifest["params_hash"] == cifar_c.params_hash()
    assert not list(written.glob(".*tmp"))


def test_blocks_are_severities_of_the_same_images(
    written: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = data
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    for severity in range(1, 6):
        got, got_labels = load_cifar_c(written, "contrast", severity)
        assert got.dtype == np.uint8 and got.shape == images.shape
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_labels, labels)
        # contrast is deterministic: the block equals the corruption of the clean images
        expected = torch.round(corrupt(x, "contrast", severity) * 255).to(torch.uint8)
        np.testing.assert_array_equal(got, expected.permute(0, 2, 3, 1).numpy())
    # noise grows with severity across the blocks
    noise = [
        np.abs(load_cifar_c(written, "gaussian_noise", s)[0].astype(float) - images).mean()
        for s in range(1, 6)
    ]
    assert noise == sorted(noise)
    # Each severity draws its own noise (its own seed), not the same draws scaled: where two
    # severities both moved a value, they moved it the same way about half the time.
    assert len({cifar_c._corruption_seed(0, "gaussian_noise", s) for s in range(1, 6)}) == 5
    blocks = [load_cifar_c(written, "gaussian_noise", s)[0].astype(float) - images for s in (1, 2)]
    both = (blocks[0] != 0) & (blocks[1] != 0)
    same_way = (np.sign(blocks[0]) == np.sign(blocks[1]))[both].mean()
    assert both.sum() > 1000 and 0.4 < same_way < 0.6


def test_batch_size_does_not_change_the_result(
    tmp_path: Path, written: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    # one generator per (corruption, severity), consumed batch after batch
    write_cifar_c(tmp_path, *data, corruptions=["contrast"], seed=3, batch_size=N)
    np.testing.assert_array_equal(
        np.load(tmp_path / "contrast.npy"), np.load(written / "contrast.npy")
    )
    write_cifar_c(tmp_path / "b", *data, corruptions=["fog"], seed=3, batch_size=4)
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "fog.npy"), np.load(written / "fog.npy"))


def test_resume_skips_finished_corruptions(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = data
    write_cifar_c(tmp_path, images, labels, corruptions=["contrast"], seed=0)
    before = (tmp_path / "contrast.npy").stat().st_mtime_ns
    calls: list[str] = []
    real = cifar_c.corrupt

    def counting(x: torch.Tensor, name: str, severity: int, generator=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(name)
        return real(x, name, severity, generator=generator, **kwargs)

    monkeypatch.setattr(cifar_c, "corrupt", counting)
    write_cifar_c(tmp_path, images, labels, corruptions=["contrast", "fog"], seed=0)
    assert set(calls) == {"fog"}
    assert (tmp_path / "contrast.npy").stat().st_mtime_ns == before
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["corruptions"] == ["contrast", "fog"]
    # a corrupted/missing file listed in the manifest is regenerated
    (tmp_path / "fog.npy").unlink()
    calls.clear()
    write_cifar_c(tmp_path, images, labels, corruptions=["contrast", "fog"], seed=0)
    assert set(calls) == {"fog"}


def test_interrupted_generation_resumes(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = data
    real = cifar_c.corrupt

    def failing(x: torch.Tensor, name: str, severity: int, generator=None, **kwargs):  # type: ignore[no-untyped-def]
        if name == "fog" and severity == 3:
            raise KeyboardInterrupt
        return real(x, name, severity, generator=generator, **kwargs)

    monkeypatch.setattr(cifar_c, "corrupt", failing)
    with pytest.raises(KeyboardInterrupt):
        write_cifar_c(tmp_path, images, labels, corruptions=["contrast", "fog"], seed=0)
    assert (tmp_path / "contrast.npy").exists() and not (tmp_path / "fog.npy").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["corruptions"] == ["contrast"]
    monkeypatch.setattr(cifar_c, "corrupt", real)
    write_cifar_c(tmp_path, images, labels, corruptions=["contrast", "fog"], seed=0)
    reference = tmp_path / "ref"
    write_cifar_c(reference, images, labels, corruptions=["fog"], seed=0)
    np.testing.assert_array_equal(np.load(tmp_path / "fog.npy"), np.load(reference / "fog.npy"))


def test_mismatched_cache_is_refused(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    write_cifar_c(tmp_path, images, labels, corruptions=["contrast"], seed=0)
    with pytest.raises(ValueError, match="seed"):
        write_cifar_c(tmp_path, images, labels, corruptions=["contrast"], seed=1)
    with pytest.raises(ValueError, match="images_sha256"):
        write_cifar_c(tmp_path, images[::-1].copy(), labels, corruptions=["contrast"], seed=0)


def test_invalid_inputs(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    with pytest.raises(ValueError, match="choose from"):
        write_cifar_c(tmp_path, images, labels, corruptions=["rain"])
    with pytest.raises(ValueError, match="uint8"):
        write_cifar_c(tmp_path, images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="labels"):
        write_cifar_c(tmp_path, images, labels[:-1])


def test_loads_the_released_layout_without_manifest(tmp_path: Path) -> None:
    # The release stores uint8 labels and no manifest.
    n = 4
    rng = np.random.default_rng(0)
    fog = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "fog.npy", fog)
    np.save(tmp_path / "spatter.npy", fog[::-1].copy())
    np.save(tmp_path / "labels.npy", np.tile(np.arange(n, dtype=np.uint8), 5))
    assert available_corruptions(tmp_path) == ["fog", "spatter"]
    images, labels = load_cifar_c(tmp_path, "fog", 4)
    np.testing.assert_array_equal(images, fog[3 * n : 4 * n])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.arange(n))


def test_missing_things_are_named(tmp_path: Path, written: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar_c(tmp_path / "nowhere", "fog", 1)
    with pytest.raises(FileNotFoundError, match=r"'snow'.*contrast.*fog.*gaussian_noise"):
        load_cifar_c(written, "snow", 1)
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5\]"):
        load_cifar_c(written, "fog", 0)
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        load_cifar_c(tmp_path, "fog", 1)
    np.save(tmp_path / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_cifar_c(tmp_path, "fog", 1)


def test_progress_in_a_log_is_a_line_per_unit(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar_c(tmp_path, *data, corruptions=["brightness"], progress=True)
    assert load_cifar_c(tmp_path, "brightness", 5)[0].shape == (N, 32, 32, 3)
    # Captured output is not a terminal: plain lines instead of a bar drawn only at the end.
    out = capsys.readouterr().out.splitlines()
    lines = [re.sub(r" \(\d+:\d\d:\d\d(, ~\d+:\d\d:\d\d left)?\)", "", ln) for ln in out]
    assert lines == [f"CIFAR-10-C {s}/5: brightness s{s}" for s in range(1, 5)] + [
        "CIFAR-10-C 5/5: done"
    ]


def test_frost_textures_are_part_of_the_cache_identity(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = data
    photos = frost_photos(tmp_path / "photos")  # 40 x 40 after the 0.2 resize
    procedural = write_cifar_c(tmp_path / "proc", images, labels, corruptions=["frost"])
    manifest = json.loads((procedural / "manifest.json").read_text())
    assert manifest["frost_textures"] == "procedural" and "frost_folder" not in manifest
    with pytest.raises(ValueError, match="frost_textures"):
        write_cifar_c(procedural, images, labels, corruptions=["frost"], frost_textures=str(photos))

    folder = write_cifar_c(
        tmp_path / "photo", images, labels, corruptions=["frost"], frost_textures=str(photos)
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["frost_textures"].startswith("photographs sha256:")
    assert manifest["frost_folder"] == str(photos)
    arr = np.load(folder / "frost.npy")
    assert not np.array_equal(arr, np.load(procedural / "frost.npy"))
    textures = load_frost_textures(str(photos))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    for severity in range(1, 6):
        g = torch.Generator().manual_seed(cifar_c._corruption_seed(0, "frost", severity))
        y = corrupt(x, "frost", severity, g, frost_textures=textures)
        expected = torch.round(y * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(arr[(severity - 1) * N : severity * N], expected)

    # The same photographs in another folder are the same source: the cache is reused.
    copy = frost_photos(tmp_path / "copy")
    write_cifar_c(folder, images, labels, corruptions=["frost"], frost_textures=str(copy))
    other = frost_photos(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="frost_textures"):
        write_cifar_c(folder, images, labels, corruptions=["frost"], frost_textures=str(other))
    # A manifest written before the frost source was recorded is a procedural cache.
    path = procedural / "manifest.json"
    old = json.loads(path.read_text())
    del old["frost_textures"]
    path.write_text(json.dumps(old))
    write_cifar_c(procedural, images, labels, corruptions=["frost"])
    # A bad source fails before anything is written.
    with pytest.raises(ValueError, match="unknown frost texture source"):
        write_cifar_c(tmp_path / "new", images, labels, frost_textures=str(tmp_path / "nope"))
    assert not (tmp_path / "new").exists()
