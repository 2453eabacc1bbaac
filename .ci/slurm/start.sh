#!/usr/bin/env bash
# Start a private two-node SLURM cluster on this host (no systemd, run as root).
#
#   eval "$(bash .ci/slurm/start.sh [DIR])"     # DIR defaults to /tmp/ssl_robust_slurm
#
# Everything (config, munge key + socket, state, spool, logs, pid files) lives under DIR, so the
# cluster never touches /etc/slurm or a system munged. Each start is from fresh state: a cluster
# still running from DIR is stopped first (by its pid files) and its state is wiped.
# stdout carries only `export ...` lines (also written to DIR/env.sh); progress goes to stderr.
#
# Tunables (environment): SLURM_CTLD_PORT (6917), SLURM_NODE_PORT_BASE (6920: node1 on +1,
# node2 on +2), SLURM_CPUS_PER_NODE (2), SLURM_CRED_EXPIRE (10), SLURM_START_TIMEOUT (90 s).
# The ports stay off the defaults (6817/6818, a system SLURM) and out of 15000-24999, where
# Lightning's SLURMEnvironment puts MASTER_PORT (15000 + last four digits of the job id).
set -euo pipefail

DIR="${1:-/tmp/ssl_robust_slurm}"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CTLD_PORT="${SLURM_CTLD_PORT:-6917}"
NODE_PORT_BASE="${SLURM_NODE_PORT_BASE:-6920}"
CPUS="${SLURM_CPUS_PER_NODE:-2}"
# cred_expire also delays the restart of a requeued job (default 120 s); 10 s gives ~20 s.
CRED_EXPIRE="${SLURM_CRED_EXPIRE:-10}"
START_TIMEOUT="${SLURM_START_TIMEOUT:-90}"
NODES=(node1 node2)

log() { echo "[slurm start] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (munged runs as user munge, slurmd as root)"
    exit 1
fi
for bin in munged munge unmunge slurmctld slurmd sinfo scontrol runuser; do
    command -v "$bin" >/dev/null 2>&1 || { log "missing $bin: run .ci/slurm/install.sh"; exit 1; }
done

# State is wiped below, so only ever in a directory this script created (it leaves a marker).
MARKER="$DIR/.ssl_robust_slurm"
if [ -e "$DIR" ] && [ ! -e "$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    log "refusing to use $DIR: it is not empty and was not created by this script"
    exit 1
fi
mkdir -p "$DIR"
touch "$MARKER"

# A previous cluster from the same DIR (possibly half-dead) is stopped by its pid files.
bash "$HERE/stop.sh" "$DIR" >&2 || true
rm -rf "$DIR/etc" "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/env.sh"
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/log" "$DIR/run"
for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
chmod 755 "$DIR"

# --- munge: private key copy, socket, pid, log, seed; all owned by munge (munged insists) ---
mkdir -p "$DIR/munge"
install -o munge -g munge -m 400 /etc/munge/munge.key "$DIR/munge/munge.key"
chown munge:munge "$DIR/munge"
chmod 755 "$DIR/munge"
MUNGE_SOCK="$DIR/munge/munge.sock"

runuser -u munge -- munged \
    --socket="$MUNGE_SOCK" \
    --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"

fail() {
    log "FAILED: $*"
    for f in "$DIR/munge/munged.log" "$DIR"/log/*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (tail) -----" >&2
        tail -n 30 "$f" >&2 || true
    done
    bash "$HERE/stop.sh" "$DIR" >&2 || true
    exit 1
}

wait_until() { # wait_until <what> <command...>: poll once a second up to START_TIMEOUT
    local what="$1"
    shift
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${START_TIMEOUT}s waiting for $what"
        sleep 1
    done
}

munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
wait_until "munged" munge_ok
log "munged up on $MUNGE_SOCK"

# --- slurm.conf ---
CONF="$DIR/etc/slurm.conf"
cat >"$CONF" <<CONF
# Private single-host SLURM cluster for tests; written by .ci/slurm/start.sh.
ClusterName=ssl_robust
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
# No cgroups without systemd: track processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
# A requeued job becomes eligible cred_expire s later and is then started by the backfill pass,
# which runs every bf_interval s (default 30); 5 s keeps requeue tests short.
SchedulerParameters=bf_interval=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Use the CPUs/RealMemory written here, not the host's 2 cores, for both emulated nodes.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
# Short waits so cancels, kills and tests stay fast.
KillWait=5
MessageTimeout=10
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
CONF
port=$NODE_PORT_BASE
for node in "${NODES[@]}"; do
    port=$((port + 1))
    echo "NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=1000 State=UNKNOWN" >>"$CONF"
done
echo "PartitionName=debug Nodes=node[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
export SLURM_CONF="$CONF"

# --- daemons ---
slurmctld -i -f "$CONF" || fail "slurmctld did not start"
wait_until "slurmctld (scontrol ping)" bash -c 'timeout 10 scontrol ping | grep -q "is UP"'
log "slurmctld up on port $CTLD_PORT"

for node in "${NODES[@]}"; do
    slurmd -N "$node" -f "$CONF" || fail "slurmd -N $node did not start"
done

nodes_idle() {
    local states
    states="$(timeout 10 sinfo -h -N -o '%N %T')" || return 1
    [ "$(grep -c ' idle$' <<<"$states")" -eq "${#NODES[@]}" ]
}
wait_until "${#NODES[@]} idle nodes (sinfo)" nodes_idle
log "nodes idle: $(timeout 10 sinfo -h -N -o '%N=%T' | tr '\n' ' ')"

echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
cat "$DIR/env.sh"
