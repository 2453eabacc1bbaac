"""Robustness evaluation: corruptions, attacks, calibration, OOD, latency and the report.

Numeric cores (pure functions of tensors): :mod:`corruptions`, :mod:`cifar_c`, :mod:`attacks`,
:mod:`metrics`, :mod:`ood`, :mod:`latency`. :mod:`report` turns a report dict into
``report.json``, ``report.md``, PNG plots and wandb tables. The job that runs them all on a
classifier (and optionally a purifier) is ``ssl_robust.pipelines.evaluate.evaluate``.
"""

from ssl_robust.evaluate.latency import measure_latency
from ssl_robust.evaluate.report import (
    METRIC_DOCS,
    describe_metric,
    expected_metric_keys,
    render_markdown,
    write_report,
)

__all__ = [
    "METRIC_DOCS",
    "describe_metric",
    "expected_metric_keys",
    "measure_latency",
    "render_markdown",
    "write_report",
]
