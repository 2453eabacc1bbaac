"""Report writing (JSON, Markdown, plots, wandb payload) from hand-made reports; latency."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from ssl_robust.evaluate.examples import perturbation_image
from ssl_robust.evaluate.latency import measure_latency
from ssl_robust.evaluate.report import (
    METRIC_DOCS,
    SANITY_CHECKS,
    describe_metric,
    expected_metric_keys,
    log_to_wandb,
    make_plots,
    render_markdown,
    report_tables,
    threat_name,
    write_report,
)
from ssl_robust.plotting import ImageRow, plot_image_grid

GRID = ["gaussian_noise", "fog"]
SEVERITIES = [1, 5]


def _bins() -> dict[str, list[Any]]:
    edges = [i / 5 for i in range(6)]
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "confidence": [math.nan, 0.3, 0.5, 0.7, 0.95],
        "accuracy": [math.nan, 0.2, 0.6, 0.65, 0.9],
        "count": [0.0, 3.0, 10.0, 20.0, 67.0],
    }


def hand_made_report() -> dict[str, Any]:
    m: dict[str, float] = {"test/acc": 0.9, "test/n": 100.0, "perf/eval_wall_s": 12.5}
    cells = {
        ("gaussian_noise", 1): 0.8,
        ("gaussian_noise", 5): 0.4,
        ("fog", 1): 0.85,
        ("fog", 5): 0.55,
    }
    for (c, s), v in cells.items():
        m[f"shift/{c}/{s}/acc"] = v
    m["shift/mean_acc"] = 0.65
    m["shift/severity/1/acc"], m["shift/severity/5/acc"] = 0.825, 0.475
    m["shift/severity5_acc"] = 0.475
    m["shift/n"] = 100.0
    m["shift/mean_acc_se"] = 0.025
    m["shift/severity/1/acc_se"], m["shift/severity/5/acc_se"] = 0.03, 0.04
    m["shift/group/noise/acc_se"], m["shift/group/weather/acc_se"] = 0.035, 0.035
    m["shift/group/noise/acc"], m["shift/group/weather/acc"] = 0.6, 0.7
    for name, acc in (("linf_8", 0.12), ("l2_0.5", 0.31)):
        p = f"adv/{name}/"
        m.update(
            {
                p + "acc": acc,
                p + "acc_worst": acc - 0.05,
                p + "clean_acc": 0.9,
                p + "n": 64,
                p + "steps": 100,
                p + "eot": 20,
                p + "rescore_draws": 10,
                p + "attack_calls_per_image": 2020,
                p + "pipeline_calls_per_image": 2040,
                p + "nfe_per_image": 12120,
                p + "wall_s": 321.0,
            }
        )
    for check in SANITY_CHECKS:
        m[f"adv/sanity/linf/{check}"] = 0.0 if check == "black_box" else 1.0
    m["adv/sanity/linf/passed"] = 0.0
    for s, (acc, ece) in {"clean": (0.9, 0.03), "shift": (0.475, 0.25)}.items():
        m.update(
            {
                f"calib/{s}/acc": acc,
                f"calib/{s}/ece": ece,
                f"calib/{s}/nll": 0.4,
                f"calib/{s}/brier": 0.15,
                f"selective/{s}/aurc": (1 - acc) / 2,
                f"selective/{s}/eaurc": (1 - acc) / 4,
                f"selective/{s}/risk_c80": (1 - acc) * 0.6,
                f"selective/{s}/risk_c50": (1 - acc) * 0.3,
            }
        )
    m["calib/severity/1/ece"], m["calib/severity/5/ece"] = 0.08, 0.25
    for s in ("noise_gaussian", "shift_s5"):
        for score in ("msp", "energy"):
            m[f"ood/{s}/{score}/auroc"], m[f"ood/{s}/{score}/fpr95"] = 0.93, 0.3
            m[f"ood/{s}/{score}/aupr_in"], m[f"ood/{s}/{score}/aupr_out"] = 0.95, 0.9
    for score in ("msp", "energy"):
        m[f"ood/mean/{score}/auroc"], m[f"ood/mean/{score}/fpr95"] = 0.93, 0.3
    m.update(
        {
            "perf/latency_ms": 1.5,
            "perf/throughput_ips": 5000.0,
            "perf/batch_size": 256,
            "perf/purified_latency_ms": 40.0,
            "perf/purified_throughput_ips": 300.0,
            "perf/purifier_nfe": 5,
        }
    )
    sanity_values = {"eps": [0.0, 2 / 255, 8 / 255], "acc": [0.9, 0.5, 0.12]}
    hist = {"edges": [0.0, 0.5, 1.0], "in": [0.1, 0.9], "out": [0.7, 0.3]}
    return {
        "metrics": m,
        "meta": {
            "title": "finetune-x + purifier",
            "classifier": "runs/finetune-x",
            "purifier": "runs/denoiser-y (ddim, t*=100, 5 NFE, fresh noise)",
            "num_images": 100,
            "data": "cifar10 validation split (data), 32 px",
            "data_config": {"name": "cifar10", "root": "data", "image_size": 32},
            "grid": {"corruptions": GRID, "severities": SEVERITIES, "source": "generated"},
            "threats": [
                {"name": "linf_8", "norm": "linf", "eps": 8 / 255, "eps_label": "8/255"},
                {"name": "l2_0.5", "norm": "l2", "eps": 0.5, "eps_label": "0.5"},
            ],
            "attack": {
                "steps": 100,
                "eot": 20,
                "rescore_draws": 10,
                "loss": "ce",
                "random_start": True,
                "gradients": "exact",
            },
            "ood_sets": ["noise_gaussian", "shift_s5"],
        },
        "sanity": {
            "linf": {
                c: {"passed": c != "black_box", "values": sanity_values} for c in SANITY_CHECKS
            }
        },
        "reliability": {"clean": _bins(), "shift": _bins()},
        "calib_severity": {
            "severities": SEVERITIES,
            "ece": {c: [0.06 + 0.04 * i, 0.2 + 0.1 * i] for i, c in enumerate(GRID)},
        },
        "risk_coverage": {
            s: {
                "coverage": [0.25, 0.5, 0.75, 1.0],
                "risk": [err / 4, err / 3, err / 2, err],
                "best": [0.0, 0.0, 0.0, err],
            }
            for s, err in (("clean", 0.1), ("shift", 0.525))
        },
        "per_class": {
            "classes": ["cat", "dog", "ship"],
            "images": [40, 60, 0],
            "clean": [0.9, 0.95, None],
            "shift": [0.3, 0.75, None],
        },
        "ood_hist": {s: {"msp": hist, "energy": hist} for s in ("noise_gaussian", "shift_s5")},
        "notes": ["AutoAttack skipped: the pipeline is stochastic."],
    }


def test_hand_made_report_has_exactly_the_documented_keys() -> None:
    keys = expected_metric_keys(
        clean=True,
        purified=False,
        corruptions=GRID,
        severities=SEVERITIES,
        threats=["linf_8", "l2_0.5"],
        sanity_norms=["linf"],
        sanity_eot=True,  # a stochastic purifier (fresh noise, EOT 20)
        calib_sets=["clean", "shift"],
        ood_sets=["noise_gaussian", "shift_s5"],
        perf=True,
    )
    extra = {"perf/purified_latency_ms", "perf/purified_throughput_ips", "perf/purifier_nfe"}
    assert set(hand_made_report()["metrics"]) == keys | extra


def test_every_template_documents_some_key_and_the_most_specific_wins() -> None:
    keys = expected_metric_keys(
        clean=True,
        purified=True,
        clean_draws=3,
        shift_draws=2,
        corruptions=["fog", "speckle_noise"],
        severities=[3, 5],
        threats=["linf_8"],
        autoattack=True,
        sanity_norms=["l2"],
        calib_sets=["clean", "shift"],
        ood_sets=["held_out"],
        perf=True,
        cert_radii=[0.0, 0.5],
        ce_reference=True,
        natural_sets=["cifar10.1_v6"],
        bootstrap=True,
        temperature=True,
        knn_sets=["clean", "shift"],
    )
    used = {describe_metric(k) for k in keys}
    assert None not in used
    assert used == set(METRIC_DOCS.values())  # every documented name occurs
    assert describe_metric("shift/group/noise/acc") == METRIC_DOCS["shift/group/{group}/acc"]
    assert describe_metric("shift/severity/3/acc") == METRIC_DOCS["shift/severity/{severity}/acc"]
    assert describe_metric("shift/fog/3/acc") == METRIC_DOCS["shift/{corruption}/{severity}/acc"]
    assert describe_metric("adv/sanity/l2/passed") == METRIC_DOCS["adv/sanity/{norm}/passed"]
    assert describe_metric("adv/linf_8/acc/extra") is None
    assert describe_metric("val/acc") is None
    assert "shift/group/extra/acc" in keys  # speckle_noise is not one of the 15
    assert "shift/severity5_acc" in keys
    assert "shift/severity5_acc" not in expected_metric_keys(corruptions=["fog"], severities=[1])


def test_threat_names_follow_the_convention() -> None:
    assert threat_name("linf", 8.0) == "linf_8"
    assert threat_name("linf", 2.5) == "linf_2.5"
    assert threat_name("l2", 0.5) == "l2_0.5"
    assert threat_name("l2", 1.0) == "l2_1"
    with pytest.raises(ValueError, match=r"unknown norm 'l0'"):
        threat_name("l0", 1.0)


def test_write_report_from_a_hand_made_dict(tmp_path: Path) -> None:
    report = hand_made_report()
    paths = write_report(report, tmp_path)
    plots = ["shift_severity", "reliability", "calib_severity", "risk_coverage"]
    plots += ["robust_eps", "ood_hist"]
    assert set(paths) == {"json", "markdown", *plots}

    back = json.loads((tmp_path / "report.json").read_text())
    assert back["metrics"] == report["metrics"]
    assert back["reliability"]["clean"]["accuracy"][0] is None  # NaN -> null (valid JSON)
    assert back["notes"] == report["notes"]

    md = (tmp_path / "report.md").read_text()
    for needle in (
        "# Evaluation report: finetune-x + purifier",
        "- AutoAttack skipped: the pipeline is stochastic.",
        "| pipeline | 90.00 | 82.6–94.5 | 100 |",  # Wilson 95% interval of 90/100
        "| clean | 90.00 | 82.6–94.5 |",
        "| mean over the grid | 65.00 | 60.1–69.9 |",  # 0.65 +- 1.96 x 0.025
        "| severity 5 | 47.50 | 39.7–55.3 |",
        "| 1 | 82.50 | 76.6–88.4 |",  # per severity
        "| noise | 60.00 | 53.1–66.9 |",
        "| gaussian_noise | noise | 80.00 | 40.00 | 60.00 |",
        "| fog | weather | 85.00 | 55.00 | 70.00 |",
        "| mean |  | 82.50 | 47.50 | 65.00 |",
        "| linf_8 | 8/255 | 90.00 | 12.00 | 6.1–22.2 | 7.00 | – | 64 | 12120 | 321.00 |",
        "| linf | black_box | **no** |",
        "| data | cifar10, 32 x 32 px: the official test split, read from the folder data |",
        "random start: yes)",
        # Per class, the classes the shift hurts most first; a class without images last.
        "| class | images | clean | shift | drop |\n| --- | ---: | ---: | ---: | ---: |\n"
        "| cat | 40 | 90.00 | 30.00 | 60.00 |\n| dog | 60 | 95.00 | 75.00 | 20.00 |\n"
        "| ship | 0 | – | – | – |",
        "| linf | large_eps | yes |",
        "EOT 20 gradient draws per step",
        "| shift | 47.50 | 0.2500 | – | 0.4000 | 0.1500 |",  # no bootstrap interval recorded
        "| noise_gaussian | energy | 93.00 | – | 30.00 |",
        "| purifier (5 NFE) + classifier | 40.00 | 300.0 |",
        "throughput batch 256 (img/s)",
        "Sehwag2021 ResNet-18",
        "| images | acc (%) | ECE |\n| --- | ---: | ---: |\n| clean | 90.00 | 0.0300 |\n"
        "| severity 1 | 82.50 | 0.0800 |\n| severity 5 | 47.50 | 0.2500 |",
        "![reliability](plots/reliability.png)\n\n![calib_severity](plots/calib_severity.png)"
        "\n\n![risk_coverage](plots/risk_coverage.png)",
        "| set | error (%) | AURC | E-AURC | error at 80% coverage (%) | at 50% (%) |",
        "| shift | 52.50 | 0.2625 | 0.1313 | 31.50 | 15.75 |",
        "E-AURC its excess over the best ranking",
        # The headline numbers first, with their intervals over the images.
        "## Summary\n\n| measure | value | 95% CI |",
        "| clean accuracy | 90.00% | 82.6–94.5 |",
        "| corruption accuracy, mean of 2 x 2 | 65.00% | 60.1–69.9 |",
        "| robust accuracy, linf_8 (PGD, mean over draws) | 12.00% | 6.1–22.2 |",
        "| ECE, shift | 0.2500 | – |",
        "| OOD AUROC (msp), mean of 2 sets / worst (noise_gaussian) | 93.00% / 93.00% | – |",
        "| attack sanity checks | FAILED: linf/black_box | – |",
    ):
        assert needle in md, needle
    for name in plots:
        path = tmp_path / "plots" / f"{name}.png"
        assert path == paths[name] and path.stat().st_size > 10_000
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 300
            assert len(img.convert("L").getcolors(maxcolors=100_000) or []) > 10


def test_minimal_report_renders_only_what_ran(tmp_path: Path) -> None:
    report = {"metrics": {"test/acc": 0.5, "test/n": 10.0}, "meta": {}}
    assert make_plots(report, tmp_path) == {}
    assert list(report_tables(report)) == ["summary", "clean"]
    md = render_markdown(report)
    assert "| pipeline | 50.00 | 23.7–76.3 | 10 |" in md
    for absent in ("Common corruptions", "Adversarial", "Calibration", "Out-of-distribution"):
        assert absent not in md
    assert "Anchors" not in md  # no dataset named: no CIFAR-10 numbers to read it against


def test_log_to_wandb_sends_tables_images_and_summary(tmp_path: Path) -> None:
    wandb = pytest.importorskip("wandb")

    class Recorder:
        def __init__(self) -> None:
            self.logged: dict[str, Any] = {}
            self.summary: dict[str, Any] = {}

        def log(self, payload: dict[str, Any]) -> None:
            self.logged.update(payload)

    report = hand_made_report()
    plots = make_plots(report, tmp_path)
    run = Recorder()
    log_to_wandb(run, report, plots)
    assert run.summary == report["metrics"]
    tables = {k: v for k, v in run.logged.items() if k.startswith("tables/")}
    assert set(tables) == {f"tables/{k}" for k in report_tables(report)}
    assert all(isinstance(t, wandb.Table) for t in tables.values())
    grid = tables["tables/shift_grid"]
    assert grid.columns == ["corruption", "group", "s1", "s5", "mean"]
    assert grid.data[0][:4] == ["gaussian_noise", "noise", 0.8, 0.4]
    images = {k: v for k, v in run.logged.items() if k.startswith("plots/")}
    assert set(images) == {f"plots/{k}" for k in plots}
    assert all(isinstance(i, wandb.Image) for i in images.values())
    assert run.logged["adv/linf_8/acc"] == 0.12


def test_latency_of_a_known_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl_robust.evaluate.latency as latency

    class Clock:  # the module's ``time``: perf_counter moves only when ``fn`` runs
        now = 50.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(latency, "time", clock)
    # Two warm-up calls of 100 s (not timed), then five timed ones (exact in binary).
    durations = iter([100.0, 100.0, 0.5, 0.125, 0.25, 0.375, 2.0])
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        clock.now += next(durations)
        return x

    res = measure_latency(fn, torch.zeros(4, 3, 8, 8), warmup=2, iters=5)
    assert calls == [4] * 7  # warm-up calls are made but not timed
    assert res == {
        "median_ms": 375.0,
        "mean_ms": pytest.approx(650.0, rel=1e-12),
        "min_ms": 125.0,
        "p90_ms": 2000.0,  # the 5th of 5 (round(0.9 x 4) = 4)
        "batch_size": 4.0,
        "images_per_s": 4 / 0.375,
    }
    with pytest.raises(ValueError, match="iters must be >= 1"):
        measure_latency(fn, torch.zeros(1, 3, 8, 8), iters=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        measure_latency(fn, torch.zeros(0, 3, 8, 8))


def test_latency_runs_without_gradients() -> None:
    layer = torch.nn.Linear(3, 2)
    seen: list[bool] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return layer(x)

    measure_latency(fn, torch.zeros(2, 3), warmup=0, iters=2)
    assert seen == [False, False]


def test_ood_section_names_the_sets_scored_below_chance() -> None:
    report = hand_made_report()
    md = render_markdown(report)
    assert "an AUROC of 50% is chance" in md and "Below chance" not in md
    report["metrics"]["ood/noise_gaussian/msp/auroc"] = 0.12
    report["metrics"]["ood/shift_s5/energy/auroc"] = 0.47
    md = render_markdown(report)
    assert "Below chance: noise_gaussian (msp), shift_s5 (energy). Those images score" in md
    # Feature scores: described with their bank and k, and named when below chance.
    assert "knn, minus" not in md
    report["meta"] |= {"ood_feature_scores": ["knn"], "ood_bank": "40 images", "ood_knn_k": 3}
    report["metrics"]["ood/noise_gaussian/knn/auroc"] = 0.3
    report["metrics"]["ood/noise_gaussian/knn/fpr95"] = 0.9
    md = render_markdown(report)
    assert "against a bank of 40 images passed through the same pipeline: knn, minus the " in md
    assert "k-th nearest normalised bank feature, k = 3 (Sun et al. 2022)" in md
    assert "mahalanobis, minus" not in md
    assert "Below chance: noise_gaussian (msp), noise_gaussian (knn), shift_s5" in md
    assert "| noise_gaussian | knn | 30.00 |" in md


def test_severity_plot_shades_the_means_interval_where_it_was_recorded(tmp_path: Path) -> None:
    report = hand_made_report()
    shaded = make_plots(report, tmp_path / "a")["shift_severity"]
    for key in ("shift/severity/1/acc_se", "shift/severity/5/acc_se"):
        del report["metrics"][key]  # e.g. a store from before the per-image results
    plain = make_plots(report, tmp_path / "b")["shift_severity"]

    def band_pixels(path: Path) -> int:
        """Pixels of the band's grey (12 % black over white)."""
        with Image.open(path) as img:
            colors = img.convert("RGB").getcolors(1 << 20) or []
        return sum(n for n, c in colors if c == (224, 224, 224))

    assert band_pixels(shaded) > band_pixels(plain) + 1000


def test_perturbation_image_maps_no_change_to_grey_and_the_largest_to_black_or_white() -> None:
    x = torch.full((2, 3, 4, 4), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] += 0.02  # image 0: largest change +0.02, another of -0.01
    x_adv[0, 1, 2, 3] -= 0.01
    x_adv[1, 2, 1, 1] -= 0.3  # image 1: scaled on its own
    out = perturbation_image(x_adv, x)
    assert out[0, 0, 0, 0] == pytest.approx(1.0)
    assert out[0, 1, 2, 3] == pytest.approx(0.25)
    assert out[1, 2, 1, 1] == pytest.approx(0.0)
    assert (out == 0.5).sum() == 2 * 48 - 3
    assert torch.equal(perturbation_image(x, x), torch.full_like(x, 0.5))  # no attack: grey


def test_image_grid_has_a_row_per_example_row_and_rejects_bad_shapes(tmp_path: Path) -> None:
    imgs = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 1])
    one = plot_image_grid(
        [ImageRow("clean", imgs, torch.tensor([0, 1, 1, 1]))], labels, ["a", "b", "c"],
        tmp_path / "one.png",
    )  # fmt: skip
    rows = [ImageRow("clean", imgs, labels), ImageRow("delta", imgs), ImageRow("x", imgs)]
    three = plot_image_grid(rows, labels, ["a", "b", "c"], tmp_path / "three.png")
    with Image.open(one) as a, Image.open(three) as b:
        assert a.size[0] == b.size[0] and b.size[1] > 2 * a.size[1] * 0.8
    with pytest.raises(ValueError, match="no rows"):
        plot_image_grid([], labels, ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 labels for 4 columns"):
        plot_image_grid(rows, labels[:2], ["a"], tmp_path / "x.png")


def test_a_failing_plot_warns_and_the_report_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_robust.evaluate import report as report_mod

    def broken(report: dict[str, Any], path: Path) -> Path:
        raise RuntimeError("no display")

    monkeypatch.setitem(report_mod._PLOTTERS, "reliability", broken)
    with pytest.warns(UserWarning, match="plot reliability not drawn: RuntimeError"):
        paths = write_report(hand_made_report(), tmp_path)
    assert "reliability" not in paths and "shift_severity" in paths
    md = paths["markdown"].read_text()
    assert "## Calibration" in md and "plots/reliability.png" not in md


def test_temperature_scaled_calibration_gets_its_columns_text_summary_and_curve(
    tmp_path: Path,
) -> None:
    report = hand_made_report()
    plain = make_plots(report, tmp_path / "a")["reliability"]
    m = report["metrics"]
    m["calib/temperature"] = 1.8
    for s, (ece, low, high) in {"clean": (0.012, 0.0, 0.03), "shift": (0.19, 0.15, 0.22)}.items():
        m.update({f"calib/{s}/ts_ece": ece, f"calib/{s}/ts_nll": 0.35, f"calib/{s}/ts_brier": 0.14})
        m[f"calib/{s}/ts_ece_low"], m[f"calib/{s}/ts_ece_high"] = low, high
    report["meta"]["calib_temperature"] = {"folds": 2, "fold_fits": [1.75, 1.85]}
    report["reliability_scaled"] = {"clean": _bins(), "shift": _bins()}
    keys = expected_metric_keys(calib_sets=["clean", "shift"], temperature=True, bootstrap=True)
    assert {k for k in keys if "/ts_" in k or k == "calib/temperature"} <= set(m)
    md = render_markdown(report)
    for needle in (
        "| set | acc (%) | ECE | ECE 95% CI | NLL | Brier | ECE (T) | ECE (T) 95% CI | NLL (T) |",
        "| shift | 47.50 | 0.2500 | – | 0.4000 | 0.1500 | 0.1900 | 0.1500–0.2200 | 0.3500 |",
        "| ECE after temperature scaling, shift | 0.1900 | 0.1500–0.2200 |",
        "T = 1.800 on all of them",
        "seeded 2-fold split (1.750, 1.850)",
        "need not hold under shift (Ovadia et al. 2019)",
    ):
        assert needle in md, needle
    scaled = make_plots(report, tmp_path / "b")["reliability"]

    def green(path: Path) -> int:  # matplotlib's C2, the scaled curve
        with Image.open(path) as img:
            colors = img.convert("RGB").getcolors(1 << 20) or []
        return sum(n for n, c in colors if c == (44, 160, 44))

    assert green(scaled) > green(plain) + 50


def test_cifar10_anchors_only_on_cifar10_and_the_data_row_says_what_was_read() -> None:
    report = hand_made_report()
    md = render_markdown(report)
    assert "## Anchors for context (CIFAR-10; RobustBench entries)" in md
    assert "| Standard WRN-28-10 | 94.78 |" in md
    digits = {"name": "digits", "root": "data", "image_size": 16, "val_fraction": 0.2, "seed": 3}
    report["meta"] |= {"data": "digits validation split (data), 16 px", "data_config": digits}
    md = render_markdown(report)
    assert "Anchors" not in md and "WRN" not in md and "RobustBench entries" not in md
    assert (
        "| data | digits, 16 x 16 px: scikit-learn's 8 x 8 handwritten digits, upsampled; the "
        "validation split is the 20% held out from training (class-balanced, seed 3) |"
    ) in md
    assert "(data)" not in md  # the unused root folder is not shown as if it meant something
    # A report without data_config (an older one): the dataset from its data line.
    del report["meta"]["data_config"]
    report["meta"]["data"] = "cifar10 validation split (data), 32 px"
    assert "Anchors for context" in render_markdown(report)
    # An image folder of CIFAR-10's ten classes (the *_cifar10_folder presets) is CIFAR-10.
    folder = {"name": "imagefolder", "root": "/data/cifar10-jpeg", "image_size": 32}
    report["meta"] |= {"data": "imagefolder", "data_config": folder}
    report["per_class"] = {"images": [100] * 10, "clean": [0.9] * 10, "classes": [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]}  # fmt: skip
    assert "Anchors for context" in render_markdown(report)
    report["per_class"]["classes"] = [f"c{i}" for i in range(10)]
    assert "Anchors for context" not in render_markdown(report)


def _sanity_report() -> dict[str, Any]:
    """The hand-made report with realistic sanity values for both norms (eps as stored:
    fractions of the [0, 1] range)."""
    report = hand_made_report()
    linf = [2 / 255, 4 / 255, 8 / 255]
    l2 = [0.25, 0.5, 1.0]

    def checks(grid: list[float], large: float) -> dict[str, dict[str, Any]]:
        values = {
            "eps_monotone": {"eps": [0.0, *grid], "acc": [0.9, 0.8, 0.5, 0.25]},
            "large_eps": {"eps": large, "acc": 0.0},
            "more_steps": {"eps": grid[1], "steps": [100, 200], "acc": [0.5, 0.48]},
            "more_eot": {"eps": grid[1], "eot": [20, 40], "acc": [0.5, 0.5]},
            "black_box": {
                "eps": grid,
                "white_box_acc": [0.8, 0.5, 0.25],
                "black_box_acc": [0.85, 0.7, 0.6],
                "queries": 2000,
            },
            "nonzero_gradients": {"zero_grad_fraction": 0.0},
        }
        return {c: {"passed": True, "values": v} for c, v in values.items()}

    report["sanity"] = {"linf": checks(linf, 1.0), "l2": checks(l2, math.sqrt(3 * 32 * 32))}
    return report


def test_sanity_table_gives_eps_in_the_threats_units_and_explains_each_check() -> None:
    report = _sanity_report()
    table = report_tables(report)["sanity"]
    assert table.columns == ["norm", "check", "passed", "measured"]
    md = render_markdown(report)
    for needle in (
        "| linf | eps_monotone | yes | eps 0, 2/255, 4/255, 8/255: accuracy 90.0, 80.0, 50.0, "
        "25.0% |",
        "| linf | large_eps | yes | eps 255/255 (the whole [0, 1] image box): accuracy 0.0% |",
        "| linf | more_steps | yes | eps 4/255: 100 steps 50.0%, 200 steps 48.0% |",
        "| linf | more_eot | yes | eps 4/255: EOT 20 50.0%, EOT 40 50.0% |",
        "| linf | black_box | yes | eps 2/255, 4/255, 8/255: PGD 80.0, 50.0, 25.0%; random "
        "search (2000 queries) 85.0, 70.0, 60.0% |",
        "| linf | nonzero_gradients | yes | images with an all-zero input gradient: 0.0% |",
        "| l2 | eps_monotone | yes | eps 0, 0.25, 0.5, 1: accuracy",
        "| l2 | large_eps | yes | eps 55.43 (= sqrt(3072), the whole [0, 1] image box): "
        "accuracy 0.0% |",
        # Every check explained, under the table; the unbounded one's expectation in words.
        "Linf eps in units of 1/255 like the threats",
        "so accuracy should reach ~0 (at most 5%)",
    ):
        assert needle in md, needle
    for check in SANITY_CHECKS:
        assert f"\n- {check}: " in md, check
    # No raw JSON, no eps as fractions of the [0, 1] range.
    sanity_part = md[md.index("**Sanity checks") : md.index("## Calibration")]
    assert "{" not in sanity_part and "0.0078" not in sanity_part and "0.0157" not in sanity_part
    # The table's note is Markdown only: the wandb table has the rows and columns.
    assert all(len(r) == 4 for r in table.rows)


class _Figures:
    """Keeps the figures the report's plotters make (laid out and drawn, as save_figure would,
    but left open) so that a test can look at their artists."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from ssl_robust.evaluate import report as report_mod

        self.figs: dict[str, Any] = {}

        def keep(fig: Any, path: Path, dpi: int, rect: tuple[float, ...] | None = None) -> Path:
            fig.tight_layout(rect=rect)
            fig.canvas.draw()
            self.figs[path.stem] = fig
            return path

        monkeypatch.setattr(report_mod, "save_figure", keep)

    def close(self) -> None:
        from ssl_robust.plotting import pyplot

        for fig in self.figs.values():
            pyplot().close(fig)


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Any:
    kept = _Figures(monkeypatch)
    yield kept
    kept.close()


def test_robust_plot_joins_no_threats_and_spreads_far_apart_radii(
    tmp_path: Path, figures: _Figures
) -> None:
    report = _sanity_report()
    report["meta"]["threats"].append(
        {"name": "linf_128", "norm": "linf", "eps": 128 / 255, "eps_label": "128/255"}
    )
    m = report["metrics"]
    m.update({k.replace("linf_8", "linf_128"): v for k, v in m.items() if "/linf_8/" in k})
    m["adv/linf_128/acc"], m["adv/linf_128/acc_worst"] = 0.0, 0.0
    make_plots(report, tmp_path)
    fig = figures.figs["robust_eps"]
    axes = {ax.get_title(): ax for ax in fig.axes}
    linf = axes["Robust accuracy, linf"]
    threat_lines = [ln for ln in linf.get_lines() if ln.get_label().startswith("threat")]
    assert threat_lines
    for line in threat_lines:  # markers at the measured radii, no line between them
        assert line.get_linestyle() == "None" and line.get_marker() not in ("", "None", None)
    (worst,) = [ln for ln in threat_lines if "worst" in ln.get_label()]
    assert list(worst.get_xdata()) == pytest.approx([8.0, 128.0])
    # 0..8/255 and 128/255 and the whole box on one axis: symmetric-log, ticked where measured.
    assert linf.get_xscale() == "symlog"
    assert list(linf.get_xticks()) == pytest.approx([0, 2, 4, 8, 128, 255])
    assert "1/255" in linf.get_xlabel() and linf.get_ylabel() == "accuracy (%)"
    assert linf.get_ylim() == (-2, 102)
    sweep = next(ln for ln in linf.get_lines() if ln.get_label().startswith("sanity sweep"))
    assert sweep.get_linestyle() == "--" and sweep.get_marker() == "o"  # measured points, dashed
    l2 = axes["Robust accuracy, l2"]
    assert "27.7" not in " ".join(t.get_text() for t in l2.get_xticklabels())  # D = 3072 here
    assert any(t.get_text() == "55.43" for t in l2.get_xticklabels())
    for ax in (linf, l2):  # the legend under the axes, covering no point
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0


def test_confusion_colour_bar_and_cells_are_both_percent(tmp_path: Path, figures: _Figures) -> None:
    report = hand_made_report()
    report["confusion"] = {"clean": [[8, 2, 0], [1, 9, 0], [0, 0, 0]]}
    make_plots(report, tmp_path)
    fig = figures.figs["confusion"]
    ax = fig.axes[0]
    (image,) = ax.get_images()
    assert image.get_clim() == (0, 100)
    assert image.get_array().max() == pytest.approx(90.0)  # 9 of 10: 90 %, not 0.9
    cells = {t.get_text() for t in ax.texts}
    assert {"80", "20", "10", "90"} <= cells
    colour_bar = fig.axes[1]
    assert colour_bar.get_ylim() == (0, 100) and "%" in colour_bar.get_ylabel()


def test_ood_histogram_titles_give_auroc_in_percent_like_the_table(
    tmp_path: Path, figures: _Figures
) -> None:
    report = hand_made_report()
    report["metrics"]["ood/noise_gaussian/msp/auroc"] = 0.8167
    make_plots(report, tmp_path)
    titles = [ax.get_title() for ax in figures.figs["ood_hist"].axes]
    assert "msp: noise_gaussian (AUROC 81.67%)" in titles
    assert "| noise_gaussian | msp | 81.67 |" in render_markdown(report)
    assert not any("0.8" in t for t in titles)


def test_reliability_legend_sits_below_the_bars_and_the_gap_is_an_outline(
    tmp_path: Path, figures: _Figures
) -> None:
    report = hand_made_report()
    make_plots(report, tmp_path)
    fig = figures.figs["reliability"]
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend.get_window_extent().y1 <= ax.get_window_extent().y0  # outside, below
        labels = [t.get_text() for t in legend.get_texts()]
        assert "gap to its mean confidence (hatched)" in labels
        accuracy, gap = ax.containers  # the bars: accuracy, then the gap to confidence
        assert all(bar.get_fill() for bar in accuracy)
        # Unfilled, hatched: where a gap lies over its bar (under-confident) no blend colour.
        assert all(not bar.get_fill() and bar.get_hatch() for bar in gap)
    md = render_markdown(report, {"reliability": "plots/reliability.png"})
    assert "its hatched outline the gap to the bin's mean confidence" in md
