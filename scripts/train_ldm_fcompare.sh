#!/usr/bin/env bash
# The LDM f-comparison runs of docs/results/latent.md: pixel space (f=1), f=4 and f=8 latents, each trained for the
# same wall-clock budget on the same machine (one after the other, one thread each), checkpoints along the way.
#   bash scripts/train_ldm_fcompare.sh [RUNS_DIR] [MINUTES]
# then: python benchmarks/latent_tables.py fcompare --runs RUNS_DIR/ldm_f1 RUNS_DIR/ldm_f4 RUNS_DIR/ldm_f8
set -euo pipefail
runs=${1:-runs}
minutes=${2:-8}
declare -A save=([1]=40 [4]=300 [8]=500)  # about three checkpoints per budget at each model's speed
for f in 1 8 4; do
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} pakhsh train "ldm_f$f" --out "$runs/ldm_f$f" -q \
    --set train.steps=1000000 --set "train.max_minutes=$minutes" --set "train.save_every=${save[$f]}"
done
