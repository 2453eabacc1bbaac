"""Trainer construction shared by every phase: run directory, loggers, callbacks, resume."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_robust.config import TrainerConfig, WandbConfig
from ssl_robust.files import write_text_atomic
from ssl_robust.launch import curves
from ssl_robust.launch.distributed import (
    CheckpointOnSigterm,
    ScaleSummary,
    SlurmRequeue,
    build_strategy,
    check_world_size,
    cluster_plugins,
    is_global_zero,
    resolve_accelerator,
    use_sync_batchnorm,
)
from ssl_robust.launch.perf import EpochThroughput, FitClock, StepProfiler


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


class _DropLightningNoise(logging.Filter):
    """Lightning's info lines that say nothing about the run (printed by every Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")  # an advert for a hosted logger


# Warnings (regex on the start of the message) that every run of this design raises and no user
# can act on:
_EXPECTED_WARNINGS = (
    # A deprecation that Lightning's own pytree helper raises under this torch.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A mid-epoch resume's loader "is not resumable": every training loader here is
    # (ResumableDataLoader), by other means than the `state_dict` Lightning looks for.
    r"You.re resuming from a checkpoint that ended",
    # Raised by each SLURMEnvironment (each Trainer) on any machine where `srun` exists: a
    # one-process job runs without srun by design, and a world started at the wrong size
    # fails earlier, in check_world_size, with the same hint.
    r"The `srun` command is available on your system but is not used",
    # Every resume: the run directory keeps its checkpoints to be resumed (a fresh start
    # deletes them, resume_checkpoint).
    r"Checkpoint directory .* exists and is not empty",
)

# wandb warnings (start of the message) that every run raises: Lightning's WandbLogger always
# passes `anonymous` to wandb.init, a setting that recent wandb ignores.
_EXPECTED_WANDB_WARNINGS = ("The anonymous setting has no effect",)


def _ignore_expected_warnings() -> None:
    """Put the ignore filters of :data:`_EXPECTED_WARNINGS` first in ``warnings.filters``, if
    they are not there yet: adding a filter resets Python's record of the warnings already
    shown, so adding them again at every Trainer would repeat every other warning once per
    Trainer."""
    wanted = [("ignore", pattern) for pattern in reversed(_EXPECTED_WARNINGS)]
    first = [(f[0], getattr(f[1], "pattern", None)) for f in warnings.filters[: len(wanted)]]
    if first == wanted:
        return
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _quiet_wandb() -> None:
    """Drop :data:`_EXPECTED_WANDB_WARNINGS` from ``wandb.termwarn`` (wandb's console warnings,
    which bypass both ``warnings`` and ``logging``); once, and only where wandb is imported
    already (``build_loggers`` imports it when wandb is on)."""
    wandb = sys.modules.get("wandb")
    termwarn = getattr(wandb, "termwarn", None)
    if termwarn is None or getattr(termwarn, "drops_expected_warnings", False):
        return

    def quiet_termwarn(string: str, *args: Any, **kwargs: Any) -> None:
        if not str(string).startswith(_EXPECTED_WANDB_WARNINGS):
            termwarn(string, *args, **kwargs)

    quiet_termwarn.drops_expected_warnings = True  # type: ignore[attr-defined]
    wandb.termwarn = quiet_termwarn  # type: ignore[union-attr]


def quiet_lightning() -> None:
    """Keep Lightning's (and wandb's) output to what concerns the run: no advert, and none of
    the warnings that every run of this design raises (:data:`_EXPECTED_WARNINGS`,
    :data:`_EXPECTED_WANDB_WARNINGS`); every other warning still shows. Called by every
    :func:`build_trainer`; installs each filter once."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in log.filters):
            log.addFilter(_DropLightningNoise())
    _ignore_expected_warnings()
    _quiet_wandb()


class ProgressBar(RichProgressBar):
    """Lightning's rich bar without ``v_num`` (the log version is not a metric, and the bar
    rendered it as a float, "v_num: 0.000"), showing the per-step ``step_metrics`` read at most
    once every ``every_s`` seconds.

    The training steps log their loss without ``prog_bar=True``: Lightning turns progress-bar
    metrics into Python numbers after every step, bar or no bar, and reading a device tensor
    makes the host wait for the device, every step.
    """

    def __init__(
        self, *args: Any, step_metrics: Sequence[str] = ("train/loss",), every_s: float = 1.0,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.step_metrics = tuple(step_metrics)
        self.every_s = every_s
        self._read_at: float | None = None
        self._values: dict[str, float] = {}

    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self.every_s:
            self._read_at = now
            for name in self.step_metrics:
                value = trainer.callback_metrics.get(name)
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    self._values[name] = float(value)
        items.update(self._values)
        return items


class ConfigInCheckpoint(Callback):
    """Store the resolved config in every checkpoint (nanoGPT-style), as plain data."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["ssl_robust_config"] = self.config


class ValidateLastEpoch(Callback):
    """Validates after the last training epoch too, whatever ``check_val_every_n_epoch``, so
    the run's final metrics (``val/knn_acc`` in ``metrics.json``) are those of the weights it
    exports, not of an earlier epoch's. Lightning reads the interval at every epoch's end."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1


class DivergedError(ValueError):
    """Training produced non-finite weights (NaN or inf): every later step would be wasted."""


class StopOnDivergence(pl.Callback):
    """Ends a fit with :class:`DivergedError` at the end of the first training epoch whose
    weights are no longer finite, before that epoch's checkpoint is written.

    A diverged run otherwise trains on for every remaining epoch (hours on a GPU) and exports a
    NaN encoder. Checked once an epoch on the trainable weights, not on the step loss: one
    reduction and one host synchronisation per epoch, and no false alarm from a single
    overflowing step that a 16-bit gradient scaler skips. Lightning runs checkpoint callbacks
    after the others, so ``last.ckpt`` keeps the last finite epoch (resuming it repeats the
    divergence unless the settings change).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            return
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        if bool(finite):
            return
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        loss = trainer.callback_metrics.get("train/loss")
        said = f" (train/loss {float(loss):.4g})" if loss is not None else ""
        kept = newest_checkpoint(Path(trainer.default_root_dir))
        raise DivergedError(
            f"training diverged in epoch {trainer.current_epoch + 1} (step "
            f"{trainer.global_step}){said}: {len(bad)} weight tensor(s) hold NaN or inf, "
            f"e.g. {bad[0]}. "
            + (f"The last finite state is {kept}. " if kept else "Nothing was checkpointed. ")
            + "Lower the learning rate, add warm-up, or train in a wider trainer.precision "
            "(32-true), then start over (run.resume=false) or give another run.dir."
        )


class TrainingCurves(pl.Callback):
    """Keep ``<run_dir>/curves.png`` current while a fit runs, so a long run's progress can be
    looked at (and a crashed or preempted run keeps its curves up to its last logged step).

    At the end of each training epoch and each validation, once ``every_s`` seconds have passed
    since the fit started or the figure was last drawn, the CSV logs are flushed and the figure
    is redrawn, titled with the epoch reached. When the fit stops on an exception (a crash,
    Ctrl-C, the ``SystemExit`` of a SLURM requeue) it is drawn at once, titled with the reason.
    Drawing takes at most ``max_share`` of the time: the wait grows with the last drawing's
    duration. Global rank zero only; ``every_s=0`` draws only when the fit stops on an
    exception. A failed drawing warns once and does not stop training.
    """

    def __init__(self, run_dir: str | Path, every_s: float = 60.0, max_share: float = 0.02) -> None:
        if every_s < 0:
            raise ValueError(
                f"curves every_s must be >= 0 (0 = only when a fit stops), got {every_s}"
            )
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.max_share = max_share
        self.run_dir = Path(run_dir)
        self.every_s = every_s
        self.wait_s = every_s
        self._last = time.monotonic()
        self._warned = False
        self.drawn = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.monotonic()

    @staticmethod
    def _total(trainer: pl.Trainer) -> str:
        return str(trainer.max_epochs) if trainer.max_epochs and trainer.max_epochs > 0 else "?"

    def draw(self, trainer: pl.Trainer, state: str) -> Path | None:
        """Flush the CSV logs and redraw now; the figure's path, or None if nothing to draw."""
        if not trainer.is_global_zero:
            return None
        start = time.monotonic()
        path = None
        try:
            for logger in trainer.loggers:
                # Only a writer already made: touching `experiment` would create an empty
                # log version for a fit that failed before logging (Lightning's finalize checks
                # the same).
                if (
                    isinstance(logger, CSVLogger)
                    and getattr(logger, "_experiment", None) is not None
                ):
                    logger.save()
            path = curves.plot_training_curves(
                self.run_dir, f"{self.run_dir.resolve().name}: {state}"
            )
        except Exception as exc:  # a figure must not stop training
            if not self._warned:
                rank_zero_warn(f"training curves not drawn: {exc!r}")
                self._warned = True
        self._last = time.monotonic()
        took = self._last - start
        self.wait_s = max(self.every_s, took * (1 - self.max_share) / self.max_share)
        self.drawn += path is not None
        return path

    def _maybe_draw(self, trainer: pl.Trainer) -> None:
        due = time.monotonic() - self._last >= self.wait_s
        if self.every_s and due and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # Both hooks run when an epoch's training is done, before current_epoch moves on.
            done = trainer.current_epoch + 1
            self.draw(trainer, f"running, {done} of {self._total(trainer)} epochs done")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_draw(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_draw(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            why = "stopped by SIGTERM"
        elif isinstance(exception, SystemExit) and not exception.code:
            why = "stopped to be requeued"
        elif isinstance(exception, KeyboardInterrupt):
            why = "interrupted"
        else:
            why = f"stopped by {type(exception).__name__}"
        where = f"in epoch {trainer.current_epoch + 1} of {self._total(trainer)}"
        self.draw(trainer, f"{why} {where} (step {trainer.global_step})")


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit``, with Ctrl-C raised as ``KeyboardInterrupt``: Lightning shuts down
    gracefully and then calls ``sys.exit(1)``, the status of bad input, with no word of why
    (a SLURM requeue's ``SystemExit(0)`` passes through)."""
    _interruptible(trainer, trainer.fit, *args, **kwargs)


def test(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.test``, with Ctrl-C raised as ``KeyboardInterrupt`` (see :func:`fit`)."""
    _interruptible(trainer, trainer.test, *args, **kwargs)


def _interruptible(
    trainer: pl.Trainer, call: Callable[..., Any], *args: Any, **kwargs: Any
) -> None:
    try:
        call(*args, **kwargs)
    except SystemExit as exit_:
        if exit_.code == 1 and trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id kept in the run directory, so a resumed run continues the same run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb's id alphabet: lowercase letters and digits
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_id)
    return run_id


def build_loggers(
    run_dir: Path, wandb_cfg: WandbConfig, config: dict[str, Any], job_type: str, default_name: str
) -> list[Logger]:
    """A CSV logger (``logs/version_<k>/metrics.csv``, one per start of the run, since
    Lightning's CSV writer truncates an existing file) and, unless disabled, a wandb logger.

    wandb follows the naming convention in ``slurm/README.md``: project per study, ``group``
    per experiment, ``job_type`` per phase (defaults to ``job_type``), run name = run directory
    name. The run id lives in the run directory, so a resumed or requeued run continues the same
    wandb run; only global rank zero creates it (and only rank zero ever logs to wandb).
    """
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if wandb_cfg.mode != "disabled" and is_global_zero():
        import wandb

        if wandb.run is not None:
            # An earlier run of this process (tests, notebooks): Lightning's WandbLogger would
            # silently log into it instead of starting this run.
            wandb.finish()
        loggers.append(
            WandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity or None,
                group=wandb_cfg.group or None,
                name=wandb_cfg.name or default_name,
                tags=list(wandb_cfg.tags) or None,
                job_type=wandb_cfg.job_type or job_type,
                # Not `offline=`: it would override WANDB_MODE=disabled.
                mode=wandb_cfg.mode,
                id=wandb_run_id(run_dir),
                resume="allow",
                save_dir=str(run_dir),
                config=config,
                settings=wandb.Settings(init_timeout=wandb_cfg.init_timeout_s),
            )
        )
    return loggers


def resume_requested(resume: bool, env: Mapping[str, str] | None = None) -> bool:
    """``run.resume``, except in a requeued SLURM job (``SLURM_RESTART_COUNT`` > 0), which always
    resumes: its command line is the first start's, and ``run.resume=false`` there asked for a
    fresh start of the job, not for every requeued piece to start over again."""
    env = os.environ if env is None else env
    return resume or int(env.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_checkpoint(run_dir: Path, resume: bool) -> str | None:
    """The newest of ``checkpoints/last.ckpt`` and an ``hpc_ckpt_*.ckpt`` (written on SLURM's
    SIGUSR1 or on SIGTERM), if resuming (:func:`resume_requested`).

    A fresh start (``resume`` false, not a requeued job) deletes the run directory's
    checkpoints and ``metrics.json``, so that neither a later rerun nor Lightning's own SLURM
    auto-resume (which loads any ``hpc_ckpt_*.ckpt`` when no checkpoint is given) continues
    the run it replaces.
    """
    if not resume_requested(resume):
        replaced = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
        # Its metrics too: a later resume of this run would carry them over as its own.
        for old in [*replaced, run_dir / "metrics.json"]:
            old.unlink(missing_ok=True)  # every rank deletes before its own fit starts
        return None
    return newest_checkpoint(run_dir)


def newest_checkpoint(run_dir: Path) -> str | None:
    """The newest of ``checkpoints/last.ckpt`` and an ``hpc_ckpt_*.ckpt``, if any."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        return None
    return str(max(existing, key=lambda p: p.stat().st_mtime_ns))


class _EpochCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint saving every ``every_n_epochs`` training epochs and after the run's
    last one, whatever its number (Lightning's own skips a last epoch that is not a multiple)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # The run's last epoch, the same on every rank (a save is collective under DDP). The
        # skip test is true once this step is saved, so a multiple is not saved twice.
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if last and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def state_key(self) -> str:
        # The key of Lightning's own every-epoch ModelCheckpoint (class name included) whatever
        # the interval: checkpoints written before the interval existed, or with another one,
        # restore this callback's state, and Lightning does not warn of a missing callback on
        # resume. A test keeps it equal to Lightning's.
        key = {
            "monitor": self.monitor,
            "mode": self.mode,
            "every_n_train_steps": self._every_n_train_steps,
            "every_n_epochs": 1,
            "train_time_interval": self._train_time_interval,
        }
        return f"ModelCheckpoint{key!r}"


def checkpoint_callbacks(
    run_dir: Path, monitor: str | None, mode: str = "max", every_n_epochs: int = 1
) -> list[Callback]:
    """``last.ckpt`` after every ``every_n_epochs``-th training epoch and the last one, plus
    ``best.ckpt`` by ``monitor``.

    Lightning writes checkpoints through an fsspec transaction (temp file + rename), so a crash
    mid-write never leaves a torn ``last.ckpt``. A crash loses at most ``every_n_epochs``
    epochs; a SLURM preemption nothing (it checkpoints on its signal, :class:`SlurmRequeue`).
    """
    if every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Callback] = []
    if monitor:
        # First: both save at the end of a training epoch, in list order, and last.ckpt must
        # hold the best score including this epoch's.
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor=monitor,
                mode=mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    callbacks.append(
        # Not save_last=True with save_top_k=0: Lightning >= 2.5 then writes last.ckpt only on
        # epochs where a top-k checkpoint was saved, i.e. never. Without a monitor, top-1 is
        # simply the latest epoch, written under the fixed name "last".
        _EpochCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
            every_n_epochs=every_n_epochs,
        )
    )
    return callbacks


def build_trainer(
    tcfg: TrainerConfig,
    run_dir: Path,
    loggers: list[Logger],
    callbacks: list[Callback],
    check_val_every_n_epoch: int = 1,
) -> pl.Trainer:
    """A Trainer from the trainer section; each argument named, none reflected from the config.

    The same section runs on one CPU, one GPU, many GPUs or many nodes: DDP (NCCL on GPUs, gloo
    on CPU, ``pg_timeout_s``) as soon as ``devices x num_nodes > 1``; under SLURM a
    ``SLURMEnvironment`` and, with ``auto_requeue``, a checkpoint + requeue on SIGUSR1
    (:class:`SlurmRequeue`); on SIGTERM a checkpoint of the step in progress in a single
    process (:class:`CheckpointOnSigterm`). A world that the launcher did not start at the
    configured size fails here, before process-group setup would hang.
    """
    check_world_size(tcfg.devices, tcfg.num_nodes)
    quiet_lightning()
    accelerator = resolve_accelerator(tcfg.accelerator)
    plugins = cluster_plugins()
    all_callbacks = [
        *callbacks, ScaleSummary(), EpochThroughput(), FitClock(), CheckpointOnSigterm(),
        StopOnDivergence(),
    ]  # fmt: skip
    if plugins and tcfg.auto_requeue:
        all_callbacks.append(SlurmRequeue())
    if tcfg.progress_bar:
        all_callbacks.append(ProgressBar(leave=True))
    if tcfg.profile_steps:
        all_callbacks.append(StepProfiler(run_dir / "profile.txt", tcfg.profile_steps))
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
        all_callbacks.append(TrainingCurves(run_dir, tcfg.curves_every_s))
    return pl.Trainer(
        default_root_dir=str(run_dir),  # also where SLURM's hpc_ckpt_N.ckpt go
        max_epochs=tcfg.max_epochs,
        accelerator=accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=build_strategy(
            tcfg.strategy, accelerator, tcfg.devices, tcfg.num_nodes, tcfg.pg_timeout_s
        ),
        plugins=plugins or None,
        sync_batchnorm=use_sync_batchnorm(tcfg.sync_batchnorm, accelerator),
        precision=tcfg.precision,  # type: ignore[arg-type]
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=tcfg.gradient_clip_val or None,
        log_every_n_steps=tcfg.log_every_n_steps,
        # None (not 1.0) when unlimited: Lightning prints a line for every explicit limit.
        limit_train_batches=None if tcfg.limit_train_batches == 1.0 else tcfg.limit_train_batches,
        limit_val_batches=None if tcfg.limit_val_batches == 1.0 else tcfg.limit_val_batches,
        deterministic=tcfg.deterministic,
        benchmark=tcfg.cudnn_benchmark and not tcfg.deterministic,
        fast_dev_run=tcfg.fast_dev_run,
        check_val_every_n_epoch=check_val_every_n_epoch,
        enable_progress_bar=tcfg.progress_bar,
        logger=loggers or False,
        callbacks=all_callbacks,
        num_sanity_val_steps=0,
    )
