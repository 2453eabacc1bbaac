"""The comparison tool over offline runs: two tiny pretraining runs with wandb offline, plus
hand-written fine-tuning / evaluation run directories that name their upstream runs by path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from ssl_robust.compare import (
    Run,
    accuracy_line_data,
    add_corruption_errors,
    add_effective_robustness,
    calibration_severity_data,
    certified_data,
    compare,
    curve_data,
    differing_keys,
    find_runs,
    flatten,
    job_of,
    line_data,
    line_series,
    load_run,
    nfe_data,
    replicate_groups,
    replicate_table,
    run_labels,
    run_link,
    select_metrics,
    severity_data,
    severity_key,
    short_paths,
    table,
    tradeoff_data,
    unfinished_runs,
)
from ssl_robust.evaluate.metrics import images_key, interval_bars
from ssl_robust.pipelines import pretrain

ROOT = Path(__file__).resolve().parents[1]


def _write_run(folder: Path, config: dict, metrics: dict, name: str = "metrics.json") -> Path:
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    (folder / name).write_text(json.dumps(metrics))
    return folder


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SimCLR and BYOL, two epochs each on 8-px digits, logged to wandb offline."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        # conftest disables wandb through the environment, which beats wandb.mode.
        mp.delenv("WANDB_MODE", raising=False)
        for method in ("simclr", "byol"):
            runs[method] = _pretrain(root / f"pre-{method}", method)
    return runs


def _pretrain(run: Path, method: str) -> Path:
    from ssl_robust.config import PretrainConfig, load_config

    from .conftest import TINY_PRETRAIN

    overrides = [f"method={method}", f"run.dir={run}", "wandb.mode=offline", "wandb.group=cmp"]
    pretrain(load_config(PretrainConfig, [*TINY_PRETRAIN, *overrides], job="pretrain"))
    return run


def test_offline_pretraining_runs_compare(pretrain_runs: dict[str, Path], tmp_path: Path) -> None:
    for run in pretrain_runs.values():
        # The wandb run is offline, in the run directory, under the id kept there.
        run_id = (run / "wandb_id.txt").read_text().strip()
        assert list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    written = compare(list(pretrain_runs.values()), tmp_path / "out")
    md = written["markdown"].read_text()
    # The units first; only the key that differs is a column (the run dirs are ignored), with
    # the metrics, accuracies in %.
    assert md.splitlines()[2].startswith("Units: accuracies and rates (AUROC, FPR) in %")
    header = md.splitlines()[4]
    assert header == "| run | method.name | val/knn_acc (%) | val/knn_acc_shift (%) |"
    out = tmp_path / "out"
    for method, run in pretrain_runs.items():
        final = json.loads((run / "metrics.json").read_text())
        knn, shift = final["val/knn_acc"], final["val/knn_acc_shift"]
        # The run's name links to its training curves, relative to the comparison.
        link = os.path.relpath(run / "curves.png", out)
        row = f"| [{run.name}]({link}) | {method} | {100 * knn:.2f} | {100 * shift:.2f} |"
        assert row in md
        assert (out / link).is_file()
        assert f"<a href='{link}'>{run.name}</a>" in written["html"].read_text()
    assert "<td>byol</td>" in written["html"].read_text()
    assert "plot_accuracy_vs_fraction" not in written  # nothing to plot for pretraining
    # The kNN accuracy of both runs against epochs, one panel, a line per method.
    runs = [load_run(r) for r in pretrain_runs.values()]
    curves = curve_data(runs, ["method.name"])
    assert list(curves) == ["val/knn_acc"]
    assert [label for label, _, _ in curves["val/knn_acc"]] == ["method=byol", "method=simclr"]
    for label, epochs, values in curves["val/knn_acc"]:
        run = pretrain_runs[label.removeprefix("method=")]
        assert epochs.tolist() == [1.0, 2.0]  # validated after each of the two epochs
        final = json.loads((run / "metrics.json").read_text())["val/knn_acc"]
        assert values[-1] == pytest.approx(final)
    with Image.open(written["plot_training_curves"]) as img:
        # One 5.5-inch panel at 120 dpi, its legend below it.
        assert img.format == "PNG" and img.size[0] == 660 and img.size[1] > 480
    # The page shows the plot it wrote, by a relative link.
    assert "![Validation curves of the training runs](training_curves.png)" in md


def _evaluation_tree(root: Path, pretrain_runs: dict[str, Path]) -> None:
    """Fine-tuning runs (2 methods x 2 fractions x 2 seeds) and, per run, evaluations through
    a DDIM purifier of 5 and 20 steps, written as the jobs write them: the evaluation's
    ``purifier`` section in its config.yaml (config/evaluate.py) and its flat metrics.json
    with ``perf/purifier_nfe`` (pipelines/evaluate/job.py)."""
    den = _write_run(
        root / "den",
        {"run": {"seed": 0, "dir": str(root / "den")}, "denoiser": {"unet": "tiny"}},
        {"val/loss": 0.03},
    )
    clean = {"simclr": 0.80, "byol": 0.70}
    for method, enc in pretrain_runs.items():
        for fraction in (0.1, 1.0):
            for seed in (0, 1):
                name = f"{method}-{fraction}-{seed}"
                ft = _write_run(
                    root / "ft" / name,
                    {"run": {"seed": seed, "dir": str(root / "ft" / name)}, "mode": "linear",
                     "encoder": {"run": str(enc)}, "subset": {"fraction": fraction},
                     "purify": {"run": "", "sampler": "ddpm", "t_star": 100}},
                    {"test/acc": clean[method] * (0.9 + 0.1 * fraction) + 0.01 * seed},
                )  # fmt: skip
                for steps in (5, 20):
                    folder = root / "eval" / f"{name}-ddim{steps}"
                    purifier = {"run": str(den), "sampler": "ddim", "t_star": 100,
                                "ddim_steps": steps}  # fmt: skip
                    _write_run(
                        folder,
                        {"run": {"seed": 0, "dir": str(folder)}, "classifier": {"run": str(ft)},
                         "purifier": purifier, "perf": {"enabled": True}},
                        {
                            "test/acc": clean[method] * (0.9 + 0.1 * fraction),
                            "shift/mean_acc": 0.5 * clean[method] * fraction,
                            "adv/linf_8/acc": 0.01 * steps + 0.001 * seed,
                            "perf/purifier_nfe": float(steps),
                        },
                    )  # fmt: skip


def test_evaluation_runs_follow_upstream_and_plot(
    pretrain_runs: dict[str, Path], tmp_path: Path
) -> None:
    _evaluation_tree(tmp_path / "runs", pretrain_runs)
    evals = find_runs([tmp_path / "runs" / "eval"])
    assert len(evals) == 2 * 2 * 2 * 2
    run = load_run(tmp_path / "runs" / "eval" / "byol-0.1-1-ddim20")
    assert run.metrics["shift/mean_acc"] == pytest.approx(0.5 * 0.7 * 0.1)
    assert run.metrics["adv/linf_8/acc"] == pytest.approx(0.201)
    # Method from the pretraining run, fraction from the fine-tuning run; own keys win.
    assert run.config["method.name"] == "byol" and run.config["subset.fraction"] == 0.1
    assert run.config["purifier.ddim_steps"] == 20
    keys = differing_keys(evals)
    assert {"method.name", "subset.fraction", "purifier.ddim_steps"} <= set(keys)
    assert not any(k.startswith("run.") for k in keys)  # seeds differ only upstream: not inherited
    assert "classifier.run" in keys and "encoder.run" in keys

    written = compare([tmp_path / "runs" / "eval"], tmp_path / "out")
    for kind in ("plot_accuracy_vs_fraction", "plot_robust_vs_nfe", "plot_clean_vs_robust"):
        with Image.open(written[kind]) as image:
            assert image.format == "PNG" and image.size[0] > 300
    md = written["markdown"].read_text().splitlines()
    # Header, rule, runs; then the 8 settings over their 2 seeds each.
    assert len([line for line in md if line.startswith("| ")]) == 2 + 16 + 2 + 8
    assert "shift/mean_acc (%)" in md[4] and "adv/linf_8/acc (%)" in md[4]
    assert md[4].endswith("| perf/purifier_nfe |")  # the NFE is a default column, as it is

    # The lines drawn: one per method and fraction (the DDIM steps are the NFE axis), their two
    # points each the mean over the two seeds of the fine-tuning the evaluation builds on.
    lines = nfe_data(evals)
    assert list(lines) == [
        (f"method={m}, fraction={f}", "adv/linf_8/acc")
        for m in ("byol", "simclr") for f in ("0.1", "1")
    ]  # fmt: skip
    for points in lines.values():
        # Seeds 0 and 1: 0.001 apart, a sample standard deviation of 0.001 / sqrt(2).
        std = pytest.approx(0.001 / 2**0.5)
        assert points == [
            (5.0, pytest.approx(0.0505), 2, std),
            (20.0, pytest.approx(0.2005), 2, std),
        ]
    # Against the fraction: a line per method and DDIM steps and metric (not per run), each
    # over both fractions and both seeds.
    series = line_series(evals, keys, leave_out=("subset.fraction",))
    assert series == ["method.name", "purifier.ddim_steps"]
    by_fraction = line_data(evals, "subset.fraction", ["test/acc", "shift/mean_acc"], series)
    assert len(by_fraction) == 2 * 2 * 2
    assert {len(p) for p in by_fraction.values()} == {2}
    assert {n for p in by_fraction.values() for _, _, n, _ in p} == {2}
    assert by_fraction["method=simclr, ddim_steps=5", "shift/mean_acc"] == [
        (0.1, pytest.approx(0.04), 2, 0.0), (1.0, pytest.approx(0.4), 2, 0.0)
    ]  # fmt: skip


def test_replicates_are_summarised_over_seeds(
    pretrain_runs: dict[str, Path], tmp_path: Path
) -> None:
    _evaluation_tree(tmp_path / "runs", pretrain_runs)
    fts = find_runs([tmp_path / "runs" / "ft"])
    keys = differing_keys(fts)
    assert {"encoder.run", "run.seed", "subset.fraction", "method.name"} <= set(keys)
    groups = replicate_groups(fts, keys)
    # Two methods x two fractions, each over seeds 0 and 1 (encoder paths set in all).
    assert [(v["method.name"], v["subset.fraction"], len(g)) for v, g in groups] == [
        ("byol", 0.1, 2), ("byol", 1.0, 2), ("simclr", 0.1, 2), ("simclr", 1.0, 2)
    ]  # fmt: skip
    header, rows = replicate_table(fts, keys, ["test/acc"])
    assert header == ["method.name", "subset.fraction", "runs", "test/acc (%)"]
    # simclr at 0.1: 0.8 x 0.91 + 0.01 x seed -> mean 73.3 %, std 1 / sqrt(2) points.
    assert rows[2] == ["simclr", "0.1", "2", "73.30 ± 0.71"]
    # A setting one of whose runs lacks a metric says over how many it is.
    fts[0].metrics.pop("test/acc")
    _, rows = replicate_table(fts, keys, ["test/acc"])
    assert sum(row[3].endswith(" (1 run)") for row in rows) == 1
    # A purifier set or not splits settings, though its path is not a setting.
    ft1 = _write_run(tmp_path / "ft1", {"run": {"seed": 1}}, {})
    ft2 = _write_run(tmp_path / "ft2", {"run": {"seed": 2}}, {})
    den = _write_run(tmp_path / "den", {"denoiser": {"unet": "tiny"}}, {})
    evals = [
        Run("a", "a", {"classifier.run": str(ft1), "purifier.run": ""}, {"test/acc": 0.5}),
        Run("b", "b", {"classifier.run": str(ft2), "purifier.run": ""}, {"test/acc": 0.7}),
        Run("c", "c", {"classifier.run": str(ft1), "purifier.run": str(den)}, {"test/acc": 0.4}),
    ]
    keys = differing_keys(evals)
    assert [len(g) for _, g in replicate_groups(evals, keys)] == [2, 1]
    # Upstream runs that cannot be read here: their settings were not compared, so runs on
    # different ones are not replicates.
    elsewhere = [Run(r.name, r.source, r.config | {"classifier.run": f"/gone/{r.name}"},
                     r.metrics) for r in evals[:2]]  # fmt: skip
    assert replicate_table(elsewhere, differing_keys(elsewhere), ["test/acc"]) is None
    assert replicate_table(evals[:1] + evals[2:], keys, ["test/acc"]) is None  # no replicates
    written = compare(evals, tmp_path / "out")
    md = written["markdown"].read_text()
    assert "## mean ± std over replicates" in md and "| 2 | 60.00 ± 14.14 |" in md, md
    assert "Over replicates: runs that differ only in run.seed" in md


def _log_curve(run: Path, metric: str, values: list[float]) -> None:
    """A Lightning CSV log: ``metric`` at the end of each epoch."""
    logs = run / "logs" / "version_0"
    logs.mkdir(parents=True)
    rows = [f"{e},{(e + 1) * 10 - 1},{v}" for e, v in enumerate(values)]
    (logs / "metrics.csv").write_text("\n".join([f"epoch,step,{metric}", *rows]) + "\n")


def test_runs_of_several_phases_compare_within_their_phase(
    pretrain_runs: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    den = _write_run(root / "den", {"denoiser": {"unet": "tiny", "lr": 0.002}}, {"val/loss": 0.03})
    _log_curve(den, "val/loss", [0.9, 0.2, 0.05])
    fts = []
    for fraction in (0.1, 1.0):
        ft = _write_run(
            root / f"ft-{fraction}",
            {"encoder": {"run": str(pretrain_runs["simclr"])}, "subset": {"fraction": fraction}},
            {
                "test/acc": 0.5 + fraction / 4,
                "val/acc_shift": 0.4 + fraction / 4,
                "val/loss": 1.0 - fraction / 2,
            },
        )
        _log_curve(ft, "val/loss", [2.0, 1.0 - fraction / 2])
        fts.append(ft)
    runs = [load_run(p) for p in (*pretrain_runs.values(), den, *fts)]
    assert [job_of(r) for r in runs] == ["pretrain", "pretrain", "denoiser", "finetune", "finetune"]

    written = compare(runs, tmp_path / "out")
    md = written["markdown"].read_text()
    sections = md.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "pretrain (2 runs)", "denoiser (1 run)", "finetune (2 runs)", "Plots"
    ]  # fmt: skip
    # Each phase's columns are the keys that differ within it, not every key of every schema.
    headers = [s.splitlines()[2] for s in sections[:3]]
    assert headers == [
        "| run | method.name | val/knn_acc (%) | val/knn_acc_shift (%) |",
        "| run | val/loss |",
        "| run | subset.fraction | val/acc_shift (%) | test/acc (%) | val/loss |",
    ]
    assert (
        "| [ft-0.1](../runs/ft-0.1) | 0.1 | 42.50 | 52.50 | 0.95 |" in md
    )  # no curves: the folder; a loss as it is
    assert written["html"].read_text().count("<table>") == 3
    # The fine-tuning runs' accuracy against the fraction.
    assert "plot_accuracy_vs_fraction" in written

    # Legends: what differs within the phase (or the run's name); val/loss gets a panel per
    # phase.
    labels = run_labels(runs)
    assert labels[str(den)] == "den"
    assert labels[str(fts[0])] == "fraction=0.1"
    assert labels[str(pretrain_runs["byol"])] == "method=byol"
    curves = curve_data(runs, labels)
    assert list(curves) == ["val/knn_acc", "val/loss (denoiser)", "val/loss (finetune)"]
    assert [label for label, _, _ in curves["val/loss (finetune)"]] == [
        "fraction=0.1", "fraction=1"
    ]  # fmt: skip
    ((_, epochs, values),) = curves["val/loss (denoiser)"]
    assert epochs.tolist() == [1.0, 2.0, 3.0] and values.tolist() == [0.9, 0.2, 0.05]
    with Image.open(written["plot_training_curves"]) as img:
        assert img.size[0] == 660 * 3 and img.size[1] > 480


def test_accuracies_show_their_interval_over_the_images(tmp_path: Path) -> None:
    assert images_key("test/acc") == "test/n" and images_key("test/acc_unpurified") == "test/n"
    assert images_key("adv/linf_8/acc_worst") == "adv/linf_8/n"
    assert (
        images_key("adv/l2_0.5/autoattack_acc")
        == images_key("adv/l2_0.5/clean_acc")
        == "adv/l2_0.5/n"
    )
    assert images_key("shift/severity5_acc") == ""  # a mean over cells: its own standard error
    assert images_key("val/knn_acc") == "" and images_key("calib/clean/ece") == ""
    metrics = {"test/acc": 0.9, "test/n": 100.0, "adv/linf_8/acc": 0.12, "adv/linf_8/n": 64.0}
    metrics |= {"shift/mean_acc": 0.65, "shift/mean_acc_se": 0.025}
    runs = [
        Run("a", "a", {"x": 1}, metrics),
        Run("b", "b", {"x": 2}, {"test/acc": 0.5, "val/knn_acc": 0.7}),  # no image count
    ]
    columns = ["test/acc", "adv/linf_8/acc", "shift/mean_acc", "val/knn_acc"]
    header, rows = table(runs, ["x"], columns)
    assert header == ["run", "x", *(f"{c} (%)" for c in columns)]
    # 90/100 and 12 % of 64: Wilson 95 % intervals (Newcombe 1998's method 3); the grid mean:
    # 0.65 +- 1.96 x 0.025; all in %.
    assert rows == [
        ["a", "1", "90.00 [82.6, 94.5]", "12.00 [6.1, 22.2]", "65.00 [60.1, 69.9]", "—"],
        ["b", "2", "50.00", "—", "—", "70.00"],
    ]
    written = compare(runs, tmp_path, metrics=["test/acc"])
    md = written["markdown"].read_text()
    assert "| 90.00 [82.6, 94.5] |" in md and "95% interval (in the value's unit) over" in md
    page = written["html"].read_text()
    assert "<td>90.00 [82.6, 94.5]</td>" in page and "<th>test/acc (%)</th>" in page
    assert "95% interval (in the value&#x27;s unit) over the images" in page
    md = compare(runs[1:], tmp_path, metrics=["test/acc"])["markdown"].read_text()
    assert "95% interval" not in md


def test_accuracy_against_severity_per_evaluation(tmp_path: Path) -> None:
    shift = {"shift/severity/1/acc": 0.8, "shift/severity/3/acc": 0.6, "shift/severity/5/acc": 0.3}
    runs = [
        Run("plain", "r/plain", {"purify.run": ""}, {"test/acc": 0.9, **shift}),
        # No clean accuracy: the line starts at severity 1; a cell's key is not a severity.
        Run("pure", "r/pure", {"purify.run": "d"}, {**shift, "shift/gaussian_noise/1/acc": 0.1}),
        Run("pre", "r/pre", {"method.name": "simclr"}, {"val/knn_acc": 0.5}),  # not evaluated
    ]
    data = severity_data(runs)
    assert data == {
        "r/plain": ([0, 1, 3, 5], [0.9, 0.8, 0.6, 0.3]),
        "r/pure": ([1, 3, 5], [0.8, 0.6, 0.3]),
    }
    # Error bars: Wilson for the clean point (test/n), +-1.96 se for a severity's mean.
    runs[0].metrics |= {"test/n": 100.0, "shift/severity/3/acc_se": 0.05}
    bars = interval_bars(runs[0].metrics, [severity_key(x) for x in data["r/plain"][0]])
    assert bars[:, 0] == pytest.approx([0.9 - 0.8256, 0.9455 - 0.9], abs=1e-3)
    assert bars[:, 2] == pytest.approx([0.098, 0.098], abs=1e-3)
    assert not bars[:, [1, 3]].any()  # no standard error recorded: no bar
    written = compare(runs, tmp_path)
    with Image.open(written["plot_accuracy_vs_severity"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert "plot_accuracy_vs_severity" not in compare(runs[2:], tmp_path / "none")
    # Legend labels: an upstream run by its directory's name, or "none".
    two = [Run("a", "r/a", {"purify.run": ""}), Run("b", "r/b", {"purify.run": "/x/den-1"})]
    assert run_labels(two) == {"r/a": "purify=none", "r/b": "purify=den-1"}


def test_metric_selection_and_errors(tmp_path: Path) -> None:
    runs = [Run("a", "x", {"k": 1}, {"test/acc": 0.5, "other/x": 1.0}), Run("b", "y", {"k": 2}, {})]
    assert select_metrics(runs) == ["test/acc"]
    assert select_metrics([Run("c", "z", {}, {"other/x": 1.0})]) == ["other/x"]
    natural = {"test/acc": 0.9, "natural/cifar10.1/acc": 0.8, "natural/cifar10.1/n": 2000.0}
    assert select_metrics([Run("d", "w", {}, natural | {"shift/mce": 1.1})]) == [
        "test/acc", "natural/cifar10.1/acc", "shift/mce"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no run has metric"):
        select_metrics(runs, ["val/knn_acc"])
    with pytest.raises(ValueError, match="no runs"):
        compare([tmp_path], tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path)
    written = compare(runs, tmp_path / "out", metrics=["test/acc"])
    assert "| b | 2 | — |" in written["markdown"].read_text()  # a missing metric shows as —


def test_run_directories_without_results_are_named_not_compared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    done = _write_run(runs / "eval-a", {"run": {"seed": 0}}, {"test/acc": 0.5}, "report.json")
    # wandb keeps a copy of the config inside a run: not a run of its own.
    (done / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({}), done / "wandb" / "offline-run-1" / "files" / "config.yaml")
    stopped = runs / "eval-b"
    (stopped / "partial").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run": {"seed": 1}}), stopped / "config.yaml")
    assert unfinished_runs([runs]) == [stopped.resolve()]
    assert unfinished_runs([done]) == []

    md = compare([runs], tmp_path / "out")["markdown"].read_text()
    assert "[eval-a](" in md and "[eval-b]" not in md
    assert "Not compared: 1 run directory without results yet" in md
    assert md.count("runs/eval-b") == 1 and "offline-run-1" not in md
    with pytest.raises(ValueError, match=r"no runs .*; without results yet: .*eval-b"):
        compare([stopped], tmp_path / "out")


def test_script(pretrain_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/compare.py",
            *map(str, pretrain_runs.values()),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "comparison.md").is_file() and (out / "comparison.html").is_file()
    bad = subprocess.run(
        [sys.executable, "scripts/compare.py", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_a_switched_off_purifier_and_its_upstream_settings_are_not_differences(
    tmp_path: Path,
) -> None:
    """A bare and two purified evaluations of one classifier: the denoiser's settings come from
    its run and the purifier's are inactive in the bare one; only what differs where it acts is
    a column (purifier.run, purifier.ddim_steps), and the bare run shows its purifier as none."""
    den = _write_run(tmp_path / "den", {"denoiser": {"unet": "tiny", "lr": 0.002}}, {"val/loss": 1})
    for name, purifier in (
        ("bare", {"run": "", "ddim_steps": 5}),
        ("ddim2", {"run": str(den), "ddim_steps": 2}),
        ("ddim8", {"run": str(den), "ddim_steps": 8}),
    ):
        _write_run(
            tmp_path / "eval" / name,
            {"classifier": {"run": "ft"}, "purifier": purifier},
            {"test/acc": 0.5},
            name="report.json",
        )
    evals = find_runs([tmp_path / "eval"])
    assert differing_keys(evals) == ["purifier.ddim_steps", "purifier.run"]
    header, rows = table(evals, differing_keys(evals), ["test/acc"])
    assert header == ["run", "purifier.ddim_steps", "purifier.run", "test/acc (%)"]
    assert rows[0] == ["ddim2", "2", "den", "50.00"]  # an upstream run by its folder's name
    assert ["bare", "—", "none", "50.00"] in rows
    labels = run_labels(evals)
    assert labels[str(tmp_path / "eval" / "bare")] == "purifier=none"
    assert labels[str(tmp_path / "eval" / "ddim8")] == "purifier=set, ddim_steps=8"


def test_a_linear_probe_has_no_augmentation_and_workers_explain_nothing(tmp_path: Path) -> None:
    for name, mode, padding, workers in (("probe", "linear", 2, 2), ("full", "full", 4, 8)):
        _write_run(
            tmp_path / name,
            {
                "encoder": {"run": "enc"},
                "mode": mode,
                "augment": {"crop_padding": padding},
                "linear": {"standardize": True},
                "optim": {"lr": 0.1, "encoder_lr_mult": 0.1},
                "data": {"num_workers": workers},
            },
            {"test/acc": 0.5},
        )
    runs = find_runs([tmp_path])
    assert differing_keys(runs) == ["mode"]
    _, rows = table(runs, ["mode", "augment.crop_padding"], [])
    assert sorted(rows) == [["full", "full", "4"], ["probe", "linear", "—"]]


def test_run_names_link_to_the_report_the_curves_or_the_folder(tmp_path: Path) -> None:
    ev = _write_run(tmp_path / "runs" / "ev 1", {}, {"test/acc": 0.5}, name="report.json")
    (ev / "report.md").write_text("# report")
    bare = _write_run(tmp_path / "runs" / "ft", {}, {"test/acc": 0.5})
    out = tmp_path / "out"
    assert run_link(load_run(ev), out) == "../runs/ev 1/report.md"
    assert run_link(load_run(bare), out) == "../runs/ft"
    assert run_link(Run("w", "wandb:e/p/id", {}, {}), out) is None
    md = compare([ev, bare], out)["markdown"].read_text()
    assert "[ev 1](../runs/ev%201/report.md)" in md  # a space in a link is escaped


def test_certified_pipelines_are_compared_against_the_radius(tmp_path: Path) -> None:
    runs = []
    for name, sigma, accs in (("s25", 0.25, [0.6, 0.4, 0.1]), ("s50", 0.5, [0.5, 0.4, 0.3])):
        metrics = {"cert/sigma": sigma, "cert/n": 100.0, "test/acc": 0.7}
        metrics |= {f"cert/radius/{r:g}/acc": a for r, a in zip((0.0, 0.5, 1.0), accs)}
        runs.append(_write_run(tmp_path / "runs" / name, {"cert": {"sigma": sigma}}, metrics))
    _write_run(tmp_path / "runs" / "bare", {}, {"test/acc": 0.8}, name="report.json")
    loaded = [load_run(r) for r in runs]
    data = certified_data(loaded)
    assert data == {str(runs[0]): ([0.0, 0.5, 1.0], [0.6, 0.4, 0.1]),
                    str(runs[1]): ([0.0, 0.5, 1.0], [0.5, 0.4, 0.3])}  # fmt: skip
    written = compare([tmp_path / "runs"], tmp_path / "out")
    with Image.open(written["plot_certified_accuracy"]) as img:
        assert img.size[0] > 300
    assert "cert/radius/0.5/acc" in written["markdown"].read_text()  # a default column
    assert "plot_certified_accuracy" not in compare([tmp_path / "runs" / "bare"], tmp_path / "o2")


def test_corruption_errors_against_a_reference_run(tmp_path: Path) -> None:
    grid = {"shift/fog/1/acc": 0.8, "shift/fog/5/acc": 0.4, "shift/snow/1/acc": 0.9}
    ref = _write_run(
        tmp_path / "supervised",
        {"classifier": {"run": "sup"}},
        {"test/acc": 0.95, **grid, "shift/snow/5/acc": 0.5},
    )
    # Errors: fog 0.2 + 0.6 = 0.8 against the reference's 0.8 -> 1; snow 0.1 / 0.1 -> 1.
    same = Run("same", "r/same", {"classifier.run": "a"}, {"test/acc": 0.95, **grid})
    # Halved errors -> CE 0.5; a stale mCE against another reference is replaced.
    half = {k: 1 - (1 - v) / 2 for k, v in grid.items()}
    better = Run("better", "r/better", {"classifier.run": "b"}, {**half, "shift/mce": 9.0})
    other = Run("other", "r/other", {"classifier.run": "c"},
                {"shift/frost/1/acc": 0.5, "shift/mce": 0.9, "shift/frost/ce": 0.9})  # fmt: skip
    trained = Run("ft", "r/ft", {"subset.fraction": 0.1}, {"test/acc": 0.9})  # no grid
    # Another data set or size: no errors, and none left from the run's own reference.
    digits = Run("digits", "r/d", {"classifier.run": "d"}, grid | {"shift/mce": 0.5},
                 data="digits at 8 px")  # fmt: skip
    runs = [same, better, other, trained, digits]
    config = {"name": "cifar10", "image_size": 32}
    (ref / "report.json").write_text(json.dumps({"meta": {"data_config": config}}))
    reference = load_run(ref)
    assert reference.data == "cifar10 at 32 px"
    notes = add_corruption_errors(runs, reference)
    assert notes == [
        "No corruption errors for digits: evaluated on other data than the reference "
        "supervised (cifar10 at 32 px).",
        "No corruption errors for other: the reference supervised was not evaluated on every "
        "cell of their grids.",
    ]
    assert "shift/mce" not in digits.metrics
    assert same.metrics["shift/mce"] == pytest.approx(1.0)
    assert same.metrics["shift/relative_mce"] == pytest.approx(1.0)
    assert better.metrics["shift/fog/ce"] == pytest.approx(0.5)
    assert better.metrics["shift/mce"] == pytest.approx(0.5)
    assert "shift/relative_mce" not in better.metrics  # it has no clean accuracy
    assert "shift/mce" not in other.metrics and "shift/mce" not in trained.metrics
    assert "shift/frost/ce" not in other.metrics  # against another reference: gone

    written = compare([same, better], tmp_path / "out", ce_reference=ref)
    md = written["markdown"].read_text()
    # The mCE a ratio, as it is; the accuracy in %.
    assert "| better | b | — | 0.5 |" in md and "| same | a | 95.00 | 1 |" in md, md
    assert "corruption errors against supervised" in written["html"].read_text()
    with pytest.raises(ValueError, match="has no corruption accuracies"):
        add_corruption_errors(runs, trained)


def test_a_baseline_from_random_weights_shows_its_backbone() -> None:
    ssl = {"encoder.run": "runs/pre", "encoder.backbone": "", "encoder.width": 32}
    runs = [
        Run("ssl", "a", ssl),
        Run("ssl-wide", "b", ssl | {"encoder.width": 64}),  # unused beside a run: no difference
        Run("scratch", "c", {"encoder.run": "", "encoder.backbone": "convnet", "encoder.width": 4}),
    ]
    assert differing_keys(runs[:2]) == []
    assert differing_keys(runs) == ["encoder.backbone", "encoder.run"]
    # Backbone and encoder change together: the label names the encoder only.
    assert run_labels(runs)["c"] == "encoder=none"
    assert run_labels(runs)["a"] == "ssl" and run_labels(runs)["b"] == "ssl-wide"  # by name


def test_clean_against_robust_accuracy_per_threat(tmp_path: Path) -> None:
    runs = [
        Run("a", "r/a", {"purifier.t_star": 20}, {"test/acc": 0.9, "adv/linf_8/acc": 0.1,
            "adv/l2_0.5/acc": 0.3, "adv/sanity/linf/passed": 1.0}),
        Run("b", "r/b", {"purifier.t_star": 100}, {"test/acc": 0.7, "adv/linf_8/acc": 0.4}),
        Run("c", "r/c", {"purifier.t_star": 5}, {"adv/linf_8/acc": 0.0}),  # no clean accuracy
    ]  # fmt: skip
    # linf_8 has two pipelines; l2_0.5 one (nothing to compare); sanity flags are not threats.
    assert tradeoff_data(runs) == {"linf_8": [("r/a", 0.9, 0.1), ("r/b", 0.7, 0.4)]}
    written = compare(runs, tmp_path)
    with Image.open(written["plot_clean_vs_robust"]) as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert "plot_clean_vs_robust" not in compare(runs[:1], tmp_path / "one")


def test_effective_robustness_above_the_line_through_the_compared_evaluations(
    tmp_path: Path,
) -> None:
    from scipy.stats import norm

    # Three pipelines exactly on the probit line y = 0.8 x - 0.4, one 5 points above it.
    def on_line(clean: float) -> float:
        return float(norm.cdf(0.8 * norm.ppf(clean) - 0.4))

    cleans = {"a": 0.6, "b": 0.75, "c": 0.9}
    runs = [
        Run(k, f"r/{k}", {"classifier.run": k}, {"test/acc": c, "shift/mean_acc": on_line(c)})
        for k, c in cleans.items()
    ]
    robust = Run("d", "r/d", {"classifier.run": "d"},
                 {"test/acc": 0.8, "shift/mean_acc": on_line(0.8) + 0.05})  # fmt: skip
    # On other data, or over another corruption grid: groups of their own, too small for a
    # line; a stale value from an earlier comparison goes.
    digits = Run("e", "r/e", {"classifier.run": "e"},
                 {"test/acc": 0.99, "shift/mean_acc": 0.5}, data="digits at 8 px")  # fmt: skip
    frost = Run("f", "r/f", {"classifier.run": "f"}, {"test/acc": 0.7, "shift/mean_acc": 0.6,
                "shift/frost/3/acc": 0.6, "shift/effective_robustness": 9.0})  # fmt: skip
    # The same evaluation listed twice counts once, and both copies get its value.
    twice = Run("d", "r/d", {"classifier.run": "d"}, dict(robust.metrics))
    everything = [*runs, robust, digits, frost, twice]
    data = accuracy_line_data(everything)
    assert list(data) == [("", "shift/mean_acc")] and len(data["", "shift/mean_acc"]) == 4
    lines = add_effective_robustness(everything)
    assert "shift/effective_robustness" not in frost.metrics
    assert (
        twice.metrics["shift/effective_robustness"] == robust.metrics["shift/effective_robustness"]
    )
    # The fit: the least-squares line through all four points (the robust one pulls it up).
    from ssl_robust.evaluate.metrics import fit_accuracy_line, probit

    xs = [0.6, 0.75, 0.9, 0.8]
    ys = [on_line(0.6), on_line(0.75), on_line(0.9), on_line(0.8) + 0.05]
    slope, intercept = lines["", "shift/mean_acc"]
    assert (slope, intercept) == pytest.approx(fit_accuracy_line(xs, ys))
    ers = {r.name: r.metrics["shift/effective_robustness"] for r in [*runs, robust]}
    for run in [*runs, robust]:
        predicted = norm.cdf(slope * probit([run.metrics["test/acc"]])[0] + intercept)
        assert ers[run.name] == pytest.approx(run.metrics["shift/mean_acc"] - predicted)
    assert max(ers, key=lambda k: ers[k]) == "d" and ers["d"] > 0.03
    assert "shift/effective_robustness" not in digits.metrics
    # The comparison shows it as a column (a natural-shift set's beside its accuracy),
    # explains it, and draws the line.
    for i, run in enumerate([*runs, robust]):
        run.metrics["natural/c101/acc"] = run.metrics["test/acc"] - 0.05 - 0.01 * i
    written = compare([*runs, robust], tmp_path / "out")
    md = written["markdown"].read_text()
    assert md.splitlines()[4] == (
        "| run | classifier.run | test/acc (%) | natural/c101/acc (%) | "
        "natural/c101/effective_robustness (pp) | shift/mean_acc (%) | "
        "shift/effective_robustness (pp) |"
    )
    assert "Effective robustness: accuracy under shift above the line" in md
    with Image.open(written["plot_accuracy_on_the_line"]) as image:
        assert image.format == "PNG" and image.size[0] > 500
    # Two evaluations fix any line exactly: no effective robustness, no plot.
    two = [Run(r.name, r.source, r.config, dict(r.metrics)) for r in runs[:2]]
    assert add_effective_robustness(two) == {}
    assert "plot_accuracy_on_the_line" not in compare(two, tmp_path / "two")


def test_accuracy_line_fit_known_answer_and_errors() -> None:
    from scipy.stats import norm

    from ssl_robust.evaluate.metrics import effective_robustness, fit_accuracy_line, probit

    clean = [0.3, 0.5, 0.7, 0.95]
    shifted = [float(norm.cdf(1.2 * norm.ppf(c) + 0.1)) for c in clean]
    line = fit_accuracy_line(clean, shifted)
    assert line == pytest.approx((1.2, 0.1))
    assert effective_robustness(clean, shifted, line) == pytest.approx([0, 0, 0, 0], abs=1e-9)
    assert effective_robustness([0.5], [0.6], line)[0] == pytest.approx(0.6 - norm.cdf(0.1))
    # Accuracies of 0 and 1 are clipped, not infinite.
    assert probit([0.0, 1.0]) == pytest.approx([norm.ppf(1e-4), norm.ppf(1 - 1e-4)])
    with pytest.raises(ValueError, match="clean accuracies are all the same"):
        fit_accuracy_line([0.5, 0.5], [0.3, 0.4])
    with pytest.raises(ValueError, match="at least 2"):
        fit_accuracy_line([0.5], [0.3])


def test_upstream_runs_show_by_the_end_of_their_paths() -> None:
    paths = ["/x/runs/finetune/a", "/x/runs/baseline/a", "/x/runs/finetune/b", "/y/c"]
    assert short_paths(paths) == {
        "/x/runs/finetune/a": "finetune/a", "/x/runs/baseline/a": "baseline/a",
        "/x/runs/finetune/b": "b", "/y/c": "c",
    }  # fmt: skip
    runs = [Run(f"e{i}", f"e{i}", {"classifier.run": p}, {"test/acc": 0.5}) for i, p in
            enumerate(paths[:2])]  # fmt: skip
    _, rows = table(runs, ["classifier.run"], ["test/acc"])
    assert [row[1] for row in rows] == ["baseline/a", "finetune/a"]


def test_baselines_of_replicate_chains_are_replicates(tmp_path: Path) -> None:
    # Two chains (seeds 0 and 1): each baseline takes its data from its own pretraining run.
    runs = []
    for seed in (0, 1):
        pre = _write_run(tmp_path / f"c{seed}" / "pretrain", {"run": {"seed": seed}}, {})
        base = {"encoder": {"run": "", "backbone": "convnet"}, "data": {"like": str(pre)},
                "run": {"seed": seed}}  # fmt: skip
        runs.append(Run(f"b{seed}", f"b{seed}", flatten(base, "."), {"test/acc": 0.5 + seed / 10}))
    keys = differing_keys(runs)
    assert keys == ["data.like", "run.seed"]
    assert [len(g) for _, g in replicate_groups(runs, keys)] == [2]
    _, rows = table(runs, keys, ["test/acc"])
    assert [row[1] for row in rows] == ["c0/pretrain", "c1/pretrain"]


def test_calibration_against_severity_per_evaluation(tmp_path: Path) -> None:
    scaled = {"calib/severity/1/ts_ece": 0.04, "calib/severity/5/ts_ece": 0.15}
    m = {"calib/severity/1/ece": 0.05, "calib/severity/5/ece": 0.2, "calib/clean/ece": 0.03}
    runs = [
        Run("ts", "r/ts", {"purify.run": ""}, {**m, **scaled, "calib/clean/ts_ece": 0.02}),
        # An older evaluation: no temperature scaling, no clean ECE, a cell is not a severity.
        Run("old", "r/old", {"purify.run": "d"}, {"calib/severity/3/ece": 0.1, "calib/x/ece": 1}),
        Run("pre", "r/pre", {"method.name": "simclr"}, {"val/knn_acc": 0.5}),  # not evaluated
    ]
    assert calibration_severity_data(runs) == {
        "r/ts": {"ece": ([0, 1, 5], [0.03, 0.05, 0.2]), "ts_ece": ([0, 1, 5], [0.02, 0.04, 0.15])},
        "r/old": {"ece": ([3], [0.1])},
    }
    written = compare(runs, tmp_path)
    with Image.open(written["plot_calibration_vs_severity"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert "plot_calibration_vs_severity" not in compare(runs[2:], tmp_path / "none")
