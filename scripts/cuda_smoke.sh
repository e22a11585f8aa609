#!/usr/bin/env bash
# CUDA smoke run of the whole CLI, in five parts:
#   core      train -> resume -> sample (every sampler) -> vary -> interpolate -> nll -> eval -> export -> info
#   palette   train multi-task + regression -> restore every task, every sampler
#   latent    autoencoder -> reconstruct -> text/map/layout model -> resume -> generate with every sampler -> inpaint
#   unclip    CLIP -> prior, decoder, upsampler -> resume -> unclip captions / variations / interpolations
#   shipped   DreamBooth on the shipped t2i (full -> resume, LoRA + learnt token -> generate), then the shipped
#             t2i, unCLIP and Fashion-MNIST models
# each in fp32 and bf16, on a GPU. Run it on a CUDA machine whenever training or sampling code changed:
#     bash scripts/cuda_smoke.sh [WORKDIR]          (DEVICE=cpu bash scripts/cuda_smoke.sh for a dry run)
#     PARTS="core palette" bash scripts/cuda_smoke.sh   (a subset; core and palette need no text encoder and no
#                                                       shipped model, so they run from a tree without assets)
# The parts run side by side (JOBS at a time, default all of them: one GPU holds them easily), each step a
# separate `python -m pakhsh.cli` call as a user would type it. Every step must exit 0; a part stops at its first
# failure and prints its log's tail; the script exits 1 if any part failed. Needs no network and no dataset beyond
# the built-in generated shapes.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
PARTS="${PARTS:-core palette latent unclip shipped}"
JOBS="${JOBS:-10}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PK=(python3 -m pakhsh.cli)
mkdir -p "$W"
ok() { echo "SMOKE OK   $*"; }
run() { local name="$1"; shift; local t0=$SECONDS; "$@" > "$W/$name.log" 2>&1 || { echo "SMOKE FAIL $name (exit $?)"; tail -30 "$W/$name.log"; exit 1; }; ok "$name ($((SECONDS - t0)) s)"; }

python3 - <<PY
import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                    torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
# Each part is a function of the precision (no = fp32, bf16); FLAG is the sampling commands' --bf16.
# a small config: 16x16 shapes, short chain, so each step takes seconds
TINY=(--set data.image_size=16 --set model.image_size=16 --set model.model_channels=32 --set diffusion.num_steps=100
      --set train.batch_size=64 --set train.log_every=10 --set train.save_every=50 --set train.sample_every=50
      --set train.warmup_steps=10 --set "train.device=$DEVICE")
part_core() {
  local prec=$1 R="$W/run_$1" FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  run "train_$prec"  "${PK[@]}" train shapes "${TINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=60 --out "$R" -q
  run "resume_$prec" "${PK[@]}" train shapes "${TINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=100 --out "$R" --resume -q
  grep -q '"step": 100' "$R/log.jsonl" || { echo "SMOKE FAIL resume_$prec did not reach step 100"; exit 1; }
  ok "resume_$prec reached step 100"
  for s in "ddpm 50" "ddim 20" "dpm++2m 10" "sde-dpm++2m 10"; do
    set -- $s
    run "sample_${prec}_$1" "${PK[@]}" sample -m "$R" --device "$DEVICE" "${FLAG[@]}" --sampler "$1" --steps "$2" -n 8 -o "$W/s_${prec}_$1.png" -q
  done
  run "vary_$prec"   "${PK[@]}" vary -m "$R" data:0 --t 50 --count 4 --device "$DEVICE" "${FLAG[@]}" -o "$W/v_$prec.png"
  run "interp_$prec" "${PK[@]}" interpolate -m "$R" data:0 data:1 --t 50 --device "$DEVICE" "${FLAG[@]}" -o "$W/i_$prec.png"
  run "nll_$prec"    "${PK[@]}" nll -m "$R" --max-images 16 --device "$DEVICE" "${FLAG[@]}" -q
  run "eval_$prec"   "${PK[@]}" eval "$R" -n 64 --num-real 256 --sampler ddpm --steps 20 --bpd --bpd-images 8 \
                       --device "$DEVICE" "${FLAG[@]}" --stats-dir "$W/stats_$prec" --json "$W/e_$prec.json" --markdown "$W/e_$prec.md" -q
  run "export_$prec" "${PK[@]}" export "$R" "$W/export_$prec"
  run "info_$prec"   "${PK[@]}" info "$W/export_$prec"
}
# Palette: a multi-task model and the regression baseline, then every restore task on the GPU
PTINY=(--set data.image_size=16 --set model.image_size=16 --set model.model_channels=32 --set diffusion.num_steps=100
       --set train.batch_size=64 --set train.log_every=10 --set train.save_every=30 --set train.sample_every=30
       --set train.preview_steps=10 --set train.warmup_steps=10 --set "train.device=$DEVICE")
part_palette() {
  local prec=$1 P="$W/palette_$1" FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  run "palette_train_$prec" "${PK[@]}" train palette "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=30 --out "$P" -q
  run "palette_resume_$prec" "${PK[@]}" train palette "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=60 --out "$P" --resume -q
  run "palette_reg_$prec" "${PK[@]}" train palette_regression "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=30 --out "$P.reg" -q
  for t in colorize inpaint uncrop jpeg panorama; do
    run "restore_${prec}_$t" "${PK[@]}" restore data:0 --task "$t" -m "$P" --device "$DEVICE" "${FLAG[@]}" --steps 10 --samples 2 --quality 10 -o "$W/r_${prec}_$t.png" -q
  done
  for s in "ddpm 20" "ddim 10" "dpm++2m 10" "sde-dpm++2m 10"; do
    set -- $s
    run "restore_${prec}_$1" "${PK[@]}" restore data:1 --task inpaint --mask freeform -m "$P" --device "$DEVICE" "${FLAG[@]}" --sampler "$1" --steps "$2" -o "$W/ri_${prec}_$1.png" -q
  done
  run "restore_reg_$prec" "${PK[@]}" restore data:2 --task jpeg --quality 5 -m "$P.reg" --device "$DEVICE" "${FLAG[@]}" -o "$W/rr_$prec.png" -q
}
# Latent diffusion: autoencoder (with the discriminator) -> text + map + layout latent model -> generate / inpaint
ATINY=(--set data.length=256 --set train.batch_size=16 --set train.log_every=10 --set train.save_every=20
       --set train.sample_every=20 --set train.num_preview=4 --set "train.device=$DEVICE")
part_latent() {
  local prec=$1 A="$W/ae_$1" L="$W/ldm_$1" FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  run "ae_train_$prec" "${PK[@]}" train autoencoder_f4 "${ATINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=20 \
      --set autoencoder_loss.disc_weight=0.1 --set autoencoder_loss.disc_start=10 --out "$A" -q
  run "reconstruct_$prec" "${PK[@]}" reconstruct data:32 -m "$A" --device "$DEVICE" -o "$W/rec_$prec.png"
  run "ldm_train_$prec" "${PK[@]}" train t2i "${ATINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=20 \
      --set "latent.autoencoder=$A" --out "$L" -q
  run "ldm_resume_$prec" "${PK[@]}" train t2i "${ATINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=40 \
      --set "latent.autoencoder=$A" --out "$L" --resume -q
  for s in "ddpm 20" "ddim 10" "dpm++2m 10" "sde-dpm++2m 10"; do
    set -- $s
    run "generate_${prec}_$1" "${PK[@]}" generate "a large red circle at the top left on a gray background" -m "$L" \
        --device "$DEVICE" "${FLAG[@]}" --sampler "$1" --steps "$2" -n 2 -o "$W/g_${prec}_$1.png" -q
  done
  run "inpaint_$prec" "${PK[@]}" inpaint data:0 "a small blue star" -m "$L" --device "$DEVICE" "${FLAG[@]}" --steps 10 -o "$W/ip_$prec.png" -q
}
# unCLIP: CLIP -> prior + decoder on it -> super-resolution upsampler -> resume -> the three unclip modes
UTINY=(--set data.length=256 --set train.log_every=10 --set train.save_every=20 --set train.sample_every=20
       --set train.num_preview=4 --set "train.device=$DEVICE")
part_unclip() {
  local prec=$1 C="$W/clip_$1" PR="$W/prior_$1" D="$W/dec_$1" U="$W/up_$1" M=(--set "train.mixed_precision=$1")
  run "clip_train_$prec" "${PK[@]}" train unclip_clip "${UTINY[@]}" "${M[@]}" --set train.steps=20 --out "$C" -q
  run "prior_train_$prec" "${PK[@]}" train unclip_prior "${UTINY[@]}" "${M[@]}" --set train.steps=20 --set "unclip.clip=$C" --out "$PR" -q
  run "decoder_train_$prec" "${PK[@]}" train unclip_decoder "${UTINY[@]}" "${M[@]}" --set train.steps=20 --set "unclip.clip=$C" --out "$D" -q
  run "decoder_resume_$prec" "${PK[@]}" train unclip_decoder "${UTINY[@]}" "${M[@]}" --set train.steps=40 --set "unclip.clip=$C" --out "$D" --resume -q
  run "upsampler_train_$prec" "${PK[@]}" train unclip_upsampler "${UTINY[@]}" "${M[@]}" --set train.steps=20 --out "$U" -q
  run "unclip_captions_$prec" "${PK[@]}" unclip "a large red circle at the top left on a gray background" --prior "$PR" \
      --decoder "$D" --upsampler "$U" --device "$DEVICE" --prior-steps 5 --decoder-steps 5 --upsampler-steps 5 -n 2 -o "$W/u_$prec.png" -q
  run "unclip_variations_$prec" "${PK[@]}" unclip --variations data:0 --decoder "$D" --upsampler "$U" --device "$DEVICE" \
      --decoder-steps 5 --upsampler-steps 5 -n 2 -o "$W/uv_$prec.png" -q
  run "unclip_interpolate_$prec" "${PK[@]}" unclip --interpolate data:0 data:1 --decoder "$D" --upsampler none \
      --device "$DEVICE" --decoder-steps 5 -n 3 -o "$W/ui_$prec.png" -q
}
# DreamBooth on the shipped t2i: full fine-tuning -> resume, LoRA with a learnt token -> generate; the shipped models
part_shipped() {
  local prec=$1 B="$W/db_$1" FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  local M=(--class-images 4 --set "train.mixed_precision=$prec" --set "train.device=$DEVICE" --set dreambooth.class_steps=10)
  run "dreambooth_train_$prec" "${PK[@]}" dreambooth --subject demo --out "$B" --steps 10 "${M[@]}" -q
  run "dreambooth_resume_$prec" "${PK[@]}" dreambooth --subject demo --out "$B" --steps 20 "${M[@]}" --resume -q
  run "dreambooth_lora_$prec" "${PK[@]}" dreambooth --subject demo --out "$B.lora" --steps 10 --lora 4 --train-token "${M[@]}" -q
  for m in "$B" "$B.lora/lora"; do
    run "dreambooth_generate_${prec}_$(basename "$m")" "${PK[@]}" generate "a sks star at the bottom right on a red background" \
        -m "$m" --device "$DEVICE" "${FLAG[@]}" --steps 10 -n 2 -o "$W/db_${prec}_$(basename "$m").png" -q
  done
  run "unclip_shipped_$prec" "${PK[@]}" unclip "a small blue star at the center on a white background" --device "$DEVICE" "${FLAG[@]}" -o "$W/unclip_$prec.png" -q
  run "generate_shipped_$prec" "${PK[@]}" generate "a small green square in the center on a white background" --device "$DEVICE" "${FLAG[@]}" -o "$W/t2i_$prec.png" -q
  run "sample_shipped_$prec" "${PK[@]}" sample -m fashion_mnist --device "$DEVICE" "${FLAG[@]}" --steps 20 -n 16 -o "$W/shipped_$prec.png" -q
}

# run the parts side by side, each (part, precision) with its own summary file; print them in a fixed order
T0=$SECONDS; pids=(); names=()
for part in $PARTS; do
  declare -F "part_$part" > /dev/null || { echo "SMOKE FAIL unknown part '$part' (parts: core palette latent unclip shipped)"; exit 2; }
  for prec in no bf16; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
    ( set -e; "part_$part" "$prec" ) > "$W/part_${part}_$prec.txt" 2>&1 &
    pids+=($!); names+=("${part}_$prec")
  done
done
failed=()
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${names[$i]}"); done
for n in "${names[@]}"; do echo "== $n"; cat "$W/part_$n.txt"; done
steps=0; for n in "${names[@]}"; do steps=$((steps + $(grep -c '^SMOKE OK' "$W/part_$n.txt" || true))); done
if [ ${#failed[@]} -gt 0 ]; then echo "SMOKE FAILED: ${failed[*]} on $DEVICE ($W)"; exit 1; fi
echo "SMOKE PASSED: $steps steps, parts '$PARTS' in fp32 and bf16 on $DEVICE, $((SECONDS - T0)) s ($W)"
