#!/usr/bin/env python
"""The project's speed in one place: pretraining pipeline vs lightly and the compute floor,
purification per sampler vs raw UNet calls, corruption generation vs the CPU reference, the
OOD feature scores vs a float64 reference.

    python scripts/bench.py --json runs/bench/all.json             # full run (GPU if present)
    python scripts/bench.py --smoke                                # tiny CPU run for CI
    python scripts/bench.py --only pretrain purify                  # some parts only
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import corruption_bench, ood_bench, pretrain_bench, purify_bench  # noqa: E402
from ssl_robust.files import write_text_atomic  # noqa: E402

PARTS = ("pretrain", "purify", "corruptions", "ood")

if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU versions (seconds)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--json", type=Path, help="write every result here")
    a = p.parse_args()
    flag = ["--smoke"] if a.smoke else []
    mains = {
        "pretrain": pretrain_bench.main,
        "purify": purify_bench.main,
        "corruptions": corruption_bench.main,
        "ood": ood_bench.main,
    }
    results = {}
    for part in PARTS:
        if part not in a.only:
            continue
        try:
            results[part] = mains[part](flag)
        except Exception as err:  # one part's failure must not cost the parts after it
            traceback.print_exc()
            results[part] = {"error": repr(err)}
        if a.json:  # after every part, so a run stopped half-way keeps what it measured
            a.json.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(a.json, json.dumps(results, indent=2, default=str))
    if a.json:
        print(f"wrote {a.json}")
    failed = [part for part, r in results.items() if isinstance(r, dict) and "error" in r]
    if failed:
        print(f"error: benchmark parts failed: {', '.join(failed)} (tracebacks above)")
        sys.exit(1)
