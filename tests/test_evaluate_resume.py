"""Resuming the evaluation job: finished units are stored in ``partial/`` and never recomputed,
a resumed run ends with the numbers of an uninterrupted one, and stale or broken units are not
reused."""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from ssl_robust.config import ConfigError, EvaluateConfig, load_config
from ssl_robust.evaluate.store import STALE_TMP_S, read_unit
from ssl_robust.finetune.export import load_classifier, save_classifier
from ssl_robust.models.export import EncoderMeta
from tests.helpers import metric_numbers, unit_stamps

# The tiny preset's 2 x 2 grid on 128 images, two threats (one per norm) and their sanity checks;
# no latency section (timings only).
SMALL = [
    "eval.max_images=128",
    "adv.linf_eps=[8]",
    "adv.l2_eps=[0.5]",
    "adv.steps=3",
    "adv.max_images=16",
    "adv.sanity_images=8",
    "perf.enabled=false",
]
# A stochastic purifier in front, so every unit draws noise: a unit computed after a resume
# matches only if it reseeds its own random streams.
PURIFIED = [
    "purifier.sampler=ddim",
    "purifier.t_star=20",
    "purifier.ddim_steps=2",
    "eval.max_images=48",
    "adv.steps=1",
    "adv.eot=1",
    "adv.rescore_draws=2",
    "adv.max_images=8",
    "adv.sanity_images=4",
    "adv.sanity_queries=4",
    "adv.sanity_linf_eps=[8]",
    "adv.sanity_l2_eps=[0.5]",
]
# The modules whose expensive calls are counted (the job's sections import them by name).
shift_mod = importlib.import_module("ssl_robust.pipelines.evaluate.shift")
adv_mod = importlib.import_module("ssl_robust.pipelines.evaluate.adversarial")
job = importlib.import_module("ssl_robust.pipelines.evaluate.job")
UNITS = [
    "clean",
    "shift/impulse_noise/1",
    "shift/impulse_noise/5",
    "shift/contrast/1",
    "shift/contrast/5",
    "adv/linf_8/pgd",
    "adv/l2_0.5/pgd",
    "adv/sanity/linf",
    "adv/sanity/l2",
    "features/bank",  # the OOD feature scores' bank, computed last
]


class Preempted(Exception):
    """Stands for SLURM preemption or a crash in the middle of a section."""


class Calls:
    """Counts the calls of a function of the evaluation pipeline; raises on call ``fail_at``
    (1-based) before doing any of its work."""

    def __init__(self, fn: Callable[..., Any], fail_at: int | None) -> None:
        self.fn = fn
        self.fail_at = fail_at
        self.done = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_at is not None and self.done + 1 == self.fail_at:
            raise Preempted
        self.done += 1
        return self.fn(*args, **kwargs)


def _count(monkeypatch: pytest.MonkeyPatch, fail: dict[str, int] | None = None) -> dict[str, Calls]:
    """Counts the expensive work per unit: a generated corruption cell, a threat's PGD, a
    norm's sanity checks. ``fail`` maps one of those names to the call that raises."""
    fail = fail or {}
    calls = {}
    for name, module in (
        ("generate", shift_mod),
        ("robust_accuracy", adv_mod),
        ("sanity_checks", adv_mod),
    ):
        calls[name] = Calls(getattr(module, name), fail.get(name))
        monkeypatch.setattr(module, name, calls[name])
    return calls


def _done(calls: dict[str, Calls]) -> tuple[int, int, int]:
    return calls["generate"].done, calls["robust_accuracy"].done, calls["sanity_checks"].done


def evaluate_counted(
    cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, fail: dict[str, int] | None = None
) -> tuple[dict[str, float], tuple[int, int, int]]:
    """Runs the job, counting the units it computes (or raising Preempted where asked)."""
    with monkeypatch.context() as m:
        calls = _count(m, fail)
        metrics = job.evaluate(cfg)
    return metrics, _done(calls)


def _report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture
def cfg_for(classifier_run: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """``cfg_for("a", *overrides)``: the tiny preset on the classifier, in tmp_path / "a"."""

    def make(run: str, *overrides: str) -> DictConfig:
        args = ["tiny", f"classifier.run={classifier_run}", f"run.dir={tmp_path / run}"]
        return load_config(EvaluateConfig, [*args, *SMALL, *overrides], job="evaluate")

    return make


def test_interrupted_runs_resume_to_the_uninterrupted_numbers(
    cfg_for: Callable[..., DictConfig],
    denoiser_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = [f"purifier.run={denoiser_run}", *PURIFIED]
    reference = evaluate_counted(cfg_for("reference", *overrides), monkeypatch)
    assert reference[1] == (4, 2, 2)
    cfg = cfg_for("resumed", *overrides)
    run = Path(cfg.run.dir)
    capsys.readouterr()

    # 1. Preempted in the corruption grid, after two of its four cells.
    with pytest.raises(Preempted):
        evaluate_counted(cfg, monkeypatch, fail={"generate": 3})
    first = unit_stamps(run)
    assert sorted(first) == ["clean", "shift/impulse_noise/1", "shift/impulse_noise/5"]
    assert "resuming" not in capsys.readouterr().out
    assert not (run / "report.json").exists()

    # 2. Resumed, then preempted again between the two threats.
    with pytest.raises(Preempted):
        evaluate_counted(cfg, monkeypatch, fail={"robust_accuracy": 2})
    assert (
        "resuming evaluation: 1/1 clean pass, 2/4 corruption cells, 0/2 PGD threats, "
        f"0/2 sanity-check norms, 0/1 OOD feature bank already done in {run / 'partial'}"
    ) in capsys.readouterr().out
    second = unit_stamps(run)
    assert sorted(second) == sorted([*UNITS[:5], "adv/linf_8/pgd"])
    assert {k: second[k] for k in first} == first  # nothing done twice

    # 3. Resumed to the end: only the remaining units are computed.
    metrics, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (0, 1, 2)
    assert "1/1 clean pass, 4/4 corruption cells, 1/2 PGD threats" in capsys.readouterr().out
    final = unit_stamps(run)
    assert sorted(final) == sorted(UNITS)
    assert {k: final[k] for k in second} == second

    # The numbers of the uninterrupted run, to the bit (every unit reseeds its own streams).
    assert metric_numbers(metrics) == metric_numbers(reference[0])
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    report, ref_report = _report(run), _report(Path(cfg_for("reference").run.dir))
    assert report["sanity"] == ref_report["sanity"]
    assert report["reliability"] == ref_report["reliability"]
    assert report["ood_hist"] == ref_report["ood_hist"]
    assert "Resumed: 6 of 10 units of work" in " ".join(report["notes"])

    # partial/ is kept: one more rerun computes nothing and gives the same numbers.
    again, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (0, 0, 0) and unit_stamps(run) == final
    assert metric_numbers(again) == metric_numbers(reference[0])


@pytest.fixture
def other_weights(classifier_run: Path, tmp_path: Path) -> Path:
    """The same classifier with one weight changed, exported elsewhere."""
    clf, meta = load_classifier(classifier_run)
    with torch.no_grad():
        next(clf.parameters()).view(-1)[0] += 0.01
    folder = tmp_path / "other"
    save_classifier(
        clf, EncoderMeta(**meta["encoder"]), folder, classes=meta["classes"], data=meta["data"]
    )
    return folder


@pytest.mark.parametrize(
    ("change", "recomputed"),
    [
        # Attack settings: the clean pass and the corruption cells are still valid.
        ("adv.steps=4", ["adv/linf_8/pgd", "adv/l2_0.5/pgd", "adv/sanity/linf", "adv/sanity/l2"]),
        ("adv.linf_eps=[4]", ["adv/linf_4/pgd"]),  # a new threat; the sanity grid is its own
        ("shift.batch_size=100", UNITS[1:5]),  # the generated images depend on it
        ("run.seed=1", UNITS),
        ("classifier.run=OTHER", UNITS),
        ("run.resume=false", UNITS),
    ],
)
def test_a_changed_config_does_not_reuse_stale_units(
    cfg_for: Callable[..., DictConfig],
    other_weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: str,
    recomputed: list[str],
) -> None:
    evaluate_counted(cfg_for("run"), monkeypatch)
    run = Path(cfg_for("run").run.dir)
    before = unit_stamps(run)
    assert sorted(before) == sorted(UNITS)
    capsys.readouterr()

    change = change.replace("OTHER", str(other_weights))
    metrics, calls = evaluate_counted(cfg_for("run", change), monkeypatch)
    assert calls == (
        sum(u.startswith("shift/") for u in recomputed),
        sum(u.endswith("/pgd") for u in recomputed),
        sum(u.startswith("adv/sanity/") for u in recomputed),
    )
    after = unit_stamps(run)
    rewritten = sorted(u for u in after if before.get(u) != after[u])
    assert rewritten == sorted(recomputed)
    assert all(after[u] == before[u] for u in after if u not in recomputed)
    out = capsys.readouterr().out
    if change == "run.resume=false":
        assert f"run.resume=false: discarded the finished units in {run / 'partial'}" in out
    else:
        stale = sorted(set(recomputed) & set(before))
        if stale:
            assert (
                f"ignoring {len(stale)} stored unit(s) in {run / 'partial'}, computed with a "
                "different config, data or weights; recomputing and replacing them"
            ) in out
        if len(recomputed) < len(UNITS):
            assert "resuming evaluation:" in out

    # The numbers of a fresh run with the changed config.
    fresh, _ = evaluate_counted(cfg_for("fresh", change), monkeypatch)
    assert metric_numbers(metrics) == metric_numbers(fresh)


def test_unreadable_units_and_temp_files_are_ignored(
    cfg_for: Callable[..., DictConfig],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = cfg_for("run")
    reference, _ = evaluate_counted(cfg, monkeypatch)
    partial = Path(cfg.run.dir) / "partial"
    # A torn file (only possible by hand: units are written to a temp file and renamed), a
    # file of garbage, an empty one, and the temp file of a write that a kill interrupted.
    torn = partial / "shift/contrast/5.safetensors"
    torn.write_bytes(torn.read_bytes()[:-50])
    (partial / "adv/linf_8/pgd.safetensors").write_bytes(b"not a safetensors file")
    (partial / "adv/sanity/l2.safetensors").write_bytes(b"")
    tmp = partial / "shift/contrast/.1.safetensors.123.tmp"
    tmp.write_bytes(b"half a file")
    hour_ago = time.time() - STALE_TMP_S - 1
    os.utime(tmp, (hour_ago, hour_ago))
    # A fresh one may be another process's write in progress: left alone.
    fresh = partial / "shift/contrast/.5.safetensors.456.tmp"
    fresh.write_bytes(b"being written")
    capsys.readouterr()

    metrics, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (1, 1, 1)
    out = capsys.readouterr().out
    assert (
        f"ignoring 3 stored unit(s) in {partial}, unreadable; recomputing and replacing them: "
        "shift/contrast/5, adv/linf_8/pgd, adv/sanity/l2"
    ) in out
    assert "3/4 corruption cells, 1/2 PGD threats, 1/2 sanity-check norms" in out
    assert not tmp.exists() and fresh.exists()
    assert metric_numbers(metrics) == metric_numbers(reference)
    # Replaced by readable units: the next rerun computes nothing.
    _, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (0, 0, 0)


def test_autoattack_results_are_stored_per_threat(
    cfg_for: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pyautoattack")
    overrides = [
        "adv.l2_eps=[]",
        "adv.autoattack=true",
        "adv.autoattack_version=custom",
        "adv.autoattack_attacks=[apgd-ce]",
        "adv.sanity_checks=false",
        *[f"{s}.enabled=false" for s in ("clean", "shift", "calib", "ood")],
    ]
    reference, _ = evaluate_counted(cfg_for("reference", *overrides), monkeypatch)
    cfg = cfg_for("run", *overrides)
    # Preempted in AutoAttack, after the threat's PGD was stored.
    with monkeypatch.context() as m:
        m.setattr(adv_mod, "autoattack", Calls(adv_mod.autoattack, fail_at=1))
        with pytest.raises(Preempted):
            evaluate_counted(cfg, monkeypatch)
    assert sorted(unit_stamps(Path(cfg.run.dir))) == ["adv/linf_8/pgd"]
    with monkeypatch.context() as m:
        aa = Calls(adv_mod.autoattack, fail_at=None)
        m.setattr(adv_mod, "autoattack", aa)
        metrics, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (0, 0, 0) and aa.done == 1
    assert sorted(unit_stamps(Path(cfg.run.dir))) == ["adv/linf_8/autoattack", "adv/linf_8/pgd"]
    assert metric_numbers(metrics) == metric_numbers(reference)
    assert "adv/linf_8/autoattack_acc" in metrics


def test_unit_store_round_trip_staleness_and_messages(tmp_path: Path) -> None:
    from ssl_robust.evaluate.store import UnitStore

    folder = tmp_path / "partial"
    specs = {"shift/fog/1": {"severity": 1}, "shift/fog/2": {"severity": 2}}
    store = UnitStore(folder, {"seed": 0}, specs, resume=True)
    assert store.get("shift/fog/1") is None and store.messages() == []
    logits = torch.randn(3, 10, dtype=torch.float64)
    store.put("shift/fog/1", {"acc": 0.1 + 0.2}, {"logits": logits})
    assert (folder / "shift" / "fog" / "1.safetensors").is_file()

    again = UnitStore(folder, {"seed": 0}, specs, resume=True, describe=lambda u: "cells")
    data, tensors = again.get("shift/fog/1")  # type: ignore[misc]
    assert data == {"acc": 0.1 + 0.2} and torch.equal(tensors["logits"], logits)  # exact
    assert again.get("shift/fog/2") is None
    assert again.messages() == [f"resuming evaluation: 1/2 cells already done in {folder}"]

    other_seed = UnitStore(folder, {"seed": 1}, specs, resume=True)
    assert other_seed.get("shift/fog/1") is None and other_seed.stale == ["shift/fog/1"]
    fresh = UnitStore(folder, {"seed": 0}, specs, resume=False)
    assert fresh.discarded and not folder.exists() and fresh.get("shift/fog/1") is None


def test_a_fresh_start_discards_only_its_own_units_when_told(tmp_path: Path) -> None:
    """PGD shard tasks share partial/: run.resume=false in one must not delete the others'."""
    from ssl_robust.evaluate.store import UnitStore

    folder = tmp_path / "partial"
    units = [f"adv/linf_8/pgd/shard-{i}-of-2" for i in (1, 2)] + ["clean"]
    specs = {u: {"unit": u} for u in units}
    store = UnitStore(folder, {"seed": 0}, specs, resume=True)
    for u in units:
        store.put(u, {"acc": 0.5})
    fresh = UnitStore(folder, {"seed": 0}, specs, resume=False, discard=[units[0]])
    assert fresh.discarded and fresh.get(units[0]) is None
    assert fresh.get(units[1]) == ({"acc": 0.5}, {}) and fresh.get("clean") is not None


def test_a_fresh_start_deletes_the_replaced_runs_checkpoints_and_metrics(tmp_path: Path) -> None:
    from ssl_robust.launch.trainer import resume_checkpoint

    (tmp_path / "checkpoints").mkdir()
    old = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_2.ckpt"]
    for f in [*old, tmp_path / "metrics.json", tmp_path / "config.yaml"]:
        f.write_text("{}")
    assert resume_checkpoint(tmp_path, True) == str(max(old, key=lambda p: p.stat().st_mtime_ns))
    assert resume_checkpoint(tmp_path, False) is None
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["config.yaml"]


def test_a_requeued_slurm_job_resumes_even_when_started_with_resume_false() -> None:
    from ssl_robust.launch.trainer import resume_requested

    assert resume_requested(True, {}) and not resume_requested(False, {})
    assert not resume_requested(False, {"SLURM_RESTART_COUNT": "0"})
    assert resume_requested(False, {"SLURM_RESTART_COUNT": "2"})


@pytest.mark.slow
def test_jobs_for_separate_sections_share_a_run_directory_at_the_same_time(
    cfg_for: Callable[..., DictConfig],
    classifier_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two processes, one per threat (and one also on the corruption grid), write their units
    into one run directory at once; a last run with the whole config computes nothing and
    reports what one run would have."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shared = tmp_path / "shared"
    base = [
        sys.executable,
        str(root / "scripts" / "evaluate.py"),
        "tiny",
        f"classifier.run={classifier_run}",
        f"run.dir={shared}",
        *SMALL,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    jobs = [
        subprocess.Popen([*base, "adv.l2_eps=[]"], **pipe),  # type: ignore[call-overload]
        subprocess.Popen(  # type: ignore[call-overload]
            [*base, "adv.linf_eps=[]", "shift.enabled=false"], **pipe
        ),
    ]
    for proc in jobs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    assert set(unit_stamps(shared)) == set(UNITS)
    assert not list((shared / "partial").rglob(".*.tmp"))
    merged, calls = evaluate_counted(cfg_for("shared"), monkeypatch)
    assert calls == (0, 0, 0)
    reference, _ = evaluate_counted(cfg_for("alone"), monkeypatch)
    assert metric_numbers(merged) == metric_numbers(reference)


def test_shard_blocks_and_their_merge() -> None:
    blocks = [adv_mod.shard_block(10, i, 3) for i in (1, 2, 3)]
    assert [list(range(10))[b] for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    p = "adv/linf_8/"
    parts = [
        {p + "acc": 0.5, p + "acc_worst": 0.25, p + "clean_acc": 1.0, p + "n": 4.0,
         p + "attack_calls_per_image": 6.0, p + "pipeline_calls_per_image": 8.0,
         p + "nfe_per_image": 12.0, p + "wall_s": 2.0, p + "steps": 5.0},
        {p + "acc": 0.0, p + "acc_worst": 0.0, p + "clean_acc": 0.5, p + "n": 2.0,
         p + "attack_calls_per_image": 6.0, p + "pipeline_calls_per_image": 8.0,
         p + "nfe_per_image": 12.0, p + "wall_s": 1.0, p + "steps": 5.0},
    ]  # fmt: skip
    merged = adv_mod.merge_pgd_shards(parts, p)
    assert merged[p + "acc"] == pytest.approx(2 / 6) and merged[p + "acc_worst"] == 1 / 6
    assert merged[p + "clean_acc"] == pytest.approx(5 / 6) and merged[p + "n"] == 6
    assert merged[p + "wall_s"] == 3.0 and merged[p + "steps"] == 5.0
    assert merged[p + "nfe_per_image"] == 12.0


def test_sharded_attacks_run_as_separate_jobs_and_merge(
    cfg_for: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    off = [f"{s}.enabled=false" for s in ("shift", "calib", "ood")]
    sharded = [*off, "adv.shards=3", "adv.sanity_checks=false"]
    # One job computing every block, then merging.
    whole, calls = evaluate_counted(cfg_for("one", *sharded), monkeypatch)
    assert calls == (0, 6, 0)  # 2 threats x 3 blocks
    p = "adv/linf_8/"
    units = [
        read_unit(
            Path(cfg_for("one").run.dir) / "partial" / f"adv/linf_8/pgd/shard-{i}-of-3.safetensors"
        )
        for i in (1, 2, 3)
    ]
    parts = [u[1] for u in units if u is not None]
    assert [part[p + "n"] for part in parts] == [5, 5, 6]  # 16 attacked images
    assert whole[p + "n"] == 16
    assert whole[p + "acc"] == pytest.approx(sum(q[p + "acc"] * q[p + "n"] for q in parts) / 16)
    # Workers for blocks 1 and 2 (a SLURM array, say) store their units and write no report;
    # the merging run computes only block 3 and reports the same numbers.
    for i in (1, 2):
        worker, calls = evaluate_counted(cfg_for("split", *sharded, f"adv.shard={i}"), monkeypatch)
        assert calls == (0, 2, 0) and worker[p + "n"] == parts[i - 1][p + "n"]
    split = Path(cfg_for("split").run.dir)
    assert not (split / "report.json").exists()
    merged, calls = evaluate_counted(cfg_for("split", *sharded), monkeypatch)
    assert calls == (0, 2, 0)
    assert metric_numbers(merged) == metric_numbers(whole)
    assert "PGD ran in 3 blocks of the attacked images" in (split / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"adv.shard must be in 0..adv.shards \(3\)"):
        job.evaluate(cfg_for("bad", *sharded, "adv.shard=4"))
    with pytest.raises(ConfigError, match=r"set adv\.shards > 1"):
        job.evaluate(cfg_for("bad", "adv.shard=1"))
    with pytest.raises(ConfigError, match=r"but adv\.enabled=false"):
        job.evaluate(cfg_for("bad", "adv.enabled=false", "adv.shards=2", "adv.shard=1"))


@pytest.mark.parametrize(
    ("overrides", "attacked", "n"),
    [
        (["adv.max_images=3", "adv.shards=4"], 3, 128),
        (["eval.max_images=5", "adv.max_images=0", "adv.shards=6"], 5, 5),
        (["eval.max_images=5", "adv.max_images=16", "adv.shards=6", "adv.shard=6"], 5, 5),
    ],
)
def test_more_shards_than_attacked_images_fail_before_any_work(
    cfg_for: Callable[..., DictConfig],
    monkeypatch: pytest.MonkeyPatch,
    overrides: list[str],
    attacked: int,
    n: int,
) -> None:
    cfg = cfg_for("many", *overrides)
    shards, cap = int(cfg.adv.shards), int(cfg.adv.max_images)
    which = f"min(adv.max_images={cap}, {n} evaluation images)"
    if cap == 0:
        which = f"adv.max_images=0: all {n} evaluation images"
    match = re.escape(
        f"adv.shards={shards} splits the attacked images into more blocks than there are "
        f"images: {attacked} are attacked ({which}), so some blocks would be empty; set "
        f"adv.shards in 1..{attacked}"
    )
    with monkeypatch.context() as m:
        calls = _count(m)
        with pytest.raises(ConfigError, match=match):
            job.evaluate(cfg)
    assert _done(calls) == (0, 0, 0)
    assert not Path(cfg.run.dir).exists()  # no config, no unit, no report


def test_as_many_shards_as_attacked_images_run(
    cfg_for: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    off = [f"{s}.enabled=false" for s in ("shift", "calib", "ood")]
    cfg = cfg_for("edge", *off, "adv.l2_eps=[]", "adv.max_images=3", "adv.shards=3")
    metrics, calls = evaluate_counted(cfg, monkeypatch)
    assert calls == (0, 3, 1)  # a block of one image each, and the sanity checks
    assert metrics["adv/linf_8/n"] == 3


def test_sigusr1_under_slurm_requeues_and_stops_keeping_the_finished_units(
    cfg_for: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from ssl_robust.launch.distributed import SlurmRequeue

    off = ["adv.enabled=false", "ood.enabled=false", "calib.enabled=false", "perf.enabled=false"]
    cfg = cfg_for("sig", *off)
    requeued: list[bool] = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(
        SlurmRequeue, "_requeue", staticmethod(lambda: requeued.append(True) or True)
    )
    real = shift_mod.generate
    cells = []

    def signalled(*args: Any, **kwargs: Any) -> Any:
        cells.append(1)
        if len(cells) == 3:  # SLURM's warning, 90 s before the time limit, in the third cell
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shift_mod, "generate", signalled)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stop:
        job.evaluate(cfg)
    assert stop.value.code == 0 and requeued == [True]
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is the job's only
    kept = unit_stamps(Path(cfg.run.dir))
    done = sorted(kept)
    assert "clean" in done and 2 <= len([u for u in done if u.startswith("shift/")]) < 4
    assert not (Path(cfg.run.dir) / "report.json").exists()
    # The requeued job computes only what is missing, keeps the stored units as they are, and
    # ends with the numbers of a run that was never stopped.
    monkeypatch.setattr(shift_mod, "generate", real)
    monkeypatch.delenv("SLURM_JOB_ID")
    metrics, (generated, _, _) = evaluate_counted(cfg, monkeypatch)
    assert generated == 4 - (len(done) - 1)
    final = unit_stamps(Path(cfg.run.dir))
    assert sorted(final) == sorted(UNITS[:5]) and {k: final[k] for k in kept} == kept
    reference, calls = evaluate_counted(cfg_for("sig-reference", *off), monkeypatch)
    assert calls == (4, 0, 0)
    assert metric_numbers(metrics) == metric_numbers(reference)
    assert {k for k in metrics if k.startswith("shift/")} >= {"shift/mean_acc", "shift/n"}
