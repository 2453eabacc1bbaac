"""Helpers for tests that submit jobs to a real SLURM cluster.

CI starts a private two-node cluster with ``.ci/slurm/start.sh`` and exports ``SLURM_CONF``.
There is no accounting storage on that cluster, so ``sacct`` is unavailable: job state is read
from ``scontrol show job -o`` (kept for ``MinJobAge`` = 300 s after a job ends) and polled
until the job reaches a final state.

Every client call runs under a time limit: a SLURM client whose controller is unreachable
retries for about a minute before it gives up, which would otherwise stall the test session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

CLIENT_TIMEOUT_S = 30.0
"""Time limit for one SLURM client call (sbatch, scontrol, scancel, sinfo)."""

FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
"""Job states after which a job never runs again (REQUEUED and PENDING are not final)."""

# Variables that would make a job join or mimic another run: torch.distributed rendezvous and
# rank variables left in os.environ by in-process launchers (ddp_spawn sets MASTER_PORT), and the
# SLURM variables of an enclosing allocation when pytest itself runs inside a job.
_INHERITED_PREFIXES = ("SLURM_", "SRUN_", "SBATCH_", "SALLOC_", "PL_", "TORCHELASTIC_")
_INHERITED_NAMES = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
    }
)
_KEEP = frozenset({"SLURM_CONF"})

_JOB_ID = re.compile(r"^(\d+)(?:;\S+)?$")
# `scontrol show job -o` prints `Key=Value` pairs separated by spaces; split only where the
# next word looks like a key so that a value containing a space stays whole.
_FIELD_SPLIT = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_:/]*=)")


def _client(
    args: Sequence[str],
    timeout: float = CLIENT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one SLURM client command under a time limit.

    Raises:
        RuntimeError: If the command exits non-zero or runs past ``timeout``.
    """
    try:
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{' '.join(args)} timed out after {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def slurm_available(timeout: float = 15.0) -> bool:
    """Whether a SLURM controller answers and has at least one node.

    Needs the client tools on PATH and a config: ``SLURM_CONF`` or the system default
    ``/etc/slurm/slurm.conf``.
    """
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not Path(conf).is_file():
        return False
    try:
        out = _client(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=timeout).stdout
    except (RuntimeError, OSError):
        return False
    return bool(out.strip())


def require_slurm() -> None:
    """Skip the calling test when no SLURM cluster is reachable.

    In CI (``CI=true``) a missing cluster is a failure instead, so a broken cluster setup can
    never turn the SLURM tests into silent skips.
    """
    if slurm_available():
        return
    conf = os.environ.get("SLURM_CONF", "<unset>")
    reason = f"no reachable SLURM cluster (SLURM_CONF={conf}); start one with .ci/slurm/start.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to submit a job with: this process's, minus rank/rendezvous variables.

    sbatch exports the submitting environment to the job (``--export=ALL``), so variables left
    behind by in-process launchers or an enclosing SLURM job would leak into it.

    Args:
        extra: Variables to set on top.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key in _KEEP or not (key in _INHERITED_NAMES or key.startswith(_INHERITED_PREFIXES))
    }
    if extra:
        env.update(extra)
    return env


def sbatch(
    script_path: str | Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = CLIENT_TIMEOUT_S,
) -> int:
    """Submit a batch script and return its job id.

    The job's working directory is the script's directory unless ``args`` says otherwise.

    Args:
        script_path: The batch script (``#SBATCH`` lines are honoured).
        *args: Extra sbatch options, placed before the script.
        env: Variables added to :func:`job_env`'s environment for the job.
        timeout: Time limit for the sbatch call in seconds.

    Raises:
        RuntimeError: If sbatch fails, times out or prints no job id.
    """
    script = Path(script_path).resolve()
    proc = _client(
        ["sbatch", "--parsable", *args, str(script)],
        timeout=timeout,
        env=job_env(env),
        cwd=script.parent,
    )
    match = _JOB_ID.match(proc.stdout.strip())
    if match is None:
        raise RuntimeError(f"sbatch printed no job id: {proc.stdout!r}")
    return int(match.group(1))


def job_info(job_id: int, timeout: float = CLIENT_TIMEOUT_S) -> dict[str, str]:
    """The fields of ``scontrol show job -o JOB_ID`` as a dict (e.g. ``JobState``, ``Restarts``).

    Raises:
        RuntimeError: If scontrol fails (also once the job has aged out of slurmctld).
    """
    line = _client(["scontrol", "show", "job", "-o", str(job_id)], timeout=timeout).stdout
    # A job array prints one line per task; the first is the one asked about.
    first = line.strip().splitlines()[0] if line.strip() else ""
    fields: dict[str, str] = {}
    for token in _FIELD_SPLIT.split(first):
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    if "JobState" not in fields:
        raise RuntimeError(f"unexpected scontrol output for job {job_id}: {line!r}")
    return fields


def _summary(fields: Mapping[str, str]) -> dict[str, object]:
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return {
        "state": fields["JobState"],
        "exit_code": int(code or 0),
        "signal": int(sig or 0),
        "restarts": int(fields.get("Restarts", "0") or 0),
        "info": dict(fields),
    }


def job_status(job_id: int, timeout: float = CLIENT_TIMEOUT_S) -> dict[str, object]:
    """The current state of a job.

    Returns:
        ``{"state": str, "exit_code": int, "signal": int, "restarts": int, "info": dict}``
        where ``info`` holds every ``scontrol show job`` field.
    """
    return _summary(job_info(job_id, timeout=timeout))


def wait_for_job(
    job_id: int, timeout: float, poll_s: float = 1.0, states: frozenset[str] = FINAL_STATES
) -> dict[str, object]:
    """Poll ``scontrol`` until a job reaches one of ``states`` (by default a final state).

    A requeued job passes through REQUEUED/PENDING and is followed into its next run.

    Args:
        job_id: The job to follow.
        timeout: Seconds to wait in total.
        poll_s: Seconds between polls.
        states: The states to stop at.

    Returns:
        The :func:`job_status` dict of the job in its reached state.

    Raises:
        TimeoutError: If the job does not get there within ``timeout``; the message carries the
            last state seen.
    """
    deadline = time.monotonic() + timeout
    last: dict[str, object] | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = "nothing" if last is None else f"{last['state']} (restarts={last['restarts']})"
            raise TimeoutError(
                f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {seen}"
            )
        try:
            last = job_status(job_id, timeout=min(CLIENT_TIMEOUT_S, max(remaining, 1.0)))
        except RuntimeError:
            pass  # a transient controller hiccup; the deadline still bounds the wait
        else:
            if last["state"] in states:
                return last
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def scancel(job_id: int, signal: str | None = None, timeout: float = CLIENT_TIMEOUT_S) -> None:
    """Cancel a job, or only send it ``signal`` (e.g. ``"USR1"``) to all of its steps.

    Raises:
        RuntimeError: If scancel fails or times out.
    """
    args = ["scancel"]
    if signal is not None:
        args.append(f"--signal={signal}")
    _client([*args, str(job_id)], timeout=timeout)


def cancel_quietly(job_ids: Sequence[int]) -> None:
    """Cancel jobs that may already be gone; for test teardown, never raises."""
    for job_id in job_ids:
        try:
            if job_status(job_id, timeout=10.0)["state"] not in FINAL_STATES:
                scancel(job_id, timeout=10.0)
        except (RuntimeError, OSError):
            pass
