"""The denoiser-training job end to end: run directory, export, grids, resume, config, learning."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ssl_robust.config import ConfigError, DenoiserJobConfig, job_choices, load_config
from ssl_robust.data.datasets import build_splits
from ssl_robust.data.images import ImageDataModule
from ssl_robust.pipelines.denoiser import build_denoiser, train_denoiser
from ssl_robust.purify import SAMPLERS, UNET_PRESETS, load_denoiser
from tests.callbacks import CheckpointMidEpoch, CountBatches, StopAfterEpoch
from tests.helpers import TickingClock

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")

TINY_DENOISER = [
    "data.image_size=8",
    "data.batch_size=64",
    "data.num_workers=0",
    "denoiser.unet=tiny",
    "denoiser.warmup_steps=2",
    "denoiser.num_timestep_buckets=4",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.progress_bar=false",
    "trainer.accelerator=cpu",
    "samples.every_n_epochs=1",
    "samples.n=4",
    "samples.steps=2",
    "samples.t_star=10",
]
BUCKETS = ("val/mse_t0-249", "val/mse_t250-499", "val/mse_t500-749", "val/mse_t750-999")


@pytest.fixture
def tiny_denoiser_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``tiny_denoiser_cfg("trainer.max_epochs=3", ...)``: a seconds-long denoiser job config."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        run = run_dir or tmp_path / "run"
        args = [*TINY_DENOISER, f"run.dir={run}", *overrides]
        return load_config(DenoiserJobConfig, args, job="denoiser")

    return make


class CrashAtEpoch(pl.Callback):
    """Simulates a crash (no graceful shutdown) when epoch ``k`` (0-based) starts."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.k:
            raise RuntimeError("simulated crash")


class RecordStartStep(pl.Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def last_ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()  # a complete, valid PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


def test_train_denoiser_writes_the_run_directory(
    tiny_denoiser_cfg: Callable[..., DictConfig],
) -> None:
    cfg = tiny_denoiser_cfg()
    metrics = train_denoiser(cfg)
    run = Path(cfg.run.dir)
    for name in (
        "config.yaml",
        "metrics.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "logs/version_0/metrics.csv",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert OmegaConf.load(run / "config.yaml") == cfg
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    expected = {"train/loss", "val/loss", "val/loss_best", *BUCKETS, "epochs"}
    expected |= {"perf/fit_time_s", "perf/train_images_per_s", "perf/unet_params"}
    assert expected <= set(saved)
    assert saved["epochs"] == 2 and saved["perf/unet_params"] > 0
    # Training throughput as for pretraining (BENCHMARKS.md): logged per epoch, validation and
    # sample grids excluded; metrics.json holds the median after the first epoch (the only one
    # of two), not the images over the whole fit's time.
    with (run / "logs" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/train_images_per_s")]
    per_epoch = [float(r["perf/train_images_per_s"]) for r in rows]
    assert len(per_epoch) == 2 and min(per_epoch) > 0
    assert saved["perf/train_images_per_s"] == pytest.approx(per_epoch[1])
    # Stratified timesteps: val/loss is an average of the (near-equal count) bucket means.
    assert min(saved[k] for k in BUCKETS) < saved["val/loss"] < max(saved[k] for k in BUCKETS)

    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 6  # 2 epochs x 3 batches
    # last.ckpt carries the up-to-date best score, so a resumed run keeps the right best.ckpt.
    best_state = next(v for k, v in ckpt["callbacks"].items() if "'val/loss'" in k)
    assert float(best_state["best_model_score"]) == pytest.approx(saved["val/loss_best"])
    assert saved["val/loss_best"] <= saved["val/loss"]
    assert ckpt["ssl_robust_config"] == OmegaConf.to_container(cfg, resolve=True)
    # The exported UNet holds the EMA weights of the final checkpoint, with its schedule.
    unet, scheduler = load_denoiser(run)
    assert unet.config["sample_size"] == 8 and unet.config["in_channels"] == 3
    assert scheduler.config["num_train_timesteps"] == cfg.denoiser.num_train_timesteps
    ema = ckpt["ema"]["shadow_params"]
    params = list(unet.parameters())
    assert len(params) == len(ema)
    for p, e in zip(params, ema):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)
    online = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
    assert not all(torch.equal(p, o) for p, o in zip(params, online))  # EMA, not online

    # Grids of every epoch plus the latest copies; images enlarged to >= 64 px (8 px x 8).
    samples = run / "samples"
    names = {p.name for p in samples.glob("*.png")}
    assert names == {
        f"{kind}_{which}.png"
        for kind in ("epoch_0001", "epoch_0002", "latest")
        for which in ("samples", "purify")
    }
    assert png_size(samples / "latest_samples.png") == (2 * 64 + 3 * 2,) * 2  # 2 x 2 grid
    assert png_size(samples / "latest_purify.png") == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)
    latest = (samples / "latest_purify.png").read_bytes()
    assert latest == (samples / "epoch_0002_purify.png").read_bytes()


def test_rerun_of_a_finished_run_does_not_retrain(
    tiny_denoiser_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl_robust.launch.perf as perf

    cfg = tiny_denoiser_cfg()
    first = train_denoiser(cfg)
    run = Path(cfg.run.dir)
    weights = (run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    grids = {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("*.png")}
    ckpts = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("*.ckpt")}
    fit_s = last_ckpt(run)["callbacks"]["FitClock"]["fit_s"]  # the fit time up to it
    # The rerun's fit lasts 7 s of a fake clock: read when the fit starts and when it ends,
    # and by nothing else (an epoch or a checkpoint would read it too).
    clock = TickingClock(7.0)
    monkeypatch.setattr(perf, "time", clock)
    start, steps = RecordStartStep(), CountBatches()
    second = train_denoiser(cfg, callbacks=[start, steps])
    assert start.step is None  # restored at the end: the training loop never started
    assert (steps.train, steps.val) == (0, 0)
    assert last_ckpt(run)["global_step"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("*.ckpt")} == ckpts
    # The fit time kept in the checkpoint plus the rerun's own, exactly.
    assert clock.reads == 2
    assert second.pop("perf/fit_time_s") == fit_s + 7.0
    assert 0 < fit_s <= first.pop("perf/fit_time_s")
    # The same numbers, the same weights, no grid drawn again.
    assert second == pytest.approx(first)
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert {p.name: p.stat().st_mtime_ns for p in (run / "samples").glob("*.png")} == grids


def _assert_same_training_state(a: Path, b: Path) -> None:
    ca, cb = last_ckpt(a), last_ckpt(b)
    assert ca["global_step"] == cb["global_step"]
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(v, cb["state_dict"][k], rtol=0, atol=0, msg=k)
    for x, y in zip(ca["ema"]["shadow_params"], cb["ema"]["shadow_params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resumed_run_matches_uninterrupted_run(
    tiny_denoiser_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    # Flips on, so the seeded data order and augmentation are part of what must match.
    common = ("trainer.max_epochs=3", "views.hf_prob=0.5", "samples.every_n_epochs=3")
    full = tiny_denoiser_cfg(*common, run_dir=tmp_path / "full")
    full_metrics = train_denoiser(full)
    part = tiny_denoiser_cfg(*common, run_dir=tmp_path / "part")
    train_denoiser(part, callbacks=[StopAfterEpoch(1)])
    assert last_ckpt(tmp_path / "part")["global_step"] == 3
    start = RecordStartStep()
    resumed_metrics = train_denoiser(part, callbacks=[start])
    assert start.step == 3
    _assert_same_training_state(tmp_path / "full", tmp_path / "part")
    assert resumed_metrics["val/loss"] == pytest.approx(full_metrics["val/loss"], rel=1e-6)
    full_unet, _ = load_denoiser(tmp_path / "full")
    part_unet, _ = load_denoiser(tmp_path / "part")
    for p, q in zip(full_unet.parameters(), part_unet.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_run_resumes_after_a_crash(
    tiny_denoiser_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_denoiser_cfg("trainer.max_epochs=3", "samples.every_n_epochs=3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_denoiser(cfg, callbacks=[CrashAtEpoch(2)])
    start = RecordStartStep()
    train_denoiser(cfg, callbacks=[start])
    assert start.step == 6  # continued after the two finished epochs


def test_training_lowers_the_validation_loss(
    tiny_denoiser_cfg: Callable[..., DictConfig],
) -> None:
    """The default recipe (digits, tiny UNet, its lr) at 8 px for a few seconds."""
    cfg = tiny_denoiser_cfg(
        "trainer.max_epochs=3", "trainer.limit_train_batches=8", "samples.every_n_epochs=10"
    )
    splits = build_splits("digits", "data", image_size=8, seed=cfg.run.seed)
    data = ImageDataModule(splits.train, splits.val, batch_size=64, eval_batch_size=512)
    untrained = build_denoiser(cfg, image_size=8, seed=0)
    validator = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    before = validator.validate(untrained, datamodule=data, verbose=False)[0]["val/loss"]
    after = train_denoiser(cfg)["val/loss"]
    assert before > 0.5  # an untrained UNet predicts next to nothing of eps (Var = 1)
    assert after < 0.5 * before


def test_image_datamodule_serves_seeded_flipped_images_in_unit_range() -> None:
    splits = build_splits("digits", "data", image_size=8, seed=0)
    raw_train = torch.from_numpy(splits.train.images).permute(0, 3, 1, 2).float() / 255
    raw_val = torch.from_numpy(splits.val.images).permute(0, 3, 1, 2).float() / 255
    data = ImageDataModule(splits.train, splits.val, batch_size=32, seed=3, hf_prob=0.5)

    def first_batch(epoch: int) -> tuple[torch.Tensor, list[int]]:
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        indices = [i for _, i in list(loader.sampler)[:32]]  # type: ignore[arg-type]
        return next(iter(loader))[0], indices

    x, indices = first_batch(1)
    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    flipped = [not torch.equal(x[k], raw_train[i]) for k, i in enumerate(indices)]
    for k, i in enumerate(indices):  # each image is itself or its mirror image
        assert torch.equal(x[k], raw_train[i].flip(-1) if flipped[k] else raw_train[i])
    assert 4 < sum(flipped) < 28  # about half of them flipped
    again, _ = first_batch(1)
    torch.testing.assert_close(again, x, rtol=0, atol=0)  # a pure function of (seed, epoch)
    assert first_batch(2)[1] != indices
    # Validation: every image once, never flipped, in one fixed order that spreads the
    # classes (the same for every loader); the grids' images are its first.
    loader = data.val_dataloader()
    order = list(loader.sampler)  # type: ignore[arg-type]
    assert sorted(order) == list(range(len(raw_val)))
    assert order == list(data.val_dataloader().sampler)  # type: ignore[arg-type]
    val = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(val, raw_val[order], rtol=0, atol=0)
    torch.testing.assert_close(data.val_images(3), raw_val[order[:3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ImageDataModule(splits.train, splits.val, batch_size=len(splits.train) + 1)


def test_choices_match_the_registries() -> None:
    choices = job_choices("denoiser")
    assert set(choices["denoiser.unet"]) == set(UNET_PRESETS)
    assert set(choices["samples.purify_sampler"]) == set(SAMPLERS)
    assert set(choices["samples.sampler"]) == {"ddim", "ddpm"}


def test_default_preset_equals_schema_defaults() -> None:
    assert load_config(DenoiserJobConfig, ["default"], job="denoiser") == load_config(
        DenoiserJobConfig, [], job="denoiser"
    )


def test_schema_defaults_are_the_cpu_default_job() -> None:
    cfg = load_config(DenoiserJobConfig, [], job="denoiser")
    assert (cfg.data.name, cfg.denoiser.unet) == ("digits", "tiny")
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.views.hf_prob == 0.0  # a mirrored digit is another symbol


def test_ddpm_cifar10_preset_follows_the_ddpm_recipe() -> None:
    cfg = load_config(DenoiserJobConfig, ["ddpm_cifar10"], job="denoiser")
    d = cfg.denoiser
    assert (d.unet, d.lr, d.warmup_steps, d.ema_decay) == ("ddpm-cifar10", 2e-4, 5000, 0.9999)
    assert (d.num_train_timesteps, d.beta_start, d.beta_end) == (1000, 1e-4, 0.02)
    assert cfg.data.batch_size == 128 and cfg.data.name == "cifar10"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.views.hf_prob == 0.5


def test_bad_names_raise_config_errors_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown denoiser preset 'ddpm_cifar11'.*ddpm_cifar10"):
        load_config(DenoiserJobConfig, ["ddpm_cifar11"], job="denoiser")
    with pytest.raises(
        ConfigError, match=r"'denoiser.unet'; choose from \['ddpm-cifar10', 'small', 'tiny'\]"
    ):
        load_config(DenoiserJobConfig, ["denoiser.unet=huge"], job="denoiser")
    with pytest.raises(ConfigError, match=r"'samples.sampler'.*\['ddim', 'ddpm'\]"):
        load_config(DenoiserJobConfig, ["samples.sampler=euler"], job="denoiser")
    with pytest.raises(ConfigError, match=r"unknown config key 'denoiser.lrr'"):
        load_config(DenoiserJobConfig, ["denoiser.lrr=1"], job="denoiser")


def test_a_flip_probability_out_of_range_fails_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"'views.hf_prob': must be a probability in \[0, 1\]"):
        load_config(DenoiserJobConfig, ["views.hf_prob=1.5"], job="denoiser")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("samples.steps=0", r"samples.steps must be in \[1, 1000\]"),
        ("samples.t_star=1001", r"samples.t_star must be in \[0, 1000\]"),
        ("samples.every_n_epochs=0", r"every_n_epochs must be >= 1"),
        ("samples.n=0", r"n must be >= 1"),
        ("denoiser.beta_end=2.0", r"beta_start <= beta_end < 1"),
        ("denoiser.ema_decay=1.5", r"ema_decay must be in \[0, 1\]"),
    ],
)
def test_bad_values_fail_before_writing_anything(
    tiny_denoiser_cfg: Callable[..., DictConfig], override: str, match: str
) -> None:
    """The job's own checks, for configs built past the loader (which range-checks these keys
    too, tests/test_config.py)."""
    cfg = tiny_denoiser_cfg()
    key, value = override.split("=")
    OmegaConf.update(cfg, key, float(value) if "." in value else int(value))
    with pytest.raises(ValueError, match=match):
        train_denoiser(cfg)
    assert not Path(cfg.run.dir).exists()


def test_script_reports_config_errors() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_denoiser.py"), "denoiser.unet=huge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "error: invalid value 'huge' for 'denoiser.unet'" in proc.stderr


def test_resume_from_a_mid_epoch_checkpoint_matches_uninterrupted_run(
    tiny_denoiser_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    common = ("trainer.max_epochs=2", "views.hf_prob=0.5", "samples.every_n_epochs=2")
    train_denoiser(tiny_denoiser_cfg(*common, run_dir=tmp_path / "full"))
    part = tiny_denoiser_cfg(*common, run_dir=tmp_path / "part")
    with pytest.raises(SystemExit):
        train_denoiser(part, callbacks=[CheckpointMidEpoch(step=4)])  # epoch 1, batch 1 of 3
    train_denoiser(part)
    a, b = last_ckpt(tmp_path / "full")["state_dict"], last_ckpt(tmp_path / "part")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_rerun_with_another_unet_is_refused_before_writing(
    tiny_denoiser_cfg: Callable[..., DictConfig],
) -> None:
    cfg = tiny_denoiser_cfg("trainer.max_epochs=1")
    train_denoiser(cfg)
    config_yaml = (Path(cfg.run.dir) / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"denoiser.unet: 'tiny' -> 'small'.*run.resume=false"):
        train_denoiser(tiny_denoiser_cfg("trainer.max_epochs=1", "denoiser.unet=small"))
    assert (Path(cfg.run.dir) / "config.yaml").read_text() == config_yaml
