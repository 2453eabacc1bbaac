"""The evaluation job's schema (clean, corruptions, attacks, calibration, OOD, latency).

Every section can be switched off and shrunk, so CI runs a tiny grid with the same code that
runs the full benchmark. Closed value sets (CHOICES) and numeric ranges (RANGES) are checked
when the config loads; lists (corruption names, eps lists) and settings that depend on each
other are checked by the pipeline before any work starts (``pipelines.evaluate.check_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import Range, RunConfig, WandbConfig, at_least

# The 15 CIFAR-10-C benchmark corruptions (Hendrycks & Dietterich 2019), in the paper's order.
BENCHMARK_CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]


@dataclass
class ClassifierSection:
    # A fine-tuning run directory holding classifier.safetensors + classifier.json (required).
    run: str = ""


@dataclass
class PurifierSection:
    # A denoiser run directory or any local diffusers UNet folder; "" evaluates the bare
    # classifier.
    run: str = ""
    # ddpm: ancestral steps t* .. 1 (DiffPure); ddim: ddim_steps deterministic steps; oneshot:
    # the predicted x0 after one UNet call (denoised smoothing).
    sampler: str = "ddpm"
    # Diffusion steps added before the reverse pass. DiffPure's t* = 0.1 of T = 1000 (Nie et
    # al. 2022, Sec. 5.1). Ignored when sigma > 0.
    t_star: int = 100
    # > 0: pick t* for this Gaussian std on [0, 1] images (denoised smoothing, Carlini et al.
    # 2023); 0 = off, t_star sets the noise (as the fine-tuning's purify.sigma).
    sigma: float = 0.0
    # Steps of the ddim sampler, 1 <= ddim_steps <= t*.
    ddim_steps: int = 5
    # Recompute UNet activations in the backward pass: exact gradients through long samplers
    # in bounded memory (not a BPDA approximation).
    gradient_checkpointing: bool = True
    # Freeze the purifier's noise (a deterministic pipeline; AutoAttack then applies).
    fixed_noise: bool = False
    # bfloat16: the UNet under bf16 autocast (faster on GPUs; attacks then see bf16 gradients).
    dtype: str = "float32"


@dataclass
class EvalSection:
    # "auto": the data the classifier was fine-tuned on (classifier.json "data"), or a dataset
    # name; the evaluation split is that data's validation split. (Not a `data` section: the
    # shared DataConfig's training keys have no meaning here.)
    data: str = "auto"
    # "" keeps the classifier's data root (set it when the data moved).
    data_root: str = ""
    # Let torchvision fetch the evaluation data and the torchvision OOD datasets (needs the
    # network).
    download: bool = False
    # "auto" takes cuda when available.
    device: str = "auto"
    # Images per forward pass (clean, corruption cells, calibration, OOD).
    batch_size: int = 256
    # Cap on evaluation images (a seeded random subset of the split); 0 = all.
    max_images: int = 0
    # Progress bars of the evaluation's passes (a live bar on a terminal, periodic log lines
    # elsewhere); false: none.
    progress: bool = True
    # Images in the report's example figures (plots/examples.png: each image clean, purified,
    # attacked under every threat; plots/corruption_examples.png: the first one under every
    # corruption and severity), with the pipeline's predictions; 0..16, 0 = no figures.
    examples: int = 8
    # Bootstrap resamples of the images behind the 95% intervals of the ECEs and the OOD
    # AUROCs (a purifier's draws of one image resampled together); 0 = no such intervals.
    bootstrap: int = 200


@dataclass
class CleanSection:
    # The clean accuracy (test/acc) on the evaluation split.
    enabled: bool = True
    # Purifications per image behind a stochastic purifier: test/acc is their mean, with
    # test/acc_std and test/acc_worst beside it (1: one purification; ignored when
    # deterministic). Calibration and OOD pool the predictions of every draw, and OOD noise
    # images are purified as many times.
    draws: int = 1


@dataclass
class ShiftSection:
    # Accuracy under a grid of common corruptions (CIFAR-10-C, Hendrycks & Dietterich 2019).
    enabled: bool = True
    # The corruptions of the grid; the default is CIFAR-10-C's 15.
    corruptions: list[str] = field(default_factory=lambda: list(BENCHMARK_CORRUPTIONS))
    # The severities of the grid, each in 1..5.
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    # A CIFAR-10-C style folder (released layout: <corruption>.npy + labels.npy) to read
    # instead of generating the corruptions on the fly.
    cifar_c_dir: str = ""
    # With cifar_c_dir: first generate the missing corruptions of the evaluation set there
    # (resumable), then read them.
    write_cifar_c: bool = False
    # Images per corruption call; the generated images depend on it (random draws are made
    # per batch), so keep it equal to the one a cache was written with.
    batch_size: int = 1000
    # Frost textures of generated corruptions: "procedural" (no files needed), "package" (the
    # CIFAR-10-C frost photographs shipped by imagecorruptions-imaug, pip install -e
    # ".[bench]") or a folder holding frost1..frost5 (png or jpg).
    frost: str = "procedural"
    # Purifications per image in every cell behind a stochastic purifier: each cell's accuracy
    # is their mean, and shift/mean_acc_std and shift/mean_acc_worst give the spread of the
    # grid mean over the draws (1: one purification; ignored when deterministic). Calibration
    # and OOD on the top severity pool the predictions of every draw. Costs draws x the grid's
    # purifications.
    draws: int = 1
    # A reference evaluation (its run directory, or its metrics.json) on the same data and
    # grid, e.g. a supervised classifier's: adds the corruption error of every corruption
    # relative to it, the mean corruption error (mCE) and the relative mCE (Hendrycks &
    # Dietterich 2019, with this reference in place of AlexNet); "" for none.
    ce_reference: str = ""


@dataclass
class NaturalSection:
    # Labeled test sets of the classifier's classes under natural distribution shift, e.g.
    # CIFAR-10.1 (Recht et al. 2018) or CIFAR-10.2 (Lu et al. 2020) for CIFAR-10: each a
    # <name>_data.npy file beside <name>_labels.npy (CIFAR-10.1's layout), a .npz file with
    # images and labels (CIFAR-10.2's), a folder holding one of those, or a
    # <folder>/<class>/<image> tree whose class folders carry the classifier's class names
    # (e.g. CINIC-10's test split).
    # Resized to the evaluation size; accuracy (over clean.draws purifications) under
    # natural/<name>/acc.
    sets: list[str] = field(default_factory=list)
    # Images of each set, a seeded subset (0: all).
    max_images: int = 0


@dataclass
class AttackSection:
    # White-box attacks (PGD, AutoAttack) and their sanity checks.
    enabled: bool = True
    # Linf radii in units of 1/255 (RobustBench's 8/255 is 8); [] = no Linf attack.
    linf_eps: list[float] = field(default_factory=lambda: [8.0])
    # L2 radii on [0, 1] images (RobustBench's 0.5); [] = no L2 attack.
    l2_eps: list[float] = field(default_factory=lambda: [0.5])
    # PGD steps (>= 100 for purifiers).
    steps: int = 100
    # PGD step size on [0, 1] images, not in units of 1/255 (2/255 is 0.00784), for every radius
    # of both norms; 0: 2.5 * eps / steps for each radius.
    step_size: float = 0.0
    # PGD starts from a uniformly random point of the eps-ball (else from the clean image).
    random_start: bool = True
    # ce: cross-entropy; margin: the Carlini-Wagner logit margin.
    loss: str = "ce"
    # Through a stochastic purifier: gradients averaged over this many draws per PGD step
    # (expectation over transformation; >= 20). A deterministic pipeline uses 1.
    eot: int = 20
    # Through a stochastic purifier: each adversarial example re-scored over this many
    # purifications (mean and worst accuracy). A deterministic pipeline uses 1.
    rescore_draws: int = 10
    # Images attacked (a seeded subset of the evaluation set); 0 = all.
    max_images: int = 512
    # Split each threat's PGD over this many blocks of the attacked images, one unit each, so
    # that separate jobs (a SLURM array) can attack a block each.
    shards: int = 1
    # i (1..shards): run only block i's attacks and store them (no report); 0: run whatever
    # blocks are missing, merge them and write the report.
    shard: int = 0
    # AutoAttack (Croce & Hein 2020) for deterministic pipelines; needs `pyautoattack`.
    autoattack: bool = True
    # AutoAttack's attack set: standard (APGD-CE, APGD-T, FAB-T, Square), plus (more attacks
    # and restarts), rand (APGD-CE and APGD-DLR with EOT, for randomized models) or custom
    # (autoattack_attacks).
    autoattack_version: str = "standard"
    # Attacks of version "custom" (apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square).
    autoattack_attacks: list[str] = field(default_factory=list)
    # Checks that the attacks work, for each norm in use: accuracy falls as eps grows, more
    # steps or EOT never help, black-box never beats white-box, gradients are non-zero.
    sanity_checks: bool = True
    # Images of the sanity checks (taken from the attacked images).
    sanity_images: int = 100
    # The growing Linf radii (in units of 1/255) of the "accuracy falls as eps grows" check.
    sanity_linf_eps: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0])
    # The growing L2 radii (on [0, 1] images) of the same check.
    sanity_l2_eps: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    # Black-box queries per image (0: max(100, steps * eot)).
    sanity_queries: int = 0
    # Slack of the checks' comparisons, an accuracy (0: automatic, one image or two standard
    # errors of the accuracy estimate).
    sanity_tol: float = 0.0


@dataclass
class CertSection:
    # Certified L2 robustness by randomized smoothing (Cohen et al. 2019, CERTIFY): per image,
    # the smoothed classifier's class and the radius it is certified for, from Monte Carlo
    # noise draws. Behind a purifier the purifier's own diffusion noise is the smoothing noise
    # (denoised smoothing, Carlini et al. 2023; purifier.sigma picks its t*).
    enabled: bool = False
    # Noise std on [0, 1] images for a bare classifier (required > 0 there); 0 behind a
    # purifier (the sigma of its t* is used).
    sigma: float = 0.0
    # Noise draws to guess the class (Cohen et al.'s n0).
    n0: int = 100
    # Noise draws to bound the class's probability (Cohen et al.'s n).
    samples: int = 10000
    # Failure probability of each certificate (Cohen et al.'s alpha).
    alpha: float = 0.001
    # Images certified (a seeded subset of the evaluation set); 0 = all.
    max_images: int = 100
    # Noise draws per forward pass.
    batch_size: int = 1000
    # Radii (L2, on [0, 1] images) at which the certified accuracy is reported.
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class CalibSection:
    # Calibration: ECE, NLL and Brier score, reliability diagrams.
    enabled: bool = True
    # Equal-width confidence bins of the ECE and the reliability diagram.
    n_bins: int = 15
    # Temperature scaling (Guo et al. 2017): one temperature, fit by NLL on the clean images,
    # rescales every set's logits, and each set's ECE, NLL and Brier are reported again after
    # it. An image is scored with the temperature fit on the other folds of a seeded split
    # (cross-fitting), so no label calibrates its own prediction.
    temperature: bool = True
    # Folds of that seeded split.
    temperature_folds: int = 2


@dataclass
class OODSection:
    # Out-of-distribution detection: AUROC, FPR at 95% TPR and AUPR of each score and OOD set.
    enabled: bool = True
    # Synthetic noise sets (Hendrycks et al. 2019, Outlier Exposure, App. B).
    noise_kinds: list[str] = field(default_factory=lambda: ["gaussian", "uniform", "blobs"])
    # Noise images per kind; 0 = as many as evaluation images.
    num_noise: int = 0
    # Classes whose images count as OOD against the other classes. The classifier was
    # trained on every class, so this is meaningful only for a classifier fine-tuned without
    # them; empty skips the held-out set.
    held_out_classes: list[int] = field(default_factory=list)
    # The pooled highest-severity corruptions as a near-OOD set (needs the shift section).
    shift: bool = True
    # Other datasets' test images as OOD sets, each "<name>" or "<name>@<root>": svhn
    # (torchvision's test_32x32.mat), cifar10, cifar100, stl10, or imagefolder@<folder> (every
    # image of a <folder>/<class>/<image> tree). The root defaults to the evaluation data's;
    # eval.download fetches a torchvision set. Resized to the evaluation size; metrics under
    # ood/<name>/ (an image folder: ood/<folder name>/, ood/<parent>_test/ for a .../test
    # folder). E.g. [svhn, cifar100] for CIFAR-10 (not stl10: 9 of its 10 classes are
    # CIFAR-10's).
    datasets: list[str] = field(default_factory=list)
    # Images of each dataset, a seeded subset; 0 = as many as evaluation images.
    num_images: int = 0
    # Scores of the encoder's features (the classifier's input to its head, after the purifier)
    # against a bank of training features passed through the same pipeline, beside the logit
    # scores (msp, energy): knn (minus the distance to the k-th nearest L2-normalised bank
    # feature; Sun et al. 2022) and mahalanobis (minus the distance to the nearest class mean
    # under one shared, Ledoit-Wolf-shrunk covariance; Lee et al. 2018). Behind a stochastic
    # purifier each image's features are those of its first purification. Empty: logit
    # scores only, and no bank pass. The labeled bank also gives the representation's kNN
    # accuracy (repr/knn_acc, repr/shift/knn_acc). The clean pass, the top-severity cells and
    # the outside sets keep their features in their stored units: switching this between
    # empty and not recomputes those units on a resumed run.
    feature_scores: list[str] = field(default_factory=lambda: ["knn", "mahalanobis"])
    # The bank: the images the classifier was fine-tuned on (subset.npy of its run; the
    # whole train split for a run without one), less any held-out classes; a seeded subset of
    # bank_size (0 = all, else at least 2), shared out between the classes as evenly as they
    # allow.
    bank_size: int = 5000
    # Which neighbour the kNN score measures; 0 = Sun et al.'s ratio of 50 per 50,000 bank
    # images (at least 1).
    knn_k: int = 0


@dataclass
class PerfSection:
    # Latency and throughput of the classifier, and of classifier + purifier when there is one.
    enabled: bool = True
    # Batch of the throughput measurement (latency is measured at batch 1).
    batch_size: int = 256
    # Untimed warm-up calls before the timed ones.
    warmup: int = 3
    # Timed calls.
    iters: int = 10


@dataclass
class EvaluateConfig:
    # run.resume: a rerun in the same run.dir reuses the finished units stored in its partial/
    # (clean pass, corruption cells, attacks, sanity checks); false recomputes everything.
    run: RunConfig = field(default_factory=RunConfig)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    purifier: PurifierSection = field(default_factory=PurifierSection)
    eval: EvalSection = field(default_factory=EvalSection)
    clean: CleanSection = field(default_factory=CleanSection)
    shift: ShiftSection = field(default_factory=ShiftSection)
    natural: NaturalSection = field(default_factory=NaturalSection)
    adv: AttackSection = field(default_factory=AttackSection)
    cert: CertSection = field(default_factory=CertSection)
    calib: CalibSection = field(default_factory=CalibSection)
    ood: OODSection = field(default_factory=OODSection)
    perf: PerfSection = field(default_factory=PerfSection)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "eval.data": ("auto", "cifar10", "cifar100", "digits", "imagefolder", "stl10"),
    "eval.device": ("auto", "cpu", "cuda"),
    "purifier.sampler": ("ddim", "ddpm", "oneshot"),
    "purifier.dtype": ("bfloat16", "float32"),
    "adv.loss": ("ce", "margin"),
    "adv.autoattack_version": ("custom", "plus", "rand", "standard"),
}

# The most images an example figure shows (eval.examples); each PGD unit keeps this many
# adversarial examples, so changing eval.examples never recomputes an attack.
MAX_EXAMPLES = 16

PROBABILITY_BELOW_HALF: Range = ((lambda v: 0 < v < 0.5), "in (0, 0.5)")

# Numeric ranges of this job's own keys, checked when the config loads (with the shared ones)
# and again by the pipeline (a config built in code skips the loader).
RANGES: dict[str, Range] = {
    "purifier.t_star": at_least(0),
    "purifier.sigma": at_least(0, "0 = use purifier.t_star"),
    "purifier.ddim_steps": at_least(1),
    "eval.batch_size": at_least(1),
    "eval.max_images": at_least(0, "0 = all"),
    "eval.examples": ((lambda v: 0 <= v <= MAX_EXAMPLES), f"in 0..{MAX_EXAMPLES}; 0 = no figures"),
    "eval.bootstrap": at_least(0, "0 = no intervals"),
    "clean.draws": at_least(1),
    "shift.batch_size": at_least(1),
    "shift.draws": at_least(1),
    "natural.max_images": at_least(0, "0 = all"),
    "adv.steps": at_least(1),
    "adv.step_size": at_least(0, "0 = 2.5 * eps / steps"),
    "adv.eot": at_least(1),
    "adv.rescore_draws": at_least(1),
    "adv.max_images": at_least(0, "0 = all"),
    "adv.shards": at_least(1),
    "adv.shard": at_least(0, "0 = every block; i = block i of adv.shards"),
    "adv.sanity_images": at_least(1),
    "adv.sanity_queries": at_least(0, "0 = max(100, steps * eot)"),
    "adv.sanity_tol": at_least(0, "0 = automatic"),
    "cert.n0": at_least(1),
    "cert.samples": at_least(1),
    "cert.alpha": PROBABILITY_BELOW_HALF,
    "cert.max_images": at_least(0, "0 = all"),
    "cert.batch_size": at_least(1),
    "cert.sigma": at_least(0, "0 behind a purifier"),
    "calib.n_bins": at_least(1),
    "calib.temperature_folds": at_least(2),
    "ood.num_noise": at_least(0, "0 = as many as evaluation images"),
    "ood.num_images": at_least(0, "0 = as many as evaluation images"),
    "ood.bank_size": ((lambda v: v == 0 or v >= 2), "0 (all) or >= 2"),
    "ood.knn_k": at_least(0, "0 = by the bank's size"),
    "perf.batch_size": at_least(1),
    "perf.warmup": at_least(0),
    "perf.iters": at_least(1),
}
