"""The whole chain on one machine, one phase after another: what ``slurm/pipeline.sh`` submits
as dependent SLURM jobs, with the same run directories under one runs folder:

    <runs>/pretrain                      pretraining (or an existing encoder run)
    <runs>/denoiser                      denoiser training (or an existing denoiser run)
    <runs>/finetune/<line>               one fine-tuning per sweep line
    <runs>/baseline/<line>               the supervised baseline per sweep line (optional)
    <runs>/evaluate/<line>[-purified]    each classifier bare, and behind the purifier
    <runs>/evaluate/baseline-<line>[-purified]
    <runs>/compare                       the side-by-side tables and plots

Each phase runs as its own process (its script under ``scripts/``), as a SLURM job would, so a
phase that fails leaves the others' state alone. A step whose prerequisite failed is skipped,
the comparison runs over whatever finished, and every phase resumes from its run directory:
running the same command again after a failure or an interruption finishes only what is left.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "Step",
    "baseline_line",
    "chain_env",
    "check_steps",
    "plan_chain",
    "run_chain",
    "run_name",
    "sweep_lines",
]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Step:
    """One phase of the chain.

    Attributes:
        name: ``pretrain``, ``denoiser``, ``finetune:<line>``, ``evaluate:<line>[-purified]``
            or ``compare``.
        argv: The command (a script of ``scripts/`` and its arguments).
        after: Steps that must succeed first.
        always: Run once the steps in ``after`` have ended, whatever their outcome.
    """

    name: str
    argv: list[str]
    after: list[str] = field(default_factory=list)
    always: bool = False


def run_name(line: str) -> str:
    """The run directory name of a sweep line, as ``slurm/finetune_array.sbatch`` makes it:
    every character outside ``A-Za-z0-9._-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", line)


def sweep_lines(path: Path | None) -> list[str]:
    """The override lines of a sweep file (blank and ``#`` lines dropped); one line,
    ``run.seed=0``, without a file."""
    if path is None:
        return ["run.seed=0"]
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file '{path}'")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"the sweep file '{path}' has no override lines")
    return lines


def baseline_line(line: str) -> str:
    """A sweep line as the supervised baseline runs it: without its ``mode=``, ``run.dir=``
    and ``encoder.run=`` words (the baseline's own arguments say how it trains, it has its own
    folder and no encoder), split and quoted again as the shell does (as the fine-tuning line
    is); ``run.seed=0`` when nothing is left."""
    words = [
        w for w in shlex.split(line) if not w.startswith(("mode=", "run.dir=", "encoder.run="))
    ]
    return shlex.join(words) or "run.seed=0"


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]


# Keys each option's arguments may not set: the chain sets them (a value given there was
# silently overridden).
_SET_BY_CHAIN = {
    "pretrain": ("run.dir",),
    "denoiser": ("run.dir",),
    "finetune": ("run.dir", "encoder.run"),
    "evaluate": ("run.dir", "classifier.run", "purifier.run"),
    "purify": ("run.dir", "classifier.run", "purifier.run"),
    "baseline": ("run.dir", "data.like", "data.name"),
}
_SET_BY_CHAIN_WHY = {
    "run.dir": "each phase's run directory lies under the runs folder; a sweep line may set "
    "its own fine-tuning's",
    "encoder.run": "the pretraining run, or --encoder",
    "classifier.run": "each fine-tuned classifier in turn",
    "purifier.run": "the denoiser run, or --denoiser-run",
    "data.like": "the encoder's data",
    "data.name": "the encoder's data, through data.like",
    "adv.shards": "--purify-shards",
}


def plan_chain(
    runs: Path,
    *,
    pretrain: str | None = None,
    encoder: Path | None = None,
    denoiser: str | None = None,
    denoiser_run: Path | None = None,
    finetune: str = "",
    lines: Sequence[str] = ("run.seed=0",),
    evaluate: str = "",
    purify: str = "",
    purify_shards: int = 1,
    baseline: str | None = None,
) -> list[Step]:
    """The steps of a chain, in an order that respects their prerequisites.

    Args:
        runs: The runs folder every phase writes under.
        pretrain: Pretraining preset and overrides (one string); or ``encoder``.
        encoder: An existing pretraining run directory.
        denoiser: Denoiser preset and overrides; or ``denoiser_run``; with neither, the
            classifiers are evaluated bare only.
        denoiser_run: An existing denoiser run (or diffusers UNet folder).
        finetune: Fine-tuning preset and overrides, for every sweep line.
        lines: Override lines, one fine-tuning each (after ``finetune``; a line's ``run.dir``
            wins).
        evaluate: Evaluation preset and overrides, for every evaluation.
        purify: Extra overrides of the purified evaluations.
        purify_shards: Blocks the purified evaluations' attacks are split into
            (``adv.shards``; slurm/pipeline.sh runs one array task per block, then the merge;
            here one run does every block, with the same results).
        baseline: Fine-tuning preset and overrides of a supervised baseline (a backbone from
            random weights, e.g. ``supervised_cifar10``), run for every distinct
            :func:`baseline_line` of the sweep on the encoder's data and split (``data.like``;
            so after pretraining) and evaluated like the other classifiers.

    Raises:
        ValueError: Both or neither of ``pretrain`` / ``encoder``; both ``denoiser`` and
            ``denoiser_run``; ``purify`` or ``purify_shards`` > 1 without either; an existing
            run that holds no encoder or denoiser.
    """
    if (pretrain is None) == (encoder is None):
        raise ValueError(
            "give pretrain (e.g. 'simclr_cifar10 data.root=/data') or encoder (a pretraining "
            "run directory), exactly one"
        )
    if denoiser is not None and denoiser_run is not None:
        raise ValueError("give denoiser or denoiser_run, not both")
    if purify_shards < 1:
        raise ValueError(f"purify_shards must be >= 1, got {purify_shards}")
    phase_args = {"pretrain": pretrain, "denoiser": denoiser, "finetune": finetune,
             "evaluate": evaluate, "purify": purify, "baseline": baseline}  # fmt: skip
    for option, args in phase_args.items():
        words = shlex.split(args or "")
        # With purify_shards the chain sets the purified evaluations' adv.shards too.
        sharded = ("adv.shards",) if purify_shards > 1 and option in ("evaluate", "purify") else ()
        for key in (*_SET_BY_CHAIN[option], *sharded):
            if any(w.startswith(f"{key}=") for w in words):
                raise ValueError(
                    f"{option} ({args!r}) sets {key}, which the chain sets for every "
                    f"{option} step ({_SET_BY_CHAIN_WHY[key]}); leave it out"
                )
    purifying = [
        ("purify", purify, bool(purify.strip())),
        ("purify_shards", purify_shards, purify_shards > 1),
    ]
    for what, value, given in purifying:
        if given and denoiser is None and denoiser_run is None:
            raise ValueError(
                f"{what} ({value!r}) sets the purified evaluations, and without a denoiser "
                "there are none: give denoiser (a preset to train) or denoiser_run (a trained one)"
            )
    if encoder is not None and not (encoder / "encoder.safetensors").is_file():
        raise ValueError(
            f"no encoder in '{encoder}' (expected encoder.safetensors from a finished "
            "pretraining run)"
        )
    if denoiser_run is not None and not any(
        (denoiser_run / p).is_file() for p in ("unet/config.json", "config.json")
    ):
        raise ValueError(
            f"no denoiser in '{denoiser_run}' (expected a denoiser run with unet/, or a "
            "diffusers UNet folder)"
        )
    runs = runs.resolve()
    steps: list[Step] = []
    needs_encoder: list[str] = []
    if pretrain is not None:
        encoder = runs / "pretrain"
        steps.append(
            Step("pretrain", _script("pretrain", *shlex.split(pretrain), f"run.dir={encoder}"))
        )
        needs_encoder = ["pretrain"]
    needs_denoiser: list[str] = []
    if denoiser is not None:
        denoiser_run = runs / "denoiser"
        steps.append(
            Step(
                "denoiser",
                _script("train_denoiser", *shlex.split(denoiser), f"run.dir={denoiser_run}"),
            )
        )
        needs_denoiser = ["denoiser"]
    assert encoder is not None
    evals: list[str] = []

    def evaluations(name: str, classifier: Path, after: list[str]) -> None:
        """The classifier evaluated bare, and behind the purifier when there is one."""
        common = [*shlex.split(evaluate), f"classifier.run={classifier}"]
        steps.append(
            Step(
                f"evaluate:{name}",
                _script("evaluate", *common, f"run.dir={runs / 'evaluate' / name}"),
                after=after,
            )
        )
        evals.append(steps[-1].name)
        if denoiser_run is not None:
            steps.append(
                Step(
                    f"evaluate:{name}-purified",
                    _script(
                        "evaluate",
                        *common,
                        f"purifier.run={denoiser_run}",
                        *shlex.split(purify),
                        *([f"adv.shards={purify_shards}"] if purify_shards > 1 else []),
                        f"run.dir={runs / 'evaluate' / f'{name}-purified'}",
                    ),
                    after=[*after, *needs_denoiser],
                )
            )
            evals.append(steps[-1].name)

    for line in lines:
        words = shlex.split(line)
        name = run_name(line)
        classifier = runs / "finetune" / name
        for w in words:
            if w.startswith("run.dir="):
                classifier = Path(w.removeprefix("run.dir=")).resolve()
                name = classifier.name
        own_dir = [] if any(w.startswith("run.dir=") for w in words) else [f"run.dir={classifier}"]
        ft = f"finetune:{name}"
        steps.append(
            Step(
                ft,
                _script(
                    "finetune", *shlex.split(finetune), f"encoder.run={encoder}", *words, *own_dir
                ),
                after=list(needs_encoder),
            )
        )
        evaluations(name, classifier, [ft])
    if baseline is not None:
        for line in dict.fromkeys(baseline_line(ln) for ln in lines):
            name = run_name(line)
            classifier = runs / "baseline" / name
            # The encoder's data and split (data.like), whatever data the baseline's preset names.
            same_data = ["data.name=", f"data.like={encoder}"]
            argv = [*shlex.split(baseline), *same_data, *shlex.split(line), f"run.dir={classifier}"]
            steps.append(Step(f"baseline:{name}", _script("finetune", *argv), list(needs_encoder)))
            evaluations(f"baseline-{name}", classifier, [f"baseline:{name}"])
    steps.append(
        Step("compare", _script("compare", str(runs), "--out", str(runs / "compare")), evals, True)
    )
    return steps


# The job of each phase script (its config schema and presets).
_JOBS = {"pretrain": "pretrain", "train_denoiser": "denoiser", "finetune": "finetune",
         "evaluate": "evaluate"}  # fmt: skip


def check_steps(steps: Sequence[Step]) -> list[str]:
    """Every step's config built as its job would build it (presets, keys, types, ranges; the
    evaluation's value lists too), and its run directory checked as the job checks it (another
    phase's run, a checkpoint trained with other settings), before anything runs: a typo in the
    evaluation's arguments should not wait for hours of pretraining to show. Returns
    ``<step>: <error>`` lines."""
    from ssl_robust.config import SCHEMAS, ConfigError, load_config

    errors = []
    for step in steps:
        job = _JOBS.get(Path(step.argv[1]).stem)
        if job is None:
            continue
        try:
            cfg = load_config(SCHEMAS[job], step.argv[2:], job=job)
            if job == "evaluate":
                from ssl_robust.pipelines.evaluate.setup import check_config, check_shards

                check_config(cfg)
                if cfg.adv.shards > 1:
                    # As an array task of slurm/pipeline.sh runs it (one block), and whether
                    # every block holds an attacked image (when adv.max_images caps them; the
                    # evaluation set's size is known only when the job runs).
                    shard = [*step.argv[2:], "adv.shard=1"]
                    check_config(load_config(SCHEMAS[job], shard, job=job))
                    if cfg.adv.max_images > 0:
                        check_shards(cfg, int(cfg.adv.max_images))
            elif job == "finetune":
                from ssl_robust.pipelines.finetune import check_config as check_finetune

                check_finetune(cfg)
            elif job == "pretrain":
                from ssl_robust.pipelines.pretrain import check_config as check_pretrain

                check_pretrain(cfg)
            elif job == "denoiser":
                from ssl_robust.pipelines.denoiser import check_config as check_denoiser

                check_denoiser(cfg)
            if cfg.run.dir:  # the chain sets it for every phase
                _check_run_dir(Path(str(cfg.run.dir)), job, cfg)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            errors.append(f"{step.name}: {err}")
    return errors


def _check_run_dir(run_dir: Path, job: str, cfg: Any) -> None:
    """What the job checks of an existing run directory before it writes (each training job's
    own ``check_run_dir``; the evaluation resumes its units by its own fingerprint, checked
    when it runs, so only whose run the directory holds)."""
    if job == "pretrain":
        from ssl_robust.pipelines.pretrain import check_run_dir
    elif job == "denoiser":
        from ssl_robust.pipelines.denoiser import check_run_dir
    elif job == "finetune":
        from ssl_robust.pipelines.finetune import check_run_dir
    else:
        from ssl_robust.pipelines.common import check_phase

        check_phase(run_dir, job)
        return
    check_run_dir(run_dir, cfg)


def run_chain(
    steps: Sequence[Step],
    log: Path | None = None,
    run: Callable[[list[str]], int] | None = None,
    echo: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Run the steps in order; returns name -> ``done``, ``failed (exit N)`` or ``skipped``.

    A step runs when every step in its ``after`` is done (or, with ``always``, has ended
    either way); otherwise it is skipped. Each start and end is appended to ``log``.

    Args:
        steps: From :func:`plan_chain`.
        log: A file to append ``<time> <step> <status>`` lines to.
        run: Runs a command and returns its exit status (default: a subprocess that shares
            this process's terminal).
        echo: Where the progress lines go.
        env: The environment of the default runner's processes (default: this one's).
    """
    runner = run or (lambda argv: subprocess.call(argv, env=env))
    status: dict[str, str] = {}

    def note(name: str, what: str) -> None:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(
                    f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {name} {what}\n"
                )

    for i, step in enumerate(steps, start=1):
        blocked = [a for a in step.after if status.get(a) != "done"]
        if blocked and not step.always:
            status[step.name] = "skipped"
            echo(f"[{i}/{len(steps)}] {step.name}: skipped (needs {', '.join(blocked)})")
            note(step.name, "skipped")
            continue
        echo(f"[{i}/{len(steps)}] {step.name}: {shlex.join(step.argv[1:])}")
        note(step.name, "started")
        start = time.perf_counter()
        try:
            code = runner(step.argv)
        except KeyboardInterrupt:
            note(step.name, "interrupted")
            raise
        took = time.perf_counter() - start
        status[step.name] = "done" if code == 0 else f"failed (exit {code})"
        echo(f"[{i}/{len(steps)}] {step.name}: {status[step.name]} after {took:.0f} s")
        note(step.name, status[step.name].replace(" ", "_"))
    return status


def chain_env(runs: Path) -> dict[str, str]:
    """The environment of the phases: one wandb group for the whole chain, the runs folder's
    name (unless WANDB_RUN_GROUP is set), as ``slurm/pipeline.sh`` does."""
    env = dict(os.environ)
    env.setdefault("WANDB_RUN_GROUP", runs.resolve().name)
    return env
