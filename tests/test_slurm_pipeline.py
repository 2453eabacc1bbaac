"""``slurm/pipeline.sh``: the whole chain as dependent SLURM jobs.

The dry run (no cluster needed) checks what would be submitted: every job's template, run
directory and dependency. The slow test submits a CPU-sized chain to CI's private two-node
cluster and checks that every phase ran in order and the comparison gathered them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY_PRETRAIN
from tests.slurm_utils import job_env, job_status

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "slurm" / "pipeline.sh"


def _pipeline(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PIPELINE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


def _dry_run(
    *args: str, cwd: Path | None = None
) -> list[tuple[int, str, dict[str, str], list[str]]]:
    """(job id, template, sbatch options, script arguments) of each job a dry run prints."""
    res = _pipeline(*args, "--dry-run", cwd=cwd)
    assert res.returncode == 0, res.stderr
    jobs = []
    for line in res.stdout.splitlines():
        words = line.split("   # job ")
        command, job = shlex.split(words[0]), int(words[1])  # the words as sbatch gets them
        start = command.index("sbatch") + 1
        template = next(i for i, w in enumerate(command) if w.endswith(".sbatch"))
        options = dict(w[2:].split("=", 1) for w in command[start:template])
        jobs.append((job, Path(command[template]).name, options, command[template + 1 :]))
    return jobs


def test_dry_run_wires_every_phase_to_what_it_needs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# fractions\nsubset.fraction=0.1 run.seed=0\n\nsubset.fraction=1.0\n")
    runs = tmp_path / "runs"
    jobs = _dry_run(
        str(runs),
        "--pretrain", "simclr_cifar10 data.root=/data",
        "--denoiser", "ddpm_cifar10 data.root=/data",
        "--finetune", "linear_cifar10",
        "--sweep", str(sweep),
        "--evaluate", "quick",
        "--purify", "purifier.sampler=ddim",
        "--sbatch", "--partition=gpu",
    )  # fmt: skip
    assert not runs.exists()  # a dry run writes nothing
    ids = {name: job for job, name, _, _ in jobs}
    by_template: dict[str, list] = {}
    for job in jobs:
        assert job[2]["partition"] == "gpu"  # --sbatch reaches every job
        by_template.setdefault(job[1], []).append(job)
    pre, den = by_template["pretrain.sbatch"][0], by_template["denoiser.sbatch"][0]
    assert pre[3] == ["simclr_cifar10", "data.root=/data", f"run.dir={runs}/pretrain"]
    assert "dependency" not in pre[2] and "dependency" not in den[2]  # side by side
    ft = by_template["finetune_array.sbatch"][0]
    assert ft[2]["array"] == "1-2"  # the comment and the blank line are not lines
    assert ft[2]["dependency"] == f"afterok:{pre[0]}"
    assert ft[3] == ["linear_cifar10", f"encoder.run={runs}/pretrain"]
    evals = by_template["evaluate.sbatch"]
    assert len(evals) == 4  # two classifiers, bare and purified
    names = ["subset.fraction_0.1_run.seed_0", "subset.fraction_1.0"]
    for k, (_, _, options, args) in enumerate(evals):
        name, purified = names[k // 2], k % 2 == 1
        assert options["kill-on-invalid-dep"] == "yes"
        assert args[0] == "quick" and f"classifier.run={runs}/finetune/{name}" in args
        if purified:
            assert options["dependency"] == f"afterok:{ft[0]}_{k // 2 + 1}:{den[0]}"
            assert f"purifier.run={runs}/denoiser" in args and "purifier.sampler=ddim" in args
            assert args[-1] == f"run.dir={runs}/evaluate/{name}-purified"
        else:
            assert options["dependency"] == f"afterok:{ft[0]}_{k // 2 + 1}"
            assert not any(a.startswith("purifier.") for a in args)
            assert args[-1] == f"run.dir={runs}/evaluate/{name}"
    compare = by_template["compare.sbatch"][0]
    assert compare[2]["dependency"] == "afterany:" + ":".join(str(e[0]) for e in evals)
    assert compare[3] == [str(runs), "--out", f"{runs}/compare"]
    assert ids["compare.sbatch"] == max(ids.values())  # submitted last


def test_existing_runs_are_used_as_they_are(tmp_path: Path) -> None:
    enc, den = tmp_path / "enc", tmp_path / "den"
    (enc).mkdir()
    (enc / "encoder.safetensors").write_bytes(b"")
    (den / "unet").mkdir(parents=True)
    (den / "unet" / "config.json").write_text("{}")
    jobs = _dry_run(str(tmp_path / "runs"), "--encoder", str(enc), "--denoiser-run", str(den))
    assert [j[1] for j in jobs] == [
        "finetune_array.sbatch",
        "evaluate.sbatch",
        "evaluate.sbatch",
        "compare.sbatch",
    ]
    assert "dependency" not in jobs[0][2] and jobs[0][3] == [f"encoder.run={enc}"]
    assert jobs[2][2]["dependency"] == f"afterok:{jobs[0][0]}_1"  # no denoiser job to wait for
    assert f"purifier.run={den}" in jobs[2][3]


def test_paths_given_from_another_folder_are_made_absolute(tmp_path: Path) -> None:
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(b"")
    jobs = _dry_run("runs", "--encoder", "./enc", cwd=tmp_path)
    assert jobs[0][3] == [f"encoder.run={tmp_path}/enc"]
    assert jobs[1][3][-1] == f"run.dir={tmp_path}/runs/evaluate/run.seed_0"
    assert jobs[-1][3] == [f"{tmp_path}/runs", "--out", f"{tmp_path}/runs/compare"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], r"give --pretrain ARGS .* or --encoder"),
        (["--pretrain", "x", "--encoder", "y"], "give --pretrain or --encoder, not both"),
        (["--encoder", "/nonexistent"], r"no encoder in '/nonexistent'"),
        (["--pretrain", "x", "--denoiser-run", "/nope"], r"no denoiser in '/nope'"),
        (["--pretrain", "x", "--sweep", "/nope.txt"], "no sweep file '/nope.txt'"),
        (["--pretrain", "x", "--bogus"], r"unknown option '--bogus'; valid: --pretrain"),
    ],
)
def test_bad_arguments_fail_before_submitting(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = _pipeline(str(tmp_path / "runs"), *args)
    assert res.returncode == 2 and re.search(message, res.stderr), res.stderr
    assert not (tmp_path / "runs").exists()
    assert res.stdout == ""


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.timeout(900)
def test_the_chain_runs_in_order_on_a_cluster(tmp_path: Path, jobs: list[int]) -> None:
    runs = tmp_path / "runs"
    cpu = "trainer.accelerator=cpu trainer.progress_bar=false data.num_workers=0"
    sbatch = (
        "--nodes=1 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --time=10 "
        f"--output={tmp_path}/slurm-%j.out"
    )
    res = _pipeline(
        str(runs),
        "--pretrain", " ".join(TINY_PRETRAIN),
        "--denoiser",
        f"{cpu} data.image_size=8 data.batch_size=64 denoiser.unet=tiny denoiser.warmup_steps=2 "
        "trainer.max_epochs=2 trainer.limit_train_batches=3 samples.n=4 samples.steps=2",
        "--finetune", cpu,
        "--evaluate", "tiny",
        "--purify", "purifier.sampler=ddim purifier.t_star=20 purifier.ddim_steps=2",
        "--purify-shards", "2",
        "--sbatch", sbatch,
        env=job_env(
            {
                "SSL_ROBUST_ROOT": str(ROOT),
                "PYTHON": sys.executable,
                "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1",
            }
        ),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    submitted = [line.split() for line in (runs / "jobs.txt").read_text().splitlines()]
    jobs.extend(int(j) for _, _, j in submitted)
    names = [name for _, name, _ in submitted]
    assert names == [
        "pretrain",
        "denoiser",
        "finetune",
        "evaluate:run.seed_0",
        "evaluate:run.seed_0-purified:shards",
        "evaluate:run.seed_0-purified",
        "compare",
    ]
    compare_job = jobs[-1]
    deadline = time.monotonic() + 780
    while (state := job_status(compare_job)["state"]) not in {"COMPLETED", "FAILED", "CANCELLED"}:
        assert time.monotonic() < deadline, f"compare job still {state}"
        time.sleep(2.0)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))
    states = {name: job_status(int(job))["state"] for _, name, job in submitted}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs[-6000:]}"
    # One wandb group, the chain's folder, in every job (the shards' array has two tasks).
    assert logs.count("group runs\n") == len(submitted) + 1

    # Each phase read what the one before it wrote.
    bare = json.loads((runs / "evaluate" / "run.seed_0" / "report.json").read_text())
    purified = json.loads((runs / "evaluate" / "run.seed_0-purified" / "report.json").read_text())
    ft = runs / "finetune" / "run.seed_0"
    assert OmegaConf.load(runs / "evaluate" / "run.seed_0" / "config.yaml").classifier.run == str(
        ft
    )
    assert bare["meta"].get("purifier") is None
    assert purified["meta"]["purifier"].startswith(f"{runs}/denoiser (ddim")
    # Its attacks ran as a two-task array, one block of the attacked images each, merged.
    blocks = runs / "evaluate" / "run.seed_0-purified" / "partial" / "adv" / "linf_8" / "pgd"
    assert sorted(p.name for p in blocks.iterdir()) == [
        "shard-1-of-2.safetensors", "shard-2-of-2.safetensors"
    ]  # fmt: skip
    assert "PGD shard 1 of 2" in logs and "PGD shard 2 of 2" in logs
    assert purified["metrics"]["adv/linf_8/n"] == 32  # the tiny preset's attacked images
    assert OmegaConf.load(ft / "config.yaml").encoder.run == f"{runs}/pretrain"
    # The evaluations started only after their fine-tuning had finished.
    finished_ft = (ft / "classifier.safetensors").stat().st_mtime
    assert (runs / "evaluate" / "run.seed_0" / "config.yaml").stat().st_mtime >= finished_ft
    tables = (runs / "compare" / "comparison.md").read_text()
    assert "run.seed_0-purified" in tables and "pretrain" in tables


def test_a_refused_submission_names_the_jobs_already_submitted(tmp_path: Path) -> None:
    """sbatch accepts two jobs and refuses the third: the chain stops, says which jobs are in
    the queue already and how to cancel them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    count = tmp_path / "count"
    fake = bin_dir / "sbatch"
    fake.write_text(
        "#!/bin/bash\n"
        f"n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}\n"
        'if [ $n -ge 3 ]; then echo "sbatch: error: Invalid partition name" >&2; exit 1; fi\n'
        'echo "$((100 + n));cluster"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = _pipeline(
        str(tmp_path / "runs"),
        "--pretrain",
        "simclr_cifar10",
        "--denoiser",
        "small_cifar10",
        env=env,
    )
    assert res.returncode == 1
    assert "sbatch: error: Invalid partition name" in res.stderr
    assert "error: sbatch refused finetune_array.sbatch" in res.stderr
    assert "Already submitted: 101 102; cancel them with: scancel 101 102" in res.stderr
    jobs = (tmp_path / "runs" / "jobs.txt").read_text().split()
    assert jobs[1:3] == ["pretrain", "101"] and jobs[4:6] == ["denoiser", "102"]


def test_a_sweep_without_override_lines_fails_before_writing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# only a comment\n\n")
    res = _pipeline(str(tmp_path / "runs"), "--pretrain", "x", "--sweep", str(sweep))
    assert res.returncode == 2 and f"the sweep file '{sweep}' has no override" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_purified_evaluations_split_their_attacks_over_an_array(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    jobs = _dry_run(
        str(runs), "--pretrain", "simclr_cifar10", "--denoiser", "ddpm_cifar10",
        "--evaluate", "diffpure", "--purify-shards", "4",
    )  # fmt: skip
    evals = [j for j in jobs if j[1] == "evaluate.sbatch"]
    bare, shards, merge = evals
    assert "array" not in bare[2] and not any(a.startswith("adv.shards") for a in bare[3])
    assert shards[2]["array"] == "1-4" and "adv.shards=4" in shards[3]
    assert merge[2]["dependency"] == f"afterok:{shards[0]}"  # every task of the array
    assert "array" not in merge[2] and merge[3] == shards[3]  # the same config, merged
    compare = next(j for j in jobs if j[1] == "compare.sbatch")
    assert compare[2]["dependency"] == f"afterany:{bare[0]}:{merge[0]}"
    res = _pipeline(str(runs), "--pretrain", "x", "--purify-shards", "x", "--dry-run")
    assert res.returncode == 2 and "--purify-shards takes a number >= 1, got 'x'" in res.stderr


def test_bad_phase_arguments_are_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # PYTHON: the interpreter that checks (this one, which imports the package); an sbatch
    # that leaves a mark if it is ever called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\ntouch {tmp_path}/submitted\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = _pipeline(
        str(runs), "--pretrain", "simclr_cifar10", "--evaluate", "quick adv.linf_eps=[-8]",
        env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "error: evaluate:run.seed_0: invalid eps -8.0 in adv.linf_eps" in res.stderr
    assert res.stderr.rstrip().endswith("nothing submitted")
    assert not runs.exists() and not (tmp_path / "submitted").exists()


def test_purify_shards_that_the_array_tasks_would_refuse_are_refused_before_submitting(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHON": sys.executable}
    res = _pipeline(
        str(runs), "--pretrain", "simclr_cifar10", "--denoiser", "ddpm_cifar10",
        "--evaluate", "quick adv.max_images=2", "--purify-shards", "3", "--dry-run", env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "error: evaluate:run.seed_0-purified: adv.shards=3 splits the attacked" in res.stderr
    assert res.stderr.rstrip().endswith("nothing submitted") and not runs.exists()
    # Without a denoiser there are no purified evaluations to split (before: silently ignored).
    res = _pipeline(str(runs), "--pretrain", "x", "--purify-shards", "3", "--dry-run", env=env)
    assert res.returncode == 2 and "--purify-shards splits the purified" in res.stderr
    res = _pipeline(str(runs), "--pretrain", "x", "--purify", "purifier.t_star=5", env=env)
    assert res.returncode == 2 and "--purify sets the purified evaluations" in res.stderr
