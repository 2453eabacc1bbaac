"""A run directory belongs to the job that made it: another job's run is refused before
anything is written (its config, metrics and checkpoints stay as they were)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_robust.cli import EXIT_USAGE, main
from ssl_robust.config import SCHEMAS, ConfigError, load_config, save_config
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta, export_encoder
from ssl_robust.pipelines.common import check_phase, job_of_config
from tests.conftest import TINY_PRETRAIN

JOBS = sorted(SCHEMAS)


def _runs(root: Path) -> dict[str, Path]:
    """A run directory of each job: its config.yaml, a metrics.json and a checkpoint."""
    runs = {}
    for job in JOBS:
        run = root / f"{job}-run"
        save_config(load_config(SCHEMAS[job], [], job=job), run / "config.yaml")
        (run / "metrics.json").write_text(f'{{"{job}": 1}}')
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(job.encode())
        runs[job] = run
    return runs


def _contents(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_each_job_is_known_by_its_config_sections(tmp_path: Path) -> None:
    runs = _runs(tmp_path)
    for job in JOBS:
        for owner, run in runs.items():
            if owner == job:
                check_phase(run, job)  # its own run: resumable
            else:
                with pytest.raises(ConfigError) as err:
                    check_phase(run, job)
                assert str(run) in str(err.value) and "give this" in str(err.value)
    check_phase(tmp_path / "new", "pretrain")  # nothing there yet
    assert job_of_config({"run", "trainer", "data"}) is None  # sections every job shares


def test_every_job_refuses_another_jobs_run_dir_and_leaves_it_as_it_was(
    tmp_path: Path, classifier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _runs(tmp_path)
    before = {job: _contents(run) for job, run in runs.items()}
    encoder = tmp_path / "encoder"
    net = build_backbone("convnet", width=4)
    export_encoder(net, EncoderMeta("convnet", 4, net.feat_dim, 8, [0.3], [0.4], 10), encoder)
    torch.manual_seed(0)
    attempts = {
        # run.resume=false would otherwise delete the denoiser's checkpoints.
        "pretrain": (runs["denoiser"], ["run.resume=false"], "a denoiser run"),
        "denoiser": (runs["pretrain"], [], "a pretraining run"),
        "finetune": (
            runs["evaluate"],
            [f"encoder.run={encoder}", "data=digits", "data.image_size=8"],
            "an evaluation run",
        ),
        "evaluate": (runs["finetune"], ["tiny", f"classifier.run={classifier_run}"], "a fine"),
    }
    for job, (run, args, holds) in attempts.items():
        assert main(job, [*args, f"run.dir={run}"]) == EXIT_USAGE, job
        err = capsys.readouterr().err
        assert f"error: run.dir '{run}' holds {holds}" in err, err
    assert {job: _contents(run) for job, run in runs.items()} == before


def test_denoised_view_settings_without_a_denoiser_do_not_block_a_resume(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    """denoise.t_min/t_max/mode do nothing while denoise.run is empty: a change to them is no
    reason to refuse a resume (a change of the denoiser itself still is)."""
    from ssl_robust.pipelines.pretrain import pretrain, resume_settings

    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    pretrain(cfg)
    extended = tiny_pretrain_cfg("trainer.max_epochs=2", "denoise.t_min=5", "denoise.mode=both")
    assert pretrain(extended)["epochs"] == 2
    with_denoiser = {"denoise": {"run": "d", "t_min": 0}}
    assert resume_settings(with_denoiser) == {"denoise.run": "d", "denoise.t_min": 0}
    assert resume_settings({"denoise": {"run": "", "t_min": 0}}) == {}


def test_a_run_from_before_joint_views_resumes_only_as_it_was_trained(
    tiny_pretrain_cfg: Callable[..., DictConfig],
) -> None:
    """Its config.yaml lacks method.joint_views, and its views went through the networks in one
    pass: resuming it with one pass per view (the default now) would mix the two."""
    from ssl_robust.pipelines.pretrain import pretrain

    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    pretrain(cfg)
    run = Path(cfg.run.dir)
    config = OmegaConf.load(run / "config.yaml")
    del config.method["joint_views"]
    OmegaConf.save(config, run / "config.yaml")
    blob = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    del blob["ssl_robust_config"]["method"]["joint_views"]
    torch.save(blob, run / "checkpoints" / "last.ckpt")
    before = _contents(run)
    with pytest.raises(ConfigError, match=r"method.joint_views: True -> False"):
        pretrain(tiny_pretrain_cfg("trainer.max_epochs=2"))
    assert _contents(run) == before
    assert (
        pretrain(tiny_pretrain_cfg("trainer.max_epochs=2", "method.joint_views=true"))["epochs"]
        == 2
    )


def test_a_fast_dev_run_on_a_finished_run_leaves_it_as_it_was(
    tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """It crashed resuming the finished run's checkpoint, after rewriting its config.yaml and
    curves; with run.resume=false it would have deleted the checkpoints."""
    import tempfile

    from ssl_robust.pipelines.pretrain import pretrain

    cfg = tiny_pretrain_cfg("trainer.max_epochs=1")
    pretrain(cfg)
    run = Path(cfg.run.dir)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    smoke = tiny_pretrain_cfg("trainer.fast_dev_run=true", "run.resume=false")
    metrics = pretrain(smoke)
    assert "train/loss" in metrics  # it trained (one batch)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert not list(Path(tempfile.gettempdir()).glob("ssl_robust-fast_dev_run-*"))


def test_fewer_epochs_than_a_run_has_trained_are_refused(
    tiny_pretrain_cfg: Callable[..., DictConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished 2-epoch run rerun with trainer.max_epochs=1 "succeeded" at once and left
    config.yaml saying 1 beside the 2-epoch encoder and metrics."""
    from ssl_robust.pipelines.pretrain import pretrain

    cfg = tiny_pretrain_cfg("trainer.max_epochs=2")
    pretrain(cfg)
    run = Path(cfg.run.dir)
    before = _contents(run)
    assert (
        main("pretrain", [*TINY_PRETRAIN, f"run.dir={run}", "trainer.max_epochs=1"]) == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "holds a pretraining checkpoint (last.ckpt) already in epoch 2" in err
    assert "trainer.max_epochs=1 cannot take that back" in err
    assert _contents(run) == before
    assert pretrain(tiny_pretrain_cfg("trainer.max_epochs=2"))["epochs"] == 2  # same: fine
    assert f"{run} is complete (2 epochs): nothing trained" in capsys.readouterr().out
    # An extension trains, and says nothing of the kind (the fit rewrites last.ckpt).
    assert pretrain(tiny_pretrain_cfg("trainer.max_epochs=3"))["epochs"] == 3
    assert "nothing trained" not in capsys.readouterr().out


def test_denoised_views_of_another_size_or_schedule_are_refused_before_writing(
    tiny_pretrain_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A 16 px denoiser for 8 px views failed at the first batch, after config.yaml and the
    logs were written; t_max beyond its schedule raised a ValueError (exit 1)."""
    from ssl_robust.pipelines.pretrain import pretrain
    from ssl_robust.purify.unet import build_unet, make_scheduler, save_denoiser

    den = save_denoiser(build_unet("tiny", sample_size=16), make_scheduler(100), tmp_path / "d")
    cfg = tiny_pretrain_cfg(f"denoise.run={den}", run_dir=tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"denoise.run=.* a denoiser of 16-px images, the views are 8 px"
    ):
        pretrain(cfg)
    cfg = tiny_pretrain_cfg(f"denoise.run={den}", "denoise.t_max=500", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"denoise \(run .*\): need 0 <= t_min <= t_max <= 100"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_fast_dev_runs_of_other_jobs_or_launches_never_share_a_scratch_directory(
    tiny_pretrain_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyed by run.dir alone, a pretraining and a denoiser smoke test from one folder shared
    it: the second was refused ("holds a pretraining run") and deleted the first's files."""
    from ssl_robust.pipelines.common import smoke_in_scratch

    seen: list[str] = []

    def pretrain(cfg: DictConfig) -> dict[str, float]:
        seen.append(str(cfg.run.dir))
        return {}

    def train_denoiser(cfg: DictConfig) -> dict[str, float]:
        seen.append(str(cfg.run.dir))
        return {}

    cfg = tiny_pretrain_cfg("trainer.fast_dev_run=true")
    smoke_in_scratch(pretrain)(cfg)
    smoke_in_scratch(train_denoiser)(cfg)
    smoke_in_scratch(pretrain)(cfg)  # the same job and launch: the same folder
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    smoke_in_scratch(pretrain)(cfg)  # another launch
    assert seen[0] == seen[2] and len(set(seen)) == 3
    assert all(Path(s).name.startswith("ssl_robust-fast_dev_run-") for s in seen)
    assert not any(Path(s).exists() for s in seen)  # removed after each
