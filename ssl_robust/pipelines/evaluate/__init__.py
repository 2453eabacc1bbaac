"""The evaluation pipeline: a classifier (and optionally a purifier) -> report.json, report.md.

Sections, each switchable and shrinkable from the config: clean accuracy; CIFAR-10-C style
corruptions (generated on the fly on the device, or read from a released-layout folder);
PGD(-EOT) robust accuracy with re-scoring, AutoAttack for deterministic pipelines and the
sanity checks against gradient masking; calibration; OOD detection; latency and throughput. Every
section evaluates the deployed pipeline ``x in [0, 1] -> purifier -> classifier``.

The job (:func:`evaluate`) runs the sections in order; each section lives in its own module:
``setup`` (config checks, data, the pipeline), ``units`` (stored work and prediction passes),
``shift``, ``adversarial``, ``calibration``, ``ood`` and ``examples``.
"""

from ssl_robust.pipelines.evaluate.adversarial import merge_pgd_shards, shard_block
from ssl_robust.pipelines.evaluate.job import evaluate
from ssl_robust.pipelines.evaluate.ood import knn_neighbour
from ssl_robust.pipelines.evaluate.setup import (
    Pipeline,
    check_config,
    natural_set_names,
    ood_set_names,
)
from ssl_robust.pipelines.evaluate.shift import load_ce_reference
from ssl_robust.pipelines.evaluate.units import pgd_unit

__all__ = [
    "Pipeline",
    "check_config",
    "evaluate",
    "knn_neighbour",
    "load_ce_reference",
    "merge_pgd_shards",
    "natural_set_names",
    "ood_set_names",
    "pgd_unit",
    "shard_block",
]
