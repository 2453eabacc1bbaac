"""What keys the evaluation job's stored units: the purifier settings it actually uses (not the
raw config), and the settings the sanity checks are given (not the whole attack)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from ssl_robust.config import EvaluateConfig, load_config
from ssl_robust.pipelines.evaluate.setup import threat_specs
from ssl_robust.pipelines.evaluate.units import purifier_settings, unit_specs
from ssl_robust.purify.purifier import Purifier, t_star_from_sigma
from ssl_robust.purify.unet import load_denoiser
from tests.helpers import metric_numbers, unit_stamps

job = importlib.import_module("ssl_robust.pipelines.evaluate.job")
adv_mod = importlib.import_module("ssl_robust.pipelines.evaluate.adversarial")

# The clean pass and one threat's PGD and sanity checks, on a few images.
SMALL = [
    "eval.max_images=48",
    "shift.enabled=false",
    "calib.enabled=false",
    "ood.enabled=false",
    "perf.enabled=false",
    "adv.linf_eps=[8]",
    "adv.l2_eps=[]",
    "adv.steps=1",
    "adv.eot=1",
    "adv.rescore_draws=2",
    "adv.max_images=8",
    "adv.sanity_images=4",
    "adv.sanity_queries=4",
    "adv.sanity_linf_eps=[8]",
]
UNITS = ["clean", "adv/linf_8/pgd", "adv/sanity/linf"]


@pytest.fixture
def cfg_for(classifier_run: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """``cfg_for("a", *overrides)``: the tiny preset on the classifier, in tmp_path / "a"."""

    def make(run: str, *overrides: str) -> DictConfig:
        args = ["tiny", f"classifier.run={classifier_run}", f"run.dir={tmp_path / run}"]
        return load_config(EvaluateConfig, [*args, *SMALL, *overrides], job="evaluate")

    return make


def _rerun(
    cfg: DictConfig, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, float], list[str], str]:
    """Runs the job again in the same directory: its metrics, the units it rewrote and what
    it printed."""
    before = unit_stamps(Path(cfg.run.dir))
    capsys.readouterr()
    metrics = job.evaluate(cfg)
    after = unit_stamps(Path(cfg.run.dir))
    return metrics, sorted(u for u in after if before.get(u) != after[u]), capsys.readouterr().out


def _purifier(denoiser_run: Path, **kwargs: Any) -> Purifier:
    unet, scheduler = load_denoiser(str(denoiser_run))
    return Purifier(unet, scheduler, **kwargs)


def test_the_fingerprint_holds_the_purifier_settings_in_use(denoiser_run: Path) -> None:
    def settings(**kwargs: Any) -> dict[str, Any]:
        return purifier_settings(_purifier(denoiser_run, **kwargs))

    ddim = {"t_star": 20, "sampler": "ddim", "ddim_steps": 2}
    assert settings(**ddim) == {
        "t_star": 20,
        "sampler": "ddim",
        "fixed_noise": False,
        "dtype": "float32",
        "ddim_steps": 2,
    }
    # Settings that change no number: gradient checkpointing, fp32 named or not, the DDIM
    # steps of another sampler, everything at t* = 0 (the identity).
    assert settings(**ddim, gradient_checkpointing=True) == settings(**ddim)
    assert settings(**ddim, dtype=torch.float32) == settings(**ddim)
    assert settings(t_star=20, sampler="ddpm", ddim_steps=3) == settings(t_star=20, sampler="ddpm")
    assert settings(t_star=0, sampler="ddim", ddim_steps=3) == settings(t_star=0, sampler="ddpm")
    # sigma chooses t*: the resolved t* is what counts, however it was given.
    _, scheduler = load_denoiser(str(denoiser_run))
    t_star = t_star_from_sigma(scheduler.alphas_cumprod, 0.05)
    assert settings(sigma=0.05, sampler="ddpm") == settings(t_star=t_star, sampler="ddpm")
    # Settings that do change the numbers.
    for other in (
        {**ddim, "ddim_steps": 3},
        {**ddim, "t_star": 30},
        {**ddim, "sampler": "ddpm"},
        {**ddim, "fixed_noise": True},
        {**ddim, "dtype": torch.bfloat16},
    ):
        assert settings(**other) != settings(**ddim), other


def test_settings_the_purifier_ignores_reuse_every_unit(
    cfg_for: Callable[..., DictConfig],
    denoiser_run: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    purifier = [f"purifier.run={denoiser_run}", "purifier.sampler=ddpm", "purifier.sigma=0.02"]
    cfg = cfg_for("run", *purifier, "purifier.gradient_checkpointing=true")
    reference = job.evaluate(cfg)
    stored = unit_stamps(Path(cfg.run.dir))
    assert sorted(stored) == sorted(UNITS)
    # Gradient checkpointing, the t_star that sigma overrides and the DDIM steps of the DDPM
    # sampler change no number: every unit is read back, none rewritten.
    for change in (
        ["purifier.gradient_checkpointing=false"],
        ["purifier.t_star=7", "purifier.ddim_steps=1"],
    ):
        metrics, rewritten, out = _rerun(cfg_for("run", *purifier, *change), capsys)
        assert rewritten == [], change
        assert "1/1 clean pass, 1/1 PGD threats, 1/1 sanity-check norms already done" in out
        assert "ignoring" not in out
        assert metric_numbers(metrics) == metric_numbers(reference)
    assert unit_stamps(Path(cfg.run.dir)) == stored
    # Another sigma is another t*: every unit is recomputed, and says why.
    metrics, rewritten, out = _rerun(
        cfg_for("run", *[*purifier[:2], "purifier.sigma=0.05"]), capsys
    )
    assert rewritten == sorted(UNITS)
    assert "ignoring 3 stored unit(s)" in out and "computed with a different config" in out


def _specs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    return unit_specs(
        cfg,
        clean=True,
        bare=False,
        clean_draws=1,
        shift_draws=1,
        corruptions=[],
        severities=[],
        threats=threat_specs(cfg),
        stochastic=False,
    )


def test_the_sanity_checks_are_keyed_by_what_they_are_given(
    cfg_for: Callable[..., DictConfig],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = _specs(cfg_for("specs"))
    stepped = _specs(cfg_for("specs", "adv.step_size=0.01"))
    fixed_start = _specs(cfg_for("specs", "adv.random_start=false"))
    assert stepped["adv/sanity/linf"] == base["adv/sanity/linf"]
    assert stepped["adv/linf_8/pgd"] != base["adv/linf_8/pgd"]
    assert fixed_start["adv/sanity/linf"] != base["adv/sanity/linf"]
    assert "step_size" not in json.dumps(base["adv/sanity/linf"])

    given: list[dict[str, Any]] = []
    sanity_checks = adv_mod.sanity_checks

    def spy(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs)
        return sanity_checks(*args, **kwargs)

    monkeypatch.setattr(adv_mod, "sanity_checks", spy)
    cfg = cfg_for("run")
    job.evaluate(cfg)
    assert [g["random_start"] for g in given] == [True]
    # A fixed PGD step: the PGD unit is recomputed, the sanity checks (which keep the default
    # step rule at every radius) are read back, and the report says which step they used.
    _, rewritten, out = _rerun(cfg_for("run", "adv.step_size=0.01"), capsys)
    assert rewritten == ["adv/linf_8/pgd"] and len(given) == 1
    assert "1/1 sanity-check norms" in out
    notes = " ".join(json.loads((Path(cfg.run.dir) / "report.json").read_text())["notes"])
    assert "The sanity checks run PGD with the default step size" in notes
    assert "not adv.step_size=0.01" in notes
    # No random start: the sanity checks are given it too, so they are recomputed with it.
    _, rewritten, _ = _rerun(cfg_for("run", "adv.random_start=false"), capsys)
    assert rewritten == ["adv/linf_8/pgd", "adv/sanity/linf"]
    assert [g["random_start"] for g in given] == [True, False]
    notes = " ".join(json.loads((Path(cfg.run.dir) / "report.json").read_text())["notes"])
    assert "default step size" not in notes
