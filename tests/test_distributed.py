"""Distributed training without SLURM: strategy from the config, world-size checks, sampler
sharding, and a two-"node" torchrun run on loopback (device views, each rank augmenting its own
shard) with the kNN bank gathered across ranks.

DDP jobs run as subprocesses: Lightning's ``ddp`` launcher re-executes ``sys.argv``, which
inside pytest would be pytest itself.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from ssl_robust.data.datamodule import EpochSeededSampler
from ssl_robust.launch.distributed import (
    build_strategy,
    check_world_size,
    cluster_plugins,
    detect_launch,
    is_global_zero,
    next_hpc_checkpoint,
    use_sync_batchnorm,
)
from tests.helpers import clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.image_size=8",
    "data.num_workers=0",
    "data.eval_batch_size=256",
    "model.width=4",
    "method.proj_hidden_dim=16",
    "method.proj_out_dim=8",
    "monitor.knn_k=20",
    "trainer.accelerator=cpu",
    "trainer.progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
]

SLURM_STEP = {"SLURM_JOB_NAME": "ssl-pretrain", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}


# --- world size: fail fast, naming both numbers ------------------------------------------------


def test_slurm_world_mismatch_names_both_numbers() -> None:
    env = {**SLURM_STEP, "SLURM_NTASKS": "3"}
    with pytest.raises(ValueError, match=r"2 x 2 = 4 ranks, but SLURM_NTASKS launched 3") as err:
        check_world_size(2, 2, env)
    assert "--ntasks-per-node=2" in str(err.value) and "--nodes=2" in str(err.value)
    assert check_world_size(3, 1, env).world_size == 3


def test_torchrun_world_mismatch_and_match() -> None:
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1"}
    with pytest.raises(ValueError, match=r"1 x 4 = 4 ranks, but torchrun's WORLD_SIZE launched 2"):
        check_world_size(1, 4, env)
    assert check_world_size(1, 2, env).launcher == "torchrun"
    assert not is_global_zero(env)


def test_batch_script_without_srun_is_one_process() -> None:
    # In the batch script SLURM_NTASKS is the allocation's, but only srun starts the tasks.
    env = {"SLURM_JOB_NAME": "ssl-pretrain", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
    with pytest.raises(ValueError, match=r"launched 1 process.*srun python"):
        check_world_size(2, 2, env)
    assert detect_launch(env).world_size == 1


def test_interactive_job_name_is_not_slurm_and_nodes_need_a_launcher() -> None:
    env = {"SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}
    assert detect_launch(env).launcher == "python"
    assert cluster_plugins(env) == []
    with pytest.raises(ValueError, match="needs a launcher on every node"):
        check_world_size(1, 2, {})
    check_world_size(1, 2, {"NODE_RANK": "1"})  # Lightning's own launcher on each node
    assert not is_global_zero({"NODE_RANK": "1", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=">= 1"):
        check_world_size(0, 1, {})


def test_slurm_plugin_without_lightning_requeue() -> None:
    (plugin,) = cluster_plugins({**SLURM_STEP, "SLURM_NTASKS": "1"})
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue


def test_mis_sized_world_fails_before_process_group_setup(tmp_path: Path) -> None:
    """The real entry point under a fake srun step of 3 tasks (every variable srun sets for a
    task, so Lightning would go on to launch): our message, before the Trainer is built, so
    nothing is written and no process group waits for ranks that never come."""
    env = clean_env(
        **SLURM_STEP,
        SLURM_NTASKS="3",
        SLURM_NTASKS_PER_NODE="3",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_LOCALID="0",
        SLURM_NODELIST="localhost",
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/pretrain.py", *TINY, "trainer.devices=2", f"run.dir={run}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert (
        "error: trainer.devices x trainer.num_nodes = 2 x 1 = 2 ranks, but SLURM_NTASKS "
        "launched 3 process(es)"
    ) in proc.stderr, out[-3000:]
    # A refusal, not a crash; no Trainer was built (it reports the devices first), no rank set
    # up, and the run directory was never made (no config, no logs, no checkpoint).
    assert "Traceback" not in out
    assert "GPU available" not in out and "Initializing distributed" not in out
    assert not run.exists()


# --- strategy ----------------------------------------------------------------------------------


def test_strategy_backend_and_timeout() -> None:
    assert build_strategy("auto", "cpu", 1, 1, 60) == "auto"
    ddp = build_strategy("auto", "cpu", 2, 1, 60)
    assert isinstance(ddp, DDPStrategy)
    assert ddp.process_group_backend == "gloo" and ddp._timeout == timedelta(seconds=60)
    spawn = build_strategy("ddp_spawn", "cpu", 1, 1, 60)
    assert isinstance(spawn, DDPStrategy) and spawn._start_method == "spawn"
    if not torch.cuda.is_available():
        assert build_strategy("ddp", "auto", 1, 2, 60).process_group_backend == "gloo"  # type: ignore[union-attr]
    assert build_strategy("ddp", "gpu", 8, 1, 60).process_group_backend == "nccl"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="choose from"):
        build_strategy("fsdp", "cpu", 2, 1, 60)
    with pytest.raises(ValueError, match="pg_timeout_s"):
        build_strategy("ddp", "cpu", 2, 1, 0)


def test_sync_batchnorm_only_on_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert use_sync_batchnorm(True, "cpu") is False
    assert "sync_batchnorm is ignored on CPU" in capsys.readouterr().out
    assert use_sync_batchnorm(True, "gpu") is True
    assert use_sync_batchnorm(False, "gpu") is False


def test_hpc_checkpoint_numbering(tmp_path: Path) -> None:
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_7.ckpt", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path).name == "hpc_ckpt_8.ckpt"


# --- sampler: what Lightning's DDP wrapper does with the datamodule's sampler ------------------


def test_distributed_sampler_shards_and_reshuffles_every_epoch() -> None:
    n, world, per_rank = 40, 4, 3
    base = EpochSeededSampler(n, seed=5)
    # What Lightning builds for a custom sampler (shuffle=False: the order is the sampler's).
    shards = [
        DistributedSamplerWrapper(base, num_replicas=world, rank=r, shuffle=False)
        for r in range(world)
    ]
    orders = []
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)  # forwarded to EpochSeededSampler
        assert base.epoch == epoch
        single = list(base)
        per = [list(s) for s in shards]
        assert all(key[0] == epoch for p in per for key in p)
        # Disjoint shards that together are the epoch's order...
        assert sorted(k for p in per for k in p) == sorted(single)
        # ...strided, so global batch k of the world is batch k of one process with
        # world x per_rank images: DDP sees the same batches as the single-process run.
        for k in range(len(per[0]) // per_rank):
            world_batch = {key for p in per for key in p[k * per_rank : (k + 1) * per_rank]}
            assert world_batch == set(single[k * world * per_rank : (k + 1) * world * per_rank])
        orders.append([i for _, i in single])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


# --- two "nodes" on loopback with torchrun ----------------------------------------------------

_DRIVER = """\
import json, sys
from pathlib import Path
import pytorch_lightning as pl
from ssl_robust.config import PretrainConfig, load_config
from ssl_robust.pipelines.pretrain import pretrain

class BankSize(pl.Callback):
    def on_validation_epoch_end(self, trainer, module):
        gather = module.all_gather if trainer.world_size > 1 else None
        bank, labels = module.monitor._full_bank(gather)
        out = Path(sys.argv[1]) / f"bank_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"bank": bank.shape[0], "labels": sorted(set(labels.tolist())),
                                   "world": trainer.world_size, "node": trainer.node_rank}))

# Record the dataset indices each rank turns into views (device-view path: the batch holds
# indices until on_after_batch_transfer makes the views).
from ssl_robust.data.datamodule import SSLDataModule
_transfer = SSLDataModule.on_after_batch_transfer
def _recording(self, batch, dataloader_idx):
    if isinstance(batch, dict) and "index" in batch:  # a training batch
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = Path(sys.argv[1]) / f"indices_rank{rank}.txt"
        with out.open("a") as f:
            f.write(" ".join(str(int(i)) for i in batch["index"]) + "\\n")
    return _transfer(self, batch, dataloader_idx)
SSLDataModule.on_after_batch_transfer = _recording

cfg = load_config(PretrainConfig, sys.argv[2:], job="pretrain")
pretrain(cfg, callbacks=[BankSize()])
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_nodes_on_loopback(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", f"--node_rank={node}", "--nproc-per-node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}",
            str(driver), str(tmp_path), *TINY,
            "data.batch_size=32", "trainer.devices=1", "trainer.num_nodes=2", f"run.dir={run}",
            "data.augment=gpu",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=220)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    # Rank zero (node 0) printed the scale, node 1 did not.
    assert "scale: world 2 = 2 node(s) x 1 device(s)" in outputs[0]
    assert "DDPStrategy (gloo)" in outputs[0] and "global batch 64" in outputs[0]
    assert "scale:" not in outputs[1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["optim/global_batch"] == 64 and metrics["optim/lr"] == pytest.approx(0.03)
    # Each rank holds half the bank; the gathered bank is the whole training split (padded by the
    # distributed sampler to a multiple of 2) on both ranks, with every class in it.
    banks = [json.loads((tmp_path / f"bank_rank{r}.json").read_text()) for r in (0, 1)]
    n_train = 1797 - round(0.2 * 1797)
    assert [b["world"] for b in banks] == [2, 2] and [b["node"] for b in banks] == [0, 1]
    assert all(b["bank"] in (n_train, n_train + 1) for b in banks), (banks, n_train)
    assert all(b["labels"] == list(range(10)) for b in banks)
    # Device views under DDP: each rank augments its own shard, 2 batches of 32 indices each.
    shards = [
        [int(i) for i in (tmp_path / f"indices_rank{r}.txt").read_text().split()] for r in (0, 1)
    ]
    assert [len(shard) for shard in shards] == [64, 64]
    assert not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize(("world", "expected"), [(1, 25), (2, 2)])
def test_requeue_check_collective_runs_every_n_batches_across_ranks(
    world: int, expected: int
) -> None:
    from types import SimpleNamespace

    from ssl_robust.launch.distributed import SlurmRequeue

    calls: list[bool] = []

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
        calls.append(decision)
        return False

    trainer = SimpleNamespace(
        world_size=world,
        strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision),
        accumulate_grad_batches=1,
        num_training_batches=100,
    )
    callback = SlurmRequeue(every_n_batches=10)
    for i in range(25):
        callback.on_train_batch_end(trainer, None, None, None, i)  # type: ignore[arg-type]
    assert len(calls) == expected  # one rank: every batch; several: batches 10 and 20
    with pytest.raises(ValueError, match="every_n_batches must be >= 1"):
        SlurmRequeue(every_n_batches=0)


@pytest.mark.parametrize("signal_after", [3, 4, 5])  # mid-window, at a step, the epoch's end
def test_a_requeue_under_gradient_accumulation_resumes_the_same_batches(
    signal_after: int, tmp_path: Path
) -> None:
    """SIGUSR1 may come in the middle of an accumulation window: the checkpoint waits for the
    window's step, so the resumed run trains exactly what an uninterrupted one would."""
    import pytorch_lightning as pl
    from torch import nn

    from ssl_robust.data.datamodule import seeded_train_loader
    from ssl_robust.launch.distributed import SlurmRequeue

    class Keys(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10  # 5 batches of 2: steps after batches 2, 4 and 5 (accumulating 2)

        def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
            return torch.tensor([float(key[1])])

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return seeded_train_loader(self, Keys(), 2, seed=0)

    class Model(pl.LightningModule):
        def __init__(self, seen: list[int]) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.seen = seen

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen += batch.flatten().int().tolist()
            return ((self.w - batch.mean()) ** 2).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Signal(pl.Callback):  # the signal arrives during batch `signal_after`
        def __init__(self, requeue: SlurmRequeue) -> None:
            self.requeue, self.batches = requeue, 0

        def on_train_batch_end(self, *args: object) -> None:
            self.batches += 1
            self.requeue.requested = self.requeue.requested or self.batches == signal_after

    def fit(root: Path, callbacks: list[pl.Callback], ckpt: str | None = None) -> Model:
        trainer = pl.Trainer(
            max_epochs=2, accumulate_grad_batches=2, default_root_dir=root, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks)  # fmt: skip
        model = Model(seen)
        with contextlib.suppress(SystemExit):  # the requeued piece stops
            trainer.fit(model, datamodule=Data(), ckpt_path=ckpt)
        return model

    seen: list[int] = []
    full = fit(tmp_path / "full", [])
    full_seen, seen = seen, []
    requeue = SlurmRequeue()
    requeue._requeue = staticmethod(lambda: True)  # type: ignore[method-assign]
    fit(tmp_path / "part", [Signal(requeue), requeue])
    (ckpt,) = (tmp_path / "part").glob("hpc_ckpt_*.ckpt")
    resumed = fit(tmp_path / "part", [], str(ckpt))
    assert seen == full_seen and torch.equal(resumed.w, full.w)
