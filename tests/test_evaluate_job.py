"""The evaluation job end to end on a tiny digits classifier (8 px, convnet width 4)."""

from __future__ import annotations

import functools
import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import save_file

from ssl_robust.config import ConfigError, EvaluateConfig, load_config
from ssl_robust.data.datasets import DataError, build_splits
from ssl_robust.evaluate.attacks import sanity_attack_costs
from ssl_robust.evaluate.cifar_c import _corruption_seed, write_cifar_c
from ssl_robust.evaluate.metrics import (
    bootstrap_interval,
    calibration_report,
    fit_temperature,
    fold_of,
    refit_scaled_ece,
    wilson_interval,
)
from ssl_robust.evaluate.ood import (
    energy_score,
    fit_mahalanobis,
    knn_score,
    mahalanobis_score,
    msp_score,
    noise_images,
    ood_metrics,
)
from ssl_robust.evaluate.report import OOD_SCORES, describe_metric, expected_metric_keys
from ssl_robust.evaluate.store import UNIT_SUFFIX, read_unit
from ssl_robust.finetune.export import load_classifier
from ssl_robust.pipelines.evaluate import evaluate
from ssl_robust.pipelines.evaluate.setup import SEED_OOD
from tests.eval_runs import DATA, train_digits_classifier
from tests.helpers import frost_photos, unit_stamps

ROOT = Path(__file__).resolve().parents[1]
GRID = ["impulse_noise", "contrast"]  # the tiny preset's grid, severities 1 and 5


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own: trained longer than conftest's, for the accuracy checks."""
    return train_digits_classifier(tmp_path_factory.mktemp("finetune-digits"), steps=120)


@pytest.fixture
def tiny_cfg(classifier_run: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        run = run_dir or tmp_path / "eval"
        args = ["tiny", f"classifier.run={classifier_run}", f"run.dir={run}", *overrides]
        return load_config(EvaluateConfig, args, job="evaluate")

    return make


def _report(cfg: DictConfig) -> dict[str, Any]:
    return json.loads((Path(cfg.run.dir) / "report.json").read_text())


@pytest.fixture
def unet_calls() -> Iterator[list[int]]:
    """Images seen by any diffusers UNet, counted by a global forward *pre*-hook: it also sees
    the recomputation of checkpointed calls (which stops early, before forward hooks run)."""
    from diffusers.models.unets.unet_2d import UNet2DModel

    seen = [0]

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if isinstance(module, UNet2DModel):
            seen[0] += args[0].shape[0]

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_wide_interval_note_names_the_widest_interval_and_the_fix() -> None:
    from ssl_robust.pipelines.evaluate.units import wide_interval_note

    # 50 % on 1,000 images: +-3.1 points, below the 5-point bar; on 128 images +-8.5.
    assert wide_interval_note([0.5], 1000) == "" and wide_interval_note([], 10) == ""
    note = wide_interval_note([0.05, 0.5], 128)
    assert "on 128 images: its 95% interval reaches +-8.5 points" in note
    assert "adv.max_images" in note


def test_job_end_to_end_writes_the_documented_report(
    tiny_cfg: Callable[..., DictConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_cfg("eval.progress=true")
    metrics = evaluate(cfg)
    # Progress in a log (captured output is not a terminal): a line per unit and per end.
    log = capsys.readouterr().out
    assert "corruptions 0/4 (" in log and "corruptions 4/4 (" in log, log
    assert re.search(r"PGD linf_8 steps 5/5 \(\d:\d\d:\d\d\): done\n", log), log
    # The sanity checks count pipeline passes, so their time left weighs each attack's budget.
    # The pipeline is deterministic: no more_eot check.
    total = sum(sanity_attack_costs(4, steps=5, eot=1, black_box_queries=20, eot_check=False))
    # So do all the attacks: 3 threats' PGD-5 on 32 images (a pass with a backward counts 3;
    # the clean and adversarial scoring one each), and two norms' checks on 16.
    passes = 3 * 32 * ((3 * 5 + 1) + 2) + 2 * 16 * total
    assert f"attacks, image passes 0/{passes} (0:00:00): PGD linf_8\n" in log, log
    assert f"attacks, image passes {passes}/{passes} (" in log, log
    start = f"sanity checks linf, passes/image 0/{total} (0:00:00): PGD eps 0.007843, 5 steps"
    assert start + ", EOT 1\n" in log, log
    assert f"sanity checks linf, passes/image {5 * 17}/{total} (" in log, log  # 5 PGD-5 done
    assert re.search(rf"sanity checks l2, passes/image {total}/{total} \(.*\): done\n", log), log
    run = Path(cfg.run.dir)
    report = _report(cfg)
    m = report["metrics"]

    # Per class: the digits' ten classes, whose image-weighted accuracies are the overall ones
    # (clean: test/acc; shift: the calibration's pooled severity-5 set).
    per_class = report["per_class"]
    assert per_class["classes"] == [str(k) for k in range(10)]
    images = per_class["images"]
    assert sum(images) == m["test/n"] and min(images) > 0
    clean = sum(a * n for a, n in zip(per_class["clean"], images, strict=True)) / sum(images)
    assert clean == pytest.approx(m["test/acc"])
    shift = sum(a * n for a, n in zip(per_class["shift"], images, strict=True)) / sum(images)
    assert shift == pytest.approx(m["calib/shift/acc"])
    # The confusion matrices: rows are the classes' images, diagonals their accuracies.
    confusion = {k: np.asarray(v) for k, v in report["confusion"].items()}
    assert confusion["clean"].sum(1).tolist() == images
    assert np.diag(confusion["clean"]) / images == pytest.approx(per_class["clean"])
    shift_rows = confusion["shift"].sum(1)
    assert (shift_rows == len(GRID) * np.asarray(images)).all()  # severity 5 of each corruption
    assert np.diag(confusion["shift"]) / shift_rows == pytest.approx(per_class["shift"])

    # Exactly the documented keys for this shape of run, each one documented.
    expected = expected_metric_keys(
        clean=True,
        corruptions=GRID,
        severities=[1, 5],
        threats=["linf_8", "linf_128", "l2_0.5"],
        sanity_norms=["linf", "l2"],
        calib_sets=["clean", "shift"],
        ood_sets=["noise_gaussian", "noise_blobs", "shift_s5"],
        perf=True,
        bootstrap=True,
        temperature=True,
        ood_scores=OOD_SCORES,
        knn_sets=["clean", "shift"],
    )
    assert set(m) == expected
    assert all(describe_metric(k) is not None for k in m)
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics) == m
    assert (run / "config.yaml").is_file()

    # Sane values.
    for key, value in m.items():
        if key.endswith(("acc", "acc_worst", "auroc", "fpr95")):
            assert 0.0 <= value <= 1.0, key
    assert m["test/acc"] > 0.85 and m["test/n"] == 359
    assert m["calib/clean/acc"] == m["test/acc"]
    # Contrast at severity 5 (blend factor 0.15) wipes out most of a digit.
    assert m["shift/contrast/5/acc"] < m["test/acc"] - 0.3
    assert m["shift/contrast/5/acc"] < m["shift/contrast/1/acc"]
    cells = [m[f"shift/{c}/{s}/acc"] for c in GRID for s in (1, 5)]
    assert m["shift/mean_acc"] == pytest.approx(np.mean(cells))
    assert m["shift/severity5_acc"] == m["shift/severity/5/acc"]
    # The grid mean's interval over the images: per image, its accuracy over the grid's cells.
    hits = np.stack([_unit(cfg, f"shift/{c}/{s}")[1]["hits"].numpy() for c in GRID for s in (1, 5)])
    assert set(np.unique(hits)) <= {0.0, 1.0} and m["shift/n"] == hits.shape[1] == 359
    assert hits.mean(1) == pytest.approx(cells)  # each cell's accuracy
    per_image = hits.mean(0)
    assert m["shift/mean_acc"] == pytest.approx(per_image.mean())
    assert m["shift/mean_acc_se"] == pytest.approx(per_image.std(ddof=1) / np.sqrt(359))
    assert m["shift/severity/5/acc_se"] == pytest.approx(
        hits[1::2].mean(0).std(ddof=1) / np.sqrt(359)
    )
    assert (
        m["shift/group/digital/acc_se"]
        == pytest.approx(  # contrast, severities 1 and 5
            hits[2:].mean(0).std(ddof=1) / np.sqrt(359)
        )
    )
    assert m["shift/severity/1/acc"] == pytest.approx(
        (m["shift/impulse_noise/1/acc"] + m["shift/contrast/1/acc"]) / 2
    )
    assert m["shift/group/digital/acc"] == pytest.approx(
        (m["shift/contrast/1/acc"] + m["shift/contrast/5/acc"]) / 2
    )
    # Calibration per severity: each cell's ECE from its stored logits, averaged over the
    # corruptions; after temperature scaling with each image's cross-fitted temperature.
    fold = fold_of(359, 2, int(cfg.run.seed) + 10)
    clean_logits = _unit(cfg, "clean")[1]["logits"][0]
    y = _val_labels()
    temps = torch.empty(359)
    for k in (0, 1):
        temps[fold == k] = fit_temperature(clean_logits[fold != k], y[fold != k])
    for sev in (1, 5):
        raw, scaled = [], []
        for c in GRID:
            logits = _unit(cfg, f"shift/{c}/{sev}")[1]["logits"]  # (N, classes): one draw
            raw.append(calibration_report(logits, y, 15)["ece"])
            scaled.append(calibration_report(logits / temps[:, None], y, 15)["ece"])
        assert m[f"calib/severity/{sev}/ece"] == pytest.approx(np.mean(raw), abs=1e-6)
        assert m[f"calib/severity/{sev}/ts_ece"] == pytest.approx(np.mean(scaled), abs=1e-6)
    # The scaled ECE's interval refits the temperatures in every bootstrap resample: the
    # statistic of a reference, resampling an image's fold, clean and scaled logits together.
    shape = (1, 359)
    clean_side = (clean_logits[None], y.expand(shape), fold.expand(shape))
    low, high = bootstrap_interval(
        functools.partial(refit_scaled_ece, n_bins=15),
        [(*clean_side, *clean_side)],
        int(cfg.eval.bootstrap),
        int(cfg.run.seed) + 9,
        bounds=(0.0, 1.0),
    )
    assert (m["calib/clean/ts_ece_low"], m["calib/clean/ts_ece_high"]) == pytest.approx(
        (low, high), abs=1e-6
    )
    assert low <= m["calib/clean/ts_ece"] <= high
    contrast = [_unit(cfg, f"shift/contrast/{s}")[1]["logits"] for s in (1, 5)]
    want = [calibration_report(logits, y, 15)["ece"] for logits in contrast]
    assert report["calib_severity"]["ece"]["contrast"] == pytest.approx(want, abs=1e-6)
    assert m["adv/linf_128/acc"] <= 0.05  # half the [0, 1] box
    assert m["adv/linf_128/acc"] <= m["adv/linf_8/acc"] <= m["adv/linf_8/clean_acc"]
    assert m["adv/l2_0.5/acc"] <= m["adv/l2_0.5/clean_acc"]
    # A deterministic pipeline: no EOT, one scoring draw, worst case = mean.
    assert m["adv/linf_8/eot"] == 1 and m["adv/linf_8/rescore_draws"] == 1
    assert m["adv/linf_8/acc_worst"] == m["adv/linf_8/acc"]
    assert m["adv/linf_8/attack_calls_per_image"] == 5 + 1  # PGD-5 + scoring the last iterate
    assert m["adv/linf_8/pipeline_calls_per_image"] == 6 + 2  # + clean and adversarial scoring
    assert m["adv/linf_8/nfe_per_image"] == 6
    assert m["ood/noise_blobs/msp/auroc"] > 0.6
    assert m["perf/latency_ms"] > 0 and m["perf/throughput_ips"] > 0

    # OOD feature scores. The bank: the encoder's features of the training images (this run
    # records no labeled subset: the whole train split), stored with their labels.
    classifier = load_classifier(cfg.classifier.run)[0].eval()
    train = build_splits(**DATA).train
    bank = _unit(cfg, "features/bank")[1]
    assert torch.equal(bank["labels"], torch.from_numpy(train.labels))
    with torch.no_grad():
        x_train = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(bank["features"], classifier.features(x_train))
        # The clean pass kept the features its logits came from.
        clean = _unit(cfg, "clean")[1]
        torch.testing.assert_close(classifier.head(clean["features"]), clean["logits"][0])
    # The scores of the top-severity set, recomputed from the stored features: kNN at Sun et
    # al.'s ratio (1438 bank images: k = 1) and Mahalanobis from the labeled bank.
    shifted = torch.cat([_unit(cfg, f"shift/{c}/5")[1]["features"] for c in GRID])
    assert report["meta"]["ood_knn_k"] == 1
    means, precision = fit_mahalanobis(bank["features"], bank["labels"])
    scorers = {
        "knn": lambda f: knn_score(bank["features"], f, 1),
        "mahalanobis": lambda f: mahalanobis_score(f, means, precision),
    }
    for score, scorer in scorers.items():
        expected = ood_metrics(scorer(clean["features"]), scorer(shifted))
        for k, v in expected.items():
            assert m[f"ood/shift_s5/{score}/{k}"] == pytest.approx(v, abs=1e-6), (score, k)
        assert m[f"ood/noise_blobs/{score}/auroc"] > 0.9, score

    # The representation's kNN accuracy against the labeled bank, by a plain reference: the
    # 200 most cosine-similar bank features vote with weight exp(similarity / 0.1).
    def weighted_knn(query: torch.Tensor, labels: torch.Tensor) -> float:
        sims = (
            torch.nn.functional.normalize(query, dim=1)
            @ torch.nn.functional.normalize(bank["features"], dim=1).T
        )
        top, idx = sims.topk(200, dim=1)
        votes = torch.zeros(len(query), 10).scatter_add_(1, bank["labels"][idx], (top / 0.1).exp())
        return (votes.argmax(1) == labels).double().mean().item()

    assert m["repr/knn_acc"] == pytest.approx(weighted_knn(clean["features"], y), abs=1e-9)
    assert m["repr/shift/knn_acc"] == pytest.approx(weighted_knn(shifted, y.repeat(2)), abs=1e-9)
    md_text = (run / "report.md").read_text()
    assert "## Representation" in md_text
    summary_row = (
        f"| kNN on the encoder's features, clean / top severity | "
        f"{100 * m['repr/knn_acc']:.2f}% / {100 * m['repr/shift/knn_acc']:.2f}% |"
    )
    assert summary_row in md_text
    assert f"| clean | {100 * m['repr/knn_acc']:.2f} | {100 * m['test/acc']:.2f} |" in md_text
    assert "against a bank of 1438 of the whole train split (1438 images; the" in md_text
    assert "| noise_blobs | knn |" in md_text and "| shift_s5 | mahalanobis |" in md_text
    # The summary's OOD rows: MSP's mean and worst set, and kNN's beside it.
    aurocs = [m[f"ood/{s}/knn/auroc"] for s in ("noise_gaussian", "noise_blobs", "shift_s5")]
    assert m["ood/mean/knn/auroc"] == pytest.approx(np.mean(aurocs))
    assert (
        f"| OOD AUROC (knn), mean of 3 sets / worst (shift_s5) | {100 * np.mean(aurocs):.2f}% / "
        f"{100 * min(aurocs):.2f}% |"
    ) in md_text

    # The sanity checks ran and are reported (a trained CNN passes them); more EOT draws are
    # not among them, as the pipeline (no purifier) is deterministic.
    for norm in ("linf", "l2"):
        checks = report["sanity"][norm]
        assert set(checks) == {
            "eps_monotone",
            "large_eps",
            "more_steps",
            "black_box",
            "nonzero_gradients",
        }
        assert checks["large_eps"]["passed"] and checks["large_eps"]["values"]["acc"] <= 0.05
        assert m[f"adv/sanity/{norm}/passed"] == float(all(c["passed"] for c in checks.values()))

    md = (run / "report.md").read_text()
    for needle in (
        "## Clean accuracy",
        "| corruption | group | s1 | s5 | mean |",
        f"| contrast | digital | {100 * m['shift/contrast/1/acc']:.2f} |",
        "**Per group (%)**",
        "**Per severity (%)**",
        "| threat | eps | clean | PGD mean | 95% CI | PGD worst | AutoAttack | images |",
        "| linf_8 | 8/255 |",
        "## Per class",
        "| class | images | clean | shift | drop |",
        "Sanity checks (against gradient masking and weak attacks; Carlini et al. 2019)",
        "| linf | large_eps | yes |",
        "classifier; the pipeline is deterministic, so one gradient per step and one scoring "
        "call per image",
        "| robust accuracy, linf_8 (PGD) |",
        "| clean | ",
        "| noise_blobs | msp |",
        "latency batch 1 (ms)",
        "![robust_eps](plots/robust_eps.png)",
        "![confusion](plots/confusion.png)",
    ):
        assert needle in md, needle
    assert "Standard WRN-28-10" not in md  # CIFAR-10's anchors, not a digits run's
    assert "more_eot" not in md and "EOT 1" not in md and "mean over draws" not in md
    for name in ("shift_severity", "reliability", "robust_eps", "ood_hist", "confusion"):
        path = run / "plots" / f"{name}.png"
        assert path.stat().st_size > 10_000, name
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 300
            assert len(img.convert("L").getcolors(maxcolors=100_000) or []) > 10


def test_purified_pipeline_runs_eot_and_rescoring(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path, unet_calls: list[int]
) -> None:
    steps, eot, draws, n, ddim = 2, 3, 4, 8, 2
    cfg = tiny_cfg(
        f"purifier.run={denoiser_run}",
        "purifier.sampler=ddim",
        "purifier.t_star=20",
        f"purifier.ddim_steps={ddim}",
        "purifier.gradient_checkpointing=true",
        "adv.linf_eps=[8]",
        "adv.l2_eps=[]",
        f"adv.steps={steps}",
        f"adv.eot={eot}",
        f"adv.rescore_draws={draws}",
        f"adv.max_images={n}",
        "adv.autoattack=true",
        "adv.sanity_checks=false",
        *[f"{s}.enabled=false" for s in ("clean", "shift", "calib", "ood", "perf")],
    )
    m = evaluate(cfg)
    report = _report(cfg)
    assert set(m) == expected_metric_keys(clean=False, purified=True, threats=["linf_8"])
    assert m["adv/linf_8/eot"] == eot and m["adv/linf_8/rescore_draws"] == draws
    # EOT: (steps + 1) x eot pipeline calls per image; scoring: draws before and after.
    assert m["adv/linf_8/attack_calls_per_image"] == (steps + 1) * eot
    assert m["adv/linf_8/pipeline_calls_per_image"] == (steps + 1) * eot + 2 * draws
    assert m["adv/linf_8/nfe_per_image"] == (steps + 1) * eot * (ddim + 1)
    # Counted at the UNet: each call runs `ddim` UNet steps; checkpointing recomputes the
    # forward of the steps * eot calls with a backward pass.
    assert unet_calls[0] == n * ddim * ((2 * steps + 1) * eot + 2 * draws)
    assert m["adv/linf_8/acc_worst"] <= m["adv/linf_8/acc"] <= 1.0
    assert report["meta"]["stochastic"] is True
    notes = " ".join(report["notes"])
    assert "AutoAttack skipped: the pipeline is stochastic" in notes
    assert "below the recommended one" in notes
    low, high = wilson_interval(m["adv/linf_8/acc"], n)  # a few images: a wide interval
    assert f"Robust accuracy is measured on {n} images: its 95% interval reaches +-" in notes
    assert f"+-{50 * (high - low):.1f} points" in notes
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "EOT 3 gradient draws per step" in md and "re-scored over 4" in md
    assert "gradient checkpointing" in md


def test_cifar_c_folder_gives_the_same_numbers_as_generation(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    val = build_splits(**DATA).val
    folder = write_cifar_c(tmp_path / "c10c", val.images, val.labels, GRID, seed=0)
    only_shift = [f"{s}.enabled=false" for s in ("adv", "calib", "ood", "perf")]
    generated = evaluate(tiny_cfg(*only_shift, run_dir=tmp_path / "a"))
    from_folder = evaluate(
        tiny_cfg(*only_shift, f"shift.cifar_c_dir={folder}", run_dir=tmp_path / "b")
    )
    shift = {k: v for k, v in generated.items() if k.startswith("shift/")}
    assert len(shift) == 4 + 1 + 2 + 2 + 1 + 6  # + n and the standard errors of the means
    assert shift == {k: v for k, v in from_folder.items() if k.startswith("shift/")}
    assert "the folder" in (tmp_path / "b" / "report.md").read_text()
    # The job writes the same arrays itself when asked to.
    written = tmp_path / "written"
    cfg = tiny_cfg(
        *only_shift,
        f"shift.cifar_c_dir={written}",
        "shift.write_cifar_c=true",
        run_dir=tmp_path / "c",
    )
    assert evaluate(cfg)["shift/mean_acc"] == generated["shift/mean_acc"]
    for name in GRID:
        assert np.array_equal(np.load(written / f"{name}.npy"), np.load(folder / f"{name}.npy"))


def test_autoattack_runs_on_a_deterministic_pipeline(tiny_cfg: Callable[..., DictConfig]) -> None:
    pytest.importorskip("pyautoattack")
    cfg = tiny_cfg(
        "adv.linf_eps=[8]",
        "adv.l2_eps=[]",
        "adv.autoattack=true",
        "adv.autoattack_version=custom",
        "adv.autoattack_attacks=[apgd-ce]",
        "adv.sanity_checks=false",
        *[f"{s}.enabled=false" for s in ("shift", "calib", "ood", "perf")],
    )
    m = evaluate(cfg)
    assert set(m) == expected_metric_keys(threats=["linf_8"], autoattack=True)
    # APGD-100 is at least as strong as PGD-5, up to one image of 32.
    assert m["adv/linf_8/autoattack_acc"] <= m["adv/linf_8/acc"] + 1 / 32
    assert "| linf_8 | 8/255 |" in (Path(cfg.run.dir) / "report.md").read_text()


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("classifier.run=''", ConfigError, "classifier.run is required"),
        ("shift.corruptions=[fog,fogg]", ConfigError, r"unknown corruption 'fogg'.*choose from"),
        ("shift.severities=[6]", ConfigError, r"invalid severity 6.*choose from \[1, 2, 3, 4, 5\]"),
        ("adv.linf_eps=[-8]", ConfigError, r"invalid eps -8.0 in adv.linf_eps.*1/255"),
        ("adv.linf_eps=[0.0]", ConfigError, r"invalid eps 0.0 in adv.linf_eps"),
        ("adv.l2_eps=[0]", ConfigError, r"invalid eps 0.0 in adv.l2_eps"),
        ("ood.noise_kinds=[pink]", ConfigError, r"unknown noise kind 'pink'.*gaussian"),
        # A repeated corruption would weigh twice in the severity means, once in the grid mean.
        (
            "shift.corruptions=[contrast,fog,contrast,fog,contrast]",
            ConfigError,
            r"shift\.corruptions names 'contrast', 'fog' more than once; give each corruption once",
        ),
        (
            "ood.noise_kinds=[blobs,gaussian,blobs]",
            ConfigError,
            r"ood\.noise_kinds names 'blobs' more than once",
        ),
        ("ood.held_out_classes=[12]", ConfigError, r"classes 0..9"),
    ],
)
def test_bad_inputs_raise_clear_errors(
    tiny_cfg: Callable[..., DictConfig], override: str, error: type, match: str
) -> None:
    cfg = tiny_cfg(override)
    with pytest.raises(error, match=match):
        evaluate(cfg)
    assert not Path(cfg.run.dir).exists()  # nothing written before the inputs are checked


def test_missing_runs_and_config_typos_fail_early(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg(f"classifier.run={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="no exported classifier"):
        evaluate(cfg)
    cfg = tiny_cfg(f"purifier.run={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match=r"denoiser folder .* does not exist"):
        evaluate(cfg)
    assert not Path(cfg.run.dir).exists()
    with pytest.raises(ConfigError, match=r"'adv.lnf_eps'.*did you mean 'adv.linf_eps'"):
        tiny_cfg("adv.lnf_eps=[8]")
    with pytest.raises(ConfigError, match=r"'purifier.sampler'.*\['ddim', 'ddpm', 'oneshot'\]"):
        tiny_cfg("purifier.sampler=euler")
    with pytest.raises(ConfigError, match=r"adv.linf_eps"):
        tiny_cfg("adv.linf_eps=[eight]")


def test_a_purifier_step_beyond_the_denoisers_schedule_is_a_config_error(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path
) -> None:
    """Known only once the denoiser is read; refused before anything is written (it was a
    ValueError: exit 1)."""
    cfg = tiny_cfg(f"purifier.run={denoiser_run}", "purifier.t_star=5000")
    with pytest.raises(ConfigError, match=r"purifier \(run .*\): t_star must be in \[0, 1000\]"):
        evaluate(cfg)
    assert not Path(cfg.run.dir).exists()


def test_a_denoiser_of_another_size_or_channels_is_a_config_error(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    from ssl_robust.purify.unet import build_unet, make_scheduler, save_denoiser

    for size, channels, kind in ((16, 3, "16-px"), (8, 1, "8-px 1-channel")):
        unet = build_unet("tiny", sample_size=size, in_channels=channels)
        den = save_denoiser(unet, make_scheduler(100), tmp_path / f"d{size}-{channels}")
        cfg = tiny_cfg(f"purifier.run={den}")
        match = (
            rf"purifier.run=.* holds a denoiser of {kind} images, the evaluation images are 8 px"
        )
        with pytest.raises(ConfigError, match=match):
            evaluate(cfg)
        assert not Path(cfg.run.dir).exists()


def test_default_run_dir_is_named_after_the_classifier(
    classifier_run: Path, denoiser_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    off = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "ood", "perf")]
    args = ["tiny", f"classifier.run={classifier_run}", f"purifier.run={denoiser_run}", *off]
    cfg = load_config(
        EvaluateConfig, [*args, "purifier.t_star=2", "eval.max_images=16"], job="evaluate"
    )
    m = evaluate(cfg)
    run = tmp_path / "runs" / f"evaluate-{classifier_run.name}-purified"
    assert json.loads((run / "metrics.json").read_text()) == m
    assert set(m) == expected_metric_keys(clean=True, purified=True)
    assert m["test/n"] == 16


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a wandb run file (``run-<id>.wandb``). Its format is a LevelDB
    log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each a
    7-byte header (CRC-32, length, type: 1 whole record, 2 first, 3 middle, 4 last part) and
    its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_gets_the_report(tiny_cfg: Callable[..., DictConfig]) -> None:
    pytest.importorskip("wandb")
    from ssl_robust.evaluate.report import report_tables

    cfg = tiny_cfg("wandb.mode=offline", "adv.sanity_checks=false")
    evaluate(cfg)
    run = Path(cfg.run.dir)
    run_id = (run / "wandb_id.txt").read_text().strip()
    (folder,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    history: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    # wandb's service process writes the run file; under load it may land a moment after
    # finish() returns.
    record_file = folder / f"run-{run_id}.wandb"
    for _ in range(600):
        if record_file.is_file():
            break
        time.sleep(0.1)
    for record in _wandb_records(record_file):
        kind = record.WhichOneof("record_type")
        items = {"history": record.history.item, "summary": record.summary.update}.get(kind, [])
        for item in items:
            key = item.key or "/".join(item.nested_key)
            (history if kind == "history" else summary)[key] = json.loads(item.value_json)
    report = _report(cfg)
    # Every number of the report, logged and in the run's summary.
    numbers = report["metrics"]
    assert len(numbers) > 100
    assert {k: history.get(k) for k in numbers} == numbers
    assert {k: summary.get(k) for k in numbers} == numbers
    # Every table of the report with its rows, and every plot.
    tables = report_tables(report)
    assert "shift_grid" in tables and "adv" in tables
    for key, table in tables.items():
        assert history[f"tables/{key}/_type"] == "table-file"
        logged = json.loads((folder / "files" / history[f"tables/{key}/path"]).read_text())
        assert logged["columns"] == list(table.columns), key
        plain = (int, float, str, type(None))
        rows = [[v if isinstance(v, plain) else str(v) for v in row] for row in table.rows]
        assert logged["data"] == rows, key
    plots = {p.stem for p in (run / "plots").glob("*.png")}
    assert "reliability" in plots
    assert {k.split("/")[1] for k in history if k.startswith("plots/")} == plots
    assert all(history[f"plots/{name}/_type"] == "image-file" for name in plots)


@pytest.mark.slow
def test_script_runs_and_reports_config_errors(classifier_run: Path, tmp_path: Path) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    bad = script(f"classifier.run={classifier_run}", "shift.corruptions=[fogg]")
    assert bad.returncode != 0 and "unknown corruption 'fogg'" in bad.stderr
    ok = script("tiny", f"classifier.run={classifier_run}", "adv.sanity_checks=false")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "runs" / f"evaluate-{classifier_run.name}" / "report.md").is_file()


def test_frost_source_is_checked_reported_and_keys_the_cells(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    nowhere = tiny_cfg(f"shift.frost={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"shift.frost=.*\['procedural', 'package'\]"):
        evaluate(nowhere)
    assert not Path(nowhere.run.dir).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"lacks frost1 .*frost5"):
        evaluate(tiny_cfg(f"shift.frost={tmp_path / 'empty'}"))

    photos = frost_photos(tmp_path / "photos", 200, 240)  # 10 x 12 at the digits' 8 px
    only_frost = [
        *[f"{s}.enabled=false" for s in ("adv", "calib", "ood", "perf")],
        "shift.corruptions=[frost]",
    ]
    run = tmp_path / "frost"
    evaluate(tiny_cfg(*only_frost, f"shift.frost={photos}", run_dir=run))
    notes = json.loads((run / "report.json").read_text())["notes"]
    assert f"frost: the CIFAR-10-C frost photographs from {photos}" in notes
    assert f"frost photographs from {photos}" in (run / "report.md").read_text()
    # Another frost source in the same run directory: the clean pass is reused, the frost cells
    # (keyed by the textures) are recomputed.
    evaluate(tiny_cfg(*only_frost, run_dir=run))
    notes = json.loads((run / "report.json").read_text())["notes"]
    assert "frost: procedural textures (not the CIFAR-10-C photographs)" in notes
    assert any(n.startswith("Resumed: 1 of 3 units") for n in notes)
    # Cells read from a folder: the note says what the folder's manifest records.
    val = build_splits(**DATA).val
    folder = write_cifar_c(
        tmp_path / "c10c", val.images, val.labels, ["frost"], frost_textures=str(photos)
    )
    evaluate(tiny_cfg(*only_frost, f"shift.cifar_c_dir={folder}", run_dir=tmp_path / "read"))
    notes = json.loads((tmp_path / "read" / "report.json").read_text())["notes"]
    assert f"frost: read from {folder}, written with the CIFAR-10-C frost photographs from " in (
        " ".join(notes)
    )


def _ddim_purifier(denoiser_run: Path, ddim: int) -> list[str]:
    """Overrides for a stochastic DDIM purifier of ``ddim`` steps from t*=20."""
    return [
        f"purifier.run={denoiser_run}",
        "purifier.sampler=ddim",
        "purifier.t_star=20",
        f"purifier.ddim_steps={ddim}",
    ]


def _unit(cfg: DictConfig, unit: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The numbers and tensors an evaluation run stored for ``unit`` in ``partial/``."""
    read = read_unit(Path(cfg.run.dir) / "partial" / f"{unit}{UNIT_SUFFIX}")
    assert read is not None, unit
    return read[1], read[2]


def _val_labels() -> torch.Tensor:
    """The labels of the evaluation split, in the order the job evaluates it."""
    return torch.from_numpy(build_splits(**DATA).val.labels)


def test_clean_accuracy_over_several_purifications(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path, unet_calls: list[int], tmp_path: Path
) -> None:
    ddim, draws = 2, 3
    only_clean = [*[f"{s}.enabled=false" for s in ("shift", "adv", "calib", "ood", "perf")]]
    purifier = _ddim_purifier(denoiser_run, ddim)
    several = tiny_cfg(*purifier, *only_clean, f"clean.draws={draws}", "calib.enabled=true")
    m = evaluate(several)
    n = int(m["test/n"])
    # draws purifications of every image, ddim UNet calls each; the classifier alone needs none.
    assert unet_calls[0] == draws * n * ddim
    expected = expected_metric_keys(
        purified=True, clean_draws=draws, calib_sets=["clean"], bootstrap=True, temperature=True
    )
    assert set(m) == expected and all(describe_metric(k) is not None for k in m)
    assert m["test/draws"] == draws and m["test/acc_std"] > 0  # the draws differ
    assert m["test/acc_worst"] <= m["test/acc"] <= 1.0
    # The first draw is the one-purification run's draw (same stream).
    logits = _unit(several, "clean")[1]["logits"]  # (draws, n, classes)
    assert logits.shape[:2] == (draws, n)
    y = _val_labels()
    one = tiny_cfg(*purifier, *only_clean, run_dir=tmp_path / "one")
    m1 = evaluate(one)
    assert "test/acc_std" not in m1
    assert m1["test/acc"] == pytest.approx((logits[0].argmax(1) == y).float().mean().item())
    # Calibration pools the predictions of every draw: NLL, Brier and accuracy are the means
    # over the draws, the ECE that of the pooled predictions.
    per_draw = [calibration_report(d, y, 15) for d in logits]
    for k in ("nll", "brier", "acc"):
        assert m[f"calib/clean/{k}"] == pytest.approx(np.mean([r[k] for r in per_draw]), rel=1e-5)
    pooled = calibration_report(logits.flatten(0, 1), y.repeat(draws), 15)
    assert m["calib/clean/ece"] == pytest.approx(pooled["ece"], rel=1e-5)
    assert m["calib/clean/acc"] == pytest.approx(m["test/acc"])
    # Temperature scaling: one temperature fit on every draw of every image; each image scored
    # with the one fit on the other fold's images and draws (cross-fitting).
    assert m["calib/temperature"] == pytest.approx(
        fit_temperature(logits.flatten(0, 1), y.repeat(draws))
    )
    fold = fold_of(n, 2, int(several.run.seed) + 10)
    temps = torch.empty(n)
    for k in (0, 1):
        rest = fold != k
        temps[fold == k] = fit_temperature(logits[:, rest].flatten(0, 1), y[rest].repeat(draws))
    scaled = calibration_report((logits / temps[None, :, None]).flatten(0, 1), y.repeat(draws), 15)
    for k in ("ece", "nll", "brier"):
        assert m[f"calib/clean/ts_{k}"] == pytest.approx(scaled[k], rel=1e-4)
    assert m["calib/clean/ts_nll"] < m["calib/clean/nll"]  # the pipeline was miscalibrated
    # Selective prediction over the pooled draws, against a plain sort.
    conf, pred = logits.flatten(0, 1).softmax(1).max(1)
    wrong = (pred != y.repeat(draws)).double()[conf.argsort(descending=True)]
    risk = wrong.cumsum(0) / torch.arange(1, len(wrong) + 1)
    assert m["selective/clean/aurc"] == pytest.approx(risk.mean().item(), rel=1e-6)
    assert 0 < m["selective/clean/eaurc"] < m["selective/clean/aurc"]
    notes = " ".join(_report(several)["notes"])
    assert f"clean accuracy is the mean over {draws} purifications" in notes
    md = (Path(several.run.dir) / "report.md").read_text()
    assert f"mean of {draws} purifications" in md
    # On four images, one wrong: the fold whose other images are all right fits a temperature
    # at the bound of its range, and the report says so.
    few = tiny_cfg(*only_clean, "calib.enabled=true", "eval.max_images=4", run_dir=tmp_path / "few")
    assert evaluate(few)["test/acc"] == 0.75
    report = _report(few)
    assert 0.01 in report["meta"]["calib_temperature"]["fold_fits"]
    assert "a fit reached the bound of its range [0.01, 100]" in " ".join(report["notes"])
    # A deterministic pipeline ignores clean.draws.
    plain = evaluate(tiny_cfg(*only_clean, "clean.draws=4", run_dir=tmp_path / "plain"))
    assert "test/draws" not in plain
    with pytest.raises(ConfigError, match=r"invalid value 0 for 'clean\.draws': must be >= 1"):
        tiny_cfg("clean.draws=0", run_dir=tmp_path / "bad")


def test_corruption_accuracy_over_several_purifications(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path, unet_calls: list[int], tmp_path: Path
) -> None:
    ddim, draws = 2, 3
    corruptions, severities = GRID, [1, 5]
    only_shift = [f"{s}.enabled=false" for s in ("clean", "adv", "ood", "perf")]
    purifier = _ddim_purifier(denoiser_run, ddim)
    several = tiny_cfg(*purifier, *only_shift, f"shift.draws={draws}")
    m = evaluate(several)
    n = int(_report(several)["meta"]["num_images"])
    # Every cell: draws purifications of every image, ddim UNet calls each; calibration adds
    # one clean pass.
    assert unet_calls[0] == (draws * len(corruptions) * len(severities) + 1) * n * ddim
    expected = expected_metric_keys(
        clean=False,
        purified=True,
        shift_draws=draws,
        corruptions=corruptions,
        severities=severities,
        calib_sets=["clean", "shift"],
        bootstrap=True,
        temperature=True,
    )
    assert set(m) == expected and all(describe_metric(k) is not None for k in m)
    assert m["shift/draws"] == draws and m["shift/mean_acc_std"] > 0  # the draws differ
    assert m["shift/mean_acc_worst"] <= m["shift/mean_acc"] <= 1.0
    # Each cell keeps its per-draw accuracies; the spread is that of the per-draw grid means.
    accs = {
        (c, sev): _unit(several, f"shift/{c}/{sev}")[0]["accs"]
        for c in corruptions
        for sev in severities
    }
    for (c, sev), cell in accs.items():
        assert len(cell) == draws and m[f"shift/{c}/{sev}/acc"] == pytest.approx(np.mean(cell))
    per_draw = np.array(list(accs.values())).mean(0)
    assert m["shift/mean_acc"] == pytest.approx(per_draw.mean())
    assert m["shift/mean_acc_std"] == pytest.approx(per_draw.std(ddof=1))
    assert m["shift/mean_acc_worst"] == pytest.approx(per_draw.min())
    # Per image, the fraction of draws right in each cell; averaged over the grid, its
    # standard error over the images.
    hits = np.stack([_unit(several, f"shift/{c}/{sev}")[1]["hits"].numpy() for (c, sev) in accs])
    assert set(np.round(np.unique(hits) * draws, 6)) <= set(range(draws + 1))
    assert hits.mean(1) == pytest.approx([np.mean(cell) for cell in accs.values()])
    assert m["shift/mean_acc_se"] == pytest.approx(hits.mean(0).std(ddof=1) / np.sqrt(n))

    # The first draw is the one-purification run's draw (same stream per cell).
    one = tiny_cfg(*purifier, *only_shift, run_dir=tmp_path / "one")
    m1 = evaluate(one)
    assert "shift/mean_acc_std" not in m1
    top = max(severities)
    first = np.mean([accs[c, top][0] for c in corruptions])
    assert m1["calib/shift/acc"] == pytest.approx(first)
    assert m1["shift/mean_acc"] != m["shift/mean_acc"]  # more draws, another estimate
    # Calibration on the top severity pools every draw of every corruption.
    assert m["calib/shift/acc"] == pytest.approx(np.mean([accs[c, top] for c in corruptions]))
    # After temperature scaling: the shift set holds the clean images, so each is scaled by its
    # cross-fitted temperature (fit on the other fold's clean images), never by one its own
    # label helped fit.
    y = _val_labels()
    clean = _unit(several, "clean")[1]["logits"]  # (1, n, classes)
    fold = fold_of(n, 2, int(several.run.seed) + 10)
    temps = torch.empty(n)
    for k in (0, 1):
        temps[fold == k] = fit_temperature(clean[0, fold != k], y[fold != k])
    cells = torch.cat([_unit(several, f"shift/{c}/{top}")[1]["logits"] for c in corruptions])
    scaled = calibration_report(
        (cells / temps[None, :, None]).flatten(0, 1), y.repeat(len(cells)), 15
    )
    for k in ("ece", "nll", "brier"):
        assert m[f"calib/shift/ts_{k}"] == pytest.approx(scaled[k], rel=1e-4)
    notes = " ".join(_report(several)["notes"])
    assert f"corruption accuracy is the mean over {draws} purifications" in notes
    assert (
        "calibration pools the predictions of every purification made "
        f"(clean once, corrupted {draws} times per image)"
    ) in notes
    md = (Path(several.run.dir) / "report.md").read_text()
    assert f"mean of {draws} purifications" in md

    # A resumed run reads every cell back, draws included, and reports the same numbers.
    calls = unet_calls[0]
    again = evaluate(tiny_cfg(*purifier, *only_shift, f"shift.draws={draws}", "run.resume=true"))
    assert unet_calls[0] == calls
    assert again == pytest.approx({**m, "perf/eval_wall_s": again["perf/eval_wall_s"]})
    # Stores from before every cell kept its logits: severity 1 is left out of the calibration
    # per severity (and the report says how to compute it); nothing is recomputed, every
    # other number is the same.
    for c in corruptions:
        path = Path(several.run.dir) / "partial" / f"shift/{c}/1{UNIT_SUFFIX}"
        read = read_unit(path)
        assert read is not None
        key, data, tensors = read
        save_file(
            {"hits": tensors["hits"]}, str(path), metadata={"key": key, "data": json.dumps(data)}
        )
    old = evaluate(tiny_cfg(*purifier, *only_shift, f"shift.draws={draws}", "run.resume=true"))
    assert unet_calls[0] == calls
    severity_1 = {k for k in m if k.startswith("calib/severity/1/")}
    assert severity_1 and not severity_1 & set(old) and "calib/severity/5/ts_ece" in old
    assert old == pytest.approx(
        {k: v for k, v in again.items() if k not in severity_1}
        | {"perf/eval_wall_s": old["perf/eval_wall_s"]}
    )
    notes = " ".join(_report(several)["notes"])
    assert "Calibration per severity left out for severities [1]" in notes
    assert "(or rerun with run.resume=false) to compute them" in notes
    assert _report(several)["calib_severity"]["severities"] == [5]

    # A deterministic pipeline ignores shift.draws; zero draws is an error.
    plain = evaluate(tiny_cfg(*only_shift, "shift.draws=4", run_dir=tmp_path / "plain"))
    assert "shift/draws" not in plain
    with pytest.raises(ConfigError, match=r"invalid value 0 for 'shift\.draws': must be >= 1"):
        tiny_cfg("shift.draws=0", run_dir=tmp_path / "bad")


def test_ood_pools_every_purification(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path, unet_calls: list[int], tmp_path: Path
) -> None:
    ddim, draws, n_noise = 2, 2, 64
    only_ood = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "perf")]
    purifier = _ddim_purifier(denoiser_run, ddim)
    ood = [
        "ood.noise_kinds=[gaussian,blobs]",
        f"ood.num_noise={n_noise}",
        "ood.held_out_classes=[0]",
    ]
    cfg = tiny_cfg(*purifier, *only_ood, *ood, f"clean.draws={draws}")
    m = evaluate(cfg)
    n = int(m["test/n"])
    # The clean images and both noise sets, each purified draws times, and the feature scores'
    # bank once: the training images less the held-out class 0.
    bank = int((build_splits(**DATA).train.labels != 0).sum())
    assert unet_calls[0] == draws * (n + 2 * n_noise) * ddim + bank * ddim
    # The held-out set's scores pool both draws on each side.
    logits = _unit(cfg, "clean")[1]["logits"]  # (draws, n, classes)
    y = _val_labels()
    inside, outside = logits[:, y != 0].flatten(0, 1), logits[:, y == 0].flatten(0, 1)
    for score, fn in (("msp", msp_score), ("energy", energy_score)):
        expected = ood_metrics(fn(inside), fn(outside))
        for k, v in expected.items():
            assert m[f"ood/held_out/{score}/{k}"] == pytest.approx(v, abs=1e-6)
    notes = " ".join(_report(cfg)["notes"])
    assert f"OOD pools the predictions of every purification made (clean {draws} times" in notes
    # Collecting the features leaves the purifications, and so every logit score, unchanged.
    logits_only = evaluate(
        tiny_cfg(
            *purifier, *only_ood, *ood, f"clean.draws={draws}", "ood.feature_scores=[]",
            run_dir=tmp_path / "logits-only",
        )
    )  # fmt: skip
    assert {k: v for k, v in m.items() if "/msp/" in k or "/energy/" in k} == {
        k: v for k, v in logits_only.items() if k.startswith("ood/")
    }
    # One draw: the noise sets are purified once, and the numbers are another estimate.
    calls = unet_calls[0]
    m1 = evaluate(tiny_cfg(*purifier, *only_ood, *ood, run_dir=tmp_path / "one"))
    assert unet_calls[0] - calls == (n + 2 * n_noise + bank) * ddim
    assert m1["ood/noise_gaussian/msp/auroc"] != m["ood/noise_gaussian/msp/auroc"]


def test_example_figures_show_what_the_pipeline_saw_and_predicted(
    tiny_cfg: Callable[..., DictConfig], classifier_run: Path, denoiser_run: Path
) -> None:
    k, n_adv, eps = 5, 12, 8
    off = [f"{s}.enabled=false" for s in ("clean", "calib", "ood", "perf")]
    common = [
        f"eval.examples={k}",
        f"adv.linf_eps=[{eps}]",
        "adv.l2_eps=[]",
        "adv.steps=2",
        "adv.eot=1",
        "adv.rescore_draws=1",
        f"adv.max_images={n_adv}",
        "adv.sanity_checks=false",
        *off,
    ]
    # A bare classifier: its predictions under the images are the classifier's.
    cfg = tiny_cfg(*common)
    first = evaluate(cfg)
    run = Path(cfg.run.dir)
    figures = _report(cfg)["figures"]
    ex = figures["examples"]
    assert [r["name"] for r in ex["rows"]] == ["clean", "linf 8/255", "perturbation"]
    assert ex["rows"][2]["preds"] is None  # a perturbation is not classified
    assert len(ex["labels"]) == k
    # The attacked subset's first images, their adversarial examples kept by the PGD unit.
    from ssl_robust.finetune.export import load_classifier
    from ssl_robust.pipelines.evaluate.setup import SEED_ADV, seeded_subset

    clf = load_classifier(classifier_run)[0].eval()
    images, labels = _eval_images(cfg)
    idx = seeded_subset(len(labels), n_adv, int(cfg.run.seed) + SEED_ADV)[:k]
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255
    assert ex["labels"] == labels[idx].tolist()
    with torch.no_grad():
        assert ex["rows"][0]["preds"] == clf(x).argmax(1).tolist()
        unit = read_unit(run / "partial" / "adv" / "linf_8" / f"pgd{UNIT_SUFFIX}")
        assert unit is not None
        x_adv = unit[2]["x_adv"]
        assert x_adv.shape == (n_adv, 3, 8, 8)  # all 12 attacked images (up to 16 are kept)
        assert (x_adv[:k] - x).abs().max() <= eps / 255 + 1e-6
        assert ex["rows"][1]["preds"] == clf(x_adv[:k]).argmax(1).tolist()
    # The corruption figure: one image, clean then each severity of the tiny grid.
    grid = figures["corruption_examples"]
    assert [r["name"] for r in grid["rows"]] == GRID
    assert all(len(r["preds"]) == 3 for r in grid["rows"])
    assert all(r["preds"][0] == ex["rows"][0]["preds"][0] for r in grid["rows"])
    md = (run / "report.md").read_text()
    assert "## Examples" in md and "![examples](plots/examples.png)" in md
    assert "![corruption_examples](plots/corruption_examples.png)" in md
    for name in ("examples", "corruption_examples"):
        with Image.open(run / "plots" / f"{name}.png") as png:
            assert png.size[0] > 300 and png.size[1] > 100
    # Resumed: the figure is redrawn from the stored adversarial examples, none recomputed
    # (every stored unit is the same file, untouched), with the same numbers.
    stored = unit_stamps(run)
    assert set(stored) == {f"shift/{c}/{s}" for c in GRID for s in (1, 5)} | {"adv/linf_8/pgd"}
    (run / "plots" / "examples.png").unlink()
    again = evaluate(cfg)
    assert unit_stamps(run) == stored
    assert {k: v for k, v in again.items() if not k.endswith("wall_s")} == {
        k: v for k, v in first.items() if not k.endswith("wall_s")
    }
    assert _report(cfg)["figures"]["examples"]["rows"] == ex["rows"]
    assert (run / "plots" / "examples.png").is_file()

    # Behind a purifier: a purified row after each classified one.
    cfg = tiny_cfg(
        *common, f"purifier.run={denoiser_run}", "purifier.sampler=oneshot", "purifier.t_star=5"
    )
    evaluate(cfg)
    rows = _report(cfg)["figures"]["examples"]["rows"]
    names = ["clean", "purified", "linf 8/255", "perturbation", "purified"]
    assert [r["name"] for r in rows] == names
    assert "purified: the purifier's output" in (Path(cfg.run.dir) / "report.md").read_text()

    # eval.examples=0: no figures, and the report says nothing of them.
    cfg = tiny_cfg(*common, "eval.examples=0", run_dir=run.parent / "none")
    evaluate(cfg)
    assert "figures" not in _report(cfg)
    assert not (Path(cfg.run.dir) / "plots" / "examples.png").exists()
    assert "## Examples" not in (Path(cfg.run.dir) / "report.md").read_text()


def test_example_rows_are_as_long_as_the_first_pgd_block(
    tiny_cfg: Callable[..., DictConfig],
) -> None:
    # 8 attacked images in 4 PGD blocks: block 1 keeps the adversarial examples of 2 images,
    # fewer than eval.examples, and every row shows those 2.
    off = [f"{s}.enabled=false" for s in ("shift", "calib", "ood", "perf")]
    cfg = tiny_cfg(
        *off,
        "eval.examples=4",
        "adv.linf_eps=[8]",
        "adv.l2_eps=[]",
        "adv.steps=1",
        "adv.max_images=8",
        "adv.shards=4",
        "adv.sanity_checks=false",
    )
    evaluate(cfg)
    report = _report(cfg)
    ex = report["figures"]["examples"]
    assert [r["name"] for r in ex["rows"]] == ["clean", "linf 8/255", "perturbation"]
    assert len(ex["labels"]) == 2
    assert [len(r["preds"]) for r in ex["rows"] if r["preds"] is not None] == [2, 2]
    note = (
        "The example figure shows 2 of the eval.examples=4 images: the PGD attacks ran in "
        "adv.shards=4 blocks, and the first holds only 2 of the attacked images."
    )
    assert note in report["notes"] and note in ex["text"]


def test_each_noise_kind_draws_its_own_streams(
    tiny_cfg: Callable[..., DictConfig], denoiser_run: Path, tmp_path: Path
) -> None:
    # Behind a stochastic purifier, so that both the noise images and their purifications
    # would differ if the kinds shared a stream in list order.
    only_ood = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "perf")]
    common = [*_ddim_purifier(denoiser_run, 2), *only_ood, "ood.feature_scores=[]"]

    def noise_metrics(kinds: str) -> dict[str, dict[str, float]]:
        m = evaluate(tiny_cfg(*common, f"ood.noise_kinds={kinds}", run_dir=tmp_path / kinds))
        return {
            kind: {k: v for k, v in m.items() if k.startswith(f"ood/noise_{kind}/")}
            for kind in ("gaussian", "blobs", "uniform")
        }

    both = noise_metrics("[gaussian,blobs]")
    alone = noise_metrics("[blobs]")
    swapped = noise_metrics("[uniform,blobs,gaussian]")
    assert both["blobs"] and both["blobs"] == alone["blobs"] == swapped["blobs"]
    assert both["gaussian"] and both["gaussian"] == swapped["gaussian"]
    assert not alone["gaussian"] and swapped["uniform"]


def _eval_images(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation split the job reads for the digits classifier (eval.max_images = 0)."""
    val = build_splits(**DATA).val
    return val.images, np.asarray(val.labels)  # type: ignore[attr-defined]


def test_certification_of_a_bare_and_a_purified_pipeline(
    tiny_cfg: Callable[..., DictConfig],
    classifier_run: Path,
    denoiser_run: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ssl_robust.evaluate.smoothing import certify
    from ssl_robust.finetune.export import load_classifier
    from ssl_robust.pipelines.evaluate import adversarial, setup

    off = [f"{s}.enabled=false" for s in ("clean", "shift", "adv", "calib", "ood", "perf")]
    n_img, n0, n = 6, 10, 300
    cert = [
        "cert.enabled=true",
        f"cert.max_images={n_img}",
        f"cert.n0={n0}",
        f"cert.samples={n}",
        "cert.alpha=0.01",
        "cert.batch_size=128",
        "cert.radii=[0,0.1,0.25]",
    ]
    cfg = tiny_cfg(*off, *cert, "cert.sigma=0.25")
    m = evaluate(cfg)
    assert set(m) == expected_metric_keys(clean=False, cert_radii=[0, 0.1, 0.25])
    assert m["cert/sigma"] == 0.25 and m["cert/n"] == n_img
    assert m["cert/nfe_per_image"] == n0 + n
    accs = [m[f"cert/radius/{r}/acc"] for r in ("0", "0.1", "0.25")]
    assert accs == sorted(accs, reverse=True) and accs[0] == m["cert/acc"] > 0
    # The job's numbers are CERTIFY's on the same images with the same noise stream.
    seed = int(cfg.run.seed) + setup.SEED_CERT
    images, labels = _eval_images(cfg)
    idx = setup.seeded_subset(len(labels), n_img, seed)
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255
    clf = load_classifier(classifier_run)[0].eval()
    gen = torch.Generator().manual_seed(seed)
    pred, radius = certify(
        lambda b: clf(b + 0.25 * torch.randn(b.shape, generator=gen)), x, 10, 0.25,
        n0=n0, n=n, alpha=0.01, batch_size=128,
    )  # fmt: skip
    report = _report(cfg)
    assert report["cert"]["radius"] == pytest.approx(radius.tolist())
    assert report["cert"]["correct"] == (pred == torch.from_numpy(labels[idx])).tolist()
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "## Certified robustness (randomized smoothing)" in md
    assert "![certified](plots/certified.png)" in md and "| 0.25 |" in md
    # Other radii come from the stored radii: nothing is certified again.
    monkeypatch.setattr(adversarial, "certify", None)  # would fail if called
    again = evaluate(tiny_cfg(*off, *cert, "cert.sigma=0.25", "cert.radii=[0.5]"))
    assert again["cert/wall_s"] == m["cert/wall_s"] and "cert/radius/0.5/acc" in again
    monkeypatch.undo()

    # Behind a purifier, its own diffusion noise smooths: sigma is the one of its t*.
    cfg = tiny_cfg(
        *off, *cert, f"purifier.run={denoiser_run}", "purifier.sampler=oneshot",
        "purifier.sigma=0.25", run_dir=Path(cfg.run.dir).parent / "purified",
    )  # fmt: skip
    m = evaluate(cfg)
    assert m["cert/sigma"] == pytest.approx(0.25, rel=0.05)
    assert m["cert/nfe_per_image"] == (n0 + n) * 2  # one UNet call + the classifier per draw
    assert "the purifier's diffusion to t*=" in (Path(cfg.run.dir) / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"leave cert\.sigma=0"):
        evaluate(tiny_cfg(*off, *cert, "cert.sigma=0.25", f"purifier.run={denoiser_run}"))
    with pytest.raises(ConfigError, match=r"cert\.sigma must be > 0"):
        evaluate(tiny_cfg(*off, *cert))
    with pytest.raises(ConfigError, match=r"'cert\.alpha': must be in \(0, 0\.5\)"):
        tiny_cfg(*off, *cert, "cert.sigma=0.25", "cert.alpha=0.7")


def test_a_failing_example_figure_costs_nothing_but_the_figure(
    tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_robust.pipelines.evaluate import examples

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise MemoryError("out of memory")

    monkeypatch.setattr(examples, "plot_image_grid", broken)
    off = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "ood", "perf")]
    cfg = tiny_cfg(*off, "eval.examples=4")
    metrics = evaluate(cfg)
    report = _report(cfg)
    assert "test/acc" in metrics and "figures" not in report
    assert "The example figures were not drawn: MemoryError('out of memory')" in report["notes"]


def test_corruption_errors_against_a_reference_evaluation(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    off = [f"{s}.enabled=false" for s in ("adv", "calib", "ood", "perf")]
    base = tiny_cfg(*off, run_dir=tmp_path / "base")
    m = evaluate(base)
    cells = {(c, s): m[f"shift/{c}/{s}/acc"] for c in GRID for s in (1, 5)}

    # A reference whose errors are the base run's, halved (fabricated metrics.json): each CE 2.
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_metrics = {f"shift/{c}/{s}/acc": 1 - (1 - a) / 2 for (c, s), a in cells.items()}
    ref_metrics["test/acc"] = 1 - (1 - m["test/acc"]) / 2
    (ref / "metrics.json").write_text(json.dumps(ref_metrics))
    # Reusing the base run's units: the reference is not part of any unit's key.
    cfg = tiny_cfg(*off, f"shift.ce_reference={ref}", run_dir=tmp_path / "base")
    got = evaluate(cfg)
    report = _report(cfg)
    assert any(n.startswith("Resumed: 5 of 5 units") for n in report["notes"]), report["notes"]
    for c in GRID:
        assert got[f"shift/{c}/ce"] == pytest.approx(2.0)
        # The added error halves with the clean error, so the relative error doubles too.
        assert got[f"shift/{c}/relative_ce"] == pytest.approx(2.0)
    assert got["shift/mce"] == pytest.approx(2.0)
    assert got["shift/relative_mce"] == pytest.approx(2.0)
    assert {k for k in got if describe_metric(k) is None} == set()
    assert set(got) == expected_metric_keys(corruptions=GRID, severities=[1, 5], ce_reference=True)
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "## Corruption error" in md and "| mean (mCE) | 200.00 | 200.00 |" in md
    assert "![corruption_error](plots/corruption_error.png)" in md
    with Image.open(Path(cfg.run.dir) / "plots" / "corruption_error.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert report["meta"]["ce_reference"]["run"] == str(ref)

    # A run directory as the reference (the base run itself, through its folder): all 1.
    own = tiny_cfg(*off, f"shift.ce_reference={base.run.dir}", run_dir=tmp_path / "own")
    assert evaluate(own)["shift/mce"] == pytest.approx(1.0)

    # Bad references stop the job before it writes anything.
    partial = tmp_path / "partial-ref"
    partial.mkdir()
    (partial / "metrics.json").write_text(json.dumps({"shift/contrast/1/acc": 0.5}))
    for reference, error, match in [
        (tmp_path / "nope", FileNotFoundError, "no evaluation metrics at"),
        (partial, ConfigError, r"no accuracy for 3 cells of this grid \(impulse_noise/1, "),
    ]:
        bad = tiny_cfg(*off, f"shift.ce_reference={reference}", run_dir=tmp_path / "bad")
        with pytest.raises(error, match=match):
            evaluate(bad)
        assert not (tmp_path / "bad").exists()
    report_json = json.loads((Path(base.run.dir) / "report.json").read_text())
    report_json["meta"]["data_config"]["name"] = "cifar10"
    other = tmp_path / "other-data"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(ref_metrics))
    (other / "report.json").write_text(json.dumps(report_json))
    bad = tiny_cfg(*off, f"shift.ce_reference={other}", run_dir=tmp_path / "bad")
    with pytest.raises(
        ConfigError, match="evaluated 'cifar10' at 8 px, this evaluation 'digits' at 8"
    ):
        evaluate(bad)
    # The same dataset split otherwise: said in a note.
    report_json["meta"]["data_config"] |= {"name": "digits", "seed": 5}
    (other / "report.json").write_text(json.dumps(report_json))
    split = tiny_cfg(*off, f"shift.ce_reference={other}", run_dir=tmp_path / "base")
    evaluate(split)
    assert any("(seed 5 there, 0 here)" in note for note in _report(split)["notes"])


def _fake_svhn(root: Path, n: int) -> np.ndarray:
    """A stand-in for SVHN's test_32x32.mat (its layout: X is (32, 32, 3, N) uint8, y is (N, 1)
    in 1..10); returns the images as (N, 32, 32, 3)."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    x[:16, :, 0, :] = 255  # a red top half: the orientation is checked below
    root.mkdir(parents=True)
    savemat(root / "test_32x32.mat", {"X": x, "y": rng.integers(1, 11, (n, 1))})
    return x.transpose(3, 0, 1, 2)


def test_ood_feature_bank_is_the_classifier_fine_tuning_subset(
    tiny_cfg: Callable[..., DictConfig], classifier_run: Path, tmp_path: Path
) -> None:
    import shutil

    # A classifier run that records its labeled subset (subset.npy, as fine-tuning writes).
    run = tmp_path / "with-subset"
    shutil.copytree(classifier_run, run)
    train_labels = build_splits(**DATA).train.labels
    subset = np.sort(np.random.default_rng(0).permutation(len(train_labels))[:300])
    np.save(run / "subset.npy", subset)
    off = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "perf")]
    ood = ["ood.noise_kinds=[gaussian]", "ood.held_out_classes=[3]", "ood.bank_size=100"]
    cfg = tiny_cfg(*off, *ood, f"classifier.run={run}", run_dir=tmp_path / "eval")
    m = evaluate(cfg)
    # The bank: 100 of the subset's images outside the held-out class, shared out between the
    # 9 other classes as evenly as they allow (11 or 12 each), each the image of its features.
    kept = subset[train_labels[subset] != 3]
    bank = _unit(cfg, "features/bank")[1]
    counts = np.bincount(bank["labels"].numpy(), minlength=10)
    assert counts.sum() == 100 and counts[3] == 0
    assert sorted(counts[np.arange(10) != 3]) == [11] * 8 + [12]
    clf = load_classifier(run)[0].eval()
    train_images = build_splits(**DATA).train.images
    with torch.no_grad():
        kept_feats = clf.features(
            torch.from_numpy(train_images[kept]).permute(0, 3, 1, 2).float() / 255
        )
    # Every bank row is the features and label of one distinct kept image.
    match = torch.cdist(bank["features"], kept_feats).argmin(1)
    assert len(set(match.tolist())) == 100
    torch.testing.assert_close(bank["features"], kept_feats[match])
    assert torch.equal(bank["labels"], torch.from_numpy(train_labels[kept[match.numpy()]]))
    report = _report(cfg)
    assert report["meta"]["ood_bank"] == (
        "100 of the classifier's 300 fine-tuning images (subset.npy), less the held-out classes"
    )
    assert report["meta"]["ood_knn_k"] == 1  # 50 per 50,000 bank images, at least 1
    # The held-out set's feature scores: the clean features of class 3 against the others.
    clean = _unit(cfg, "clean")[1]["features"]
    y = _val_labels()
    scores = knn_score(bank["features"], clean, 1)
    expected = ood_metrics(scores[y != 3], scores[y == 3])
    assert m["ood/held_out/knn/auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    # The other sets' in-distribution side leaves the held-out class out too, for the logit
    # scores as for the feature scores: its images are OOD for this classifier. Known answer:
    # the noise set remade from its seed (its kind's own stream), scored by the classifier.
    n_noise = int(cfg.ood.num_noise)  # the tiny preset's
    seed = _corruption_seed(int(cfg.run.seed) + SEED_OOD, "noise_gaussian", 0)
    noise = noise_images(
        n_noise, (3, 8, 8), "gaussian", generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        noise_feats = clf.features(noise)
        clean_logits = _unit(cfg, "clean")[1]["logits"][0]
    outside = {
        "knn": knn_score(bank["features"], noise_feats, 1),
        "msp": msp_score(clf.head(noise_feats)),
    }
    inside = {"knn": scores, "msp": msp_score(clean_logits)}
    for score in ("knn", "msp"):
        want = ood_metrics(inside[score][y != 3], outside[score])
        assert m[f"ood/noise_gaussian/{score}/auroc"] == pytest.approx(want["auroc"], abs=1e-6)
        everyone = ood_metrics(inside[score], outside[score])["auroc"]
        assert m[f"ood/noise_gaussian/{score}/auroc"] != pytest.approx(everyone, abs=1e-6)
    assert report["meta"]["ood_sets"] == ["noise_gaussian", "held_out"]
    # An explicit k, and the logit scores only.
    k3 = evaluate(tiny_cfg(*off, *ood, f"classifier.run={run}", "ood.knn_k=3"))
    assert _report(tiny_cfg())["meta"]["ood_knn_k"] == 3
    assert k3["ood/held_out/knn/auroc"] != m["ood/held_out/knn/auroc"]
    logit_only = tiny_cfg(*off, *ood, "ood.feature_scores=[]", run_dir=tmp_path / "logits")
    plain = evaluate(logit_only)
    assert not any("/knn/" in k or "/mahalanobis/" in k for k in plain)
    assert not (Path(logit_only.run.dir) / "partial" / "features").exists()
    assert "features" not in _unit(logit_only, "clean")[1]

    # A subset drawn from another train split (its subset.json says so) is refused before
    # anything is written: its indices would pick other images for the bank.
    record = json.loads((run / "subset.json").read_text()) if (run / "subset.json").exists() else {}
    (run / "subset.json").write_text(
        json.dumps({**record, "num_train": 5000, "train_labels_sha1": "0" * 16})
    )
    elsewhere = tiny_cfg(*off, f"classifier.run={run}", run_dir=tmp_path / "elsewhere")
    with pytest.raises(
        ConfigError, match=r"subset.npy indexes another train split .*\(5000 images then, 1438 now"
    ):
        evaluate(elsewhere)
    assert not Path(elsewhere.run.dir).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ood.feature_scores=[odin]", r"unknown score 'odin' in ood.feature_scores; choose from"),
        ("ood.bank_size=-1", r"invalid value -1 for 'ood.bank_size': must be 0 \(all\) or >= 2"),
        ("ood.bank_size=1", r"invalid value 1 for 'ood.bank_size': must be 0 \(all\) or >= 2"),
        ("ood.knn_k=-2", r"invalid value -2 for 'ood.knn_k': must be >= 0"),
    ],
)
def test_bad_ood_feature_settings_are_refused(
    tiny_cfg: Callable[..., DictConfig], override: str, message: str, tmp_path: Path
) -> None:
    """Refused when the config loads (the ranges) or, for the list, before anything is
    written."""
    with pytest.raises(ConfigError, match=message):
        cfg = tiny_cfg(override, run_dir=tmp_path / "bad")
        evaluate(cfg)
    assert not (tmp_path / "bad").exists()


def test_outside_datasets_are_ood_sets(
    tiny_cfg: Callable[..., DictConfig],
    classifier_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torchvision

    from ssl_robust.data.datasets import load_outside_images
    from ssl_robust.finetune.export import load_classifier

    # The stand-in file has not the released file's md5, which torchvision checks.
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    svhn = _fake_svhn(tmp_path / "svhn", 40)
    folder = tmp_path / "letters"
    for k in range(2):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(6):
            pixels = np.full((12, 12, 3), 30 * i + 90 * k, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{k}" / f"{i}.png")
    # The loader: torchvision's (N, C, H, W) back to (N, H, W, C), resized with Pillow.
    full = load_outside_images("svhn", str(tmp_path / "svhn"), 32)
    assert np.array_equal(full, svhn)
    small = load_outside_images("svhn", str(tmp_path / "svhn"), 8)
    resized = Image.fromarray(svhn[3]).resize((8, 8), Image.Resampling.BICUBIC)
    assert small.shape == (40, 8, 8, 3) and np.array_equal(small[3], np.asarray(resized))

    off = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "perf")]
    sets = f"ood.datasets=[svhn@{tmp_path / 'svhn'},imagefolder@{folder}]"
    cfg = tiny_cfg(*off, sets, "ood.noise_kinds=[gaussian]")
    m = evaluate(cfg)
    report = _report(cfg)
    assert report["meta"]["ood_sets"] == ["noise_gaussian", "svhn", "letters"]
    assert "40 of 40 images at 8 px" in report["meta"]["ood_datasets"]["svhn"]
    assert "12 of 12 images" in report["meta"]["ood_datasets"]["letters"]
    # Known answer: the classifier's own scores on the evaluation and the resized SVHN images.
    clf = load_classifier(classifier_run)[0].eval()
    images, _ = _eval_images(cfg)

    def logits(x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return clf(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)

    want = ood_metrics(msp_score(logits(images)), msp_score(logits(small)))
    assert m["ood/svhn/msp/auroc"] == pytest.approx(want["auroc"], abs=1e-6)
    assert m["ood/svhn/msp/fpr95"] == pytest.approx(want["fpr95"], abs=1e-6)
    assert {"ood/letters/energy/auroc", "ood/letters/msp/fpr95"} <= set(m)
    # The outside set's unit keeps the encoder features its feature scores read.
    with torch.no_grad():
        want_feats = clf.features(torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(_unit(cfg, "ood/svhn")[1]["features"], want_feats)
    assert {"ood/svhn/knn/auroc", "ood/letters/mahalanobis/fpr95"} <= set(m)
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "Outside datasets: svhn, svhn test split (" in md
    # A rerun reads the sets' logits back; fewer images make another unit.
    again = evaluate(cfg)
    assert any(n.startswith("Resumed: 4 of 4 units") for n in _report(cfg)["notes"])
    assert again["ood/svhn/msp/auroc"] == m["ood/svhn/msp/auroc"]
    fewer = evaluate(tiny_cfg(*off, sets, "ood.noise_kinds=[gaussian]", "ood.num_images=10"))
    assert "10 of 40 images" in _report(cfg)["meta"]["ood_datasets"]["svhn"]
    assert fewer["ood/letters/msp/auroc"] != m["ood/letters/msp/auroc"]  # 10 of 12 images

    # An image folder named after a split is called after its parent too.
    from ssl_robust.pipelines.evaluate import ood_set_names

    assert ood_set_names(["imagefolder@/d/cifar10-jpeg/test", "cifar100@/d"]) == {
        "cifar10-jpeg_test": ("imagefolder", "/d/cifar10-jpeg/test"),
        "cifar100": ("cifar100", "/d"),
    }
    # Bad sets stop the job before it writes anything.
    monkeypatch.undo()  # torchvision's own check again: a missing file fails it
    for value, error, match in [
        ("[mnist]", ConfigError, r"unknown dataset 'mnist' in ood.datasets; choose from \['cif"),
        ("[imagefolder]", ConfigError, "imagefolder needs its folder"),
        (f"[svhn@{tmp_path / 'nope'}]", DataError, "svhn not found under"),
        (f"[svhn,svhn@{tmp_path}]", ConfigError, "two OOD sets would be named 'svhn'"),
        ("[imagefolder@/x/held_out]", ConfigError, "would be the OOD set 'held_out', a name"),
        ("[imagefolder@/x/mean]", ConfigError, r"the OOD set 'mean', a name the section keeps"),
    ]:
        bad = tiny_cfg(*off, f"ood.datasets={value}", run_dir=tmp_path / "bad")
        with pytest.raises(error, match=match):
            evaluate(bad)
        assert not (tmp_path / "bad").exists()


def test_natural_shift_sets_are_scored_through_the_pipeline(
    tiny_cfg: Callable[..., DictConfig], classifier_run: Path, tmp_path: Path
) -> None:
    from ssl_robust.finetune.export import load_classifier

    images, labels = _eval_images(tiny_cfg())
    # A darker copy in CIFAR-10.1's layout (a folder holding <name>_data/_labels.npy), and a
    # class-folder tree of 30 images (a split folder, named after its parent).
    dark = (images * 0.6).astype(np.uint8)
    pair = tmp_path / "digits.1"
    pair.mkdir()
    np.save(pair / "digits.1_v1_data.npy", dark)
    np.save(pair / "digits.1_v1_labels.npy", labels)
    tree = tmp_path / "scans" / "test"
    for i in range(30):
        (tree / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tree / str(labels[i]) / f"{i}.png")
    off = [f"{s}.enabled=false" for s in ("shift", "adv", "calib", "ood", "perf")]
    cfg = tiny_cfg(*off, f"natural.sets=[{pair},{tree}]")
    m = evaluate(cfg)
    # Known answer: the classifier's own accuracy on those images.
    clf = load_classifier(classifier_run)[0].eval()
    with torch.no_grad():
        pred = clf(torch.from_numpy(dark).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert m["natural/digits.1/acc"] == pytest.approx((pred == labels).mean())
    assert m["natural/digits.1/n"] == len(labels) and m["natural/scans_test/n"] == 30
    assert m["natural/digits.1/acc"] < m["test/acc"]  # darker digits are harder
    report = _report(cfg)
    assert set(m) == expected_metric_keys(natural_sets=["digits.1", "scans_test"])
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "## Natural distribution shift" in md and "| scans_test | 30 |" in md
    again = evaluate(cfg)  # a rerun reads the sets' logits back
    assert any(n.startswith("Resumed: 3 of 3 units") for n in _report(cfg)["notes"])
    assert again["natural/digits.1/acc"] == m["natural/digits.1/acc"]
    assert "digits.1" in report["meta"]["natural"]
    # Calibration on each set too, from the stored logits: the darker digits' ECE is the
    # classifier's own on them.
    on = [o for o in off if not o.startswith("calib")]
    cal_cfg = tiny_cfg(*on, f"natural.sets=[{pair},{tree}]")
    calibrated = evaluate(cal_cfg)
    sets = ["clean", "natural_digits.1", "natural_scans_test"]
    assert set(calibrated) == expected_metric_keys(
        natural_sets=["digits.1", "scans_test"], calib_sets=sets, bootstrap=True, temperature=True
    )
    with torch.no_grad():
        dark_logits = clf(torch.from_numpy(dark).permute(0, 3, 1, 2).float() / 255)
    want = calibration_report(dark_logits, torch.from_numpy(labels), 15)
    assert calibrated["calib/natural_digits.1/ece"] == pytest.approx(want["ece"], abs=1e-6)
    # After temperature scaling: other images, so the temperature of every clean image.
    t = calibrated["calib/temperature"]
    scaled = calibration_report(dark_logits / t, torch.from_numpy(labels), 15)
    assert calibrated["calib/natural_digits.1/ts_ece"] == pytest.approx(scaled["ece"], abs=1e-6)
    assert calibrated["calib/natural_digits.1/ts_nll"] == pytest.approx(scaled["nll"], rel=1e-5)
    # Its interval refits the temperature on each resample of the clean images, resampled
    # apart from the set's own (other images).
    clean_logits = _unit(cal_cfg, "clean")[1]["logits"]  # (1, N, classes)
    n_clean = clean_logits.shape[1]
    y = _val_labels()
    assert len(y) == n_clean  # the whole evaluation split
    fold = fold_of(n_clean, 2, int(cal_cfg.run.seed) + 10)
    n_dark = len(labels)
    low, high = bootstrap_interval(
        functools.partial(refit_scaled_ece, n_bins=15),
        [
            (dark_logits[None], torch.from_numpy(labels)[None], torch.full((1, n_dark), -1)),
            (clean_logits, y[None], fold[None]),
        ],
        int(cal_cfg.eval.bootstrap),
        int(cal_cfg.run.seed) + 9,
        bounds=(0.0, 1.0),
    )
    got = (
        calibrated["calib/natural_digits.1/ts_ece_low"],
        calibrated["calib/natural_digits.1/ts_ece_high"],
    )
    assert got == pytest.approx((low, high), abs=1e-6)
    md = (Path(cfg.run.dir) / "report.md").read_text()
    assert "| natural_scans_test |" in md and "![reliability](plots/reliability.png)" in md

    # Bad sets stop the job before it writes anything.
    (tmp_path / "birds" / "bird").mkdir(parents=True)
    Image.fromarray(images[0]).save(tmp_path / "birds" / "bird" / "0.png")
    bad_labels = tmp_path / "bad.1"
    bad_labels.mkdir()
    np.save(bad_labels / "x_data.npy", dark[:5])
    np.save(bad_labels / "x_labels.npy", np.array([0, 1, 2, 3, 12]))
    for value, error, match in [
        (f"[{tmp_path / 'birds'}]", DataError, r"not among the classifier's classes: \['bird'\]"),
        (f"[{bad_labels}]", DataError, r"holds labels 0..12; the classifier has classes 0..9"),
        (f"[{tmp_path / 'nope'}]", DataError, "no labeled test set at"),
        (f"[{pair},{tmp_path / 'x' / 'digits.1'}]", ConfigError, "would both be named 'digits.1'"),
    ]:
        bad = tiny_cfg(*off, f"natural.sets={value}", run_dir=tmp_path / "bad")
        with pytest.raises(error, match=match):
            evaluate(bad)
        assert not (tmp_path / "bad").exists()


def test_the_shift_sets_corruptions_of_an_image_are_grouped_for_the_bootstrap() -> None:
    from ssl_robust.pipelines.evaluate.calibration import group_by_image

    # 2 draws, 3 corruptions of the same 4 images one after another, 5 classes.
    logits = torch.arange(2 * 12 * 5, dtype=torch.float32).view(2, 12, 5)
    labels = torch.tensor([0, 1, 2, 3] * 3)
    grouped, image_labels = group_by_image(logits, labels, 3)
    assert grouped.shape == (6, 4, 5) and image_labels is not None
    assert torch.equal(image_labels, torch.tensor([0, 1, 2, 3]))
    # Row (draw d, corruption c) holds that corruption's images in order.
    assert torch.equal(grouped[1 * 3 + 2], logits[1, 8:12])
    # The same (prediction, label) pairs: pooled metrics do not change.
    assert sorted(grouped.flatten(0, 1)[:, 0].tolist()) == sorted(
        logits.flatten(0, 1)[:, 0].tolist()
    )
    # Corruptions over other images (a folder's own labels) stay as they are.
    other = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3])
    assert (
        group_by_image(logits, other, 3)[0] is logits
        and group_by_image(logits, labels, 5)[0] is logits
    )
