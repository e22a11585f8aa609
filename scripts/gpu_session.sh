#!/usr/bin/env bash
# One GPU session (about 8 minutes on an H100/H200): the data-path throughput check, the CUDA smoke run, and the
# retraining of both shipped models (side by side, until a time budget, then SIGTERM saves them), followed by
# their sampler tables at n = 1,000. Its first two parts ran on an H200 (docs/benchmarks.md), and the GPU tables
# of the shipped weights (docs/results/samplers.md); the retraining is still to run.
#     OUT=/path/for/results TRAIN_SECONDS=270 bash scripts/gpu_session.sh
# Fashion-MNIST is read from /usr/share/datasets/fashion-mnist, or copied there from .gpu_data/fashion-mnist.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/gpu_out}"; W="${WORK:-/tmp/gpu_work}"; TRAIN_SECONDS="${TRAIN_SECONDS:-270}"
ROWS="${ROWS:-full}"; TPUT_STEPS="${TPUT_STEPS:-300}"
mkdir -p "$OUT" "$W"
export PYTHONPATH="$REPO/src" PYTHONUNBUFFERED=1
PK=(python3 -m pakhsh.cli)
cd "$REPO"
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -d .gpu_data/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && cp -r .gpu_data/fashion-mnist /usr/share/datasets/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/session.log"
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/session.log"

# 1. data path: the shapes config at batch 128, in-process loading (the old default) vs automatic workers
for nw in 0 auto; do
  extra=(); [ "$nw" = 0 ] && extra=(--set train.num_workers=0)
  "${PK[@]}" train shapes --set train.batch_size=128 --set train.steps=$TPUT_STEPS --set train.log_every=25 \
     --set train.sample_every=0 --set train.save_every=$TPUT_STEPS --set train.mixed_precision=no --set train.device=cuda \
     "${extra[@]}" --out "$W/tput_$nw" -q > "$W/tput_$nw.log" 2>&1 || log "throughput run $nw FAILED: $(tail -3 "$W/tput_$nw.log")"
  python3 - "$W/tput_$nw/log.jsonl" "$nw" <<'PY' | tee -a "$OUT/session.log"
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][1:]  # first window holds start-up
print(f"throughput workers={sys.argv[2]}: median {statistics.median(r['images_per_s'] for r in recs):.0f} img/s "
      f"over {len(recs)} windows of 25 steps (batch 128, fp32)")
PY
done

# 2. retrain both shipped models side by side; 3. the smoke run meanwhile
log "training shapes and fashion_mnist for ${TRAIN_SECONDS}s"
COMMON=(--set train.batch_size=128 --set train.steps=100000 --set train.mixed_precision=no --set train.device=cuda
        --set train.save_every=1000 --set train.sample_every=2000 --set train.log_every=100 -q)
"${PK[@]}" train shapes "${COMMON[@]}" --out "$W/shapes" > "$W/train_shapes.log" 2>&1 & P1=$!
"${PK[@]}" train fashion_mnist "${COMMON[@]}" --out "$W/fashion_mnist" > "$W/train_fashion_mnist.log" 2>&1 & P2=$!
T0=$SECONDS
# the smoke parts that need neither the text encoder nor the shipped models (a device call carries too little for
# them beside the data: scripts/device_payload.sh runs the rest); SMOKE_PARTS="core palette latent unclip shipped"
# where they are installed
PARTS="${SMOKE_PARTS:-core palette}" bash scripts/cuda_smoke.sh "$W/smoke" > "$OUT/smoke.log" 2>&1
log "smoke: $(tail -1 "$OUT/smoke.log")"
while [ $((SECONDS - T0)) -lt $TRAIN_SECONDS ] && { kill -0 $P1 2>/dev/null || kill -0 $P2 2>/dev/null; }; do sleep 2; done
kill -TERM $P1 $P2 2>/dev/null; wait $P1; log "shapes train exit $?"; wait $P2; log "fashion train exit $?"
for m in shapes fashion_mnist; do
  tail -2 "$W/train_$m.log" | tee -a "$OUT/session.log"
  "${PK[@]}" export "$W/$m" "$W/models/$m" >> "$OUT/session.log" 2>&1 || log "export $m FAILED"
done

# 4. sampler tables, both models at once
for m in shapes fashion_mnist; do
  python3 benchmarks/sampler_table.py "$W/models/$m" --num 1000 --rows "$ROWS" --device cuda --stats-dir "$W/stats" \
     --out "$W/tables/samplers_$m" > "$W/table_$m.log" 2>&1 &
done
wait; log "tables done"
for m in shapes fashion_mnist; do tail -18 "$W/table_$m.log" | tee -a "$OUT/session.log"; done
for m in shapes fashion_mnist; do
  cp "$W/$m/log.jsonl" "$W/$m/loss.png" "$W/models/$m/" 2>/dev/null
  cp "$(ls "$W/$m"/samples/*.png | tail -1)" "$W/models/$m/last_preview.png" 2>/dev/null
  tar -C "$W/models" -cf "$OUT/$m.tar" "$m"
done
tar -C "$W" -cf "$OUT/tables.tar" tables smoke/e_no.md smoke/e_bf16.md 2>/dev/null
log "done"
