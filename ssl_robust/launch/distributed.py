"""How a run is spread over processes: accelerator, DDP strategy, cluster environment, checks.

The same config runs unchanged on one CPU, one GPU, 8 GPUs or N nodes; only ``trainer.devices``
and ``trainer.num_nodes`` (and the launcher: plain ``python``, ``torchrun`` or SLURM's ``srun``)
change. Everything here is decided before ``pl.Trainer`` is built, so a wrong setup fails with a
message instead of hanging in process-group setup, which waits for ranks that never come.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy, Strategy
from pytorch_lightning.utilities.rank_zero import rank_zero_only

STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu")

# Job names with which Lightning deliberately ignores SLURM (an interactive shell in an
# allocation): processes are then launched by something else.
_SLURM_INTERACTIVE_NAMES = ("bash", "interactive")


@dataclass(frozen=True)
class Launch:
    """Who started this process, and how many processes it started in all.

    Attributes:
        launcher: ``"slurm"``, ``"torchrun"`` or ``"python"`` (Lightning starts the other
            local processes itself).
        world_size: Processes started in all; ``None`` when the launcher does not say.
        source: Where ``world_size`` came from, for messages (e.g. ``"SLURM_NTASKS"``).
    """

    launcher: str
    world_size: int | None
    source: str


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launcher and the launched world size from the environment.

    torchrun sets ``TORCHELASTIC_RUN_ID`` and ``WORLD_SIZE``; SLURM sets ``SLURM_NTASKS`` (the
    step's task count inside ``srun``, which Lightning's SLURMEnvironment takes as the world
    size) and ``SLURM_STEP_ID`` only inside an ``srun`` step.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["WORLD_SIZE"]), "torchrun's WORLD_SIZE")
    slurm_job = env.get("SLURM_JOB_NAME", "")
    if "SLURM_NTASKS" in env and slurm_job not in _SLURM_INTERACTIVE_NAMES:
        if "SLURM_STEP_ID" not in env:
            # The batch script itself: one process, whatever the allocation holds.
            return Launch("slurm", 1, "the batch script (no srun step)")
        return Launch("slurm", int(env["SLURM_NTASKS"]), "SLURM_NTASKS")
    return Launch("python", None, "")


def is_global_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process will be global rank zero, read before the Trainer exists.

    For files that must be written by exactly one process before ``fit`` (e.g. the wandb run
    id: two ranks writing different ids would split a requeued run in two).
    """
    env = os.environ if env is None else env
    launch = detect_launch(env)
    if launch.launcher == "torchrun":
        return int(env.get("RANK", "0")) == 0
    if launch.launcher == "slurm":
        return int(env.get("SLURM_PROCID", "0")) == 0
    # Lightning's own launcher: NODE_RANK per node, LOCAL_RANK per child process.
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    return node == 0 and int(env.get("LOCAL_RANK", "0")) == 0


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node, read before the Trainer exists: torchrun's and
    Lightning's launcher's ``LOCAL_RANK``, or SLURM's ``SLURM_LOCALID`` under ``srun``."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    if detect_launch(env).launcher == "slurm":
        return int(env.get("SLURM_LOCALID", "0"))
    return 0


def check_world_size(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> Launch:
    """Fail fast when the launched processes cannot form ``devices x num_nodes`` ranks.

    Without this, a mis-sized world hangs in process-group setup (each rank waits for ranks
    that were never started) until the timeout, which is 30 minutes by default.

    Raises:
        ValueError: Naming both numbers and the fix.
    """
    if devices < 1 or num_nodes < 1:
        raise ValueError(
            f"trainer.devices and trainer.num_nodes must be >= 1, got {devices}, {num_nodes}"
        )
    expected = devices * num_nodes
    launch = detect_launch(env)
    env = os.environ if env is None else env
    if launch.world_size is not None and launch.world_size != expected:
        hint = ""
        if launch.source.startswith("the batch script"):
            hint = " Start the training with `srun python ...` inside the batch script."
        elif launch.launcher == "slurm":
            hint = (
                f" Submit with --nodes={num_nodes} --ntasks-per-node={devices}, or set"
                " trainer.devices / trainer.num_nodes to the allocation."
            )
        elif launch.launcher == "torchrun":
            hint = f" Run torchrun with --nnodes={num_nodes} --nproc-per-node={devices}."
        raise ValueError(
            f"trainer.devices x trainer.num_nodes = {devices} x {num_nodes} = {expected} ranks, "
            f"but {launch.source} launched {launch.world_size} process(es).{hint}"
        )
    if launch.launcher == "python" and num_nodes > 1 and "NODE_RANK" not in env:
        raise ValueError(
            f"trainer.num_nodes={num_nodes} needs a launcher on every node: srun (SLURM), "
            "torchrun --nnodes, or NODE_RANK + MASTER_ADDR + MASTER_PORT set on each node"
        )
    return launch


def resolve_accelerator(accelerator: str) -> str:
    """``auto`` -> ``gpu`` when CUDA is available, else ``cpu``; names the valid choices."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; choose from {list(ACCELERATORS)}")
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


def process_group_backend(accelerator: str) -> str:
    """NCCL between GPUs, gloo between CPU processes (NCCL has no CPU tensors)."""
    return "nccl" if resolve_accelerator(accelerator) == "gpu" else "gloo"


def build_strategy(
    strategy: str, accelerator: str, devices: int, num_nodes: int, pg_timeout_s: int
) -> Strategy | str:
    """The Lightning strategy: DDP with an explicit backend and timeout as soon as there is
    more than one rank (or one is asked for), ``"auto"`` for a single process.

    Args:
        strategy: One of :data:`STRATEGIES`; ``auto`` means DDP when ``devices x num_nodes > 1``.
        pg_timeout_s: Collective timeout: how long a rank waits for the others (a stalled
            rank, a slow checkpoint on rank zero) before the job fails instead of hanging.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    if pg_timeout_s < 1:
        raise ValueError(f"trainer.pg_timeout_s must be >= 1, got {pg_timeout_s}")
    if strategy == "auto" and devices * num_nodes == 1:
        return "auto"
    kwargs: dict[str, Any] = {
        "process_group_backend": process_group_backend(accelerator),
        "timeout": timedelta(seconds=pg_timeout_s),
    }
    if strategy == "ddp_spawn":
        kwargs["start_method"] = "spawn"
    if strategy == "ddp_find_unused_parameters_true":
        kwargs["find_unused_parameters"] = True
    return DDPStrategy(**kwargs)


def use_sync_batchnorm(requested: bool, accelerator: str) -> bool:
    """SyncBatchNorm (BN statistics over the global batch) on GPUs only.

    torch's SyncBatchNorm raises on CPU tensors, so on CPU the request is ignored with a note
    rather than failing a run that is otherwise valid (the same config then runs everywhere).
    """
    if requested and resolve_accelerator(accelerator) == "cpu":
        rank_zero_print("note: trainer.sync_batchnorm is ignored on CPU (SyncBatchNorm needs GPUs)")
        return False
    return requested


def cluster_plugins(env: Mapping[str, str] | None = None) -> list[Any]:
    """``SLURMEnvironment`` (ranks and world from SLURM's variables) when running under SLURM.

    Lightning's own auto-requeue is off: its SIGUSR1 handler writes the checkpoint inside the
    signal handler, i.e. at whatever instruction each rank happens to be (possibly halfway
    through an optimiser step, and on different steps on different ranks, where the
    checkpoint's barrier can meet another rank's all-reduce). :class:`SlurmRequeue` defers
    the checkpoint to the next step boundary instead.
    """
    if detect_launch(env).launcher != "slurm":
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def next_hpc_checkpoint(root: Path) -> Path:
    """``root/hpc_ckpt_<N+1>.ckpt`` after the highest existing N (Lightning's naming)."""
    numbers = [
        int(m.group(1))
        for p in root.glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def at_step_boundary(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether training batch ``batch_idx`` has just ended with an optimiser step: where a
    checkpoint can be taken, as it holds whole steps (the gradients of an accumulation window
    cut short are not in it), and where a resumed run starts, at the next batch
    (``batches_done_this_epoch``)."""
    acc = trainer.accumulate_grad_batches
    return (batch_idx + 1) % acc == 0 or batch_idx + 1 == trainer.num_training_batches


class SlurmRequeue(pl.Callback):
    """Checkpoint and requeue the SLURM job when it is sent ``SIGUSR1``.

    With ``#SBATCH --signal=SIGUSR1@90 --requeue`` SLURM sends the signal 90 s before the time
    limit (``scancel --signal=USR1 JOBID`` does it by hand). The handler only records the
    request; at the end of a training step every rank agrees on it (one boolean all-reduce,
    every ``every_n_batches`` batches when there are several ranks: the reduction makes the
    host wait for the device, so doing it every step would cost throughput; one rank checks
    every batch, for free), ``hpc_ckpt_N.ckpt`` is written into ``default_root_dir`` (the run
    directory) by the usual collective ``save_checkpoint``, rank zero calls ``scontrol
    requeue`` and the run stops. The requeued job reruns the same command, and the pipeline
    resumes from the newest of ``last.ckpt`` and ``hpc_ckpt_*.ckpt`` in the run directory.

    The handler is installed when ``fit`` starts; a signal that arrives earlier (imports, data
    loading) gets SIGUSR1's default action, which ends the job, so the signal lead must exceed
    the job's start-up time.
    """

    def __init__(self, signum: int = signal.SIGUSR1, every_n_batches: int = 10) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.signum = signum
        self.every_n_batches = every_n_batches
        self.requested = False
        self._previous: Any = None
        self._batches = 0  # the same count on every rank: all of them check on the same batch

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not at_step_boundary(trainer, batch_idx):
            return
        self._batches += 1
        if trainer.world_size > 1 and self._batches % self.every_n_batches:
            return
        # One tiny collective keeps the ranks in agreement about when to stop.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = trainer.strategy.broadcast(next_hpc_checkpoint(Path(trainer.default_root_dir)))
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        ok = self._requeue() if trainer.is_global_zero else False
        if trainer.strategy.broadcast(ok):
            rank_zero_print(f"checkpointed {path} and requeued the job; stopping")
            # The job is requeued and will be killed; leave now rather than train on.
            raise SystemExit(0)
        rank_zero_print(f"checkpointed {path}, but the requeue failed; training on")
        self.requested = False

    @staticmethod
    def _requeue() -> bool:
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array_job is not None:
            job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        else:
            job_id = os.environ.get("SLURM_JOB_ID", "")
        if not re.fullmatch(r"[0-9_]+", job_id):
            return False
        try:
            done = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            print(f"scontrol requeue {job_id} failed: {err}", flush=True)
            return False
        if done.returncode != 0:
            print(f"scontrol requeue {job_id} failed: {done.stderr.strip()}", flush=True)
        return done.returncode == 0


class CheckpointOnSigterm(pl.Callback):
    """On SIGTERM, checkpoint the training step in progress before Lightning stops the fit.

    SIGTERM is how schedulers stop a job (SLURM at its time limit or on ``scancel``, Kubernetes,
    ``timeout``, ``kill``). Lightning notes it (``trainer.received_sigterm``) and stops at the
    end of the training batch in which it arrived, after this hook has run: the checkpoint,
    ``hpc_ckpt_N.ckpt`` in the run directory, holds every step taken, and running the same
    command again resumes from it (the newest of it and ``last.ckpt``) on the next batch.
    Without it the rerun would start again from the last ``last.ckpt``, up to
    ``trainer.checkpoint_every_n_epochs`` epochs earlier.

    One process only: under DDP the ranks may notice the signal in different batches, and a
    checkpoint written by all of them would hang; there a SLURM job checkpoints on SIGUSR1
    (:class:`SlurmRequeue`) and other stops resume from ``last.ckpt``. A signal in the middle
    of an accumulation window (``trainer.accumulate_grad_batches``), whose gradients no
    checkpoint holds, or during validation, also leaves ``last.ckpt`` as the resume point.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.received_sigterm or trainer.world_size > 1 or self.saved is not None:
            return
        if not at_step_boundary(trainer, batch_idx):
            return
        path = next_hpc_checkpoint(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        self.saved = path
        rank_zero_print(f"SIGTERM: checkpointed {path} (step {trainer.global_step}); stopping")


class Terminated(SystemExit):
    """A job without a Trainer stopped by SIGTERM (:func:`stop_on_sigterm`); the command line
    reports it in one line and exits 143, as it does a fit that Lightning stopped."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """For a job without a Trainer (the evaluation): SIGTERM raises :class:`Terminated`.

    Without it the signal's default action ends the process at once, with no word of why and
    its wandb run left open. Such a job stores each finished unit of work atomically as it
    goes, so stopping between two Python bytecodes loses only the unit in progress.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def requeue_on_signal(signum: int = signal.SIGUSR1) -> Iterator[None]:
    """For a job without a Trainer (the evaluation), under SLURM: on ``SIGUSR1`` requeue the
    job and stop at once (``SystemExit(0)``).

    Such a job stores each finished unit of work as it goes, atomically, so stopping between
    two Python bytecodes loses only the unit in progress, which the requeued job computes
    again. When the requeue fails the job works on (and is ended at its time limit). Outside
    SLURM nothing is installed: the signal keeps its default action.
    """
    if "SLURM_JOB_ID" not in os.environ:
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if SlurmRequeue._requeue():
            print("SIGUSR1: requeued the job; stopping (finished units are stored)", flush=True)
            raise SystemExit(0)
        print("SIGUSR1: the requeue failed; working on", flush=True)

    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@rank_zero_only
def rank_zero_print(message: str) -> None:
    print(message, flush=True)


class ScaleSummary(pl.Callback):
    """Print and log, once on rank zero at the start of training, how the run is scaled.

    The numbers derived from the world size (global batch, scaled learning rate) are computed
    in the methods' ``configure_optimizers`` and read from ``pl_module.derived``.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        derived: dict[str, float] = dict(getattr(pl_module, "derived", {}))
        strategy = trainer.strategy
        backend = getattr(strategy, "process_group_backend", None) or "none"
        scale = {
            "dist/world_size": float(trainer.world_size),
            "dist/num_nodes": float(trainer.num_nodes),
            "dist/devices": float(trainer.num_devices),
        }
        if trainer.is_global_zero:
            parts = [
                f"world {trainer.world_size} = {trainer.num_nodes} node(s) x "
                f"{trainer.num_devices} device(s)",
                f"strategy {type(strategy).__name__} ({backend})",
            ]
            if "optim/global_batch" in derived:
                parts.append(f"global batch {int(derived['optim/global_batch'])}")
            if "optim/lr" in derived:
                parts.append(f"scaled lr {derived['optim/lr']:.6g}")
            print("scale: " + ", ".join(parts), flush=True)
        for logger in trainer.loggers:
            logger.log_metrics({**scale, **derived}, step=trainer.global_step)
