#!/usr/bin/env bash
# One prepared call on a GPU machine: the speed benchmarks, then a 200-epoch CIFAR-10 run, all
# results under $OUT. Run from the repository root on the device machine:
#
#   bash benchmarks/device_session.sh simclr        # or byol
#
# It expects, next to the working tree (see BENCHMARKS.md, "Running on a GPU machine"):
#   .whl/   wheels of the packages the machine lacks (lightly, omegaconf, antlr4, diffusers,
#           imagecorruptions-imaug), installed with --no-deps into /tmp/site;
#   .data/cifar10-jpeg.tar.gz   the CIFAR-10 ImageFolder archive.
# Environment:
#   CALL_S   seconds the whole call may take (default 590, under the tool's 600 s per call);
#   BENCH_S  limit of the benchmarks (default 150); SKIP_BENCH=1 skips them and the GPU tests
#            that precede them (pytest -m gpu: no host syncs on the view path, GPU = CPU views;
#            at most TESTS_S, default 150; SKIP_TESTS=1 skips the tests alone);
#   TRAIN_S  limit of the training run (default: what is left of CALL_S, less 25 s to copy);
#            SKIP_TRAIN=1 skips it (a benchmarks-only call);
#   EXTRA    more key=value overrides for the training run (word-split), e.g. to rehearse its
#            start on a CPU: EXTRA="trainer.limit_train_batches=3 trainer.max_epochs=1";
#   RUN_DIR  the training run's directory (default: a fresh one); a second call on the still
#            warm machine resumes a run the first one was stopped in;
#   SMOKE=1  a tiny CPU rehearsal of the same steps: bench --smoke and 1 epoch on the digits.
# $OUT receives at most 7 files (the tool returns 8): session.log, nvidia-smi.txt, bench.json
# (written after each benchmark part), metrics.csv (copied every 15 s while training),
# metrics.json, profile.txt (20 training steps of epoch 2 under torch.profiler: the GPU's busy
# share and the top host and device operators) and summary.md (the figures against the
# targets, benchmarks/session_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
METHOD="${1:-simclr}"
OUT="${OUT:-/tmp/device_out}"
CALL_S="${CALL_S:-590}"
BENCH_S="${BENCH_S:-150}"
RUN="${RUN_DIR:-$(mktemp -d /tmp/device_run.XXXXXX)}"  # fresh by default: an old run there would be resumed
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
echo "== $(date -Is) device session: $METHOD (run dir $RUN)"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}"
python3 -c "import torch, lightly, diffusers, omegaconf, ssl_robust; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt"

gpu_tests() {
    [ "${SKIP_TESTS:-0}" = 1 ] && return
    echo "== $(date -Is) GPU tests (pytest -m gpu, limit ${TESTS_S:-150}s)"
    timeout -k 10 "${TESTS_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests
    echo "GPU tests exit $?"
}

copy_logs() {  # the newest piece's log (a resumed run starts logs/version_<k+1>)
    local latest
    latest="$(ls -d "$RUN"/logs/version_* 2>/dev/null | sort -V | tail -n 1)"
    [ -z "$latest" ] || cp "$latest/metrics.csv" "$OUT/metrics.csv" 2>/dev/null
    cp "$RUN/metrics.json" "$OUT/metrics.json" 2>/dev/null
    cp "$RUN/profile.txt" "$OUT/profile.txt" 2>/dev/null
}

if [ "${SMOKE:-0}" = 1 ]; then
    gpu_tests
    python3 scripts/bench.py --smoke --json "$OUT/bench.json"
    python3 scripts/pretrain.py trainer.max_epochs=1 data.augment=gpu run.dir="$RUN" \
        trainer.progress_bar=false trainer.limit_train_batches=4
else
    if [ "${SKIP_BENCH:-0}" != 1 ]; then
        gpu_tests
        echo "== $(date -Is) benchmarks (limit ${BENCH_S}s)"
        timeout -k 10 "$BENCH_S" python3 scripts/bench.py --json "$OUT/bench.json"
        echo "benchmarks exit $?"
    fi
    if [ "${SKIP_TRAIN:-0}" != 1 ]; then
        DATA=/tmp/data  # the benchmarks use synthetic images: unpacked for training only
        [ -d "$DATA/cifar10-jpeg" ] || { mkdir -p "$DATA" && tar xzf .data/cifar10-jpeg.tar.gz -C "$DATA"; } || exit 1
        TRAIN_S="${TRAIN_S:-$(( CALL_S - ($(date +%s) - T0) - 25 ))}"
        echo "== $(date -Is) ${METHOD} CIFAR-10, 200 epochs (limit ${TRAIN_S}s)"
        ( while sleep 15; do copy_logs; done ) &
        COPIER=$!
        start=$(date +%s)
        # A compiler failure must not cost the call: dynamo falls back to eager (and logs it).
        # curves.png does not come back from the machine: not redrawn during the timed run.
        # trainer.profile_steps: where a step's time goes (profile.txt), a second or two.
        # last.ckpt every 20 epochs (and after the last), not every 2.5 s epoch: ~100 MB each.
        # A run stopped by the call's limit (timeout's SIGTERM) checkpoints the step in progress
        # (hpc_ckpt_1.ckpt) and a second call resumes from there (RUN_DIR).
        # Metrics every 50 steps: each logging is an .item() that makes the host wait.
        # Off for the timed run: the kNN monitor under shift (its corrupted twin of the 10k
        # validation images is made on the CPU first, ~40 s) and the views figure.
        TORCHDYNAMO_SUPPRESS_ERRORS=1 timeout -k 10 "$TRAIN_S" python3 scripts/pretrain.py \
            "${METHOD}_cifar10_folder" \
            data.root="$DATA/cifar10-jpeg" data.augment=gpu data.compile_views=true \
            model.compile=true monitor.every_n_epochs=40 monitor.shift_severity=0 \
            monitor.views_figure=0 wandb.mode=disabled trainer.profile_steps=20 \
            trainer.checkpoint_every_n_epochs=20 trainer.log_every_n_steps=50 \
            trainer.progress_bar=false trainer.curves_every_s=0 run.dir="$RUN" ${EXTRA:-}
        echo "training exit $? after $(( $(date +%s) - start )) s"
        # The wall-time target is judged on a run made in one piece only.
        [ -n "${RUN_DIR:-}" ] || WALL_S=$(( $(date +%s) - start ))
        kill "$COPIER" 2>/dev/null
    fi
fi
copy_logs
[ -f "$OUT/profile.txt" ] && head -n 2 "$OUT/profile.txt"
python3 benchmarks/session_summary.py --bench "$OUT/bench.json" --csv "$OUT/metrics.csv" \
    --metrics "$OUT/metrics.json" --method "$METHOD" ${WALL_S:+--train-wall-s "$WALL_S"} \
    --profile "$OUT/profile.txt" \
    > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "== $(date -Is) done in $(( $(date +%s) - T0 )) s; results in $OUT"
