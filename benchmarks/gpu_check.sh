#!/usr/bin/env bash
# The GPU checks of issue 13 in one script (about 8 minutes on one H200, an estimate), for a machine with a CUDA GPU:
#   bash benchmarks/gpu_check.sh <out-dir>
# 1. the CUDA tests (fused optimisers, precision flags); 2. a short apps.vit.train run on the bundled digits
# with precision=tf32 (its runtime.json says what was in force); 3. benchmarks.train, ViT-B/16 at 224 px, batch
# 256: the app's step in fp32 / tf32 / bf16 and the plain timm loop in tf32 and in bf16 + torch.compile;
# 4. benchmarks.pipeline: apps.vit.train end to end on a generated JPEG class folder with the decoded-image
# cache, bf16 and compile, 14 workers: median and 10th-percentile step images/s; 5. benchmarks.compile_cache:
# the first step of a compiled ViT-B/16 run (a new process) with torch.compile's cache empty vs filled; 6 (only
# with PARTS naming it): benchmarks.methods, each finetuning method's step on ViT-B/16.
# Measured rates go to <out-dir>/rates.csv (columns of vitef.rates) to merge into benchmarks/rates.csv; each
# part's output to <out-dir>/<part>.log. A part that fails is reported and the next one still runs.
# PARTS="tests pipeline" runs only those parts; BUDGET_S (default 570) caps the whole run; PIPE_CACHE=both also
# trains with the cache off; PIPE_DEFERRED=false makes the host wait for each update's checks before it (the loop
# before deferred checks, to compare).
set -u
OUT_DIR=${1:-${OUT:-/tmp/vitef-gpu-check}}
mkdir -p "$OUT_DIR"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0

PARTS=${PARTS:-env tests app_tf32 train pipeline compile_cache}
# The whole script stays within BUDGET_S seconds (a device call is cut at 600 s, and a cut loses what is left):
# each part gets at most what remains, and a part with under 30 s left is skipped (rerun it with PARTS=...).
BUDGET_S=${BUDGET_S:-570}
START_S=$SECONDS
part() {  # part <name> <timeout-seconds> <command...>
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET_S - (SECONDS - START_S)))
    if [ $left -lt 30 ]; then
        echo "== $name: skipped, ${left} s of BUDGET_S=$BUDGET_S left (rerun with PARTS=\"$name\")"
        status=1
        return 0
    fi
    [ $limit -le $left ] || limit=$left
    echo "== $(date -u +%H:%M:%S) $name: $*"
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep -v -E " I (apps|vitef)\.|^train:|it/s\]" "$OUT_DIR/$name.log" | tail -n 25
    echo "== $(date -u +%H:%M:%S) $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}

part env 60 $PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, \
'torchvision', torchvision.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
part tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_optim.py tests/test_precision.py tests/data/test_resized_crop.py \
    tests/data/test_device_prefetch.py tests/apps/test_train_divergence.py
part app_tf32 180 $PY -m apps.vit.train config=apps/vit/configs/digits.yaml device=cuda precision=tf32 steps=60 \
    eval_period=30 root="$WORK/app" log_dir=tf32 tensorboard=false
[ -f "$WORK/app/runs/tf32/runtime.json" ] && cat "$WORK/app/runs/tf32/runtime.json"
part train 300 $PY -m benchmarks.train device=cuda batch_size=256 steps=10 warmup=3 \
    "variants=[ours-fp32,ours-tf32,plain-tf32,ours-bf16,plain-bf16-compile]" rates_out="$OUT_DIR/rates.csv"
# Each worker keeps 2 batches of 256 uint8 images (38 MB each) in shared memory: 14 workers need ~1.1 GB of /dev/shm.
WORKERS=14
SHM_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "$SHM_KB" ] && [ "$SHM_KB" -lt 2000000 ]; then WORKERS=4; fi
echo "== /dev/shm free: ${SHM_KB:-unknown} kB: $WORKERS training workers"
part pipeline 420 $PY -m benchmarks.pipeline device=cuda tiny=false model=vit_base_patch16_224 batch_size=256 \
    steps=${PIPE_STEPS:-150} warmup=${PIPE_WARMUP:-40} train_workers=$WORKERS loader_workers=0 precision=bf16 compile=true \
    train_cache=${PIPE_CACHE:-on} deferred_checks=${PIPE_DEFERRED:-true} classes=20 \
    per_class=100 workdir="$WORK/pipeline" rates_out="$OUT_DIR/rates.csv"
# The bundled digits at 224 px through a random-init ViT-B/16: no download, the graphs of the study's model.
cat >"$WORK/vitb_digits.yaml" <<'YAML'
dataset_name: digits_subset-56789
model: {name: vit_base_patch16_224, pretrained: false, img_size: 224}
optim: {name: sgd, lr: 0.01, warmup_steps: 0}
YAML
part compile_cache 420 $PY -m benchmarks.compile_cache device=cuda precision=bf16 batch_size=128 steps=6 runs=2 \
    train_config="$WORK/vitb_digits.yaml" workdir="$WORK/compile_cache"
# Not in the default PARTS (PARTS="methods" for it): the step cost of each finetuning method on ViT-B/16 (DoRA vs LoRA).
part methods 240 $PY -m benchmarks.methods device=cuda model=vit_base_patch16_224 batch_size=128 precision=bf16 \
    steps=10 warmup=3
[ -f "$OUT_DIR/rates.csv" ] && cat "$OUT_DIR/rates.csv"
exit $status
