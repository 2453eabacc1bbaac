"""Smoke tests against a real SLURM cluster: the recipe the project's SLURM jobs rely on.

CI starts a private two-node cluster on one host (``.ci/slurm/start.sh``: node1 and node2,
2 CPUs each, ``cred_expire=10``) and exports ``SLURM_CONF``; without a cluster these tests skip,
except under ``CI=true`` where they fail. They check:

1. ``srun`` in a 2-node x 2-task allocation starts 4 ranks spread 2 + 2 over the two nodes.
2. Lightning DDP (gloo, CPU) over 2 nodes x 2 tasks forms a world of 4 and really all-reduces.
3. Preemption: ``--signal=SIGUSR1@90 --requeue`` with ``SLURMEnvironment(auto_requeue=True)``
   writes ``hpc_ckpt_*.ckpt``, requeues, restores the step count and completes.

Jobs run the interpreter running pytest (same host), so the project's environment is used.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_utils import job_status, sbatch, scancel, wait_for_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# The emulated nodes do not resolve by name, so the rendezvous address is the first node's
# NodeAddr from slurm.conf (127.0.0.1 on the CI cluster); the job name must not be `bash` or
# `interactive`, which make Lightning ignore SLURM.
_MASTER_ADDR = """\
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
"""


def _batch_script(
    path: Path, job_name: str, nodes: int, tasks_per_node: int, body: str, *extra: str
) -> Path:
    """Write a batch script whose output goes to ``slurm-<jobid>.out`` next to it."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        # Longer than the signal lead (90 s) + sbatch's up-to-60 s early signal + run time.
        "#SBATCH --time=10",
        f"#SBATCH --output={path.parent}/slurm-%j.out",
        *(f"#SBATCH {option}" for option in extra),
        "set -euo pipefail",
        body,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _output(directory: Path, job_id: int) -> str:
    log = directory / f"slurm-{job_id}.out"
    return log.read_text(errors="replace") if log.exists() else "<no job output>"


@pytest.mark.timeout(120)
def test_srun_spreads_four_ranks_over_two_nodes(tmp_path: Path, jobs: list[int]) -> None:
    body = "srun bash -c 'echo RANK $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURMD_NODENAME'"
    script = _batch_script(tmp_path / "ranks.sh", "ssl_robust_ranks", 2, 2, body)
    job_id = sbatch(script)
    jobs.append(job_id)

    status = wait_for_job(job_id, timeout=90)
    log = _output(tmp_path, job_id)
    assert status["state"] == "COMPLETED" and status["exit_code"] == 0, log

    rows = [line.split()[1:] for line in log.splitlines() if line.startswith("RANK ")]
    assert len(rows) == 4, log
    procids = sorted(int(row[0]) for row in rows)
    assert procids == [0, 1, 2, 3]
    by_node: dict[int, list[int]] = {}
    hosts: dict[int, set[str]] = {}
    for _procid, nodeid, localid, host in rows:
        by_node.setdefault(int(nodeid), []).append(int(localid))
        hosts.setdefault(int(nodeid), set()).add(host)
    # Block distribution: each node runs local ranks 0 and 1, and each node id is one slurmd.
    assert sorted(by_node) == [0, 1]
    assert all(sorted(local) == [0, 1] for local in by_node.values()), by_node
    assert all(len(names) == 1 for names in hosts.values())
    assert hosts[0] != hosts[1]


_DDP_TRAIN = """\
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

out = Path(sys.argv[1])


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.seen = {}

    def on_train_start(self) -> None:
        self.seen["dist_world_size"] = torch.distributed.get_world_size()
        self.seen["backend"] = torch.distributed.get_backend()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
x = torch.randn(32, 4)
y = x.sum(dim=1, keepdim=True)
model = Tiny()
initial = [float(v) for v in torch.cat([model.net.weight.flatten(), model.net.bias])]
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    num_nodes=2,
    strategy="ddp",
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir=str(out),
)
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
record = {
    "global_rank": trainer.global_rank,
    "world_size": trainer.world_size,
    "node_rank": trainer.node_rank,
    "local_rank": trainer.local_rank,
    "slurm_procid": int(os.environ["SLURM_PROCID"]),
    "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
    "global_step": trainer.global_step,
    "initial": initial,
    "final": [float(v) for v in torch.cat([model.net.weight.flatten(), model.net.bias])],
    **model.seen,
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
# As the job scripts do (ssl_robust.cli): left to interpreter shutdown, gloo's process group
# can abort a finished rank ("terminate called without an active exception").
torch.distributed.destroy_process_group()
"""


@pytest.mark.timeout(300)
def test_lightning_ddp_over_two_nodes(tmp_path: Path, jobs: list[int]) -> None:
    (tmp_path / "train_ddp.py").write_text(_DDP_TRAIN)
    out = tmp_path / "out"
    out.mkdir()
    body = _MASTER_ADDR + f"srun {sys.executable} {tmp_path / 'train_ddp.py'} {out}"
    script = _batch_script(tmp_path / "ddp.sh", "ssl_robust_ddp", 2, 2, body)
    job_id = sbatch(script)
    jobs.append(job_id)

    status = wait_for_job(job_id, timeout=270)
    log = _output(tmp_path, job_id)
    assert status["state"] == "COMPLETED" and status["exit_code"] == 0, log

    records = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    assert sorted(records) == [0, 1, 2, 3], log
    assert records[0]["world_size"] == 4
    for rank, rec in records.items():
        assert rec["world_size"] == rec["dist_world_size"] == 4
        assert rec["backend"] == "gloo"
        assert rec["cluster_environment"] == "SLURMEnvironment"
        # Lightning's global rank is SLURM's task id; node rank follows the block layout.
        assert rec["slurm_procid"] == rank
        assert (rec["node_rank"], rec["local_rank"]) == divmod(rank, 2)
        # 32 samples / (4 ranks x batch 4): the DistributedSampler gave each rank 2 batches.
        assert rec["global_step"] == 2
    # Every rank saw different data, so identical weights after training means the gradients
    # were all-reduced across both nodes.
    finals = [records[rank]["final"] for rank in range(4)]
    assert all(final == pytest.approx(finals[0], abs=1e-6) for final in finals)
    assert finals[0] != pytest.approx(records[0]["initial"], abs=1e-4)


_PREEMPT_TRAIN = """\
import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, TensorDataset

out = Path(sys.argv[1])
max_steps = int(sys.argv[2])
step_sleep = float(sys.argv[3])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def record(**event) -> None:
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"restart": restart, **event}) + "\\n")


class Slow(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def on_train_start(self) -> None:
        # Runs after any checkpoint restore: the step the run resumes from.
        record(event="train_start", global_step=self.trainer.global_step)

    def training_step(self, batch, batch_idx):
        time.sleep(step_sleep)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # trainer.fit has installed its SIGUSR1 handler by now: tell the test it may signal.
        marker = out / "fit_started"
        if self.trainer.global_step >= 3 and not marker.exists():
            marker.write_text(str(self.trainer.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


torch.manual_seed(0)
x = torch.randn(64, 4)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=1,
    num_nodes=1,
    max_steps=max_steps,
    max_epochs=-1,
    plugins=[SLURMEnvironment(auto_requeue=True)],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir=str(out / "root"),
)
# ckpt_path=None: on SLURM, Lightning then resumes from the newest hpc_ckpt_*.ckpt.
trainer.fit(Slow(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4))
record(event="fit_end", global_step=trainer.global_step)
"""


@pytest.mark.timeout(300)
def test_preemption_checkpoints_requeues_and_resumes(tmp_path: Path, jobs: list[int]) -> None:
    max_steps = 50
    (tmp_path / "train_preempt.py").write_text(_PREEMPT_TRAIN)
    out = tmp_path / "out"
    out.mkdir()
    body = (
        _MASTER_ADDR
        + f"srun {sys.executable} {tmp_path / 'train_preempt.py'} {out} {max_steps} 0.15"
    )
    script = _batch_script(
        tmp_path / "preempt.sh",
        "ssl_robust_preempt",
        1,
        1,
        body,
        "--signal=SIGUSR1@90",
        "--requeue",
        "--open-mode=append",
    )
    job_id = sbatch(script)
    jobs.append(job_id)

    # The signal must come after trainer.fit installed its handler, or it kills the job.
    marker = out / "fit_started"
    deadline = time.monotonic() + 150
    while not marker.exists():
        state = job_status(job_id)["state"]
        assert state not in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, _output(
            tmp_path, job_id
        )
        assert time.monotonic() < deadline, f"no fit marker; job {state}"
        time.sleep(0.5)
    scancel(job_id, signal="USR1")

    # Requeue waits ~cred_expire (10 s) before the job can start again.
    status = wait_for_job(job_id, timeout=200)
    log = _output(tmp_path, job_id)
    assert status["state"] == "COMPLETED" and status["exit_code"] == 0, log
    assert status["restarts"] == 1, log

    assert sorted(p.name for p in (out / "root").glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "train_start"]
    ends = [e for e in events if e["event"] == "fit_end"]
    assert [e["restart"] for e in starts] == [0, 1], events
    assert starts[0]["global_step"] == 0
    # The requeued run resumed from the checkpoint rather than from scratch...
    resumed = starts[1]["global_step"]
    assert 3 <= resumed < max_steps, events
    # ...and only the requeued run reached the end, at the full step count.
    assert ends == [{"restart": 1, "event": "fit_end", "global_step": max_steps}], events
    assert "Restored all states from the checkpoint" in log or "Restoring states" in log, log
