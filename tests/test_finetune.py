from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from ssl_robust.config import ConfigError, FinetuneConfig, load_config
from ssl_robust.config.finetune import CHOICES
from ssl_robust.data.datasets import ArraySource, build_splits
from ssl_robust.evaluate.corruptions import corrupted_source
from ssl_robust.finetune import features as features_mod
from ssl_robust.finetune.export import load_classifier
from ssl_robust.pipelines.finetune import MODES, finetune
from ssl_robust.pipelines.pretrain import pretrain
from tests.conftest import TINY_FINETUNE as TINY
from tests.conftest import finetune_cfg as ft_cfg


def _accuracy(
    classifier: torch.nn.Module, data: dict[str, Any], images: ArraySource | None = None
) -> float:
    """Accuracy of an exported classifier on the evaluation split rebuilt from its JSON (or
    on ``images``)."""
    splits = build_splits(
        data["name"], data["root"], image_size=data["image_size"],
        val_fraction=data["val_fraction"], seed=data["seed"],
    )  # fmt: skip
    source = images if images is not None else splits.val
    x = torch.from_numpy(source.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pred = classifier.eval()(x).argmax(1)
    return float((pred == torch.from_numpy(source.labels)).float().mean())


def test_linear_probe_caches_features_learns_and_exports(
    tiny_pretrain_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    enc_run = tmp_path / "pretrain"
    pretrain(tiny_pretrain_cfg(run_dir=enc_run))
    enc_bytes = (enc_run / "encoder.safetensors").read_bytes()
    calls: list[int] = []
    original = features_mod.extract_features

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(features_mod, "extract_features", counting)

    run = tmp_path / "ft"
    metrics = finetune(ft_cfg(enc_run, run, "trainer.max_epochs=30"))
    # Train and evaluation splits, once each, and the evaluation split's shifted twin.
    assert len(calls) == 3
    cache = sorted((enc_run / "features").glob("*.pt"), key=lambda p: p.name.endswith("shift.pt"))
    assert len(cache) == 2 and cache[1].name.endswith("-val-shift.pt")
    mtime = cache[0].stat().st_mtime_ns
    for name in ("config.yaml", "subset.npy", "subset.json", "metrics.json", "classifier.json"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").is_file()  # 30 epochs of train/loss
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["subset/size"] == 145  # 10 % of each class, halves rounded up
    # Learning: a 4-wide convnet pretrained for 6 steps still separates digits far above chance.
    assert metrics["test/acc"] > 0.5 and metrics["train/loss"] < 1.5
    # The encoder is frozen: its export is untouched and the classifier carries it unchanged.
    assert (enc_run / "encoder.safetensors").read_bytes() == enc_bytes
    clf, info = load_classifier(run)
    enc_state = load_file(str(enc_run / "encoder.safetensors"))
    for k, v in clf.encoder.state_dict().items():
        torch.testing.assert_close(v, enc_state[k], rtol=0, atol=0)
    # The exported classifier (folded standardisation) reproduces the logged test accuracy.
    assert info["classes"] == [str(d) for d in range(10)] and info["mode"] == "linear"
    assert info["data"]["seed"] == 0 and info["data"]["image_size"] == 8
    assert _accuracy(clf, info["data"]) == pytest.approx(metrics["test/acc"], abs=1.5 / 359)
    # The last validation on the shifted twin (each image under one of the 15 corruptions at
    # severity 3) is the exported classifier's accuracy on it.
    twin = corrupted_source(build_splits("digits", "data", image_size=8).val, 3, seed=0)
    assert _accuracy(clf, info["data"], twin) == pytest.approx(
        metrics["val/acc_shift"], abs=1.5 / 359
    )
    assert metrics["val/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)

    # Another seed (another subset, another run) reuses the cached features, the twin's too.
    other = finetune(ft_cfg(enc_run, tmp_path / "ft-seed1", "run.seed=1", "trainer.max_epochs=30"))
    assert len(calls) == 3 and cache[0].stat().st_mtime_ns == mtime
    assert not np.array_equal(
        np.load(run / "subset.npy"), np.load(tmp_path / "ft-seed1/subset.npy")
    )
    assert other["test/acc"] > 0.5


def test_full_finetune_changes_the_encoder_and_resumes(
    random_encoder: Path, tmp_path: Path
) -> None:
    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            trainer.should_stop = True

    class Batches(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []  # (epoch, batch) of each training batch

        def on_train_batch_start(self, trainer: pl.Trainer, m: Any, b: Any, i: int) -> None:
            self.seen.append((trainer.current_epoch, i))

    run = tmp_path / "full"
    common = ("mode=full", "subset.per_class=10", "trainer.max_epochs=2", "optim.lr=0.05")
    finetune(ft_cfg(random_encoder, run, *common), callbacks=[StopAfterFirstEpoch()])
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # one epoch: 100 images in batches of 32, 32, 32 and 4
    rest = Batches()
    metrics = finetune(ft_cfg(random_encoder, run, *common), callbacks=[rest])  # rerun = resume
    assert rest.seen == [(1, 0), (1, 1), (1, 2), (1, 3)]  # the second epoch only
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and metrics["epochs"] == 2
    assert metrics["optim/encoder_lr"] == pytest.approx(0.005)
    # The resumed run ends as an uninterrupted one: the same weights, the same numbers.
    whole = finetune(ft_cfg(random_encoder, tmp_path / "whole", *common))
    resumed_w = load_file(str(run / "classifier.safetensors"))
    whole_w = load_file(str(tmp_path / "whole" / "classifier.safetensors"))
    assert resumed_w.keys() == whole_w.keys()
    for k in whole_w:
        torch.testing.assert_close(resumed_w[k], whole_w[k], rtol=1e-5, atol=1e-6, msg=k)
    for key in ("train/loss", "val/acc", "val/acc_shift", "test/acc"):
        assert metrics[key] == pytest.approx(whole[key], rel=1e-5), key
    clf, info = load_classifier(run)
    assert info["mode"] == "full" and info["subset"]["size"] == 100
    before = load_file(str(random_encoder / "encoder.safetensors"))
    after = clf.encoder.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if after[k].is_floating_point())
    assert _accuracy(clf, info["data"]) == pytest.approx(metrics["test/acc"], abs=1.5 / 359)
    twin = corrupted_source(build_splits("digits", "data", image_size=8).val, 3, seed=0)
    assert _accuracy(clf, info["data"], twin) == pytest.approx(
        metrics["val/acc_shift"], abs=1.5 / 359
    )
    # Without the twin: clean validation only.
    plain = finetune(
        ft_cfg(random_encoder, tmp_path / "plain", *common, "data.val_shift_severity=0")
    )
    assert "val/acc" in plain and "val/acc_shift" not in plain


def test_full_finetune_fast_dev_run(random_encoder: Path, tmp_path: Path) -> None:
    metrics = finetune(
        ft_cfg(random_encoder, tmp_path / "dev", "mode=full", "trainer.fast_dev_run=true")
    )
    assert "train/loss" in metrics and "test/acc" in metrics
    assert not (tmp_path / "dev" / "classifier.safetensors").exists()


def test_purifier_at_test_time(random_encoder: Path, tmp_path: Path) -> None:
    import torchvision.transforms as T

    from ssl_robust.data.datamodule import eval_loader
    from ssl_robust.data.datasets import TransformDataset
    from ssl_robust.purify.purifier import Purifier, t_star_from_sigma
    from ssl_robust.purify.unet import build_unet, load_denoiser, make_scheduler, save_denoiser

    torch.manual_seed(0)
    save_denoiser(build_unet("tiny", 8), make_scheduler(), tmp_path / "denoiser")
    purify = f"purify.run={tmp_path / 'denoiser'}"
    cfg = ft_cfg(
        random_encoder, tmp_path / "ft", "trainer.max_epochs=5", purify,
        "purify.sampler=oneshot", "purify.sigma=0.1",
    )  # fmt: skip
    metrics = finetune(cfg)
    # sigma = 0.1 on [0, 1] is 2 sigma = 0.2 on [-1, 1]: the step of the linear 1e-4..0.02
    # schedule with sqrt((1 - abar) / abar) nearest 0.2.
    unet, scheduler = load_denoiser(tmp_path / "denoiser")
    assert t_star_from_sigma(scheduler.alphas_cumprod, 0.1) == 58
    assert metrics["purify/nfe"] == 1 and metrics["purify/t_star"] == 58
    # The purified accuracy, recomputed: the exported classifier on the evaluation split (in
    # the evaluation loaders' order) through a one-shot purifier at sigma = 0.1 whose noise
    # comes from one generator seeded with purify.seed.
    clf = load_classifier(tmp_path / "ft")[0]
    purifier = Purifier(unet.requires_grad_(False), scheduler, sigma=0.1, sampler="oneshot")
    generator = torch.Generator().manual_seed(cfg.purify.seed)
    val = build_splits("digits", "data", image_size=8).val
    loader = eval_loader(TransformDataset(val, T.ToTensor()), cfg.data.eval_batch_size)
    correct = clean = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((clf.eval()(purifier(x, generator)).argmax(1) == y).sum())
            clean += int((clf(x).argmax(1) == y).sum())
    assert metrics["test/acc_purified"] == pytest.approx(correct / len(val), abs=1e-6)
    assert metrics["test/acc"] == pytest.approx(clean / len(val), abs=1e-6)
    # The purified images are not the clean ones: the two accuracies differ (21 images).
    assert abs(correct - clean) > 10, (correct, clean)
    bad = ft_cfg(
        random_encoder,
        tmp_path / "ft16",
        "data.image_size=16",
        f"purify.run={tmp_path / 'denoiser'}",
    )
    with pytest.raises(
        ConfigError, match=r"purify.run=.* holds a denoiser of 8-px images, the images are 16 px"
    ):
        finetune(bad)


def test_bad_inputs_raise_clear_errors(random_encoder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        finetune(ft_cfg(tmp_path / "missing", tmp_path / "a"))
    with pytest.raises(ValueError, match=r"encoder\.run is empty"):
        finetune(load_config(FinetuneConfig, [*TINY, f"run.dir={tmp_path / 'b'}"], job="finetune"))
    for fraction in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"for 'subset.fraction': must be in \(0, 1\]"):
            ft_cfg(random_encoder, tmp_path / "c", f"subset.fraction={fraction}")
    cfg = ft_cfg(random_encoder, tmp_path / "c")
    cfg.subset.fraction = 1.5  # past the loader: the subset code checks too
    with pytest.raises(ValueError, match=r"subset.fraction must be in \(0, 1\]"):
        finetune(cfg)
    with pytest.raises(
        ConfigError, match=r"invalid value 'probe' for 'mode'; choose from \['full', 'linear'\]"
    ):
        ft_cfg(random_encoder, tmp_path / "d", "mode=probe")
    cfg = ft_cfg(random_encoder, tmp_path / "d")
    cfg.mode = "probe"  # past the loader: the pipeline checks too
    with pytest.raises(ValueError, match=r"unknown mode 'probe'; choose from \['full', 'linear'\]"):
        finetune(cfg)
    with pytest.raises(ValueError, match=r"class .0. has only 142 train images.*per_class=200"):
        finetune(ft_cfg(random_encoder, tmp_path / "e", "subset.per_class=200"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_rerun_with_another_request_raises(random_encoder: Path, tmp_path: Path) -> None:
    run = tmp_path / "ft"
    finetune(ft_cfg(random_encoder, run, "trainer.max_epochs=1"))
    with pytest.raises(ValueError, match="drawn for another request"):
        finetune(ft_cfg(random_encoder, run, "trainer.max_epochs=1", "subset.fraction=0.2"))
    with pytest.raises(ValueError, match="mode='linear', not 'full'"):
        finetune(ft_cfg(random_encoder, run, "mode=full"))


def test_default_run_dir_and_choices(random_encoder: Path) -> None:
    from ssl_robust.data.subsets import SubsetSpec
    from ssl_robust.pipelines.finetune import default_run_dir

    cfg = load_config(
        FinetuneConfig, [f"encoder.run={random_encoder}", "run.seed=3"], job="finetune"
    )
    assert default_run_dir(cfg, SubsetSpec(0.1, seed=3)) == (
        random_encoder.parent / "finetune-linear-10pct-seed3-pretrain-random"
    )
    assert set(CHOICES["mode"]) == set(MODES)
    for preset in ("default", "linear_cifar10", "full_cifar10"):
        assert load_config(FinetuneConfig, [preset], job="finetune").mode in MODES


@pytest.mark.parametrize("preset", ["linear_cifar10", "full_cifar10"])
def test_cifar_presets_fine_tune_on_the_encoders_own_data(
    random_encoder: Path, preset: str
) -> None:
    """An encoder pretrained on the CIFAR-10 JPEG tree (simclr_cifar10_folder) fine-tunes with
    the CIFAR presets on that tree, split as in pretraining, not on torchvision's CIFAR-10."""
    from omegaconf import OmegaConf

    from ssl_robust.models.export import load_encoder
    from ssl_robust.pipelines.finetune import resolve_data

    enc = random_encoder.parent / f"pretrain-folder-{preset}"
    shutil.copytree(random_encoder, enc)
    pre = {
        "run": {"seed": 7},
        "data": {"name": "imagefolder", "root": "/datasets/cifar10-jpeg", "image_size": 32},
    }
    OmegaConf.save(OmegaConf.create(pre), enc / "config.yaml")
    meta = load_encoder(enc)[1]
    cfg = load_config(FinetuneConfig, [preset, f"encoder.run={enc}"], job="finetune")
    data = resolve_data(cfg, enc, meta)
    assert (data["name"], data["root"], data["image_size"], data["seed"]) == (
        "imagefolder",
        "/datasets/cifar10-jpeg",
        32,
        7,
    )
    # Naming a dataset still overrides the encoder's.
    cfg = load_config(
        FinetuneConfig, [preset, f"encoder.run={enc}", "data=cifar10"], job="finetune"
    )
    assert resolve_data(cfg, enc, meta)["name"] == "cifar10"


def test_only_a_last_batch_of_one_image_is_dropped() -> None:
    """Full fine-tuning's BatchNorm cannot take a batch of one; no other images are skipped."""
    from omegaconf import OmegaConf

    from ssl_robust.pipelines.finetune import _last_batch_of_one

    one = OmegaConf.create({"devices": 1, "num_nodes": 1})
    assert not _last_batch_of_one(500, 256, one)  # 1 % of CIFAR-10: 256 + 244
    assert _last_batch_of_one(257, 256, one) and not _last_batch_of_one(256, 256, one)
    # Under DDP each of 2 x 2 ranks reads ceil(1029 / 4) = 258 images: 256 + 2.
    assert not _last_batch_of_one(1029, 256, OmegaConf.create({"devices": 2, "num_nodes": 2}))
    assert _last_batch_of_one(1025, 256, OmegaConf.create({"devices": 2, "num_nodes": 2}))


def test_a_linear_probe_reads_every_labeled_image_each_epoch(
    random_encoder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "probe"
    finetune(ft_cfg(random_encoder, run, "subset.per_class=10", "trainer.max_epochs=2"))
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * 4  # 100 images in batches of 32, 32, 32 and 4


def test_gaussian_noise_augmentation_trains_on_noisy_images(
    random_encoder: Path, tmp_path: Path
) -> None:
    seen: list[torch.Tensor] = []

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(batch[0].detach().clone())

    common = ["mode=full", "augment.crop_padding=0", "trainer.fast_dev_run=true"]
    for i, sigma in enumerate((0.0, 0.5, 0.5)):
        cfg = ft_cfg(random_encoder, tmp_path / f"r{i}", *common, f"augment.gaussian_noise={sigma}")
        finetune(cfg, callbacks=[FirstBatch()])
    clean, noisy, again = seen
    noise = noisy - clean  # the same images in the same order: only the noise differs
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    assert noise.mean().abs().item() < 0.02
    assert noisy.min() < 0 and noisy.max() > 1  # unclipped, as the smoothing noise is
    assert torch.equal(noisy, again)  # seeded per image: a resumed run sees the same noise
    with pytest.raises(ConfigError, match="only mode=full does"):
        finetune(ft_cfg(random_encoder, tmp_path / "lin", "augment.gaussian_noise=0.25"))
    with pytest.raises(ConfigError, match=r"'augment.gaussian_noise': must be >= 0"):
        ft_cfg(random_encoder, tmp_path / "neg", "augment.gaussian_noise=-1")


SCRATCH = ["encoder.backbone=convnet", "encoder.width=8", "data=digits", "data.image_size=8"]


def test_a_backbone_trained_from_random_weights_is_the_supervised_baseline(
    tmp_path: Path,
) -> None:
    def cfg(run: Path, *overrides: str) -> DictConfig:
        args = [*TINY, *SCRATCH, f"run.dir={run}", *overrides]
        return load_config(FinetuneConfig, args, job="finetune")

    full = ("mode=full", "subset.fraction=1.0", "optim.encoder_lr_mult=1", "optim.lr=0.05")
    metrics = finetune(cfg(tmp_path / "sup", *full, "trainer.max_epochs=4"))
    # From random weights, on labels alone, an 8-wide convnet learns the digits in 4 epochs
    # (0.85 measured; chance is 0.1).
    assert metrics["test/acc"] > 0.7, metrics
    clf, info = load_classifier(tmp_path / "sup")
    assert info["encoder_run"] == "" and info["encoder"]["backbone"] == "convnet"
    assert info["encoder"]["extra"] == {"method": "supervised", "dataset": "digits"}
    splits = build_splits("digits", "", image_size=8)
    # Normalised with the dataset's own statistics, which the classifier carries.
    assert info["data"]["mean"] == info["encoder"]["mean"] == list(splits.info.mean)
    assert _accuracy(clf, info["data"]) == pytest.approx(metrics["test/acc"], abs=1.5 / 359)

    # A probe on random features: the weights come from run.seed, and the features are cached
    # in the run directory (there is no encoder run).
    runs = [tmp_path / "rand-a", tmp_path / "rand-b"]
    for run in runs:
        finetune(cfg(run, "trainer.max_epochs=2"))
        assert len(list((run / "features").glob("*.pt"))) == 2  # the splits and the twin
    a, b = (load_classifier(r)[0].encoder.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = finetune(cfg(tmp_path / "rand-c", "trainer.max_epochs=2", "run.seed=1"))
    c = load_classifier(tmp_path / "rand-c")[0].encoder.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a) and "test/acc" in other


def test_random_weights_bad_requests_fail_before_writing(
    random_encoder: Path, tmp_path: Path
) -> None:
    from ssl_robust.data.subsets import SubsetSpec
    from ssl_robust.pipelines.finetune import default_run_dir

    run = tmp_path / "x"
    cases = [
        ([f"encoder.run={random_encoder}", "encoder.backbone=convnet"], "set one"),
        (["encoder.backbone=convnet"], r"set data.name \(one of \['cifar10', "),
        (["encoder.backbone=resnet7", "data=digits"], "encoder.backbone: unknown backbone"),
    ]
    for overrides, match in cases:
        cfg = load_config(FinetuneConfig, [*TINY, f"run.dir={run}", *overrides], job="finetune")
        with pytest.raises(ConfigError, match=match):
            finetune(cfg)
    assert not run.exists()
    # Another encoder in the same run directory is refused.
    finetune(ft_cfg(random_encoder, run, "trainer.max_epochs=1"))
    cfg = load_config(FinetuneConfig, [*TINY, *SCRATCH, f"run.dir={run}"], job="finetune")
    with pytest.raises(ValueError, match=r"encoder\.run="):
        finetune(cfg)
    # Another width of the same backbone in the same run directory is refused too.
    scratch = tmp_path / "scratch"
    args = [*TINY, *SCRATCH, f"run.dir={scratch}", "trainer.max_epochs=1"]
    finetune(load_config(FinetuneConfig, args, job="finetune"))
    with pytest.raises(ValueError, match=r"encoder\.width=8, not 16"):
        finetune(load_config(FinetuneConfig, [*args, "encoder.width=16"], job="finetune"))
    # Default folders name the backbone, a convnet's width and the data.
    cfg = load_config(FinetuneConfig, ["supervised_cifar10", "subset.fraction=0.1"], job="finetune")
    assert default_run_dir(cfg, SubsetSpec(0.1)) == Path(
        "runs/finetune-full-10pct-seed0-scratch-resnet18_cifar-cifar10"
    )
    cfg.encoder.backbone = "tv:resnet18"
    assert default_run_dir(cfg, SubsetSpec(0.1)).name.endswith("scratch-tv-resnet18-cifar10")
    cfg.encoder.backbone, cfg.data.name, cfg.data.like = "convnet", "", "runs/c10/pretrain"
    assert default_run_dir(cfg, SubsetSpec(0.1)).name.endswith("scratch-convnet-w32-c10-pretrain")
    bad = load_config(FinetuneConfig, [*TINY, *SCRATCH, "data.like=x"], job="finetune")
    with pytest.raises(ConfigError, match=r"data\.like='x' takes the data of a pretraining run"):
        finetune(bad)


def test_a_baseline_like_a_pretraining_run_sees_its_data_and_split(
    tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    pre = tmp_path / "pretrain"
    pretrain(tiny_pretrain_cfg("run.seed=3", run_dir=pre))
    # Whatever data the baseline's own arguments name, data.like takes the pretraining run's.
    args = [*TINY, "encoder.backbone=convnet", "encoder.width=4", "mode=full", "data.name=''",
            f"data.like={pre}", "trainer.max_epochs=1"]  # fmt: skip
    finetune(load_config(FinetuneConfig, [*args, f"run.dir={tmp_path / 'b'}"], job="finetune"))
    info = json.loads((tmp_path / "b" / "classifier.json").read_text())
    ssl = finetune(ft_cfg(pre, tmp_path / "ssl", "trainer.max_epochs=1"))
    ssl_info = json.loads((tmp_path / "ssl" / "classifier.json").read_text())
    for key in ("name", "image_size", "seed", "val_fraction", "root"):
        assert info["data"][key] == ssl_info["data"][key], key
    assert info["data"]["seed"] == 3 and info["data"]["image_size"] == 8
    # The same labeled images as the encoder's fine-tuning with the same subset seed.
    assert np.array_equal(np.load(tmp_path / "b" / "subset.npy"),
                          np.load(tmp_path / "ssl" / "subset.npy"))  # fmt: skip
    assert "test/acc" in ssl
    with pytest.raises(FileNotFoundError, match=r"data\.like: no run in"):
        finetune(load_config(FinetuneConfig, [*args[:-2], f"data.like={tmp_path}"], job="finetune"))


def test_a_baseline_like_an_exported_encoder_sees_its_data(
    random_encoder: Path, tmp_path: Path
) -> None:
    """An export without config.yaml (encoder.json names the data), as for its fine-tunings."""
    args = [*TINY, "encoder.backbone=convnet", "encoder.width=4", "mode=full", "data.name=''",
            f"data.like={random_encoder}", "trainer.max_epochs=1"]  # fmt: skip
    args.append(f"run.dir={tmp_path / 'b'}")
    finetune(load_config(FinetuneConfig, args, job="finetune"))
    info = json.loads((tmp_path / "b" / "classifier.json").read_text())
    assert (info["data"]["name"], info["data"]["image_size"]) == ("digits", 8)
    # Normalised with the data's own statistics, not the unrelated encoder's (0.3 and 0.4):
    # those of the train split's pixels (digits at 8 px, split seed 0), to 4 decimals.
    train = build_splits("digits", "", image_size=8).train.images.reshape(-1, 3) / 255.0
    assert np.allclose(train.mean(0), 0.3055, atol=5e-5)
    assert np.allclose(train.std(0), 0.3759, atol=5e-5)
    for key, value in (("mean", 0.3055), ("std", 0.3759)):
        assert info["encoder"][key] == info["data"][key] == [value] * 3, key
