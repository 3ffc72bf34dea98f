#!/usr/bin/env bash
# The main job: sets itself up on a fresh machine, then runs the whole method on Fashion-MNIST with the shipped
# models: the 12 sample images of examples/fashion-mnist/ are inverted (encoder -> regularized refinement ->
# pivotal tuning), three InterFaceGAN directions are trained from the generator (pullover <-> coat,
# sneaker <-> ankle boot, brightness), applied to every inverted image and measured (LEC, the change of the
# evaluation classifier's score, distance to the reconstruction), and a report is written.
#
#   scripts/demo.sh [OUT]        # OUT defaults to out/demo; about 5 minutes on 2 CPU cores after set-up
#
# Output: OUT/run/report.html (the page), OUT/run/report.png (the grid), OUT/run/edits/EDIT/ (the edited images),
# OUT/directions/*.safetensors (the directions). Re-running into the same OUT resumes the inversion and keeps the
# directions already trained. Environment overrides (for development with other models): DEMO_GENERATOR,
# DEMO_ENCODER (files or shipped names), DEMO_IMAGES (a folder), DEMO_SAMPLES (generator samples per direction,
# default 5000), DEMO_TUNE_STEPS (pivotal tuning steps at most, default 150), DEMO_STRENGTHS (one list for all
# edits), DEMO_DEVICE.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"

OUT="${1:-$ROOT/out/demo}"
GENERATOR="${DEMO_GENERATOR:-fmnist-generator}"
ENCODER="${DEMO_ENCODER:-fmnist-encoder}"
IMAGES="${DEMO_IMAGES:-$ROOT/examples/fashion-mnist}"
SAMPLES="${DEMO_SAMPLES:-5000}"
TUNE_STEPS="${DEMO_TUNE_STEPS:-150}"
STRENGTHS="${DEMO_STRENGTHS:-}"  # empty: each edit its own (below)
DEVICE="${DEMO_DEVICE:-auto}"
RUN="$OUT/run"
DIRS="$OUT/directions"
SECONDS=0

step() { printf '\n[demo %d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

mkdir -p "$OUT" "$DIRS"
step "models: generator $GENERATOR, encoder $ENCODER; images: $IMAGES; output: $OUT"
cycle-encoding info --brief "$GENERATOR"   # everything about a file: cycle-encoding info FILE
cycle-encoding info --brief "$ENCODER"

step "1/4 inverting the sample images: encoder -> refine -> tune (at most $TUNE_STEPS tuning steps each)"
cycle-encoding invert "$IMAGES" --generator "$GENERATOR" --encoder "$ENCODER" --stages encoder,refine,tune \
  --perceptual fmnist-features --identity fmnist-features --train-data fashion-mnist \
  --tune-steps "$TUNE_STEPS" --device "$DEVICE" --out "$RUN"

# name | classifier and attribute the direction is trained with | classifier and attribute the edit is measured
# with (fmnist-eval: the network no training loss uses) | strengths (the directions are unit vectors in W; positive
# = towards the first class of "A vs B", brighter). Brightness is entangled with the kind of garment in this
# generator (dark = shoes, bright = tops), so its edits stay small.
EDITS=(
  "coat-pullover|fmnist-features|Coat vs Pullover|fmnist-eval|Coat vs Pullover|-6,-3,0,3,6"
  "ankle-boot-sneaker|fmnist-features|Ankle boot vs Sneaker|fmnist-eval|Ankle boot vs Sneaker|-6,-3,0,3,6"
  "brightness|brightness||brightness||-2,-1,0,1,2"
)

step "2/4 training the edit directions (InterFaceGAN, $SAMPLES generator samples each)"
for spec in "${EDITS[@]}"; do
  IFS='|' read -r name clf attr _ _ _ <<<"$spec"
  file="$DIRS/$name.safetensors"
  if [[ -f "$file" ]]; then
    echo "$file: already trained, kept"
    continue
  fi
  echo "direction $name: classifier $clf${attr:+, attribute \"$attr\"}"
  args=(--generator "$GENERATOR" --classifier "$clf" --samples "$SAMPLES" --name "$name" --device "$DEVICE")
  [[ -n "$attr" ]] && args+=(--attribute "$attr")
  cycle-encoding directions train "${args[@]}" --out "$file"
done

step "3/4 editing every inverted image (measured: LEC, the classifier's score change, MSE to the reconstruction)"
for spec in "${EDITS[@]}"; do
  IFS='|' read -r name _ _ mclf mattr strengths <<<"$spec"
  args=(--direction "$DIRS/$name.safetensors" --name "$name" --strengths="${STRENGTHS:-$strengths}" --lec
    --classifier "$mclf" --preservation mse --device "$DEVICE" --quiet)
  [[ -n "$mattr" ]] && args+=(--attribute "$mattr")
  cycle-encoding edit "$RUN" "${args[@]}"
done

step "4/4 writing the report"
cycle-encoding report "$RUN"

elapsed=$SECONDS
dir_files="$(printf ' %q' "$DIRS"/*.safetensors)"
cat <<EOF

demo finished in $((elapsed / 60)) min $((elapsed % 60)) s (after set-up). Where everything is:
  report (open in a browser)       $RUN/report.html
  grid (input, stages, edits)      $RUN/report.png
  numbers                          $RUN/report.json, $RUN/summary.json
  edited images                    $RUN/edits/{coat-pullover,ankle-boot-sneaker,brightness}/NAME/*.png (+ NAME_strip.png)
  directions                       $DIRS/{coat-pullover,ankle-boot-sneaker,brightness}.safetensors
  per-image inversion              $RUN/images/NAME/ (target, reconstruction after each stage, pivots, tuned generator)

Edit these images in the browser (a slider per direction above, and the generator's SeFa / GANSpace ones):
  $(printf '%q' "$VENV/bin/cycle-encoding") ui $(printf '%q' "$RUN") --directions$dir_files
  then open http://127.0.0.1:7860/ (this machine only; Ctrl-C stops it)
EOF
