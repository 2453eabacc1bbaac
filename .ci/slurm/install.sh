#!/usr/bin/env bash
# Install a real SLURM (Debian 12 ships 22.05) plus munge, without systemd.
# Idempotent: returns at once when every binary is already present.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch srun scontrol sinfo scancel munged)

missing=0
for bin in "${BINARIES[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
done
[ -f /etc/munge/munge.key ] || missing=1
if [ "$missing" -eq 0 ]; then
    echo "slurm + munge already installed: $(slurmctld -V)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh must run as root (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# The package scripts try to start services; without systemd that must be a no-op, not an error.
policy_rc=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
    chmod 755 "$policy_rc"
    own_policy=1
fi
cleanup() { if [ "$own_policy" -eq 1 ]; then rm -f "$policy_rc"; fi; }
trap cleanup EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${PACKAGES[@]}"

# munge's postinst normally creates the key; make sure one exists either way.
if [ ! -f /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
echo "installed: $(slurmctld -V)"
