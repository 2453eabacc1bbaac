from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_robust.data.datamodule import EpochSeededSampler, SpreadOrder, SSLDataModule, eval_loader
from ssl_robust.data.datasets import (
    ArraySource,
    DataError,
    FileSource,
    TransformDataset,
    build_splits,
    load_digits_source,
    load_image_folder,
    load_labeled_set,
    stratified_split,
)
from ssl_robust.data.transforms import (
    ViewParams,
    eval_transform,
    gpu_view_transforms,
    view_transform,
)
from ssl_robust.pipelines.evaluate import natural_set_names


def _tree(root: Path, classes: dict[str, int], size: int = 12, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                root / cls / f"{i}.png"
            )
    return root


def test_digits_are_real_images_with_ten_classes() -> None:
    src = load_digits_source(16)
    assert src.images.shape == (1797, 16, 16, 3) and src.images.dtype == np.uint8
    assert sorted(np.unique(src.labels).tolist()) == list(range(10))
    # Real digits: the mean "0" and the mean "1" look different (not noise, not constants).
    m0 = src.images[src.labels == 0].mean(0)
    m1 = src.images[src.labels == 1].mean(0)
    assert np.abs(m0 - m1).mean() > 20
    assert np.array_equal(src.images[..., 0], src.images[..., 2])  # grey -> 3 channels


def test_stratified_split_is_balanced_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(4), 25)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert not set(tr) & set(va) and len(tr) + len(va) == 100
    assert np.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    _, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2)
    _, va3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(va, va3)


def test_build_splits_digits_info() -> None:
    s = build_splits("digits", root="unused", image_size=8, val_fraction=0.25, seed=0)
    assert s.info.num_classes == 10 and s.info.image_size == 8
    assert len(s.train) + len(s.val) == 1797
    assert len(s.info.mean) == 3 and all(0 < v < 1 for v in s.info.std)


def test_image_statistics_equal_a_float64_reference() -> None:
    from ssl_robust.data.datasets import _array_stats

    rng = np.random.default_rng(0)
    # Not a multiple of the 4096-image blocks; channels with different spreads.
    images = np.stack(
        [rng.integers(0, hi, (5000, 6, 6), dtype=np.uint8) for hi in (256, 100, 3)], axis=-1
    )
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    stats = _array_stats(images)
    assert stats == {"mean": x.mean(0).round(4).tolist(), "std": x.std(0).round(4).tolist()}
    flat = np.full((3, 2, 2, 3), 51, dtype=np.uint8)  # known answer: 0.2, spread 0
    assert _array_stats(flat) == {"mean": [0.2] * 3, "std": [0.0] * 3}


def test_given_statistics_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Computing them takes seconds of every start-up on CIFAR-10-sized folders.
    import ssl_robust.data.datasets as datasets

    def refuse(images: np.ndarray) -> dict[str, list[float]]:
        raise AssertionError("statistics computed although the config gives them")

    monkeypatch.setattr(datasets, "_array_stats", refuse)
    s = build_splits("digits", root="unused", image_size=8, mean=[0.1] * 3, std=[0.3] * 3)
    assert (s.info.mean, s.info.std) == ([0.1] * 3, [0.3] * 3)
    with pytest.raises(AssertionError, match="computed although"):
        build_splits("digits", root="unused", image_size=8, mean=[0.1] * 3)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*digits.*imagefolder"):
        build_splits("mnist", root=".")


def test_missing_torchvision_root_names_path_and_switch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar10 not found under .*nowhere.*data.download=true"):
        build_splits("cifar10", root=str(tmp_path / "nowhere"))


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image folder '.*missing' does not exist"):
        build_splits("imagefolder", root=str(tmp_path / "missing"))


def test_image_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image folder '.*empty' is empty"):
        load_image_folder(tmp_path / "empty", 0, True, False)


def test_image_folder_class_without_images(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"cat": 3})
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder '.*dog' holds no images"):
        load_image_folder(root, 0, True, False)


@pytest.mark.parametrize("in_memory", [True, False])
def test_unreadable_image_raises_or_skips_with_count(
    tmp_path: Path, in_memory: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path / "t", {"a": 3, "b": 3})
    (root / "b" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image file '.*broken.png'.*skip_bad_images"):
        load_image_folder(root, 0, in_memory, skip_bad=False)
    src = load_image_folder(root, 0, in_memory, skip_bad=True)
    assert len(src) == 6
    assert "Skipped 1 unreadable image file" in capsys.readouterr().out


def test_process_pool_reads_like_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssl_robust.data import datasets

    root = _tree(tmp_path / "t", {"a": 30, "b": 30})
    (root / "a" / "00_broken.png").write_bytes(b"not an image")  # first file of class a
    (root / "b" / "zz_broken.png").write_bytes(b"not an image either")
    serial = load_image_folder(root, 0, True, skip_bad=True)
    monkeypatch.setattr(datasets, "_PARALLEL_MIN_FILES", 8)  # 62 files: the pool reads them
    monkeypatch.setattr(datasets.os, "cpu_count", lambda: 2)
    pooled = load_image_folder(root, 0, True, skip_bad=True)
    assert isinstance(pooled, ArraySource) and isinstance(serial, ArraySource)
    assert np.array_equal(pooled.images, serial.images)
    assert np.array_equal(pooled.labels, serial.labels) and len(pooled) == 60
    assert capsys.readouterr().out.count("Skipped 2 unreadable image file(s)") == 2
    # The first unreadable file in file order is the one reported.
    with pytest.raises(DataError, match=r"cannot read image file '.*00_broken.png'"):
        load_image_folder(root, 0, True, skip_bad=False)


def test_grayscale_images_become_rgb_and_cache_is_reused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 2, "b": 2}, size=10, mode="L")
    cache = tmp_path / "cache"
    src = load_image_folder(root, 0, in_memory=True, skip_bad=False, cache_dir=cache)
    assert isinstance(src, ArraySource) and src.images.shape == (4, 10, 10, 3)
    assert len(list(cache.glob("*.npz"))) == 1
    again = load_image_folder(root, 0, in_memory=True, skip_bad=False, cache_dir=cache)
    assert np.array_equal(again.images, src.images) and again.classes == ["a", "b"]  # type: ignore[attr-defined]
    lazy = load_image_folder(root, 0, in_memory=False, skip_bad=False)
    assert isinstance(lazy, FileSource) and lazy[0][0].mode == "RGB"


def test_image_folder_train_test_layout(tmp_path: Path) -> None:
    _tree(tmp_path / "ds" / "train", {"a": 4, "b": 4})
    _tree(tmp_path / "ds" / "test", {"a": 2, "b": 2})
    s = build_splits("imagefolder", root=str(tmp_path / "ds"))
    assert (len(s.train), len(s.val), s.info.num_classes, s.info.image_size) == (8, 4, 2, 12)


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochSeededSampler(50, seed=1), EpochSeededSampler(50, seed=1)
    a.set_epoch(3)
    list(b)  # consuming other epochs does not matter
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(i for _, i in a) == list(range(50))
    assert {e for e, _ in a} == {3}
    b.set_epoch(4)
    assert list(a) != list(b)


def test_a_limited_validation_samples_every_class(tmp_path: Path) -> None:
    # An ImageFolder split is stored class by class: its first fifth is class "a" alone.
    _tree(tmp_path / "ds" / "train", {c: 2 for c in "abcde"})
    _tree(tmp_path / "ds" / "test", {c: 20 for c in "abcde"})
    val = build_splits("imagefolder", root=str(tmp_path / "ds")).val
    assert set(val.labels[:20].tolist()) == {0}
    loader = eval_loader(TransformDataset(val, lambda im: 0), batch_size=10)
    order = list(loader.sampler)  # type: ignore[arg-type]
    assert sorted(order) == list(range(100))  # every image once
    # Any limit of whole batches reads a spread of the classes, the same on every loader.
    first = next(iter(loader))[1].tolist()
    assert len(set(first)) >= 4
    assert set(val.labels[order[:20]].tolist()) == set(range(5))
    assert order == list(SpreadOrder(100)) and order != list(SpreadOrder(100, seed=1))
    assert len(SpreadOrder(7)) == 7


def _datamodule(method: str, augment: str, **kw: object) -> tuple[SSLDataModule, ViewParams]:
    s = build_splits("digits", root="", image_size=8)
    params = ViewParams(input_size=8, mean=tuple(s.info.mean), std=tuple(s.info.std))
    transform = (
        gpu_view_transforms(method, params) if augment == "gpu" else view_transform(method, params)
    )
    dm = SSLDataModule(
        s.train,
        s.val,
        transform,
        eval_transform(8, params.mean, params.std),
        batch_size=32,
        eval_batch_size=100,
        augment=augment,
        **kw,  # type: ignore[arg-type]
    )
    return dm, params


@pytest.mark.parametrize("augment", ["cpu", "gpu"])
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_datamodule_batches(method: str, augment: str) -> None:
    dm, _ = _datamodule(method, augment)
    raw = next(iter(dm.train_dataloader()))
    views, labels = dm.on_after_batch_transfer(raw, 0)
    assert len(views) == 2 and views[0].shape == (32, 3, 8, 8) and labels.shape == (32,)
    assert views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # two different augmentations
    # The same batch again gives the same views (seeded from seed, epoch and indices).
    again = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0]
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    bank, val = dm.val_dataloader()
    x, _ = next(iter(val))
    assert x.shape == (100, 3, 8, 8)
    assert len(bank.dataset) == len(dm.train_source)  # type: ignore[arg-type]
    # Normalised with the dataset statistics: roughly zero-mean over the whole val split.
    allx = torch.cat([b[0] for b in val])
    assert abs(float(allx.mean())) < 0.15


def test_device_path_validates_on_the_device_with_the_cpu_paths_batches() -> None:
    """With augment=gpu and the batched eval transform, validation batches are made on the
    device from uploaded images: the same tensors as the workers' ToTensor + Normalize, in
    the same order, for the bank, the val split and its shifted twin."""
    from ssl_robust.data import gpu_views as gv
    from ssl_robust.data.datamodule import _Indices
    from ssl_robust.data.datasets import ArraySource
    from ssl_robust.data.transforms import gpu_eval_transform

    s = build_splits("digits", root="", image_size=8)
    shifted = ArraySource(255 - s.val.images, s.val.labels, s.val.classes)  # type: ignore[attr-defined]
    kw = {"val_shift": shifted, "num_workers": 2, "channels_last": True}
    cpu, params = _datamodule("simclr", "cpu", **kw)
    dev, _ = _datamodule(
        "simclr", "gpu", device_eval_transform=gpu_eval_transform(8, params.mean, params.std), **kw
    )
    assert dev.device_validation and not cpu.device_validation
    dev_loaders = dev.val_dataloader()
    assert [len(loader.dataset) for loader in dev_loaders] == [1438, 359, 359]  # type: ignore[arg-type]
    for i, (c, d) in enumerate(zip(cpu.val_dataloader(), dev_loaders, strict=True)):
        assert isinstance(d.dataset, _Indices) and d.num_workers == 0  # nothing to decode
        for a, b in zip(c, d, strict=True):
            x, y = cpu.on_after_batch_transfer(a, i)
            xd, yd = dev.on_after_batch_transfer(b, i)
            assert torch.equal(xd, x) and torch.equal(yd, y)
            assert xd.is_contiguous(memory_format=torch.channels_last)
    # The bank is the training split: its images are the ones uploaded for the views.
    assert dev.eval_images_on(torch.device("cpu"), 0) is dev.images_on(torch.device("cpu"))
    # A split at another size than the transform's would need resizing: the workers do it.
    other, _ = _datamodule("simclr", "gpu", device_eval_transform=gv.eval_transform(16))
    assert not other.device_validation
    assert not isinstance(other.val_dataloader()[0].dataset, _Indices)


def test_cpu_views_do_not_depend_on_worker_count() -> None:
    dm0, _ = _datamodule("simclr", "cpu", num_workers=0)
    dm2, _ = _datamodule("simclr", "cpu", num_workers=2)
    a = dm0.on_after_batch_transfer(next(iter(dm0.train_dataloader())), 0)[0]
    b = dm2.on_after_batch_transfer(next(iter(dm2.train_dataloader())), 0)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gpu_path_statistics_match_cpu_path() -> None:
    """Both paths make views of the same distribution (the GPU path's own tests compare it
    transform by transform with lightly); here: per-batch pixel statistics agree."""
    stats = {}
    for augment in ("cpu", "gpu"):
        dm, _ = _datamodule("simclr", augment)
        vals = []
        for i, raw in enumerate(dm.train_dataloader()):
            vals.append(dm.on_after_batch_transfer(raw, 0)[0][0])
            if i == 8:
                break
        v = torch.cat(vals)
        stats[augment] = (float(v.mean()), float(v.std()))
    assert stats["cpu"][0] == pytest.approx(stats["gpu"][0], abs=0.15)
    assert stats["cpu"][1] == pytest.approx(stats["gpu"][1], rel=0.15)


VIEW_SETTINGS = {
    "defaults": {},
    "weak": {"cj_strength": 0.5, "min_scale": 0.3, "random_gray_scale": 0.0, "hf_prob": 0.0},
    "blurred": {"cj_prob": 0.3, "cj_strength": 0.2, "random_gray_scale": 0.6, "hf_prob": 0.9,
                "min_scale": 0.9, "gaussian_blur": 0.5},
}  # fmt: skip


@pytest.mark.parametrize("settings", list(VIEW_SETTINGS))
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_gpu_views_take_the_cpu_views_settings(method: str, settings: str) -> None:
    """Each device-side view is built with the settings of lightly's view on the CPU path:
    crop scale, flips, jitter probability and strength, grayscale, blur, solarisation and the
    normalisation, for the defaults and for other values of every ViewParams field."""
    from tests.test_gpu_views import _approx_equal, _lightly_settings, _our_settings

    params = ViewParams(input_size=8, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                        **VIEW_SETTINGS[settings])  # fmt: skip
    ours = gpu_view_transforms(method, params)
    theirs = view_transform(method, params).transforms  # type: ignore[attr-defined]
    assert len(ours) == len(theirs) == 2
    for gpu, cpu in zip(ours, theirs):
        expected = _lightly_settings(cpu)
        _approx_equal(_our_settings(gpu), expected)
        # Lightly took the values asked for (strength s scales brightness to 1 +- 0.8 s for
        # SimCLR, 1 +- 0.4 s for BYOL).
        assert expected["min_scale"] == params.min_scale
        assert expected["random_gray_scale"] == params.random_gray_scale
        assert expected["cj_prob"] == params.cj_prob and expected["hf_prob"] == params.hf_prob
        bright = (0.8 if method == "simclr" else 0.4) * params.cj_strength
        assert expected["brightness"] == pytest.approx((1 - bright, 1 + bright))
        assert expected["normalize"] == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    # BYOL's views blur with probabilities 1.0 and 0.1 times gaussian_blur, SimCLR's both with
    # gaussian_blur; only BYOL's second view solarises (0.2).
    blur = [1.0, 0.1] if method == "byol" else [1.0, 1.0]
    assert [v.gaussian_blur for v in ours] == pytest.approx(
        [b * params.gaussian_blur for b in blur]
    )
    solarize = [0.0, 0.2] if method == "byol" else [0.0, 0.0]
    assert [v.solarization_prob for v in ours] == pytest.approx(solarize)


def test_view_hook_rewrites_training_views() -> None:
    class Zero(torch.nn.Module):
        def forward(
            self, views: list[torch.Tensor], generator: object = None
        ) -> list[torch.Tensor]:
            return [views[0], torch.zeros_like(views[1])]

    dm, _ = _datamodule("simclr", "gpu", view_hook=Zero())
    views, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert views[1].abs().sum() == 0 and views[0].abs().sum() > 0


def test_gpu_augment_needs_in_memory_images(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 40, "b": 40})
    lazy = load_image_folder(root, 0, in_memory=False, skip_bad=False)
    with pytest.raises(ValueError, match=r"augment='gpu' needs .*data.in_memory=true"):
        SSLDataModule(lazy, lazy, [], lambda x: x, batch_size=8, augment="gpu")
    with pytest.raises(ValueError, match=r"unknown augment 'tpu'; choose from \['cpu', 'gpu'\]"):
        SSLDataModule(lazy, lazy, [], lambda x: x, batch_size=8, augment="tpu")


def test_device_upload_refuses_datasets_that_crowd_out_the_model() -> None:
    from ssl_robust.data.datamodule import check_fits_on_device

    gib = 1024**3
    check_fits_on_device(2 * gib, 4 * gib, "cuda:0")  # half of the free memory: fine
    with pytest.raises(RuntimeError, match=r"3\.00 GiB.*4\.00 GiB are free.*data\.augment=cpu"):
        check_fits_on_device(3 * gib, 4 * gib, "cuda:0")


def test_datamodule_rejects_batch_larger_than_dataset() -> None:
    s = build_splits("digits", root="", image_size=8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        SSLDataModule(s.train, s.val, lambda x: [x, x], lambda x: x, batch_size=10_000)


class _FakeSTL10:
    """torchvision's STL10 interface: .data (N, 3, 96, 96) uint8, .labels, .classes."""

    def __init__(self, split: str) -> None:
        n = {"train": 60, "test": 30, "unlabeled": 90}[split]
        rng = np.random.default_rng(len(split))
        self.data = rng.integers(0, 255, (n, 3, 96, 96), dtype=np.uint8)
        self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 10
        self.classes = [f"c{i}" for i in range(10)]


@pytest.fixture
def fake_stl10(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_robust.data.datasets as ds

    monkeypatch.setattr(ds, "_torchvision", lambda name, root, download, split: _FakeSTL10(split))


def test_stl10_unlabeled_pool_joins_the_self_supervised_phases(fake_stl10: None) -> None:
    s = build_splits("stl10", root="unused", image_size=8, with_unlabeled=True)
    assert (len(s.train), len(s.val)) == (60, 30) and s.unlabeled is not None
    assert len(s.unlabeled) == 90 and (s.unlabeled.labels == -1).all()
    pooled = s.unsupervised_train()
    assert len(pooled) == 150 and pooled.images.shape[1:] == (8, 8, 3)  # type: ignore[attr-defined]
    # Supervised phases never see the pool.
    assert build_splits("stl10", root="unused", image_size=8).unlabeled is None
    with pytest.raises(ValueError, match="kNN bank needs labeled images"):
        SSLDataModule(pooled, s.val, [], lambda x: x, batch_size=8, augment="gpu")
    dm = SSLDataModule(pooled, s.val, [], lambda x: x, batch_size=8, augment="gpu", bank=s.train)
    assert len(dm.val_dataloader()[0].dataset) == 60  # type: ignore[arg-type]


def test_workers_are_capped_at_the_usable_cpus_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ssl_robust.data import datamodule

    monkeypatch.setattr(datamodule.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(datamodule, "_capped_workers_warned", False)
    assert datamodule.usable_workers(0) == 0 and datamodule.usable_workers(2) == 2
    with pytest.warns(UserWarning, match=r"data.num_workers=8 but this process may use 2 CPUs"):
        assert datamodule.usable_workers(8) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert datamodule.worker_options(8)["num_workers"] == 2


def test_labeled_sets_read_cifar10_2_npz_archives(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    classes = [str(k) for k in range(10)]
    split = {}
    for name, n in (("train", 12), ("test", 8)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        split[name] = (images, labels)
        # CIFAR-10.2's keys: the names and keywords are string arrays beside the data.
        np.savez(
            tmp_path / f"cifar102_{name}.npz",
            images=images,
            labels=labels,
            label_names=np.array(["airplane"] * 10),
            keywords=np.array(["kw"] * n),
        )
    # A folder holding the pair (and what unzipping on a Mac leaves): its test file; or the
    # file itself.
    (tmp_path / "__MACOSX").mkdir()
    for path in (tmp_path, tmp_path / "cifar102_test.npz"):
        images, labels = load_labeled_set(path, classes, 32)
        assert np.array_equal(images, split["test"][0])
        assert np.array_equal(labels, split["test"][1]) and labels.dtype == np.int64
    small, _ = load_labeled_set(tmp_path / "cifar102_train.npz", classes, 16)
    assert small.shape == (12, 16, 16, 3)  # resized to the evaluation size
    assert natural_set_names([str(tmp_path / "cifar102_test.npz")]) == {
        "cifar102_test": str(tmp_path / "cifar102_test.npz")
    }

    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "a.npz", images=split["test"][0])
    with pytest.raises(
        DataError, match=r"^'[^']*a\.npz' has no labels array; it holds \['images'\]"
    ):
        load_labeled_set(bad / "a.npz", classes, 32)
    np.savez(bad / "b.npz", images=split["test"][0], labels=split["test"][1])
    assert np.array_equal(load_labeled_set(bad, classes, 32)[1], split["test"][1])  # b.npz
    np.savez(bad / "f.npz", images=split["test"][0], labels=split["test"][1])
    with pytest.raises(DataError, match=r"holds several data files \(\['b.npz', 'f.npz'\]\)"):
        load_labeled_set(bad, classes, 32)
    np.save(bad / "g.npy", split["test"][0])
    (bad / "g.npy").rename(bad / "g.npz")
    with pytest.raises(DataError, match=r"g\.npz' is not a readable \.npz archive: it holds"):
        load_labeled_set(bad / "g.npz", classes, 32)
    (bad / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"is not a readable \.npz archive"):
        load_labeled_set(bad / "c.npz", classes, 32)
    np.savez(bad / "d.npz", images=split["test"][0], labels=split["test"][1] + 5)
    with pytest.raises(DataError, match=r"d.npz\[labels\]' holds labels \d+..1\d; the classifier"):
        load_labeled_set(bad / "d.npz", classes, 32)
    np.savez(bad / "e.npz", images=split["test"][0], labels=np.array(["cat"] * 8))
    with pytest.raises(DataError, match=r"holds <U3 labels; expected integer class indices"):
        load_labeled_set(bad / "e.npz", classes, 32)
    # A class tree stays a tree whatever lies beside its class folders.
    tree = tmp_path / "tree"
    for k in (0, 1):
        (tree / str(k)).mkdir(parents=True)
        Image.fromarray(split["test"][0][k]).save(tree / str(k) / "a.png")
    np.savez(tree / "embeddings.npz", x=np.zeros(3))
    images, labels = load_labeled_set(tree, classes, 32)
    assert labels.tolist() == [0, 1] and np.array_equal(images, split["test"][0][:2])


def test_seeded_views_are_those_of_the_derived_seeds_without_touching_accelerators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    from ssl_robust.data.transforms import ViewParams, view_transform

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(4), [str(i) for i in range(4)])
    params = ViewParams(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform = view_transform("simclr", params)
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    views, label, key = TransformDataset(source, transform, seed=5)[(3, 2)]
    assert label == 2 and key == (3, 2) and calls == []  # the GPU's random state is left alone
    # The reference: every generator seeded from SeedSequence([seed, epoch, index]).
    state = np.random.SeedSequence([5, 3, 2]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]))
    expected = transform(source.load(2))
    assert all(torch.equal(v, e) for v, e in zip(views, expected))
    other, _, _ = TransformDataset(source, transform, seed=5)[(4, 2)]  # another epoch
    assert not torch.equal(other[0], views[0])
