#!/usr/bin/env python
"""The whole chain on this machine, one phase after another, under one runs folder.

python scripts/chain.py runs/c10 \\
    --pretrain "simclr_cifar10 data.root=/data" --denoiser "ddpm_cifar10 data.root=/data" \\
    --finetune linear_cifar10 --sweep slurm/sweeps/finetune_fractions.txt \\
    --evaluate quick --purify "purifier.sampler=ddim purifier.ddim_steps=10"

The same steps and run directories as slurm/pipeline.sh (which submits them as SLURM jobs):
<runs>/pretrain, <runs>/denoiser, <runs>/finetune/<line>, <runs>/evaluate/<line>[-purified],
<runs>/compare; with --baseline also <runs>/baseline/<line> and
<runs>/evaluate/baseline-<line>[-purified]. A step whose prerequisite failed is skipped; the
comparison runs over whatever finished. Every phase resumes from its run directory, so the
same command again finishes only what is left. Steps and their outcomes are appended to
<runs>/chain.txt.
"""

import sys
from pathlib import Path

from ssl_robust.cli import ArgumentParser
from ssl_robust.pipelines.chain import (
    chain_env,
    check_steps,
    plan_chain,
    run_chain,
    sweep_lines,
)


def _run_dir(argv: list[str]) -> str:
    """The run directory a step's arguments name (the last run.dir=, or compare's --out)."""
    if "--out" in argv:
        return argv[argv.index("--out") + 1]
    dirs = [a.removeprefix("run.dir=") for a in argv if a.startswith("run.dir=")]
    return dirs[-1] if dirs else ""


def main() -> int:
    parser = ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Each phase option takes one quoted string: a preset and key=value overrides.",
    )
    parser.add_argument("runs", type=Path, help="the folder every phase writes under")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrain", metavar="ARGS", help="pretraining preset and overrides")
    source.add_argument("--encoder", type=Path, metavar="DIR", help="an existing pretraining run")
    purifier = parser.add_mutually_exclusive_group()
    purifier.add_argument("--denoiser", metavar="ARGS", help="denoiser preset and overrides")
    purifier.add_argument(
        "--denoiser-run", type=Path, metavar="DIR", help="an existing denoiser run"
    )
    parser.add_argument(
        "--finetune", default="", metavar="ARGS", help="fine-tuning preset and overrides"
    )
    parser.add_argument(
        "--sweep", type=Path, metavar="FILE", help="override lines, one fine-tuning each"
    )
    parser.add_argument(
        "--evaluate", default="", metavar="ARGS", help="evaluation preset and overrides"
    )
    parser.add_argument(
        "--purify", default="", metavar="ARGS", help="extra overrides of the purified evaluations"
    )
    parser.add_argument(
        "--purify-shards",
        type=int,
        default=1,
        metavar="K",
        help="split each purified evaluation's attacks into K blocks (adv.shards=K; "
        "slurm/pipeline.sh runs them as a K-task array)",
    )
    parser.add_argument(
        "--baseline",
        metavar="ARGS",
        help="a supervised baseline from random weights (fine-tuning preset and overrides, e.g. "
        "supervised_cifar10), trained for every sweep line (its mode=, run.dir= and "
        "encoder.run= words aside) and evaluated like the other classifiers",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check every phase's arguments and existing run directory, and exit "
        "(slurm/pipeline.sh does, before submitting)",
    )
    args = parser.parse_args()
    try:
        steps = plan_chain(
            args.runs,
            pretrain=args.pretrain,
            encoder=args.encoder.resolve() if args.encoder else None,
            denoiser=args.denoiser,
            denoiser_run=args.denoiser_run.resolve() if args.denoiser_run else None,
            finetune=args.finetune,
            lines=sweep_lines(args.sweep),
            evaluate=args.evaluate,
            purify=args.purify,
            purify_shards=args.purify_shards,
            baseline=args.baseline,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    errors = check_steps(steps)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        if not args.check:
            print("nothing ran", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(steps)} steps, every phase's arguments valid")
        return 0
    if args.dry_run:
        for i, step in enumerate(steps, start=1):
            after = f"   # after {', '.join(step.after)}" if step.after else ""
            print(f"[{i}/{len(steps)}] {step.name}: {' '.join(step.argv[1:])}{after}")
        return 0
    try:
        status = run_chain(
            steps,
            log=args.runs / "chain.txt",
            env=chain_env(args.runs),
            echo=lambda line: print(line, flush=True),  # before the phase's own output
        )
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print("\nchain summary:")
    width = max(map(len, status))
    dirs = {step.name: _run_dir(step.argv) for step in steps}
    for name, outcome in status.items():
        where = f"  {dirs[name]}" if dirs.get(name) else ""
        print(f"  {name:{width}s}  {outcome:18s}{where}")
    failed = [n for n, s in status.items() if s != "done"]
    if failed:
        print(
            f"not done: {', '.join(failed)}. Fix what stopped the failed steps (their errors "
            "are above, and in their run directories), then run the same command again: "
            "finished steps return at once",
            file=sys.stderr,
        )
        return 1
    print(f"comparison: {args.runs.resolve() / 'compare' / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
