#!/usr/bin/env bash
# Stop the private cluster started by start.sh from DIR ($1, default /tmp/ssl_robust_slurm).
#
# Jobs are cancelled first (their slurmstepd outlive slurmd otherwise), then the daemons are
# stopped strictly by the pid files under DIR: SIGTERM, a grace period, then SIGKILL. A pid is
# only signalled while its executable is the daemon that pid file belongs to, so a stale pid file
# never hits an unrelated process. Safe to run when nothing is running.
set -uo pipefail

DIR="${1:-/tmp/ssl_robust_slurm}"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
CONF="$DIR/etc/slurm.conf"

log() { echo "[slurm stop] $*" >&2; }

pid_of() { # pid_of <pidfile> <exe basename>: print the live pid, if it really is that daemon
    local pidfile="$1" want="$2" pid exe
    [ -f "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
    # Debian installs the daemons as slurmd-wlm / slurmctld-wlm behind alternatives.
    case "$(basename "$exe")" in "$want" | "$want"-wlm) echo "$pid" ;; *) return 1 ;; esac
}

stop_pidfile() { # stop_pidfile <pidfile> <exe basename>
    local pidfile="$1" want="$2" pid i
    if pid="$(pid_of "$pidfile" "$want")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do # up to 10 s
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            log "$want ($pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        log "stopped $want ($pid)"
    fi
    rm -f "$pidfile"
}

# 1. Cancel every job of this cluster while slurmctld can still do it.
if [ -f "$CONF" ] && pid_of "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF="$CONF"
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do # KillWait is 5 s; allow 30 s
            [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
            sleep 1
        done
    fi
fi

# 2. Daemons, by pid file: nodes first, then the controller, then munge.
for pidfile in "$DIR"/run/slurmd-*.pid; do
    [ -e "$pidfile" ] && stop_pidfile "$pidfile" slurmd
done
stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
stop_pidfile "$DIR/munge/munged.pid" munged

# 3. Leftovers, e.g. a slurmstepd whose job could not be cancelled because slurmctld was already
# gone: a SLURM/munge process is ours when it holds a file or unix socket under DIR open.
own_socket_inodes() { # inodes of unix sockets bound under DIR
    awk -v d="$DIR/" 'NR > 1 && index($8, d) == 1 { print $7 }' /proc/net/unix 2>/dev/null
}
holds_dir() { # holds_dir <pid> <inode list>
    local fd target
    for fd in /proc/"$1"/fd/*; do
        target="$(readlink "$fd" 2>/dev/null)" || continue
        case "$target" in
        "$DIR"/*) return 0 ;;
        socket:\[*\]) grep -qx "${target//[^0-9]/}" <<<"$2" && return 0 ;;
        esac
    done
    return 1
}
descendants() { # descendants <pid>: every process below pid, deepest first
    local child
    for child in $(awk -v p="$1" '$4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}
inodes="$(own_socket_inodes)"
for proc in /proc/[0-9]*; do
    pid="${proc#/proc/}"
    [ "$pid" != "$$" ] || continue
    exe="$(readlink "$proc/exe" 2>/dev/null)" || continue
    exe="$(basename "$exe")"
    case "${exe%-wlm}" in slurmstepd | slurmd | slurmctld | munged) ;; *) continue ;; esac
    if holds_dir "$pid" "$inodes"; then
        # The job's own processes hang below its slurmstepd; end them with it.
        for child in $(descendants "$pid"); do kill -KILL "$child" 2>/dev/null || true; done
        log "killing leftover $exe ($pid) holding files under $DIR"
        kill -KILL "$pid" 2>/dev/null || true
    fi
done
exit 0
