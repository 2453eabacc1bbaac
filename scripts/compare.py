#!/usr/bin/env python
"""Compare runs side by side: a table (Markdown + HTML) and plots over their metrics.

python scripts/compare.py runs/                              # every run directory below runs/
python scripts/compare.py runs/ft-* --out reports/ft --metrics test/acc shift/mean_acc
python scripts/compare.py runs/ --ce-reference runs/evaluate-supervised   # mCE against it
python scripts/compare.py --wandb-project ssl_robust --wandb-group c10-sweep --out reports/c10
"""

import sys

from ssl_robust.cli import ArgumentParser
from ssl_robust.compare import compare, unfinished_runs, wandb_runs

if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories or folders holding them")
    parser.add_argument(
        "--out",
        default="reports/compare",
        help="output folder: comparison.md, comparison.html and the plots (default: %(default)s)",
    )
    parser.add_argument("--metrics", nargs="+", help="metric columns (default: the standard ones)")
    parser.add_argument(
        "--title", default="Run comparison", help="the pages' title (default: %(default)s)"
    )
    parser.add_argument(
        "--ce-reference",
        help="an evaluation run directory: every evaluation's corruption errors (CE, mCE, "
        "relative mCE) against it",
    )
    parser.add_argument("--wandb-project", help="also gather this wandb project's runs (online)")
    parser.add_argument("--wandb-entity", default="")
    parser.add_argument("--wandb-group", help="only runs of this wandb group")
    args = parser.parse_args()
    if not args.runs and not args.wandb_project:
        parser.error("give run directories (or folders holding them), or --wandb-project")
    sources: list = list(args.runs)
    if args.wandb_project:
        filters = {"group": args.wandb_group} if args.wandb_group else None
        sources += wandb_runs(args.wandb_project, args.wandb_entity, filters)
    try:
        written = compare(sources, args.out, args.metrics, args.title, args.ce_reference)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    for path in unfinished_runs(args.runs):
        print(f"not compared (no results yet): {path}", file=sys.stderr)
