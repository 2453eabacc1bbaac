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
# Environment: TRAIN_S (seconds allowed for the training run, default 480), SMOKE=1 (a tiny
# CPU rehearsal of the same steps: bench --smoke and 1 epoch on the digits).
set -uo pipefail
cd "$(dirname "$0")/.."
METHOD="${1:-simclr}"
OUT="${OUT:-/tmp/device_out}"
TRAIN_S="${TRAIN_S:-480}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
echo "== $(date -Is) device session: $METHOD"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$(pwd):${PYTHONPATH:-}"
python3 -c "import torch, lightly, diffusers, omegaconf, ssl_robust; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt"

if [ "${SMOKE:-0}" = 1 ]; then
    python3 scripts/bench.py --smoke --json "$OUT/bench.json"
    python3 scripts/pretrain.py trainer.max_epochs=1 data.augment=gpu run.dir=/tmp/device_run \
        trainer.progress_bar=false
else
    DATA=/tmp/data
    mkdir -p "$DATA" && tar xzf .data/cifar10-jpeg.tar.gz -C "$DATA" || exit 1
    echo "== $(date -Is) benchmarks"
    python3 scripts/bench.py --json "$OUT/bench.json"
    echo "== $(date -Is) ${METHOD} CIFAR-10, 200 epochs (limit ${TRAIN_S}s)"
    start=$(date +%s)
    timeout "$TRAIN_S" python3 scripts/pretrain.py "${METHOD}_cifar10_folder" \
        data.root="$DATA/cifar10-jpeg" data.augment=gpu model.compile=true \
        monitor.every_n_epochs=20 wandb.mode=disabled trainer.progress_bar=false \
        run.dir=/tmp/device_run
    echo "training exit $? after $(( $(date +%s) - start )) s"
fi
cp /tmp/device_run/metrics.json "$OUT/metrics.json" 2>/dev/null
cp /tmp/device_run/logs/version_0/metrics.csv "$OUT/metrics.csv" 2>/dev/null
echo "== $(date -Is) done; results in $OUT"
