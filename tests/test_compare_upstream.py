"""The comparison over runs built on other runs: replicates only where every upstream run's
settings match too, lines of the plots over replicates, the robust accuracy against a real
evaluation's NFE, and the comparison written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

import ssl_robust.compare as compare_module
from ssl_robust.compare import (
    Run,
    compare,
    differing_keys,
    find_runs,
    line_data,
    line_series,
    load_run,
    nfe_data,
    replicate_groups,
    replicate_table,
    upstream_keys,
    upstream_settings,
)
from tests.test_compare import _write_run


def _pretrain(root: Path, name: str, epochs: int, lr: float, seed: int, **extra: dict) -> Path:
    config = {
        "run": {"seed": seed, "dir": str(root / name)},
        "method": {"name": "simclr"},
        "trainer": {"max_epochs": epochs, "progress_bar": seed == 0},
        "optim": {"base_lr": lr},
        "data": {"root": f"/data{seed}", "num_workers": 2 + seed},  # where, not what
        "wandb": {"group": f"g{seed}"},
        **extra,
    }
    return _write_run(root / name, config, {"val/knn_acc": 0.5})


def _finetune(root: Path, name: str, encoder: str, seed: int, acc: float) -> Path:
    """A fine-tuning that sets its own trainer.max_epochs and optim: they hide its encoder's."""
    config = {
        "run": {"seed": seed, "dir": str(root / name)},
        "mode": "linear",
        "encoder": {"run": encoder},
        "trainer": {"max_epochs": 30},
        "optim": {"base_lr": 0.1},
        "linear": {"cache_dir": f"/cache/{name}"},  # where its features went: no setting
    }
    return _write_run(root / name, config, {"test/acc": acc})


def test_fine_tunings_of_differently_pretrained_encoders_are_not_replicates(
    tmp_path: Path,
) -> None:
    pre = tmp_path / "pre"
    # Two replicate encoders of 100 epochs (seeds, data folder, workers, wandb apart) and one
    # of 800 epochs at another learning rate.
    e100 = [_pretrain(pre, f"ep100-s{s}", 100, 0.06, s) for s in (0, 1)]
    e800 = _pretrain(pre, "ep800", 800, 0.3, 0)
    ft = tmp_path / "ft"
    fts = [
        _finetune(ft, "a", str(e100[0]), 0, 0.6),
        _finetune(ft, "b", str(e100[1]), 1, 0.7),
        _finetune(ft, "c", str(e800), 0, 0.9),
    ]
    runs = find_runs([ft])
    # The merged config cannot tell them apart: the fine-tuning's own keys win.
    assert {r.config["trainer.max_epochs"] for r in runs} == {30}
    assert runs[0].upstream == {
        "encoder.run": True,
        "encoder>method.name": "simclr",
        "encoder>optim.base_lr": 0.06,
        "encoder>trainer.max_epochs": 100,
    }
    assert upstream_keys(runs) == ["encoder>optim.base_lr", "encoder>trainer.max_epochs"]
    keys = differing_keys(runs)
    assert keys == ["encoder.run", "run.seed"]
    groups = replicate_groups(runs, keys)
    assert [(v, [r.name for r in g]) for v, g in groups] == [
        ({"encoder>optim.base_lr": 0.06, "encoder>trainer.max_epochs": 100}, ["a", "b"]),
        ({"encoder>optim.base_lr": 0.3, "encoder>trainer.max_epochs": 800}, ["c"]),
    ]
    header, rows = replicate_table(runs, keys, ["test/acc"])
    assert header == [
        "encoder>optim.base_lr", "encoder>trainer.max_epochs", "runs", "test/acc (%)"
    ]  # fmt: skip
    assert rows == [["0.06", "100", "2", "65.00 ± 7.07"], ["0.3", "800", "1", "90.00"]]
    # Only the 800-epoch one: no replicates at all.
    assert replicate_table(runs[1:], differing_keys(runs[1:]), ["test/acc"]) is None
    md = compare([ft], tmp_path / "out")["markdown"].read_text()
    assert "| encoder>optim.base_lr | encoder>trainer.max_epochs | runs | test/acc (%) |" in md
    assert "| 0.06 | 100 | 2 | 65.00 ± 7.07 |" in md, md

    # One step further down: evaluations of those fine-tunings, the encoder's settings under
    # the classifier's.
    ev = tmp_path / "eval"
    for f, acc in zip(fts, (0.5, 0.6, 0.8), strict=True):
        _write_run(ev / f.name, {"run": {"seed": 0}, "classifier": {"run": str(f)}},
                   {"test/acc": acc})  # fmt: skip
    evals = find_runs([ev])
    assert upstream_keys(evals) == [
        "classifier>encoder>optim.base_lr",
        "classifier>encoder>trainer.max_epochs",
    ]
    keys = differing_keys(evals)
    assert [[r.name for r in g] for _, g in replicate_groups(evals, keys)] == [["a", "b"], ["c"]]
    header, rows = replicate_table(evals, keys, ["test/acc"])
    assert header[:2] == upstream_keys(evals) and rows[0][2:] == ["2", "55.00 ± 7.07"]
    # Lines of a plot over them: one per encoder setting, the 100-epoch one over both seeds,
    # named by the first of the encoder's settings that tell them apart (the other changes
    # with it).
    lines = line_data(evals, "test/acc", ["test/acc"], line_series(evals, keys))
    assert list(lines) == [
        ("encoder>base_lr=0.06", "test/acc"), ("encoder>base_lr=0.3", "test/acc")
    ]  # fmt: skip
    assert [n for _, _, n, _ in lines["encoder>base_lr=0.06", "test/acc"]] == [1, 1]


def test_upstream_settings_that_switch_off_or_cannot_be_read(tmp_path: Path) -> None:
    pre = _pretrain(tmp_path, "pre", 100, 0.06, 0)
    # Fine-tunings whose switched-off section (a linear probe's augmentation) differs: alike.
    fts = [
        _write_run(tmp_path / f"ft{i}", {"run": {"seed": i}, "mode": "linear",
                   "encoder": {"run": str(pre)}, "augment": {"crop_padding": 2 + 2 * i}}, {})
        for i in (0, 1)
    ]  # fmt: skip
    settings = [upstream_settings({"classifier.run": str(f)}, tmp_path) for f in fts]
    assert settings[0] == settings[1]
    assert settings[0]["classifier>mode"] == "linear"
    assert settings[0]["classifier>encoder.run"] is True  # nested: whether it is set
    assert settings[0]["classifier>encoder>trainer.max_epochs"] == 100
    assert not any("augment" in k or "run.seed" in k for k in settings[0])
    # A nested upstream that is missing here counts by its path; none set shows as "".
    gone = _write_run(tmp_path / "gone-ft", {"encoder": {"run": "/nowhere/pre"}}, {})
    scratch = _write_run(tmp_path / "scratch", {"encoder": {"run": ""}}, {})
    assert upstream_settings({"classifier.run": str(gone)}, tmp_path) == {
        "classifier.run": True,
        "classifier>encoder.run": "/nowhere/pre",
    }
    runs = [
        Run("e0", "e0", {"classifier.run": str(fts[0]), "run.seed": 0}, {"test/acc": 0.5}),
        Run("e1", "e1", {"classifier.run": str(fts[1]), "run.seed": 1}, {"test/acc": 0.7}),
        Run("e2", "e2", {"classifier.run": str(scratch), "run.seed": 0}, {"test/acc": 0.1}),
        Run("e3", "e3", {"classifier.run": str(gone), "run.seed": 0}, {"test/acc": 0.2}),
    ]
    keys = differing_keys(runs)
    groups = replicate_groups(runs, keys)
    assert sorted([r.name for r in g] for _, g in groups) == [["e0", "e1"], ["e2"], ["e3"]]
    # Shown by whether the classifier's encoder is set (the path where it cannot be read).
    header, rows = replicate_table(runs, keys, ["test/acc"])
    assert "classifier>encoder.run" in header
    column = header.index("classifier>encoder.run")
    assert sorted(row[column] for row in rows) == ["/nowhere/pre", "none", "set"]


def test_lines_against_the_fraction_are_per_setting_not_per_run(tmp_path: Path) -> None:
    """Evaluations of fine-tunings (2 fractions x 2 seeds), bare and purified: a line per
    purifier choice and metric, two points each, the mean over the seeds."""
    den = _write_run(tmp_path / "den", {"denoiser": {"unet": "tiny"}}, {"val/loss": 0.1})
    runs = []
    for fraction in (0.1, 1.0):
        for seed in (0, 1):
            ft = _write_run(tmp_path / f"ft-{fraction}-{seed}",
                            {"run": {"seed": seed}, "subset": {"fraction": fraction}},
                            {"test/acc": 0.5})  # fmt: skip
            for purifier in ("", str(den)):
                name = f"ev-{fraction}-{seed}-{'pur' if purifier else 'bare'}"
                acc = fraction / 2 + 0.1 * seed + (0.05 if purifier else 0)
                folder = _write_run(
                    tmp_path / "eval" / name,
                    {"classifier": {"run": str(ft)},
                     "purifier": {"run": purifier, "sampler": "ddpm", "t_star": 100}},
                    {"test/acc": acc},
                )  # fmt: skip
                runs.append(load_run(folder))
    keys = differing_keys(runs)
    assert keys == ["classifier.run", "purifier.run", "subset.fraction"]
    series = line_series(runs, keys, leave_out=("subset.fraction",))
    assert series == ["purifier.run"]  # by whether it is set: the paths are no setting
    lines = line_data(runs, "subset.fraction", ["test/acc"], series)
    assert lines == {
        ("purifier=none", "test/acc"): [
            (0.1, pytest.approx(0.1), 2, pytest.approx(0.1 / 2**0.5)),
            (1.0, pytest.approx(0.55), 2, pytest.approx(0.1 / 2**0.5)),
        ],
        ("purifier=set", "test/acc"): [
            (0.1, pytest.approx(0.15), 2, pytest.approx(0.1 / 2**0.5)),
            (1.0, pytest.approx(0.6), 2, pytest.approx(0.1 / 2**0.5)),
        ],
    }
    written = compare([tmp_path / "eval"], tmp_path / "out")
    assert written["plot_accuracy_vs_fraction"].is_file()


def _evaluation(root: Path, name: str, purifier: dict, metrics: dict) -> Run:
    folder = _write_run(root / name, {"classifier": {"run": "ft"}, "purifier": purifier}, metrics)
    return load_run(folder)


def test_robust_accuracy_against_the_nfe_of_real_evaluations(tmp_path: Path) -> None:
    runs = []
    # DDIM: the NFE is ddim_steps; each t* its own line.
    for t in (50, 100):
        for k in (2, 8):
            purifier = {"run": "/d", "sampler": "ddim", "t_star": t, "ddim_steps": k}
            metrics = {"adv/linf_8/acc": t / 1000 + k / 100, "perf/purifier_nfe": float(k)}
            runs.append(_evaluation(tmp_path, f"ddim-t{t}-{k}", purifier, metrics))
    # DDPM: the NFE is t* (ddim_steps ignored): one line.
    for t in (10, 40):
        purifier = {"run": "/d", "sampler": "ddpm", "t_star": t, "ddim_steps": 5}
        metrics = {"adv/linf_8/acc": t / 1000, "perf/purifier_nfe": float(t)}
        runs.append(_evaluation(tmp_path, f"ddpm-{t}", purifier, metrics))
    # A bare classifier writes no purifier NFE; a fine-tuning (purify/nfe) is not attacked.
    runs.append(_evaluation(tmp_path, "bare", {"run": ""}, {"adv/linf_8/acc": 0.0}))
    runs.append(Run("ft", "ft", {"encoder.run": "e", "purify.t_star": 7}, {"purify/nfe": 7.0}))
    lines = nfe_data(runs)
    assert lines == {
        ("sampler=ddim, t_star=100", "adv/linf_8/acc"): [
            (2.0, pytest.approx(0.12), 1, 0.0), (8.0, pytest.approx(0.18), 1, 0.0)
        ],
        ("sampler=ddim, t_star=50", "adv/linf_8/acc"): [
            (2.0, pytest.approx(0.07), 1, 0.0), (8.0, pytest.approx(0.13), 1, 0.0)
        ],
        ("sampler=ddpm", "adv/linf_8/acc"): [
            (10.0, pytest.approx(0.01), 1, 0.0), (40.0, pytest.approx(0.04), 1, 0.0)
        ],
    }  # fmt: skip
    written = compare(runs, tmp_path / "out")
    assert written["plot_robust_vs_nfe"].name == "robust_vs_nfe.png"
    # One NFE only: nothing to draw.
    assert nfe_data(runs[:1]) == {}
    assert "plot_robust_vs_nfe" not in compare(runs[:1], tmp_path / "one")


def test_report_sections_are_flattened_to_metric_names(tmp_path: Path) -> None:
    folder = _write_run(tmp_path / "ev", {}, {"shift": {"mean_acc": 0.3}, "label": "x"},
                        name="report.json")  # fmt: skip
    run = load_run(folder)
    assert run.metrics == {"shift/mean_acc": 0.3}


def test_the_comparison_is_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [Run("a", "a", {"k": 1}, {"test/acc": 0.5}), Run("b", "b", {"k": 2}, {"test/acc": 0.6})]
    out = tmp_path / "out"
    replaced: list[tuple[Path, Path]] = []
    real = compare_module.os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        replaced.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(compare_module.os, "replace", spy)
    written = compare(runs, out)
    # Each page through a hidden temp file in its own folder, renamed over it.
    assert [dst for _, dst in replaced] == [written["markdown"], written["html"]]
    assert all(src.parent == out and src.name.startswith(".") for src, _ in replaced)
    assert sorted(p.name for p in out.iterdir()) == ["comparison.html", "comparison.md"]
    assert "| a | 1 | 50.00 |" in written["markdown"].read_text()

    # A failure before the rename keeps the previous pages whole and leaves no temp file.
    def fail(src: str | Path, dst: str | Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(compare_module.os, "replace", fail)
    before = written["markdown"].read_text()
    with pytest.raises(OSError, match="disk full"):
        compare([Run("c", "c", {"k": 3}, {"test/acc": 0.1}), *runs], out)
    assert written["markdown"].read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["comparison.html", "comparison.md"]


def test_an_evaluation_report_gives_its_metrics_only(tmp_path: Path) -> None:
    report = {
        "metrics": {"test/acc": 0.5, "shift/mean_acc": 0.25},
        "meta": {"num_images": 100, "seed": 0},
        "per_class": {"images": [50, 50], "clean": [0.4, 0.6]},
    }
    folder = _write_run(tmp_path / "ev", {}, report, name="report.json")
    assert load_run(folder).metrics == {"test/acc": 0.5, "shift/mean_acc": 0.25}


def test_upstream_io_settings_and_a_data_like_runs_method_do_not_split_replicates(
    tmp_path: Path,
) -> None:
    pre = tmp_path / "pre"
    # Seed replicates, of which only the first downloaded its data and kept it on disk.
    encs = [
        _pretrain(pre, f"s{s}", 100, 0.06, s, data={"download": s == 0, "in_memory": s > 0})
        for s in range(3)
    ]
    fts = [
        _finetune(tmp_path / "ft", f"f{s}", str(e), s, 0.4 + s / 100) for s, e in enumerate(encs)
    ]
    runs = find_runs([tmp_path / "ft"])
    groups = replicate_groups(runs, differing_keys(runs))
    assert [[r.name for r in g] for _, g in groups] == [["f0", "f1", "f2"]] and len(fts) == 3
    # Supervised baselines on the data of a SimCLR and of a BYOL encoder (data.like): the
    # encoders' methods never acted on them; their data did.
    simclr = _pretrain(pre, "simclr", 100, 0.06, 0, data={"name": "cifar10"})
    byol = _pretrain(pre, "byol", 100, 0.06, 1, method={"name": "byol"}, data={"name": "cifar10"})
    c100 = _pretrain(pre, "c100", 100, 0.06, 0, data={"name": "cifar100"})
    base = tmp_path / "base"
    for name, like, seed in (("a", simclr, 0), ("b", byol, 1), ("c", c100, 0)):
        _write_run(base / name, {"run": {"seed": seed}, "data": {"like": str(like)}},
                   {"test/acc": 0.4})  # fmt: skip
    runs = find_runs([base])
    groups = replicate_groups(runs, differing_keys(runs))
    assert [[r.name for r in g] for _, g in groups] == [["a", "b"], ["c"]]


def test_runs_apart_only_in_seeds_of_any_kind_are_replicates(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    for s in range(3):  # the run's seed, its purifier's noise and its split apart
        config = {"run": {"seed": s}, "mode": "linear", "purify": {"seed": 10 + s},
                  "data": {"split_seed": s}}  # fmt: skip
        _write_run(ft / f"f{s}", config, {"test/acc": 0.5 + s / 100})
    runs = find_runs([ft])
    keys = differing_keys(runs)
    assert keys == ["data.split_seed", "purify.seed", "run.seed"]
    assert [[r.name for r in g] for _, g in replicate_groups(runs, keys)] == [["f0", "f1", "f2"]]
