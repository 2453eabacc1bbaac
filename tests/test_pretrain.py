from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_robust.config import ConfigError
from ssl_robust.data.transforms import eval_transform
from ssl_robust.evaluate.corruptions import corrupted_source
from ssl_robust.launch.curves import read_history
from ssl_robust.methods.monitor import knn_accuracy_counts
from ssl_robust.models.export import load_encoder
from ssl_robust.pipelines import pretrain
from ssl_robust.pipelines.common import build_data
from tests.callbacks import CheckpointMidEpoch, CountBatches, StopAfterEpoch
from tests.helpers import TickingClock

ROOT = Path(__file__).resolve().parents[1]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def test_pretrain_writes_the_run_directory(
    tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_pretrain_cfg("monitor.views_figure=4")
    metrics = pretrain(cfg)
    run = Path(cfg.run.dir)
    for name in (
        "views.png",
        "config.yaml",
        "metrics.json",
        "encoder.safetensors",
        "encoder.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "logs/version_0/metrics.csv",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("train/loss", "val/knn_acc", "val/online_acc", "optim/lr", "optim/global_batch"):
        assert key in saved
    assert saved["optim/global_batch"] == 64 and saved["optim/lr"] == pytest.approx(0.06 * 64 / 128)
    # Training throughput, logged per epoch; metrics.json has the median after epoch 1.
    with (run / "logs" / "version_0" / "metrics.csv").open() as f:
        per_epoch = [
            float(r["perf/train_images_per_s"])
            for r in csv.DictReader(f)
            if r.get("perf/train_images_per_s")
        ]
    assert len(per_epoch) == saved["epochs"] and min(per_epoch) > 0
    assert saved["perf/train_images_per_s"] == pytest.approx(
        statistics.median(per_epoch[1:] or per_epoch)
    )
    assert OmegaConf.load(run / "config.yaml") == cfg
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ssl_robust_config"] == OmegaConf.to_container(cfg, resolve=True)
    assert ckpt["global_step"] == 6  # 2 epochs x 3 batches
    # The exported encoder is the trained backbone.
    enc, meta = load_encoder(run)
    assert meta.feat_dim == enc.feat_dim and meta.num_classes == 10 and meta.image_size == 8
    state = {
        k.removeprefix("backbone."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("backbone.")
    }
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, state[k])

    # The last validation's kNN accuracies, clean and on the corrupted twin of the val split,
    # recomputed from the exported encoder: features of the bank (the labeled train split)
    # and of each query set, cosine kNN (k=20, T=0.1).
    splits = build_data(cfg, run, with_unlabeled=True)
    info = splits.info
    transform = eval_transform(info.image_size, tuple(info.mean), tuple(info.std))

    def features(source: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([transform(source.load(i)) for i in range(len(source))])
        with torch.no_grad():
            return enc.eval()(x), torch.as_tensor(source.labels)

    bank, bank_labels = features(splits.train)
    shifted = corrupted_source(splits.val, int(cfg.monitor.shift_severity), seed=0)
    assert len(shifted) == len(splits.val) and cfg.monitor.shift_severity == 3
    assert not np.array_equal(shifted.images, splits.val.images)  # type: ignore[attr-defined]
    for key, source in (("val/knn_acc", splits.val), ("val/knn_acc_shift", shifted)):
        query, labels = features(source)
        right = knn_accuracy_counts(query, labels, bank, bank_labels, 10, k=20, t=0.1)
        assert saved[key] == pytest.approx(int(right) / len(labels), abs=1.5 / len(labels))
    # Drawn beside the clean one; off with monitor.shift_severity=0.
    assert "val/online_acc_shift" in saved
    off = pretrain(tiny_pretrain_cfg("monitor.shift_severity=0", run_dir=tmp_path / "off"))
    assert not any(k.endswith("_shift") for k in off)


@pytest.mark.parametrize(
    ("method", "augment"), [("simclr", "cpu"), ("byol", "cpu"), ("simclr", "gpu")]
)
def test_resumed_run_matches_uninterrupted_run(
    method: str, augment: str, tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    common = (
        f"method={method}",
        f"data.augment={augment}",
        "trainer.max_epochs=3",
        "optim.warmup_epochs=1",
    )
    full = tiny_pretrain_cfg(*common, run_dir=tmp_path / "full")
    full_metrics = pretrain(full)

    part = tiny_pretrain_cfg(*common, run_dir=tmp_path / "part")
    pretrain(part, callbacks=[StopAfterEpoch(1)])
    assert (
        torch.load(tmp_path / "part/checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    )
    resumed_metrics = pretrain(part)  # same command, same run directory: resumes

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed_metrics["train/loss"] == pytest.approx(full_metrics["train/loss"], rel=1e-5)
    assert resumed_metrics["val/knn_acc"] == pytest.approx(full_metrics["val/knn_acc"])
    _same_history(tmp_path / "full", tmp_path / "part")


def _same_history(full: Path, part: Path) -> None:
    """The resumed run's stitched logs (curves.png) tell the uninterrupted run's story."""
    h_full, h_part = read_history(full), read_history(part)
    assert (part / "logs" / "version_1").is_dir()
    assert set(h_part) == set(h_full)
    # Training metrics, learning rates and timings, one per step; the run's settings (dist/*,
    # optim/*) are logged again at every start.
    for key in [k for k in h_full if k.startswith(("train/", "val/", "lr-", "perf/"))]:
        (s_full, v_full), (s_part, v_part) = h_full[key], h_part[key]
        assert s_part.tolist() == s_full.tolist(), key
        if not key.startswith("perf/"):  # timings differ
            np.testing.assert_allclose(v_part, v_full, rtol=1e-5, err_msg=key)


def test_rerunning_a_finished_run_does_not_retrain(
    tiny_pretrain_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl_robust.launch.perf as perf

    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    first = pretrain(cfg)
    run = Path(cfg.run.dir)
    files = ("checkpoints/last.ckpt", "checkpoints/best.ckpt")
    stamps = {name: (run / name).stat().st_mtime_ns for name in files}
    encoder = (run / "encoder.safetensors").read_bytes()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3  # one epoch of limit_train_batches=3
    fit_s = ckpt["callbacks"]["FitClock"]["fit_s"]  # the fit time up to the checkpoint
    # The rerun's fit lasts 7 s of a fake clock: read when the fit starts and when it ends,
    # and by nothing else (an epoch or a checkpoint would read it too).
    clock = TickingClock(7.0)
    monkeypatch.setattr(perf, "time", clock)
    batches = CountBatches()
    again = pretrain(cfg, callbacks=[batches])
    # Nothing trained or validated, no checkpoint written; the same weights exported again.
    assert (batches.train, batches.val) == (0, 0)
    assert {name: (run / name).stat().st_mtime_ns for name in files} == stamps
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["global_step"] == 3
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in after["state_dict"].items())
    assert (run / "encoder.safetensors").read_bytes() == encoder
    # The fit time kept in the checkpoint plus the rerun's own, exactly; the other numbers are
    # the first run's.
    assert clock.reads == 2
    assert again.pop("perf/fit_time_s") == fit_s + 7.0
    assert 0 < fit_s <= first.pop("perf/fit_time_s")
    assert again == pytest.approx(first)


def test_no_resume_starts_over(tiny_pretrain_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    pretrain(cfg)
    seen: list[int] = []

    class Epochs(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, module: Any) -> None:
            seen.append(trainer.current_epoch)

    run = Path(cfg.run.dir)
    (run / "hpc_ckpt_3.ckpt").write_bytes(b"an earlier run's")  # Lightning would load it
    assert "val/knn_acc_shift" in json.loads((run / "metrics.json").read_text())
    fresh = tiny_pretrain_cfg(
        "trainer.max_epochs=1", "run.resume=false", "monitor.shift_severity=0"
    )
    metrics = pretrain(fresh, callbacks=[Epochs()])
    assert seen == [0]
    assert not list(run.glob("hpc_ckpt_*"))
    # Nothing of the replaced run's numbers: it validated on a shifted twin, this one does not.
    assert not [k for k in metrics if "shift" in k]
    assert not [k for k in json.loads((run / "metrics.json").read_text()) if "shift" in k]


def test_wandb_offline_keeps_run_id_across_resume(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    pytest.importorskip("wandb")
    cfg = tiny_pretrain_cfg(
        "wandb.mode=offline",
        "trainer.max_epochs=1",
        "wandb.group=g",
        "wandb.tags=[a,b]",
        "monitor.views_figure=2",
    )
    pretrain(cfg)
    run = Path(cfg.run.dir)
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((run / "wandb").glob("*"))
    assert list(offline[0].glob("files/media/images/views_*.png"))  # the views figure too
    pretrain(tiny_pretrain_cfg("wandb.mode=offline", "trainer.max_epochs=2", "wandb.group=g"))
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_script_reports_config_errors_before_any_work(tmp_path: Path) -> None:
    res = _script("trainer.max_epoch=2", cwd=tmp_path)
    assert res.returncode != 0
    assert "unknown config key 'trainer.max_epoch'" in res.stderr and "max_epochs" in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_script_runs_the_embedded_default(tmp_path: Path) -> None:
    from tests.conftest import TINY_PRETRAIN

    res = _script(*TINY_PRETRAIN, "trainer.max_epochs=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "pretrain-simclr-digits"
    assert json.loads((run / "metrics.json").read_text())["val/knn_acc"] > 0.1
    assert "Run directory" in res.stdout


def test_extending_a_finished_run_follows_the_new_schedule(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    pretrain(tiny_pretrain_cfg("trainer.max_epochs=1", "optim.warmup_epochs=0"))
    lrs: list[float] = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, b: Any, i: int) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    pretrain(tiny_pretrain_cfg("trainer.max_epochs=2", "optim.warmup_epochs=0"), callbacks=[LR()])
    # Epoch 2 of a 6-step cosine run (steps 3..5) from 1 to 0.001 of the peak rate, not stuck
    # at the final rate of the 3-step run it extends.
    peak = 0.06 * 64 / 128
    expected = [peak * (0.001 + 0.999 * (math.cos(math.pi * k / 5) + 1) / 2) for k in (3, 4, 5)]
    assert lrs == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("augment", "workers"), [("cpu", 0), ("gpu", 0), ("cpu", 2)])
def test_resume_from_a_mid_epoch_checkpoint_matches_uninterrupted_run(
    augment: str, workers: int, tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    # With workers, the loader's iterator (made before the resumed epoch is set) must not
    # draw its first indices early.
    common = ("trainer.max_epochs=2", f"data.augment={augment}", f"data.num_workers={workers}")
    full = pretrain(tiny_pretrain_cfg(*common, run_dir=tmp_path / "full"))
    part = tiny_pretrain_cfg(*common, run_dir=tmp_path / "part")
    with pytest.raises(SystemExit):
        pretrain(part, callbacks=[CheckpointMidEpoch(step=4)])  # epoch 1, batch 1 of 3
    seen: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, m: Any, b: Any, i: int) -> None:
            seen.append(trainer.global_step)

    (hpc,) = Path(part.run.dir).glob("hpc_ckpt_*.ckpt")
    before_s = torch.load(hpc, weights_only=False)["callbacks"]["FitClock"]["fit_s"]
    resumed = pretrain(part, callbacks=[Steps()])
    assert seen == [4, 5]  # only the two batches not yet trained on
    # The fit time counts the first piece (up to its checkpoint) and the resumed one.
    assert 0 < before_s < resumed["perf/fit_time_s"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed["train/loss"] == pytest.approx(full["train/loss"], rel=1e-5)
    _same_history(tmp_path / "full", tmp_path / "part")


def test_pretraining_on_stl10_uses_the_unlabeled_pool(
    tiny_pretrain_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl_robust.data.datasets as ds
    from tests.test_data import _FakeSTL10

    monkeypatch.setattr(ds, "_torchvision", lambda name, root, download, split: _FakeSTL10(split))
    from ssl_robust.data.datasets import build_splits
    from ssl_robust.methods.monitor import knn_accuracy

    steps: list[int] = []
    banks: list[tuple[Any, torch.Tensor, int]] = []

    class Count(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
            steps.append(trainer.num_training_batches)

        def on_validation_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
            if not trainer.sanity_checking:  # the bank the kNN accuracy was just scored with
                source = trainer.val_dataloaders[0].dataset.source
                labels = torch.cat(module.monitor._bank_labels)
                banks.append((source, labels, sum(len(b) for b in module.monitor._bank)))

    cfg = tiny_pretrain_cfg(
        "data=stl10",
        "data.batch_size=16",
        "trainer.limit_train_batches=1.0",
        "trainer.max_epochs=1",
        "monitor.knn_k=5",
    )
    metrics = pretrain(cfg, callbacks=[Count()])
    assert steps == [150 // 16]  # 60 labeled + 90 unlabeled images
    # The kNN bank is the labeled train split, every image once, and nothing else (not the
    # unlabeled pool, not the test images it is scored on).
    splits = build_splits("stl10", "", image_size=8)
    assert len(splits.train) == 60 and len(splits.val) == 30
    assert len(banks) == 1
    source, labels, n_features = banks[0]
    assert np.array_equal(source.images, splits.train.images)
    assert np.array_equal(source.labels, splits.train.labels)
    assert n_features == 60 and sorted(labels.tolist()) == sorted(splits.train.labels.tolist())
    assert (labels >= 0).all()
    # val/knn_acc: the exported encoder's test images scored against that bank.
    encoder = load_encoder(cfg.run.dir)[0].eval()
    to_input = eval_transform(8, tuple(splits.info.mean), tuple(splits.info.std))

    def features(images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        with torch.no_grad():
            return encoder(torch.stack([to_input(Image.fromarray(im)) for im in images]))

    expected = knn_accuracy(
        features(splits.val.images), torch.from_numpy(splits.val.labels),
        features(splits.train.images), torch.from_numpy(splits.train.labels),
        num_classes=10, k=5, t=cfg.monitor.knn_t,
    )  # fmt: skip
    assert metrics["val/knn_acc"] == pytest.approx(expected, abs=1e-6)


def test_compiled_views_need_the_device_path(tiny_pretrain_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_pretrain_cfg("data.augment=cpu", "data.compile_views=true")
    with pytest.raises(ConfigError, match=r"data.compile_views=true .* data.augment='cpu'"):
        pretrain(cfg)
    assert not Path(cfg.run.dir).exists()  # refused before anything was written


@pytest.mark.slow
def test_compiled_views_train_like_eager_views(
    tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    # Same seed, same views up to float rounding: the two runs end with nearly equal weights.
    common = ("data.augment=gpu", "trainer.max_epochs=1", "method=byol")
    compiled_views: list[bool] = []

    class Views(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
            views = trainer.datamodule.train_transform  # type: ignore[attr-defined]
            compiled_views.extend(v._compiled_apply is not None for v in views)

    eager = pretrain(tiny_pretrain_cfg(*common, run_dir=tmp_path / "eager"), callbacks=[Views()])
    compiled = pretrain(
        tiny_pretrain_cfg(*common, "data.compile_views=true", run_dir=tmp_path / "compiled"),
        callbacks=[Views()],
    )
    assert compiled_views == [False, False, True, True]
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-3)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-3)


def test_a_warm_up_longer_than_the_run_is_cut_with_a_warning(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    cfg = tiny_pretrain_cfg("trainer.max_epochs=1", "optim.warmup_epochs=5")
    with pytest.warns(UserWarning, match=r"warmup_epochs=5 is at least the whole run .*cut to 2 "):
        metrics = pretrain(cfg)
    assert metrics["optim/warmup_steps"] == 2 and metrics["optim/total_steps"] == 3


def test_batches_done_this_epoch_counts_whole_accumulation_windows() -> None:
    from types import SimpleNamespace

    from ssl_robust.data.datamodule import batches_done_this_epoch

    # 5 batches an epoch, 2 per step: steps after batches 2, 4 and 5, so 3 steps an epoch.
    def done(step: int, epoch: int) -> int:
        trainer = SimpleNamespace(
            num_training_batches=5, accumulate_grad_batches=2, global_step=step, current_epoch=epoch
        )
        return batches_done_this_epoch(trainer)  # type: ignore[arg-type]

    assert [done(s, 0) for s in range(4)] == [0, 2, 4, 0]
    assert [done(s, 1) for s in range(3, 7)] == [0, 2, 4, 0]  # a fresh epoch 1 skips nothing
    assert done(7, 2) == 2
    one = SimpleNamespace(
        num_training_batches=3, accumulate_grad_batches=1, global_step=4, current_epoch=1
    )
    assert batches_done_this_epoch(one) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_gradient_accumulation_trains_every_batch_and_steps_the_target_once(
    method: str, tiny_pretrain_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl_robust.methods.byol as byol

    updates: list[int] = []
    real = byol.update_momentum

    def counted(model: Any, model_ema: Any, m: float) -> None:
        updates.append(1)
        real(model, model_ema, m)

    monkeypatch.setattr(byol, "update_momentum", counted)
    batches: list[tuple[int, int]] = []

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, m: Any, b: Any, i: int) -> None:
            batches.append((trainer.current_epoch, i))

    # 3 batches an epoch, 2 per step: 2 steps an epoch, the second after one batch.
    metrics = pretrain(
        tiny_pretrain_cfg(f"method={method}", "trainer.accumulate_grad_batches=2"),
        callbacks=[Batches()],
    )
    assert batches == [(e, i) for e in range(2) for i in range(3)]
    assert metrics["optim/total_steps"] == 4
    if method == "byol":  # backbone and projection head, once per optimiser step
        assert len(updates) == 2 * 4


def test_the_last_epoch_is_validated_whatever_the_interval(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    validated: list[int] = []

    class Validations(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, m: Any) -> None:
            if not trainer.sanity_checking:
                validated.append(trainer.current_epoch)

    cfg = tiny_pretrain_cfg("trainer.max_epochs=3", "monitor.every_n_epochs=2")
    metrics = pretrain(cfg, callbacks=[Validations()])
    assert validated == [1, 2]  # every second epoch, and the last (the exported weights')
    epochs, knn = read_history(Path(cfg.run.dir), x="epoch")["val/knn_acc"]
    assert list(epochs) == [2, 3] and metrics["val/knn_acc"] == pytest.approx(knn[-1])


def test_a_rerun_asking_for_another_training_is_refused_before_writing(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    pretrain(cfg)
    run = Path(cfg.run.dir)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_pretrain_cfg("trainer.max_epochs=1", "method=byol", "model.width=8"))
    msg = str(err.value)
    assert "method.name: 'simclr' -> 'byol'" in msg and "model.width: 4 -> 8" in msg
    assert "run.resume=false" in msg
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match=r"run.seed: 0 -> 1"):  # another data order and views
        pretrain(tiny_pretrain_cfg("trainer.max_epochs=1", "run.seed=1"))
    # Monitoring and I/O may change; a fresh start may change anything.
    pretrain(tiny_pretrain_cfg("trainer.max_epochs=1", "data.num_workers=1", "monitor.knn_k=10"))
    pretrain(tiny_pretrain_cfg("trainer.max_epochs=1", "method=byol", "run.resume=false"))


@pytest.mark.parametrize(
    ("every", "epochs", "saved_after"),
    [(1, 3, [1, 2, 3]), (2, 3, [2, 3]), (2, 4, [2, 4]), (5, 3, [3])],
)
def test_last_checkpoint_every_n_epochs_and_after_the_last(
    every: int,
    epochs: int,
    saved_after: list[int],
    tiny_pretrain_cfg: Callable[..., DictConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saves: list[tuple[int, str]] = []
    real = pl.Trainer.save_checkpoint

    def recorded(trainer: pl.Trainer, filepath: Any, *args: Any, **kwargs: Any) -> None:
        saves.append((trainer.current_epoch + 1, Path(filepath).name))
        real(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", recorded)
    cfg = tiny_pretrain_cfg(
        f"trainer.checkpoint_every_n_epochs={every}", f"trainer.max_epochs={epochs}"
    )
    pretrain(cfg)
    assert [epoch for epoch, name in saves if name == "last.ckpt"] == saved_after
    last = torch.load(Path(cfg.run.dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] + 1 == epochs  # the finished run's checkpoint: a rerun trains nothing


def test_a_run_stopped_between_checkpoints_resumes_from_the_last_multiple(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    # Checkpoints every 2 epochs, the run stopped (a crash) after epoch 3 of 4: the rerun
    # resumes after epoch 2 and trains epochs 3 and 4 (3 batches each).
    cfg = tiny_pretrain_cfg("trainer.checkpoint_every_n_epochs=2", "trainer.max_epochs=4")
    pretrain(cfg, [StopAfterEpoch(3)])
    last = torch.load(Path(cfg.run.dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 6
    count = CountBatches()
    pretrain(cfg, [count])
    assert count.train == 6


def test_last_checkpoint_state_key_does_not_depend_on_the_interval(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ssl_robust.launch.trainer import checkpoint_callbacks

    # A run checkpointed by Lightning's every-epoch callback (or another interval) restores
    # this callback's state under the same key.
    keys = {checkpoint_callbacks(tmp_path, None, every_n_epochs=n)[0].state_key for n in (1, 7)}
    plain = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="last",
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    assert keys == {plain.state_key}
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        checkpoint_callbacks(tmp_path, None, every_n_epochs=0)
