#!/bin/bash
# Submit the whole chain as dependent SLURM jobs, all writing under one folder:
#
#   <runs>/pretrain          pretraining                      (pretrain.sbatch)
#   <runs>/denoiser          denoiser training, side by side  (denoiser.sbatch)
#   <runs>/finetune/<line>   one fine-tuning per sweep line   (finetune_array.sbatch), after pretraining
#   <runs>/baseline/<line>   with --baseline: the supervised baseline per sweep line, from random
#                            weights on the encoder's data    (finetune_array.sbatch), after pretraining
#   <runs>/evaluate/<line>[-purified]
#                            each classifier bare, and behind the purifier once the denoiser is
#                            trained                          (evaluate.sbatch), after its fine-tuning
#   <runs>/compare           the side-by-side tables and plots (compare.sbatch), after the rest
#
#   bash slurm/pipeline.sh runs/c10 \
#       --pretrain "simclr_cifar10 data.root=/data" \
#       --denoiser "ddpm_cifar10 data.root=/data" \
#       --finetune linear_cifar10 --sweep slurm/sweeps/finetune_fractions.txt \
#       --evaluate quick --purify "purifier.sampler=ddim purifier.ddim_steps=10"
#
# Options (each takes one quoted string of arguments for that phase's script):
#   --pretrain ARGS      pretraining preset and overrides; or --encoder DIR: an existing run
#   --denoiser ARGS      denoiser preset and overrides; or --denoiser-run DIR: an existing run;
#                        with neither, classifiers are evaluated bare only
#   --finetune ARGS      fine-tuning preset and overrides for every sweep line
#   --sweep FILE         override lines, one fine-tuning each (default: one line, the preset's
#                        own subset); copied to <runs>/sweep.txt
#   --evaluate ARGS      evaluation preset and overrides for every evaluation
#   --purify ARGS        extra overrides of the purified evaluations (purifier.*)
#   --baseline ARGS      a supervised baseline: fine-tuning preset and overrides of a backbone
#                        from random weights (e.g. supervised_cifar10), on the encoder's data
#                        and split (data.like), one per distinct sweep line without its mode=,
#                        run.dir= and encoder.run= words, each evaluated like the other
#                        classifiers (<runs>/evaluate/baseline-<line>[-purified])
#   --purify-shards K    split each purified evaluation's attacks over a K-task array
#                        (adv.shards=K, one block of the attacked images per task), then one
#                        more job merges the blocks and writes the report
#   --sbatch OPTS        sbatch options for every job (--partition=..., --account=...)
#   --dry-run            print the sbatch commands, submit nothing
#
# A job whose dependency fails is cancelled (--kill-on-invalid-dep=yes) instead of waiting
# forever; the comparison runs whatever finished. Every job resumes from its run directory, so
# running the same command again after a failure re-submits the chain and each finished phase
# returns at once. Job ids are appended to <runs>/jobs.txt. In wandb, every run of the chain is
# in the group named after <runs> (WANDB_RUN_GROUP), unless a config sets wandb.group.
set -euo pipefail

usage() { sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0" | grep -v '^set -e'; }
die() {
    echo "error: $*" >&2
    exit 2
}

[ $# -ge 1 ] || {
    usage
    exit 2
}
case "$1" in -h | --help) usage && exit 0 ;; -*) die "the first argument is the runs folder, got '$1'" ;; esac
RUNS="${1%/}"
shift
pretrain="" encoder="" denoiser="" denoiser_run="" finetune="" sweep="" evaluate="" purify=""
baseline="" sbatch_opts="" dry_run=0 have_pretrain=0 have_denoiser=0 have_baseline=0 shards=1
while [ $# -gt 0 ]; do
    case "$1" in
    --pretrain) pretrain="${2?--pretrain needs an argument}" have_pretrain=1 && shift 2 ;;
    --encoder) encoder="${2?--encoder needs a run directory}" && shift 2 ;;
    --denoiser) denoiser="${2?--denoiser needs an argument}" have_denoiser=1 && shift 2 ;;
    --denoiser-run) denoiser_run="${2?--denoiser-run needs a run directory}" && shift 2 ;;
    --finetune) finetune="${2?--finetune needs an argument}" && shift 2 ;;
    --sweep) sweep="${2?--sweep needs a file}" && shift 2 ;;
    --evaluate) evaluate="${2?--evaluate needs an argument}" && shift 2 ;;
    --purify) purify="${2?--purify needs an argument}" && shift 2 ;;
    --purify-shards) shards="${2?--purify-shards needs a number}" && shift 2 ;;
    --baseline) baseline="${2?--baseline needs an argument}" have_baseline=1 && shift 2 ;;
    --sbatch) sbatch_opts="${2?--sbatch needs an argument}" && shift 2 ;;
    --dry-run) dry_run=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown option '$1'; valid: --pretrain --encoder --denoiser --denoiser-run --finetune --sweep --evaluate --purify --purify-shards --baseline --sbatch --dry-run" ;;
    esac
done
if [ "$have_pretrain" = 1 ] && [ -n "$encoder" ]; then die "give --pretrain or --encoder, not both"; fi
if [ "$have_pretrain" = 0 ] && [ -z "$encoder" ]; then
    die "give --pretrain ARGS (e.g. --pretrain \"simclr_cifar10 data.root=/data\") or --encoder <pretraining run dir>"
fi
if [ "$have_denoiser" = 1 ] && [ -n "$denoiser_run" ]; then die "give --denoiser or --denoiser-run, not both"; fi
if [ -n "$encoder" ] && [ ! -f "$encoder/encoder.safetensors" ]; then
    die "no encoder in '$encoder' (expected encoder.safetensors from a finished pretraining run)"
fi
if [ -n "$denoiser_run" ] && [ ! -f "$denoiser_run/unet/config.json" ] && [ ! -f "$denoiser_run/config.json" ]; then
    die "no denoiser in '$denoiser_run' (expected a denoiser run with unet/, or a diffusers UNet folder)"
fi
if [ -n "$sweep" ] && [ ! -f "$sweep" ]; then die "no sweep file '$sweep'"; fi
case "$shards" in '' | *[!0-9]* | 0) die "--purify-shards takes a number >= 1, got '$shards'" ;; esac
if [ "$have_denoiser" = 0 ] && [ -z "$denoiser_run" ]; then
    [ -z "$purify" ] || die "--purify sets the purified evaluations, and without --denoiser or --denoiser-run there are none"
    [ "$shards" = 1 ] || die "--purify-shards splits the purified evaluations' attacks, and without --denoiser or --denoiser-run there are none"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Every phase's arguments are checked before anything is submitted (scripts/chain.py --check:
# the same steps), so a typo in the evaluation's does not wait for hours of queue and training.
# Skipped, with a warning, where this machine's Python cannot import the package.
check=(--finetune "$finetune" --evaluate "$evaluate" --purify "$purify" --purify-shards "$shards")
if [ "$have_pretrain" = 1 ]; then check+=(--pretrain "$pretrain"); else check+=(--encoder "$encoder"); fi
if [ "$have_denoiser" = 1 ]; then check+=(--denoiser "$denoiser"); fi
if [ -n "$denoiser_run" ]; then check+=(--denoiser-run "$denoiser_run"); fi
if [ -n "$sweep" ]; then check+=(--sweep "$sweep"); fi
if [ "$have_baseline" = 1 ]; then check+=(--baseline "$baseline"); fi
py="${PYTHON:-python3}"
if "$py" -c "import ssl_robust" 2>/dev/null; then
    "$py" "$here/../scripts/chain.py" "$RUNS" ${check[@]+"${check[@]}"} --check >/dev/null || {
        echo "nothing submitted" >&2
        exit 2
    }
else
    echo "warning: $py cannot import ssl_robust; the phases' arguments are not checked before submitting" >&2
fi
# The jobs run in the repository this script belongs to, wherever it is called from; the paths
# given here are made absolute (paths inside the phases' arguments are read from that root).
export SSL_ROBUST_ROOT="${SSL_ROBUST_ROOT:-$(dirname "$here")}"
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/${1#./}" ;; esac }
RUNS="$(absolute "$RUNS")"
[ -z "$encoder" ] || encoder="$(absolute "$encoder")"
[ -z "$denoiser_run" ] || denoiser_run="$(absolute "$denoiser_run")"
# The array reads its lines from a copy (blank and # lines dropped), so editing the sweep file
# cannot change a queued job. A dry run writes nothing under <runs>.
if [ -n "$sweep" ]; then
    lines="$(grep -v '^[[:space:]]*\(#.*\)\{0,1\}$' "$sweep" || true)"
else
    lines="run.seed=0"
fi
n_lines=$(grep -c . <<<"$lines" || true)
[ "$n_lines" -ge 1 ] || die "the sweep file '$sweep' has no override lines"
# The baseline's lines: each sweep line without its mode=, run.dir= and encoder.run= words, once each
# (ssl_robust.pipelines.chain.baseline_line).
baseline_lines="$(while IFS= read -r line; do
    words=()
    for word in $line; do case "$word" in mode=* | run.dir=* | encoder.run=*) ;; *) words+=("$word") ;; esac done
    echo "${words[*]:-run.seed=0}"
done <<<"$lines" | awk '!seen[$0]++')"
if [ "$dry_run" = 1 ]; then
    sweep_copy="$(mktemp)" baseline_copy="$(mktemp)"
    trap 'rm -f "$sweep_copy" "$baseline_copy"' EXIT
else
    mkdir -p "$RUNS"
    sweep_copy="$RUNS/sweep.txt" baseline_copy="$RUNS/baseline_sweep.txt"
fi
printf '%s\n' "$lines" >"$sweep_copy"
[ "$have_baseline" = 0 ] || printf '%s\n' "$baseline_lines" >"$baseline_copy"

read -r -a common <<<"$sbatch_opts"
# One wandb group for the whole chain (the runs folder's name), unless a config sets wandb.group;
# sbatch passes it on to every job.
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$(basename "$RUNS")}"
JOB=1000
submit() { # submit <sbatch options> <template> <args...>: sets JOB to the new job's id
    if [ "$dry_run" = 1 ]; then
        JOB=$((JOB + 1))
        [ -z "${SWEEP:-}" ] || printf 'SWEEP=%q SWEEP_DIR=%q ' "$SWEEP_SHOWN" "$SWEEP_DIR"
        printf 'sbatch'
        printf ' %q' ${common[@]+"${common[@]}"} "$@"
        printf '   # job %s\n' "$JOB"
    else
        if ! JOB="$(sbatch --parsable ${common[@]+"${common[@]}"} "$@")"; then
            local template
            for template in "$@"; do case "$template" in *.sbatch) break ;; esac done
            echo "error: sbatch refused $(basename "$template") (its message is above)" >&2
            if [ ${#submitted[@]} -gt 0 ]; then
                echo "Already submitted: ${submitted[*]}; cancel them with: scancel ${submitted[*]}" >&2
            fi
            exit 1
        fi
        JOB="${JOB%%;*}"
        submitted+=("$JOB")
    fi
}
submitted=()
record() { [ "$dry_run" = 1 ] || echo "$(date -Is) $1 $2" >>"$RUNS/jobs.txt"; }
split() { read -r -a _words <<<"$1"; }

# --- pretraining and the denoiser, side by side ----------------------------------------------
after_encoder=()
if [ "$have_pretrain" = 1 ]; then
    encoder="$RUNS/pretrain"
    split "$pretrain"
    submit "$here/pretrain.sbatch" ${_words[@]+"${_words[@]}"} "run.dir=$encoder"
    record pretrain "$JOB"
    after_encoder=(--dependency="afterok:$JOB" --kill-on-invalid-dep=yes)
fi
denoiser_job=""
if [ "$have_denoiser" = 1 ]; then
    denoiser_run="$RUNS/denoiser"
    split "$denoiser"
    submit "$here/denoiser.sbatch" ${_words[@]+"${_words[@]}"} "run.dir=$denoiser_run"
    denoiser_job="$JOB"
    record denoiser "$JOB"
fi

# --- one fine-tuning per sweep line ------------------------------------------------------------
split "$finetune"
# sbatch passes the submitting environment on: SWEEP and SWEEP_DIR reach the array's tasks.
export SWEEP="$sweep_copy" SWEEP_DIR="$RUNS/finetune" SWEEP_SHOWN="$RUNS/sweep.txt"
submit --array="1-$n_lines" ${after_encoder[@]+"${after_encoder[@]}"} "$here/finetune_array.sbatch" \
    ${_words[@]+"${_words[@]}"} "encoder.run=$encoder"
unset SWEEP SWEEP_DIR
finetune_job="$JOB"
record finetune "$JOB"

# --- one evaluation per classifier, bare and purified ------------------------------------------
split "$evaluate"
eval_words=(${_words[@]+"${_words[@]}"})
split "$purify"
purify_words=(${_words[@]+"${_words[@]}"})
eval_jobs=()
evaluations() { # evaluations <name> <classifier run dir> <dependency>: bare, then purified
    local name="$1" classifier="$2" dep="$3"
    submit --dependency="$dep" --kill-on-invalid-dep=yes "$here/evaluate.sbatch" \
        ${eval_words[@]+"${eval_words[@]}"} "classifier.run=$classifier" "run.dir=$RUNS/evaluate/$name"
    record "evaluate:$name" "$JOB"
    eval_jobs+=("$JOB")
    if [ -n "$denoiser_run" ]; then
        [ -z "$denoiser_job" ] || dep="$dep:$denoiser_job"
        local purified=(${eval_words[@]+"${eval_words[@]}"} "classifier.run=$classifier" "purifier.run=$denoiser_run"
            ${purify_words[@]+"${purify_words[@]}"})
        if [ "$shards" -gt 1 ]; then
            # Task i attacks block i (evaluate.sbatch adds adv.shard=i); the merge waits for all.
            purified+=("adv.shards=$shards")
            submit --array="1-$shards" --dependency="$dep" --kill-on-invalid-dep=yes \
                "$here/evaluate.sbatch" ${purified[@]+"${purified[@]}"} "run.dir=$RUNS/evaluate/$name-purified"
            record "evaluate:$name-purified:shards" "$JOB"
            dep="afterok:$JOB"
        fi
        submit --dependency="$dep" --kill-on-invalid-dep=yes "$here/evaluate.sbatch" \
            ${purified[@]+"${purified[@]}"} "run.dir=$RUNS/evaluate/$name-purified"
        record "evaluate:$name-purified" "$JOB"
        eval_jobs+=("$JOB")
    fi
}
i=0
while IFS= read -r line; do
    i=$((i + 1))
    # The run directory finetune_array.sbatch gives this line (or the line's own run.dir).
    name="$(tr -c 'A-Za-z0-9._\n-' '_' <<<"$line")"
    classifier="$RUNS/finetune/$name"
    for word in $line; do
        case "$word" in run.dir=*) classifier="${word#run.dir=}" && name="$(basename "$classifier")" ;; esac
    done
    evaluations "$name" "$classifier" "afterok:${finetune_job}_$i"
done <"$sweep_copy"

# --- the supervised baseline: from random weights on the encoder's data and split, evaluated alike
if [ "$have_baseline" = 1 ]; then
    split "$baseline"
    export SWEEP="$baseline_copy" SWEEP_DIR="$RUNS/baseline" SWEEP_SHOWN="$RUNS/baseline_sweep.txt"
    submit --array="1-$(grep -c . "$baseline_copy")" ${after_encoder[@]+"${after_encoder[@]}"} \
        "$here/finetune_array.sbatch" ${_words[@]+"${_words[@]}"} "data.name=" "data.like=$encoder"
    unset SWEEP SWEEP_DIR
    baseline_job="$JOB"
    record baseline "$JOB"
    i=0
    while IFS= read -r line; do
        i=$((i + 1))
        name="$(tr -c 'A-Za-z0-9._\n-' '_' <<<"$line")"
        evaluations "baseline-$name" "$RUNS/baseline/$name" "afterok:${baseline_job}_$i"
    done <"$baseline_copy"
fi

# --- the comparison, whatever finished ---------------------------------------------------------
all="$(
    IFS=:
    echo "${eval_jobs[*]}"
)"
submit --dependency="afterany:$all" "$here/compare.sbatch" "$RUNS" --out "$RUNS/compare"
record compare "$JOB"

if [ "$dry_run" = 0 ]; then
    echo "submitted the chain under $RUNS (job ids in $RUNS/jobs.txt); follow it with squeue -u \$USER"
    echo "comparison when done: $RUNS/compare/"
fi
