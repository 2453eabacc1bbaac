# Shared set-up sourced by every template in slurm/ (runs inside the job, on the first node).
# Edit the CLUSTER section for your site; everything else is overridable from the environment
# at submission time (sbatch exports the submitting shell's environment by default).
set -euo pipefail

# --- CLUSTER: modules, Python environment ----------------------------------------------------
# module load cuda/12.4            # e.g.
# module load python/3.11
if [ -n "${SSL_ROBUST_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$SSL_ROBUST_VENV/bin/activate"
fi
PYTHON="${PYTHON:-python}"

# --- Where the code is: the repository root the job was submitted from ------------------------
cd "${SSL_ROBUST_ROOT:-$SLURM_SUBMIT_DIR}"

# --- Rendezvous: the first node of the allocation, by its address ------------------------------
# Lightning's SLURMEnvironment derives MASTER_PORT from the job id; the address is set here
# because node names need not resolve (they do not on emulated nodes).
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
node_addr="$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
export MASTER_ADDR="${MASTER_ADDR:-${node_addr:-$first_node}}"

# --- Threads: one task per device, cpus-per-task threads each ----------------------------------
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# SLURM >= 22.05: srun no longer inherits --cpus-per-task from the job unless told to.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export PYTHONUNBUFFERED=1

# --- wandb: compute nodes usually have no internet ---------------------------------------------
# offline runs are written into <run dir>/wandb/ and uploaded later from a login node with
#   wandb sync <run dir>/wandb/offline-run-*
# (see slurm/README.md). online/disabled are the other choices.
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_INIT_TIMEOUT="${WANDB_INIT_TIMEOUT:-300}"
# The experiment name groups runs in wandb (README: naming convention).
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-${SLURM_JOB_NAME}}"

echo "[$(date -Is)] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) restart ${SLURM_RESTART_COUNT:-0}:" \
    "${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s), master ${MASTER_ADDR}," \
    "wandb ${WANDB_MODE} group ${WANDB_RUN_GROUP}"
