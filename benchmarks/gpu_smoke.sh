#!/usr/bin/env bash
# GPU smoke test and speed numbers in one short script (at most BUDGET_S=540 s on one H100/H200):
#   1. the CUDA tests of the suite, 2. every task trains, validates, tests and checkpoints on the GPU
#   at its default precision, 3. eval.py / predict.py / export.py on the detection checkpoint,
#   4. attention memory on CUDA (benchmarks/gpu_attention_memory.py), 5. detection step time and
#   peak memory at the real sizes, ours (bf16 and fp32) against the original DETR computation,
#   6. the default recipe on real photos for a few minutes when a raccoon folder is given.
# Usage: [ONLY='train-detection eval-detection'] [BUDGET_S=540] [RACCOON_MINUTES=2] bash benchmarks/gpu_smoke.sh OUT_DIR [RACCOON_DIR]
# Each step has its own time limit; a failed step is reported (FAIL <step>) and the script goes on.
set -u
OUT=${1:?usage: gpu_smoke.sh OUT_DIR [RACCOON_DIR]}
RACCOON=${2:-}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1
PY=${PY:-python3}

DEADLINE=$((SECONDS + ${BUDGET_S:-540}))   # the whole script's budget: later steps get what is left
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi   # ONLY="step names": just those
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "FAIL $name (no time left)" | tee -a "$LOG"; return; fi
  echo "=== $name" >>"$LOG"
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then
    echo "ok   $name $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "FAIL $name (rc $?) $((SECONDS - t0)) s" | tee -a "$LOG"
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'tv', torchvision.__version__, 'lightning', lightning.__version__)"
  lscpu | grep 'Model name'; nproc; } >>"$LOG" 2>&1

SHORT="trainer.max_epochs=1 trainer.limit_train_batches=20 trainer.limit_val_batches=4 trainer.limit_test_batches=4 logger=csv"
step tests-cuda 60 $PY -m pytest -o addopts= -q tests/tasks/test_runtime.py
for task in detection multilabel translation multitask; do
  step "train-$task" 120 $PY train.py task=$task $SHORT hydra.run.dir=outputs/gpu/$task
done
CKPT=$(ls outputs/gpu/detection/checkpoints/*.ckpt 2>/dev/null | grep -v last | head -1)
IMAGES=${RACCOON:+$RACCOON/images}
step eval-detection 60 $PY eval.py ckpt_path="$CKPT" split=test device=cuda logger=none hydra.run.dir=outputs/gpu/eval
if [ -n "$IMAGES" ]; then
  step predict-detection 60 $PY predict.py ckpt_path="$CKPT" input="$IMAGES" device=cuda precision=bf16 hydra.run.dir=outputs/gpu/predict
fi
step export-detection 90 $PY export.py ckpt_path="$CKPT" hydra.run.dir=outputs/gpu/export
step attention-memory 60 $PY benchmarks/gpu_attention_memory.py --out "$OUT/attention_memory.json"
step detection-speed-bf16 120 $PY benchmarks/detection_speed.py --device cuda --precision bf16 \
  --settings detr-r50-800x1200,detr-small-800x1067 --impls ours,reference --steps 8 --warmup 3 \
  --out "$OUT/detection_speed_bf16.json"
step detection-speed-fp32 90 $PY benchmarks/detection_speed.py --device cuda --precision fp32 \
  --settings detr-r50-800x1200,detr-small-800x1067 --impls ours --steps 8 --warmup 3 \
  --out "$OUT/detection_speed_fp32.json"
if [ -n "$RACCOON" ]; then
  step real-photos $(( ${RACCOON_MINUTES:-2} * 60 + 120 )) $PY benchmarks/real_photos.py --root "$RACCOON" --minutes "${RACCOON_MINUTES:-2}" --every 0.5 \
    --out "$OUT/real_photos.json" -- trainer.accelerator=gpu
fi
grep -E "^(ok|FAIL) " "$LOG"
