#!/usr/bin/env bash
# CUDA smoke run of the whole CLI: train -> resume -> sample (every sampler) -> vary -> interpolate -> nll ->
# eval -> export -> info, then Palette (train multi-task + regression -> restore every task, every sampler), then
# latent diffusion (autoencoder -> reconstruct -> text/map/layout model -> generate with every sampler -> inpaint),
# then unCLIP (CLIP -> prior, decoder, upsampler -> resume -> unclip captions / variations / interpolations),
# then DreamBooth (demo subject: full -> resume, LoRA + learnt token -> generate),
# in fp32 and bf16, on a GPU. Run it on a CUDA machine whenever training or sampling
# code changed:
#     bash scripts/cuda_smoke.sh [WORKDIR]          (DEVICE=cpu bash scripts/cuda_smoke.sh for a dry run)
# Every step must exit 0; the script stops at the first failure and prints what ran. Needs no network and no
# dataset beyond the built-in generated shapes.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PK=(python3 -m pakhsh.cli)
mkdir -p "$W"
ok() { echo "SMOKE OK   $*"; }
run() { local name="$1"; shift; local t0=$SECONDS; "$@" > "$W/$name.log" 2>&1 || { echo "SMOKE FAIL $name (exit $?)"; tail -30 "$W/$name.log"; exit 1; }; ok "$name ($((SECONDS - t0)) s)"; }

python3 - <<PY
import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                    torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
# a small config: 16x16 shapes, short chain, so each step takes seconds
TINY=(--set data.image_size=16 --set model.image_size=16 --set model.model_channels=32 --set diffusion.num_steps=100
      --set train.batch_size=64 --set train.log_every=10 --set train.save_every=50 --set train.sample_every=50
      --set train.warmup_steps=10 --set "train.device=$DEVICE")
for prec in no bf16; do
  R="$W/run_$prec"; FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  run "train_$prec"  "${PK[@]}" train shapes "${TINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=60 --out "$R" -q
  run "resume_$prec" "${PK[@]}" train shapes "${TINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=100 --out "$R" --resume -q
  grep -q '"step": 100' "$R/log.jsonl" && ok "resume_$prec reached step 100"
  for s in "ddpm 50" "ddim 20" "dpm++2m 10" "sde-dpm++2m 10"; do
    set -- $s
    run "sample_${prec}_$1" "${PK[@]}" sample -m "$R" --device "$DEVICE" "${FLAG[@]}" --sampler "$1" --steps "$2" -n 8 -o "$W/s_${prec}_$1.png" -q
  done
  run "vary_$prec"   "${PK[@]}" vary -m "$R" data:0 --t 50 --count 4 --device "$DEVICE" "${FLAG[@]}" -o "$W/v_$prec.png"
  run "interp_$prec" "${PK[@]}" interpolate -m "$R" data:0 data:1 --t 50 --device "$DEVICE" "${FLAG[@]}" -o "$W/i_$prec.png"
  run "nll_$prec"    "${PK[@]}" nll -m "$R" --max-images 16 --device "$DEVICE" "${FLAG[@]}" -q
  run "eval_$prec"   "${PK[@]}" eval "$R" -n 64 --num-real 256 --sampler ddpm --steps 20 --bpd --bpd-images 8 \
                       --device "$DEVICE" "${FLAG[@]}" --stats-dir "$W/stats" --json "$W/e_$prec.json" --markdown "$W/e_$prec.md" -q
  run "export_$prec" "${PK[@]}" export "$R" "$W/export_$prec"
  run "info_$prec"   "${PK[@]}" info "$W/export_$prec"
done
# Palette: a multi-task model and the regression baseline, then every restore task on the GPU
PTINY=(--set data.image_size=16 --set model.image_size=16 --set model.model_channels=32 --set diffusion.num_steps=100
       --set train.batch_size=64 --set train.log_every=10 --set train.save_every=30 --set train.sample_every=30
       --set train.preview_steps=10 --set train.warmup_steps=10 --set "train.device=$DEVICE")
for prec in no bf16; do
  P="$W/palette_$prec"; FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  run "palette_train_$prec" "${PK[@]}" train palette "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=30 --out "$P" -q
  run "palette_resume_$prec" "${PK[@]}" train palette "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=60 --out "$P" --resume -q
  run "palette_reg_$prec" "${PK[@]}" train palette_regression "${PTINY[@]}" --set "train.mixed_precision=$prec" --set train.steps=30 --out "$P.reg" -q
  for t in colorize inpaint uncrop jpeg panorama; do
    run "restore_${prec}_$t" "${PK[@]}" restore data:0 --task "$t" -m "$P" --device "$DEVICE" "${FLAG[@]}" --steps 10 --samples 2 --quality 10 -o "$W/r_${prec}_$t.png" -q
  done
  for s in "ddpm 20" "ddim 10" "dpm++2m 10"; do
    set -- $s
    run "restore_${prec}_$1" "${PK[@]}" restore data:1 --task inpaint --mask freeform -m "$P" --device "$DEVICE" "${FLAG[@]}" --sampler "$1" --steps "$2" -o "$W/ri_${prec}_$1.png" -q
  done
  run "restore_reg_$prec" "${PK[@]}" restore data:2 --task jpeg --quality 5 -m "$P.reg" --device "$DEVICE" "${FLAG[@]}" -o "$W/rr_$prec.png" -q
done
# Latent diffusion: autoencoder (with the discriminator) -> text + map + layout latent model -> generate / inpaint
ATINY=(--set data.length=256 --set train.batch_size=16 --set train.log_every=10 --set train.save_every=20
       --set train.sample_every=20 --set train.num_preview=4 --set "train.device=$DEVICE")
for prec in no bf16; do
  A="$W/ae_$prec"; L="$W/ldm_$prec"; FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
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
done
# unCLIP: CLIP -> prior + decoder on it -> super-resolution upsampler -> resume -> the three unclip modes
UTINY=(--set data.length=256 --set train.log_every=10 --set train.save_every=20 --set train.sample_every=20
       --set train.num_preview=4 --set "train.device=$DEVICE")
for prec in no bf16; do
  C="$W/clip_$prec"; PR="$W/prior_$prec"; D="$W/dec_$prec"; U="$W/up_$prec"; M=(--set "train.mixed_precision=$prec")
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
done
# DreamBooth: the demo subject on the shipped t2i, full fine-tuning -> resume, LoRA with a learnt token -> generate
for prec in no bf16; do
  B="$W/db_$prec"; FLAG=(); [ "$prec" = bf16 ] && FLAG=(--bf16)
  M=(--class-images 4 --set "train.mixed_precision=$prec" --set "train.device=$DEVICE" --set dreambooth.class_steps=10)
  run "dreambooth_train_$prec" "${PK[@]}" dreambooth --subject demo --out "$B" --steps 10 "${M[@]}" -q
  run "dreambooth_resume_$prec" "${PK[@]}" dreambooth --subject demo --out "$B" --steps 20 "${M[@]}" --resume -q
  run "dreambooth_lora_$prec" "${PK[@]}" dreambooth --subject demo --out "$B.lora" --steps 10 --lora 4 --train-token "${M[@]}" -q
  for m in "$B" "$B.lora/lora"; do
    run "dreambooth_generate_${prec}_$(basename "$m")" "${PK[@]}" generate "a sks star at the bottom right on a red background" \
        -m "$m" --device "$DEVICE" "${FLAG[@]}" --steps 10 -n 2 -o "$W/db_${prec}_$(basename "$m").png" -q
  done
done
run "unclip_shipped" "${PK[@]}" unclip "a small blue star at the center on a white background" --device "$DEVICE" -o "$W/unclip.png" -q
run "generate_shipped" "${PK[@]}" generate "a small green square in the center on a white background" --device "$DEVICE" -o "$W/t2i.png" -q
run "sample_shipped" "${PK[@]}" sample -m fashion_mnist --device "$DEVICE" --steps 20 -n 16 -o "$W/shipped.png" -q
echo "SMOKE PASSED: all steps on $DEVICE ($W)"
