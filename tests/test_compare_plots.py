"""The comparison of a whole chain as scripts/chain.py lays it out (pretraining, denoiser,
fine-tunings and supervised baselines of three sweep lines, each evaluated bare and purified:
12 evaluations): short unique legend labels, distinct colours, legends beside the data, the
plots in %, the tables' names, units and image sizes, and the pages linking the plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from omegaconf import OmegaConf

import ssl_robust.compare as compare_module
from ssl_robust.compare import (
    Run,
    compare,
    differing_keys,
    display_names,
    find_runs,
    load_run,
    run_labels,
    run_styles,
    table,
)
from tests.test_compare import _log_curve, _write_run

ROOT = Path(__file__).resolve().parents[1]
LINES = ((0.1, 0), (0.1, 1), (1.0, 0))  # the sweep: subset.fraction, run.seed


def _line(fraction: float, seed: int) -> str:
    return f"subset.fraction_{fraction}_run.seed_{seed}"  # as chain.run_name names them


def _classifier(folder: Path, config: dict, acc: float, image_size: int | None) -> Path:
    _write_run(folder, config, {"test/acc": acc, "val/acc_shift": acc - 0.05, "val/loss": 1 - acc})
    if image_size is not None:  # the data the fine-tuning used, as finetune/export.py writes it
        (folder / "classifier.json").write_text(
            json.dumps({"data": {"name": "digits", "image_size": image_size}})
        )
    _log_curve(folder, "val/acc", [acc / 2, acc])
    return folder


def _chain(root: Path, ft_image_size: int | None = 16) -> Path:
    """The chain's run directories; the fine-tunings ask for data.image_size 0 (the dataset's
    own size, 16 px here), which their classifier.json resolves (``ft_image_size`` None: no
    classifier.json says)."""
    pre = _write_run(
        root / "pretrain",
        {"run": {"seed": 0}, "method": {"name": "simclr"},
         "data": {"name": "digits", "image_size": 0}},
        {"val/knn_acc": 0.91},
    )  # fmt: skip
    (pre / "encoder.json").write_text(json.dumps({"image_size": 16}))
    den = _write_run(root / "denoiser", {"denoiser": {"unet": "tiny"}}, {"val/loss": 0.37})
    for fraction, seed in LINES:
        line = _line(fraction, seed)
        ssl = 0.9 + 0.05 * fraction + 0.01 * seed
        base = 0.1 + 0.5 * fraction + 0.05 * seed
        classifiers = {
            "": _classifier(
                root / "finetune" / line,
                {"run": {"seed": seed}, "mode": "linear",
                 "encoder": {"run": str(pre), "backbone": ""},
                 "data": {"image_size": 0, "batch_size": 64, "like": ""},
                 "subset": {"fraction": fraction}, "optim": {"lr": 0.1},
                 "purify": {"run": ""}},
                ssl, ft_image_size,
            ),
            "baseline-": _classifier(
                root / "baseline" / line,
                {"run": {"seed": seed}, "mode": "full",
                 "encoder": {"run": "", "backbone": "convnet"},
                 "data": {"image_size": 16, "batch_size": 256, "like": str(pre)},
                 "subset": {"fraction": fraction}, "optim": {"lr": 0.2},
                 "purify": {"run": ""}},
                base, 16,
            ),
        }  # fmt: skip
        for prefix, classifier in classifiers.items():
            clean = json.loads((classifier / "metrics.json").read_text())["test/acc"]
            for purified in (False, True):
                acc = clean - (0.002 if purified else 0.0)
                metrics = {
                    "test/acc": acc, "test/n": 359.0,
                    "shift/mean_acc": acc * 0.8, "shift/mean_acc_se": 0.01,
                    "shift/severity/1/acc": acc * 0.95, "shift/severity/5/acc": acc * 0.6,
                    "calib/clean/ece": 0.05, "calib/severity/1/ece": 0.06,
                    "calib/severity/5/ece": 0.2 + (0.05 if prefix else 0.0),
                    "calib/clean/ts_ece": 0.03, "calib/severity/1/ts_ece": 0.04,
                    "calib/severity/5/ts_ece": 0.1,
                    "adv/linf_8/acc": acc * 0.7, "adv/linf_8/n": 32.0,
                    "adv/linf_128/acc": 0.0, "adv/linf_128/n": 32.0,
                }  # fmt: skip
                name = f"{prefix}{line}{'-purified' if purified else ''}"
                report = {
                    "metrics": metrics,
                    "meta": {"data_config": {"name": "digits", "image_size": 16}},
                }
                _write_run(
                    root / "evaluate" / name,
                    {"run": {"seed": 0}, "classifier": {"run": str(classifier)},
                     "purifier": {"run": str(den) if purified else ""}},
                    report, name="report.json",
                )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The chain compared, with what each saved figure shows (its axes and legends' texts, its
    lines' colours, where its legend lies)."""
    root = _chain(tmp_path_factory.mktemp("chain") / "c1")
    figures: dict[str, Any] = {}
    real = compare_module.save_figure

    def spy(fig: Any, path: Path, dpi: int, rect: Any = None) -> Path:
        out = real(fig, path, dpi, rect)  # laid out and written; the figure still readable
        figures[path.name] = fig
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare_module, "save_figure", spy)
        written = compare([root], root / "compare")
    return {"root": root, "written": written, "figures": figures, "runs": find_runs([root])}


def _drawn_lines(ax: Any) -> list[Any]:
    """The lines of an axes, not the caps of its error bars."""
    return [line for line in ax.get_lines() if line.get_linestyle() != "None"]


def _legend_texts(fig: Any) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_legend_labels_are_short_unique_settings(compared: dict[str, Any]) -> None:
    runs = compared["runs"]
    labels = run_labels(runs)
    evals = [r for r in runs if "/evaluate/" in r.source]
    assert len(evals) == 12
    shown = [labels[r.source] for r in evals]
    assert len(set(shown)) == 12 and max(map(len, shown)) <= 52
    root = compared["root"]
    # The settings that tell them apart, the rest (batch size, optimiser, backbone: they come
    # with the encoder) left to the tables; a seed of the classifier tells replicates apart.
    assert labels[str(root / "evaluate" / "baseline-subset.fraction_0.1_run.seed_1-purified")] == (
        "encoder=none, fraction=0.1, purifier=set, seed=1"
    )
    assert labels[str(root / "evaluate" / "subset.fraction_1.0_run.seed_0")] == (
        "encoder=set, fraction=1, purifier=none, seed=0"
    )
    # Fine-tunings and baselines of one sweep line: apart in their labels too.
    fts = [labels[str(root / d / _line(0.1, 0))] for d in ("baseline", "finetune")]
    assert fts == ["encoder=none, fraction=0.1, seed=0", "encoder=set, fraction=0.1, seed=0"]
    # The figures' legends show those labels, no config dump.
    figures = compared["figures"]
    for name in ("accuracy_vs_severity.png", "calibration_vs_severity.png", "clean_vs_robust.png"):
        texts = _legend_texts(figures[name])
        assert sorted(texts) == sorted(shown), name
    curves = _legend_texts(figures["training_curves.png"])
    assert fts[0] in curves and fts[1] in curves and len(curves) == len(set(curves))


def test_twelve_runs_get_twelve_distinct_colours(compared: dict[str, Any]) -> None:
    styles = run_styles([f"r{i}" for i in range(12)])
    looks = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len({s["color"] for s in styles.values()}) == 12 and len(looks) == 12
    assert len({s["color"] for s in run_styles([f"r{i}" for i in range(30)]).values()}) == 30
    # In the drawn plot: one colour per evaluation's line.
    (ax,) = compared["figures"]["accuracy_vs_severity.png"].axes
    colours = [to_hex(line.get_color()) for line in _drawn_lines(ax)]
    assert len(colours) == 12 and len(set(colours)) == 12


def test_legends_lie_beside_the_axes(compared: dict[str, Any]) -> None:
    for name in ("accuracy_vs_severity.png", "calibration_vs_severity.png",
                 "clean_vs_robust.png", "accuracy_vs_fraction.png"):  # fmt: skip
        fig = compared["figures"][name]
        assert not any(ax.get_legend() for ax in fig.axes), name  # none inside an axes
        (legend,) = fig.legends
        renderer = FigureCanvasAgg(fig).get_renderer()  # pyplot closed it: a canvas again
        box = legend.get_window_extent(renderer)
        right = max(ax.get_window_extent(renderer).x1 for ax in fig.axes)
        width = fig.get_size_inches()[0] * fig.dpi
        assert box.x0 >= right and box.x1 <= width, name  # right of every panel, in the figure


def test_accuracy_against_the_fraction(compared: dict[str, Any]) -> None:
    fig = compared["figures"]["accuracy_vs_fraction.png"]
    (ax,) = fig.axes
    assert ax.get_ylabel() == "accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10 %", "100 %"]
    assert ax.get_xscale() == "log"
    # A line per setting (encoder x purifier) and metric; the legend: the settings, then the
    # clean and corrupted line styles.
    texts = _legend_texts(fig)
    assert texts == [
        "encoder=none, purifier=none", "encoder=none, purifier=set",
        "encoder=set, purifier=none", "encoder=set, purifier=set",
        "clean (test/acc)", "corrupted (shift/mean_acc)",
    ]  # fmt: skip
    lines = _drawn_lines(ax)
    assert len(lines) == 8
    assert {line.get_linestyle() for line in lines} == {"-", "--"}
    # The SSL probe's clean accuracy at 10 %: the mean over seeds 0 and 1, in %.
    ssl = [0.9 + 0.005 + 0.01 * s for s in (0, 1)]
    ys = sorted(float(line.get_ydata()[0]) for line in lines)
    assert ys[-1] == pytest.approx(100 * sum(ssl) / 2)
    # Error bars: the standard deviation over the two seeds, where there are two.
    bars = [c for c in ax.containers if c.has_yerr]
    assert bars and len(bars) == 8
    # Coinciding lines (bare and purified) are nudged apart on x.
    xs = {round(float(line.get_xdata()[0]), 6) for line in lines}
    assert len(xs) == 4


def test_an_all_zero_threat_is_explained(compared: dict[str, Any]) -> None:
    fig = compared["figures"]["clean_vs_robust.png"]
    panels = {ax.get_title().split(":")[0]: ax for ax in fig.axes}
    assert sorted(panels) == ["linf_128", "linf_8"]
    texts = [t.get_text() for t in panels["linf_128"].texts]
    assert len(texts) == 1 and "robust accuracy 0 % for all 12 runs" in texts[0]
    assert not panels["linf_8"].texts
    for ax in panels.values():  # every panel on the same axes, 0 to 100 %
        assert ax.get_ylim() == (-3, 103) and ax.get_xlim() == (-3, 103)


def test_tables_name_runs_by_folder_units_and_image_size(compared: dict[str, Any]) -> None:
    md = compared["written"]["markdown"].read_text()
    # Baselines and fine-tunings of a sweep line: apart by their folders under the root.
    assert "[baseline/subset.fraction_0.1_run.seed_0](" in md
    assert "[finetune/subset.fraction_0.1_run.seed_0](" in md
    # Evaluations' folder names already differ: the names alone.
    assert "| [baseline-subset.fraction_0.1_run.seed_0-purified](" in md
    # data.image_size 0 resolved to the 16 px the fine-tunings used: no difference.
    assert "data.image_size" not in md
    # Accuracies in %, said in the header.
    assert md.splitlines()[2].startswith("Units: accuracies and rates (AUROC, FPR) in %")
    assert "| test/acc (%) |" in md and "| shift/effective_robustness (pp) |" in md
    # Upstream runs by whether they are set, in each table over replicates alike.
    replicates = md.split("## evaluate, mean ± std over replicates")[1]
    assert "| True |" not in md and "| set |" in replicates
    # The plots, linked and shown, relative to the page.
    assert "## Plots" in md
    for name in ("accuracy_vs_fraction.png", "clean_vs_robust.png", "training_curves.png"):
        assert f"]({name})" in md and (compared["root"] / "compare" / name).is_file()
    page = compared["written"]["html"].read_text()
    assert "<h2>Plots</h2>" in page and "<img src='accuracy_vs_severity.png'" in page


def test_an_image_size_no_file_resolves_stays_and_is_explained(tmp_path: Path) -> None:
    root = _chain(tmp_path / "c1", ft_image_size=None)
    fts = find_runs([root / "finetune", root / "baseline"])
    assert "data.image_size" in differing_keys(fts)
    assert {r.config["data.image_size"] for r in fts} == {0, 16}
    md = compare(fts, tmp_path / "out")["markdown"].read_text()
    assert "data.image_size 0 (finetune): the dataset's own size" in md
    # Resolved where the run's files say: an evaluation's report, a pretraining's encoder.
    assert load_run(root / "pretrain").config["data.image_size"] == 16


def test_display_names_tell_runs_apart_at_one_depth() -> None:
    runs = [Run("a", "/x/finetune/a"), Run("a", "/x/baseline/a"), Run("b", "/x/finetune/b")]
    assert display_names(runs) == {
        "/x/finetune/a": "finetune/a", "/x/baseline/a": "baseline/a", "/x/finetune/b": "finetune/b"
    }  # fmt: skip
    wandb = [Run("w", "wandb:e/p/1"), Run("w", "wandb:e/p/2")]
    assert display_names(wandb) == {
        "wandb:e/p/1": "w (wandb:e/p/1)",
        "wandb:e/p/2": "w (wandb:e/p/2)",
    }
    _, rows = table(runs, [], [])
    assert [row[0] for row in rows] == ["baseline/a", "finetune/a", "finetune/b"]


def test_script_help_shows_the_default_output_folder() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "reports/compare" in result.stdout


def test_config_reading_keeps_a_size_it_cannot_resolve(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    OmegaConf.save(OmegaConf.create({"data": {"image_size": 0}}), folder / "config.yaml")
    assert compare_module._read_config(folder)["data.image_size"] == 0
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    assert compare_module._read_config(folder)["data.image_size"] == 32
