"""Fine-tuning runs that are resumed, rerun or spread over several processes end as one
uninterrupted, single-process run of the same request would, or refuse to run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from ssl_robust.config import ConfigError, FinetuneConfig, load_config, to_dict
from ssl_robust.finetune.model import Classifier
from ssl_robust.finetune.modules import ClassifierTest, FineTuner
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta, export_encoder
from ssl_robust.pipelines.finetune import _device, finetune, training_settings
from tests.callbacks import CheckpointMidEpoch, StopAfterEpoch
from tests.conftest import TINY_FINETUNE, finetune_cfg
from tests.helpers import clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]
# 100 images (batches of 32, 32, 32 and 4), no shifted validation set.
TINY = [*TINY_FINETUNE, "subset.per_class=10", "data.val_shift_severity=0"]


def ft_cfg(encoder_run: Path, run_dir: Path, *overrides: str) -> DictConfig:
    return finetune_cfg(encoder_run, run_dir, *overrides, base=tuple(TINY[len(TINY_FINETUNE) :]))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "classifier.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


class Batches(pl.Callback):
    """Records (global step, labels) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, m: Any, batch: Any, i: int) -> None:
        self.seen.append((trainer.global_step, batch[1].tolist()))


# --- resuming: the same batches, the same final weights ------------------------------------------


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(
    mode: str, random_encoder: Path, tmp_path: Path
) -> None:
    common = (f"mode={mode}", "trainer.max_epochs=2")
    whole = Batches()
    full = finetune(ft_cfg(random_encoder, tmp_path / "whole", *common), callbacks=[whole])
    part = ft_cfg(random_encoder, tmp_path / "part", *common)
    first = Batches()
    with pytest.raises(SystemExit):  # SLURM preemption: hpc_ckpt_1.ckpt after epoch 1, batch 1
        finetune(part, callbacks=[first, CheckpointMidEpoch(step=6)])
    rest = Batches()
    resumed = finetune(part, callbacks=[rest])
    assert [s for s, _ in rest.seen] == [6, 7]  # only the two batches not yet trained on
    assert first.seen + rest.seen == whole.seen  # the same images in the same order
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")
    assert resumed["test/acc"] == pytest.approx(full["test/acc"])


def test_a_linear_probe_resumed_after_an_epoch_sees_that_epochs_order(
    random_encoder: Path, tmp_path: Path
) -> None:
    """Each epoch's order is seeded by (seed, epoch), not drawn from a generator whose state
    the checkpoint does not hold (a resumed run replayed epoch 0's order)."""
    common = ("mode=linear", "trainer.max_epochs=4")
    whole = Batches()
    finetune(ft_cfg(random_encoder, tmp_path / "whole", *common), callbacks=[whole])
    first, rest = Batches(), Batches()
    finetune(
        ft_cfg(random_encoder, tmp_path / "part", *common), callbacks=[first, StopAfterEpoch(2)]
    )
    finetune(ft_cfg(random_encoder, tmp_path / "part", *common), callbacks=[rest])
    assert rest.seen[0][0] == 8 and first.seen + rest.seen == whole.seen
    epochs = [labels for step, labels in whole.seen if step % 4 == 0]
    assert len({tuple(e) for e in epochs}) == 4  # every epoch in its own order
    _assert_same_weights(tmp_path / "whole", tmp_path / "part")


# --- rerunning with other settings ---------------------------------------------------------------


def test_resuming_with_other_hyperparameters_is_refused_before_writing(
    random_encoder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "ft"
    finetune(ft_cfg(random_encoder, run, "trainer.max_epochs=2", "optim.lr=0.1"))
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as err:
        finetune(
            ft_cfg(
                random_encoder, run, "trainer.max_epochs=3", "optim.lr=0.0001",
                "linear.standardize=false", "trainer.gradient_clip_val=1",
            )
        )  # fmt: skip
    message = str(err.value)
    for change in ("optim.lr: 0.1 -> 0.0001", "trainer.gradient_clip_val: 0.0 -> 1.0",
                   "linear.standardize: True -> False", "run.resume=false",
                   "another run.dir"):  # fmt: skip
        assert change in message, message
    assert "optim.encoder_lr_mult" not in message
    # Nothing was written, the finished run's files are as they were.
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # What does not change the training (logging, loaders, devices) resumes as before.
    same = finetune(
        ft_cfg(
            random_encoder, run, "trainer.max_epochs=2", "optim.lr=0.1",
            "data.eval_batch_size=64", "trainer.log_every_n_steps=1", "trainer.devices=1",
            "linear.cache_dir=" + str(tmp_path / "cache"), "optim.encoder_lr_mult=0.5",
            "augment.crop_padding=0",  # the probe has no augmentation
        )
    )  # fmt: skip
    assert same["epochs"] == 2
    # A fresh start in the same directory trains with the new values.
    fresh = finetune(
        ft_cfg(random_encoder, run, "trainer.max_epochs=3", "optim.lr=0.0001", "run.resume=false")
    )
    assert fresh["optim/lr"] == pytest.approx(0.0001) and fresh["epochs"] == 3
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ssl_robust_config"]["optim"]["lr"] == pytest.approx(0.0001)


def test_a_mid_epoch_checkpoint_resumes_only_with_its_own_settings(
    random_encoder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "ft"
    common = ("mode=full", "trainer.max_epochs=2")
    with pytest.raises(SystemExit):
        finetune(ft_cfg(random_encoder, run, *common), callbacks=[CheckpointMidEpoch(step=2)])
    with pytest.raises(
        ValueError, match=r"\(hpc_ckpt_1\.ckpt\).*augment\.hflip_prob: 0\.0 -> 0\.5"
    ):
        finetune(ft_cfg(random_encoder, run, *common, "augment.hflip_prob=0.5"))
    with pytest.raises(ValueError, match=r"data\.batch_size: 32 -> 16"):
        finetune(ft_cfg(random_encoder, run, *common, "data.batch_size=16"))
    assert finetune(ft_cfg(random_encoder, run, *common))["epochs"] == 2


def test_training_settings_leave_out_what_does_not_change_the_training() -> None:
    cfg = load_config(FinetuneConfig, ["encoder.run=x", "mode=full"], job="finetune")
    keys = set(training_settings(to_dict(cfg)))
    for key in ("optim.lr", "optim.encoder_lr_mult", "augment.crop_padding", "data.batch_size",
                "trainer.accumulate_grad_batches", "subset.fraction",
                "run.seed", "data.val_shift_severity"):  # fmt: skip
        assert key in keys, key
    # trainer.max_epochs may grow: the run is extended (check_resumable refuses fewer).
    for key in ("run.dir", "run.resume", "wandb.mode", "trainer.devices", "trainer.num_nodes",
                "trainer.max_epochs", "trainer.checkpoint_every_n_epochs",
                "trainer.progress_bar", "data.num_workers", "data.eval_batch_size",
                "linear.standardize", "purify.run", "encoder.run"):  # fmt: skip
        assert key not in keys, key
    assert "subset.fraction" not in training_settings(to_dict(cfg), with_subset=False)


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_more_epochs_extend_a_finished_run_along_the_longer_schedule(
    mode: str, random_encoder: Path, tmp_path: Path
) -> None:
    from ssl_robust.finetune.modules import warmup_cosine

    run = tmp_path / "ft"
    common = (f"mode={mode}", "optim.warmup_epochs=0")
    first = Batches()
    done = finetune(ft_cfg(random_encoder, run, *common, "trainer.max_epochs=2"), [first])
    steps_per_epoch = len(first.seen) // 2

    class FirstRate(pl.Callback):  # the first resumed step's rate, and its peak
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if not hasattr(self, "rate"):
                self.rate = trainer.optimizers[0].param_groups[0]["lr"]
                self.peak = trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]

    rate, rest = FirstRate(), Batches()
    longer = finetune(ft_cfg(random_encoder, run, *common, "trainer.max_epochs=4"), [rate, rest])
    assert longer["epochs"] == 4 and done["epochs"] == 2
    assert [s for s, _ in rest.seen] == list(range(2 * steps_per_epoch, 4 * steps_per_epoch))
    # The first resumed step already runs at the 4-epoch cosine's rate, not the 2-epoch one's
    # (which ended at 0).
    k, total = 2 * steps_per_epoch, 4 * steps_per_epoch
    assert rate.rate == pytest.approx(rate.peak * warmup_cosine(k, 0, total))
    assert rate.rate == pytest.approx(rate.peak / 2)  # half-way along the cosine
    with pytest.raises(ConfigError, match="cannot take that back"):
        finetune(ft_cfg(random_encoder, run, *common, "trainer.max_epochs=3"))


# --- metrics.json --------------------------------------------------------------------------------


def test_metrics_of_an_earlier_run_are_kept_only_by_a_resumed_run(
    random_encoder: Path, tmp_path: Path
) -> None:
    run = tmp_path / "ft"
    common = ("trainer.max_epochs=2",)
    first = finetune(ft_cfg(random_encoder, run, *common, "data.val_shift_severity=3"))
    assert "val/acc_shift" in first
    # A fresh start (the reviewer's scenario): nothing of the earlier run's metrics.
    fresh = finetune(ft_cfg(random_encoder, run, *common, "run.resume=false"))
    stored = json.loads((run / "metrics.json").read_text())
    assert "val/acc_shift" not in fresh and "val/acc_shift" not in stored
    assert stored == pytest.approx(fresh)
    # A rerun that resumes the finished run keeps its training metrics; the test is its own.
    (run / "metrics.json").write_text(json.dumps({**stored, "test/acc": -1.0, "old/key": 5.0}))
    again = finetune(ft_cfg(random_encoder, run, *common))
    assert again["old/key"] == 5.0 and again["train/loss"] == pytest.approx(fresh["train/loss"])
    assert again["test/acc"] == pytest.approx(fresh["test/acc"])


# --- a frozen encoder ----------------------------------------------------------------------------


def test_a_zero_encoder_learning_rate_freezes_the_encoder_and_its_batchnorm(
    tmp_path: Path,
) -> None:
    from ssl_robust.data.datasets import build_splits

    initial: dict[str, torch.Tensor] = {}

    class InitialHead(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
            initial.update({k: v.clone() for k, v in module.classifier.head.state_dict().items()})

    # Random weights whose BatchNorm statistics are the digits' (as a pretrained encoder's
    # are): its features vary from image to image at a scale a linear head can learn from.
    torch.manual_seed(0)
    enc = build_backbone("convnet", 4)
    images = build_splits("digits", "data", image_size=8).train.images[:512]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.4
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = None  # the cumulative mean: the statistics of the 512 images
    with torch.no_grad():
        enc.train()(x)
    for m in norms:
        m.momentum = 0.1
    meta = EncoderMeta(
        "convnet", 4, enc.feat_dim, 8, [0.3] * 3, [0.4] * 3, 10, {"dataset": "digits"}
    )
    encoder_run = tmp_path / "pretrain-calibrated"
    export_encoder(enc, meta, encoder_run)

    run = tmp_path / "frozen"
    args = ("mode=full", "trainer.max_epochs=3", "optim.encoder_lr_mult=0", "optim.lr=0.5")
    metrics = finetune(
        ft_cfg(encoder_run, run, *args, "augment.crop_padding=0"), callbacks=[InitialHead()]
    )
    before = load_file(str(encoder_run / "encoder.safetensors"))
    after = _weights(run)
    assert any("running_mean" in k for k in before)  # the encoder has BatchNorm statistics
    for k, v in before.items():
        assert torch.equal(after["encoder." + k], v), k
    assert metrics["optim/encoder_lr"] == 0.0
    # The head alone trains: its exported weights are not those it started from (run.seed's),
    # and on the frozen random features it beats chance (0.1) on the evaluation split (0.46
    # measured).
    assert initial["weight"].shape == after["head.weight"].shape == (10, 16)
    for k in ("weight", "bias"):
        assert (after["head." + k] - initial[k]).abs().max() > 0.05, k
    assert metrics["test/acc"] > 0.3, metrics


def test_a_frozen_encoder_stays_in_eval_mode() -> None:
    clf = Classifier(build_backbone("convnet", 4), 10, [0.5] * 3, [0.5] * 3)
    module = FineTuner(clf, lr=0.1, encoder_lr=0.0)
    module.train()
    assert module.training and clf.head.training and not clf.encoder.training
    assert not any(p.requires_grad for p in clf.encoder.parameters())
    assert all(not m.training for m in clf.encoder.modules())
    trained = FineTuner(Classifier(build_backbone("convnet", 4), 10, [0.5] * 3, [0.5] * 3))
    trained.train()
    assert trained.classifier.encoder.training


# --- the device of the feature extraction --------------------------------------------------------


def test_each_rank_extracts_features_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _device("auto", {}) == torch.device("cuda", 0)
    assert _device("gpu", {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
    slurm = {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "3", "SLURM_JOB_NAME": "j"}
    assert _device("cuda", slurm) == torch.device("cuda", 3)
    # One GPU visible per process (e.g. a per-task CUDA_VISIBLE_DEVICES): its only device.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _device("cuda", {"LOCAL_RANK": "1"}) == torch.device("cuda", 0)
    assert _device("cpu", {"LOCAL_RANK": "1"}) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _device("auto") == torch.device("cuda", 0)


# --- the test accuracy: every image once, every rank's -------------------------------------------


def test_the_test_accuracy_counts_images_not_batch_means() -> None:
    clf = Classifier(build_backbone("convnet", 4), 3, [0.5] * 3, [0.5] * 3)
    torch.manual_seed(0)
    x, y = torch.rand(7, 3, 8, 8), torch.randint(0, 3, (7,))
    with torch.no_grad():
        expected = float((clf.eval()(x).argmax(1) == y).float().mean())
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(ClassifierTest(clf), DataLoader(TensorDataset(x, y), batch_size=3), verbose=False)
    assert float(trainer.callback_metrics["test/acc"]) == pytest.approx(expected)


_DDP_DRIVER = """\
import json, os, sys
from pathlib import Path
from ssl_robust.config import ConfigError, FinetuneConfig, load_config, to_dict
from ssl_robust.pipelines.finetune import finetune

m = finetune(load_config(FinetuneConfig, sys.argv[2:], job="finetune"))
out = Path(sys.argv[1]) / f"metrics_rank{os.environ['RANK']}.json"
out.write_text(json.dumps(m))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_test_accuracy_under_ddp_is_over_every_ranks_images(
    random_encoder: Path, tmp_path: Path
) -> None:
    from ssl_robust.data.datasets import build_splits
    from ssl_robust.finetune.export import load_classifier

    driver = tmp_path / "driver.py"
    driver.write_text(_DDP_DRIVER)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(driver), str(tmp_path), *TINY, f"encoder.run={random_encoder}", f"run.dir={run}",
        "mode=full", "trainer.max_epochs=2", "trainer.devices=2", "data.eval_batch_size=64",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["test/acc"] == ranks[1]["test/acc"]
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["test/acc"] == ranks[0]["test/acc"]
    # The exported classifier's accuracy on the whole evaluation split, up to the one image the
    # distributed sampler repeats (359 images on 2 ranks).
    clf, info = load_classifier(run)
    d = info["data"]
    val = build_splits(
        d["name"], d["root"], image_size=d["image_size"], val_fraction=d["val_fraction"],
        seed=d["seed"],
    ).val  # fmt: skip
    x = torch.from_numpy(val.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        correct = int((clf.eval()(x).argmax(1) == torch.from_numpy(val.labels)).sum())
    n = len(val.labels)
    padded = n + n % 2
    assert correct / padded <= stored["test/acc"] <= (correct + padded - n) / padded


def test_full_fine_tuning_trains_channels_last_when_asked(
    random_encoder: Path, tmp_path: Path
) -> None:
    formats: list[bool] = []

    class Format(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, m: Any, b: Any, i: int) -> None:
            conv = next(p for p in m.parameters() if p.ndim == 4)
            formats.append(conv.is_contiguous(memory_format=torch.channels_last))

    common = ("mode=full", "trainer.max_epochs=1")
    cl = ft_cfg(random_encoder, tmp_path / "cl", *common, "trainer.channels_last=true")
    finetune(cl, callbacks=[Format()])
    assert formats and all(formats)
    formats.clear()
    finetune(ft_cfg(random_encoder, tmp_path / "nchw", *common), callbacks=[Format()])
    assert formats and not any(formats)


def test_lazily_read_images_of_their_own_sizes_are_refused(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls in "ab":
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i, side in enumerate((9, 12)):
                Image.new("RGB", (side, side)).save(tmp_path / "d" / split / cls / f"{i}.png")
    args = [
        *TINY,
        "encoder.backbone=convnet",
        "data.name=imagefolder",
        f"data.root={tmp_path / 'd'}",
        "data.in_memory=false",
        "subset.per_class=1",
        f"run.dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ConfigError, match=r"give data\.image_size"):
        finetune(load_config(FinetuneConfig, args, job="finetune"))
    assert not (tmp_path / "run").exists()
