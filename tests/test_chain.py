"""``scripts/chain.py``: the whole chain on one machine, with the run directories and
prerequisites of ``slurm/pipeline.sh``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_robust.pipelines.chain import (
    Step,
    baseline_line,
    check_steps,
    plan_chain,
    run_chain,
    run_name,
    sweep_lines,
)
from tests.test_slurm_pipeline import _dry_run

ROOT = Path(__file__).resolve().parents[1]
SWEEP = (
    "# fractions\nsubset.fraction=0.1 run.seed=0\n\nsubset.fraction=1.0 run.dir=elsewhere/full\n"
)


def _args(step: Step) -> list[str]:
    return step.argv[2:]  # after the interpreter and the script


def _value(step: Step, key: str) -> str:
    """The value the step's arguments give ``key`` ("" when they do not)."""
    found = [a.split("=", 1)[1] for a in _args(step) if a.startswith(f"{key}=")]
    return found[-1] if found else ""


def test_plan_has_the_slurm_pipelines_steps_run_dirs_and_prerequisites(tmp_path: Path) -> None:
    (tmp_path / "sweep.txt").write_text(SWEEP)
    runs = tmp_path / "runs"
    steps = plan_chain(
        runs,
        pretrain="simclr_cifar10 data.root=/data",
        denoiser="ddpm_cifar10 data.root=/data",
        finetune="linear_cifar10",
        lines=sweep_lines(tmp_path / "sweep.txt"),
        evaluate="quick",
        purify="purifier.sampler=ddim",
    )
    assert [s.name for s in steps] == [
        "pretrain",
        "denoiser",
        "finetune:subset.fraction_0.1_run.seed_0",
        "evaluate:subset.fraction_0.1_run.seed_0",
        "evaluate:subset.fraction_0.1_run.seed_0-purified",
        "finetune:full",
        "evaluate:full",
        "evaluate:full-purified",
        "compare",
    ]
    by = {s.name: s for s in steps}
    assert Path(by["pretrain"].argv[1]).name == "pretrain.py"
    assert _args(by["pretrain"]) == [
        "simclr_cifar10",
        "data.root=/data",
        f"run.dir={runs}/pretrain",
    ]
    ft = by["finetune:subset.fraction_0.1_run.seed_0"]
    assert ft.after == ["pretrain"]
    assert _args(ft) == [
        "linear_cifar10",
        f"encoder.run={runs}/pretrain",
        "subset.fraction=0.1",
        "run.seed=0",
        f"run.dir={runs}/finetune/subset.fraction_0.1_run.seed_0",
    ]
    # A line's own run.dir is where its classifier goes (made absolute for the evaluations).
    assert _args(by["finetune:full"])[-1] == "run.dir=elsewhere/full"
    full = Path("elsewhere/full").resolve()
    purified = by["evaluate:full-purified"]
    assert purified.after == ["finetune:full", "denoiser"]
    assert _args(purified) == [
        "quick",
        f"classifier.run={full}",
        f"purifier.run={runs}/denoiser",
        "purifier.sampler=ddim",
        f"run.dir={runs}/evaluate/full-purified",
    ]
    assert by["evaluate:full"].after == ["finetune:full"]
    compare = by["compare"]
    assert compare.always and len(compare.after) == 4
    assert _args(compare) == [str(runs), "--out", f"{runs}/compare"]


def test_a_supervised_baseline_runs_every_distinct_line_and_is_evaluated_alike(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    lines = [
        "subset.fraction=0.1 run.seed=0",
        "mode=full subset.fraction=0.1  run.seed=0",  # the same baseline: run once
        "subset.fraction=1.0 run.dir=elsewhere/full",
        "mode=full encoder.run=runs/other",
    ]
    assert [baseline_line(ln) for ln in lines] == [
        "subset.fraction=0.1 run.seed=0", "subset.fraction=0.1 run.seed=0",
        "subset.fraction=1.0", "run.seed=0",
    ]  # fmt: skip
    # A quoted value stays one word, as in the fine-tuning line.
    assert baseline_line("mode=full 'optim.lr=0.1' \"run.tag=a b\"") == "optim.lr=0.1 'run.tag=a b'"
    steps = plan_chain(
        runs,
        pretrain="simclr_cifar10",
        denoiser_run=_denoiser_folder(tmp_path),
        finetune="linear_cifar10",
        lines=lines,
        evaluate="quick",
        baseline="supervised_cifar10 trainer.max_epochs=100",
    )
    by = {s.name: s for s in steps}
    base = [s.name for s in steps if s.name.startswith("baseline:")]
    assert base == [
        "baseline:subset.fraction_0.1_run.seed_0", "baseline:subset.fraction_1.0",
        "baseline:run.seed_0",
    ]  # fmt: skip
    first = by["baseline:subset.fraction_0.1_run.seed_0"]
    assert first.after == ["pretrain"]  # it trains on the encoder's data and split
    assert _args(first) == [
        "supervised_cifar10",
        "trainer.max_epochs=100",
        "data.name=",
        f"data.like={runs}/pretrain",
        "subset.fraction=0.1",
        "run.seed=0",
        f"run.dir={runs}/baseline/subset.fraction_0.1_run.seed_0",
    ]
    purified = by["evaluate:baseline-subset.fraction_1.0-purified"]
    assert purified.after == ["baseline:subset.fraction_1.0"]
    assert _args(purified)[:2] == ["quick", f"classifier.run={runs}/baseline/subset.fraction_1.0"]
    assert _args(purified)[-1] == f"run.dir={runs}/evaluate/baseline-subset.fraction_1.0-purified"
    assert len(by["compare"].after) == 2 * len(lines) + 2 * 3
    assert check_steps(steps) == []


def _denoiser_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "den"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def test_plan_matches_the_slurm_pipeline_dry_run(tmp_path: Path) -> None:
    (tmp_path / "sweep.txt").write_text(
        SWEEP.replace(" run.dir=elsewhere/full", "") + "mode=full subset.fraction=0.1 run.seed=0\n"
    )
    runs = tmp_path / "runs"
    options = {
        "--pretrain": "byol_cifar10 data.root=/data",
        "--denoiser": "small_cifar10",
        "--finetune": "full_cifar10",
        "--evaluate": "quick",
        "--purify": "purifier.sampler=oneshot",
        "--baseline": "supervised_cifar10 data.root=/data",
    }
    jobs = _dry_run(
        str(runs),
        *[w for kv in options.items() for w in kv],
        "--sweep",
        str(tmp_path / "sweep.txt"),
    )
    steps = plan_chain(
        runs, **{k[2:]: v for k, v in options.items()}, lines=sweep_lines(tmp_path / "sweep.txt")
    )
    slurm = [args for _, template, _, args in jobs if template != "finetune_array.sbatch"]
    local = [_args(s) for s in steps if not s.name.startswith(("finetune:", "baseline:"))]
    assert local == slurm
    # The baseline's array: its own lines file, after pretraining like the fine-tunings.
    arrays = [
        (opts, args) for _, template, opts, args in jobs if template == "finetune_array.sbatch"
    ]
    assert len(arrays) == 2 and arrays[1][0]["dependency"] == arrays[0][0]["dependency"]
    assert arrays[1][0]["array"] == "1-2"  # 3 lines, two of them one baseline
    assert arrays[1][1] == [
        "supervised_cifar10", "data.root=/data", "data.name=", f"data.like={runs}/pretrain"
    ]  # fmt: skip
    # The array's tasks name their run directories as run_name does (the shell's `tr`).
    for line in sweep_lines(tmp_path / "sweep.txt"):
        shell = subprocess.run(
            ["tr", "-c", "A-Za-z0-9._\\n-", "_"], input=line + "\n", capture_output=True, text=True
        ).stdout.strip()
        assert run_name(line) == shell


def test_existing_runs_and_bad_arguments(tmp_path: Path) -> None:
    enc, den = tmp_path / "enc", tmp_path / "den"
    (den / "unet").mkdir(parents=True)
    enc.mkdir()
    with pytest.raises(ValueError, match="no encoder in"):
        plan_chain(tmp_path / "r", encoder=enc)
    (enc / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no denoiser in"):
        plan_chain(tmp_path / "r", encoder=enc, denoiser_run=den)
    (den / "unet" / "config.json").write_text("{}")
    steps = plan_chain(tmp_path / "r", encoder=enc, denoiser_run=den)
    assert [s.name for s in steps] == [
        "finetune:run.seed_0",
        "evaluate:run.seed_0",
        "evaluate:run.seed_0-purified",
        "compare",
    ]
    assert steps[0].after == [] and steps[2].after == ["finetune:run.seed_0"]
    assert f"encoder.run={enc}" in _args(steps[0])
    with pytest.raises(ValueError, match="exactly one"):
        plan_chain(tmp_path / "r")
    with pytest.raises(ValueError, match="exactly one"):
        plan_chain(tmp_path / "r", pretrain="", encoder=enc)
    with pytest.raises(ValueError, match="not both"):
        plan_chain(tmp_path / "r", encoder=enc, denoiser="", denoiser_run=den)
    with pytest.raises(ValueError, match="without a denoiser there are none"):
        plan_chain(tmp_path / "r", encoder=enc, purify="purifier.sampler=ddim")
    with pytest.raises(FileNotFoundError, match="no sweep file"):
        sweep_lines(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no override lines"):
        sweep_lines(tmp_path / "empty.txt")
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "chain.py"),
            str(tmp_path / "r"),
            "--encoder",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "error: no encoder in" in res.stderr
    assert not (tmp_path / "r").exists()


def test_a_failed_step_skips_what_needs_it_and_the_comparison_still_runs(tmp_path: Path) -> None:
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(b"")
    steps = plan_chain(
        tmp_path / "r", encoder=tmp_path / "enc", denoiser="x", lines=["run.seed=0", "run.seed=1"]
    )
    ran: list[str] = []

    def fake(argv: list[str]) -> int:
        step = next(s for s in steps if s.argv == argv)
        ran.append(step.name)
        return 3 if step.name == "finetune:run.seed_0" else 0

    lines: list[str] = []
    status = run_chain(steps, log=tmp_path / "r" / "chain.txt", run=fake, echo=lines.append)
    assert status == {
        "denoiser": "done",
        "finetune:run.seed_0": "failed (exit 3)",
        "evaluate:run.seed_0": "skipped",
        "evaluate:run.seed_0-purified": "skipped",
        "finetune:run.seed_1": "done",
        "evaluate:run.seed_1": "done",
        "evaluate:run.seed_1-purified": "done",
        "compare": "done",
    }
    assert "evaluate:run.seed_0" not in ran and ran[-1] == "compare"
    assert "[3/8] evaluate:run.seed_0: skipped (needs finetune:run.seed_0)" in lines
    log = (tmp_path / "r" / "chain.txt").read_text().splitlines()
    assert [ln.split()[1:] for ln in log[:3]] == [
        ["denoiser", "started"],
        ["denoiser", "done"],
        ["finetune:run.seed_0", "started"],
    ]
    assert log[3].split()[1:] == ["finetune:run.seed_0", "failed_(exit_3)"]

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_chain(steps, log=tmp_path / "r" / "chain.txt", run=interrupted, echo=lines.append)
    assert (
        (tmp_path / "r" / "chain.txt").read_text().splitlines()[-1].endswith("denoiser interrupted")
    )


@pytest.mark.slow
def test_the_chain_runs_every_phase_and_a_rerun_resumes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "chain.py"),
        str(runs),
        "--pretrain", "trainer.max_epochs=1 trainer.limit_train_batches=3 data.image_size=8 "
        "model.width=4 monitor.views_figure=0",
        "--denoiser", "trainer.max_epochs=1 trainer.limit_train_batches=2 data.image_size=8",
        "--finetune", "trainer.max_epochs=1",
        "--evaluate", "tiny adv.sanity_checks=false perf.enabled=false",
        "--purify", "purifier.sampler=oneshot purifier.t_star=5",
        "--baseline", "encoder.backbone=convnet encoder.width=4 data=digits data.image_size=8 "
        "mode=full optim.encoder_lr_mult=1 trainer.max_epochs=1",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # The summary: each step, its outcome and its run directory.
    summary = first.stdout.split("chain summary:")[1]
    assert re.search(rf"\n  pretrain +done +{re.escape(str(runs / 'pretrain'))}\n", summary)
    assert re.search(rf"\n  compare +done +{re.escape(str(runs / 'compare'))}\n", summary)
    for run in ("pretrain", "denoiser", "finetune/run.seed_0", "evaluate/run.seed_0"):
        assert (runs / run / "metrics.json").is_file(), run
    purified = json.loads((runs / "evaluate" / "run.seed_0-purified" / "metrics.json").read_text())
    assert "test/acc_unpurified" in purified
    table = (runs / "compare" / "comparison.md").read_text()
    assert "run.seed_0-purified" in table
    # The supervised baseline, from random weights, evaluated bare and purified beside.
    baseline = json.loads((runs / "baseline" / "run.seed_0" / "classifier.json").read_text())
    assert baseline["encoder_run"] == "" and baseline["encoder"]["backbone"] == "convnet"
    assert (runs / "evaluate" / "baseline-run.seed_0-purified" / "report.md").is_file()
    assert "baseline-run.seed_0-purified" in table and "encoder.backbone" in table
    # Run again: every phase finds its run finished and returns at once.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (runs / "chain.txt").read_text().split("\n")
    assert sum(" done" in ln for ln in log) == 2 * 9


def test_every_phase_config_is_checked_before_anything_runs(tmp_path: Path) -> None:
    steps = plan_chain(
        tmp_path / "r",
        pretrain="trainer.max_epoch=1",
        denoiser="small_cifar10",
        finetune="subset.fraction=2",
        evaluate="tiny adv.linf_eps=[-8]",
    )
    errors = check_steps(steps)
    assert len(errors) == 4  # pretrain, finetune, and both evaluations; the denoiser is fine
    assert errors[0].startswith("pretrain: unknown config key 'trainer.max_epoch'")
    assert "did you mean 'trainer.max_epochs'" in errors[0]
    assert errors[1] == (
        "finetune:run.seed_0: invalid value 2.0 for 'subset.fraction': must be in (0, 1]"
    )
    assert all("invalid eps -8.0 in adv.linf_eps" in e for e in errors[2:])
    assert check_steps(plan_chain(tmp_path / "r", pretrain="", evaluate="quick")) == []
    # A baseline's encoder and data are checked too.
    for baseline, match in [
        ("encoder.backbone=convnet encoder.run=x", "set one"),
        ("encoder.backbone=resnet7", "encoder.backbone: unknown backbone 'resnet7'"),
    ]:
        steps = plan_chain(tmp_path / "r", pretrain="", baseline=baseline)
        (error,) = check_steps(steps)
        assert error.startswith("baseline:run.seed_0: ") and match in error
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chain.py"), str(tmp_path / "r"),
         "--pretrain", "", "--finetune", "subset.fraction=2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "subset.fraction" in res.stderr and "nothing ran" in res.stderr
    assert not (tmp_path / "r").exists()


def test_purify_shards_are_checked_as_the_array_tasks_run_them(tmp_path: Path) -> None:
    """slurm/pipeline.sh --purify-shards K submits K tasks with adv.shard=i: a setting that
    makes them fail (attacks off, more blocks than attacked images) is refused before anything
    is submitted, not after the fine-tuning."""
    den = tmp_path / "den"
    (den / "unet").mkdir(parents=True)
    (den / "unet" / "config.json").write_text("{}")
    plan = {"pretrain": "", "denoiser_run": den, "evaluate": "tiny"}
    steps = plan_chain(tmp_path / "r", **plan, purify_shards=3)  # type: ignore[arg-type]
    bare, purified = (s for s in steps if s.name.startswith("evaluate:"))
    assert "adv.shards=3" in _args(purified) and not any("adv.shards" in a for a in _args(bare))
    assert check_steps(steps) == []
    (error,) = check_steps(
        plan_chain(tmp_path / "r", **plan, purify="adv.enabled=false", purify_shards=3)  # type: ignore[arg-type]
    )
    assert error.startswith("evaluate:run.seed_0-purified: adv.shard=1 runs one block")
    (error,) = check_steps(
        plan_chain(tmp_path / "r", **plan, purify="adv.max_images=2", purify_shards=3)  # type: ignore[arg-type]
    )
    assert "adv.shards=3 splits the attacked images into more blocks than there are images" in error
    assert "set adv.shards in 1..2" in error
    with pytest.raises(ValueError, match=r"purify_shards \(3\) sets the purified evaluations"):
        plan_chain(tmp_path / "r", pretrain="", purify_shards=3)
    for option in ("evaluate", "purify"):
        with pytest.raises(ValueError, match=rf"{option} .* sets adv.shards, which the chain"):
            plan_chain(tmp_path / "r", **{**plan, option: "adv.shards=2"}, purify_shards=3)  # type: ignore[arg-type]
    assert plan_chain(tmp_path / "r", **{**plan, "purify": "adv.shards=2"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="purify_shards must be >= 1, got 0"):
        plan_chain(tmp_path / "r", **plan, purify_shards=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "args", "key"),
    [
        ("pretrain", "simclr_cifar10 run.dir=/elsewhere", "run.dir"),
        ("finetune", "linear_cifar10 encoder.run=/other/encoder", "encoder.run"),
        ("evaluate", "quick classifier.run=/some/classifier", "classifier.run"),
        ("purify", "purifier.run=/another/denoiser", "purifier.run"),
        ("baseline", "supervised_cifar10 data.like=/x", "data.like"),
        ("baseline", "supervised_cifar10 data.name=cifar100", "data.name"),
    ],
)
def test_keys_the_chain_sets_are_refused_in_the_phase_arguments(
    tmp_path: Path, option: str, args: str, key: str
) -> None:
    """They were silently overridden by the chain's own value."""
    den = tmp_path / "den"
    (den / "unet").mkdir(parents=True)
    (den / "unet" / "config.json").write_text("{}")
    plan: dict[str, object] = {"pretrain": "", "denoiser_run": den, option: args}
    with pytest.raises(ValueError, match=rf"{option} \(.*\) sets {key}, which the chain sets"):
        plan_chain(tmp_path / "r", **plan)  # type: ignore[arg-type]
    # A sweep line may name its own fine-tuning's run directory.
    lines = ["run.seed=0 run.dir=mine"]
    names = [step.name for step in plan_chain(tmp_path / "r", pretrain="", lines=lines)]
    assert "finetune:mine" in names


def test_existing_run_directories_are_checked_before_anything_runs(tmp_path: Path) -> None:
    """A step whose run directory holds another phase's run, or a checkpoint trained with other
    settings, would fail only when its job starts (hours into a SLURM chain): --check says so
    first."""
    import torch
    from omegaconf import OmegaConf

    from ssl_robust.config import SCHEMAS, load_config, to_dict

    runs = tmp_path / "r"
    steps = plan_chain(runs, pretrain="", denoiser="", finetune="")
    assert check_steps(steps) == []
    dirs = {s.name: Path(_value(s, "run.dir")) for s in steps if _value(s, "run.dir")}
    # The pretraining step's directory holds a denoiser run.
    den_cfg = load_config(SCHEMAS["denoiser"], [], job="denoiser")
    dirs["pretrain"].mkdir(parents=True)
    OmegaConf.save(den_cfg, dirs["pretrain"] / "config.yaml")
    # The denoiser step's holds a checkpoint of a denoiser trained at another learning rate.
    trained = to_dict(load_config(SCHEMAS["denoiser"], ["denoiser.lr=0.5"], job="denoiser"))
    (dirs["denoiser"] / "checkpoints").mkdir(parents=True)
    torch.save(
        {"epoch": 0, "ssl_robust_config": trained}, dirs["denoiser"] / "checkpoints/last.ckpt"
    )
    errors = check_steps(steps)
    assert len(errors) == 2, errors
    assert errors[0].startswith("pretrain: run.dir") and "holds a denoiser run" in errors[0]
    assert errors[1].startswith("denoiser: ") and "trained with other settings" in errors[1]
    assert "denoiser.lr: 0.5 ->" in errors[1]
