#!/usr/bin/env bash
# The main job: sets itself up on a fresh machine, then runs the most complete pipeline that exists.
# Today (foundation stage): build a StyleGAN2, write it in the project's format and in rosinality's,
# read both back, describe them, and render seeds to PNGs and a grid. Output: out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
OUT="${1:-$ROOT/out/demo}"
mkdir -p "$OUT"
python scripts/demo_foundation.py --out "$OUT"
cycle-encoding info "$OUT/generator.pt"
cycle-encoding generate --generator "$OUT/generator.pt" --seeds 0-15 --truncation 0.7 --out "$OUT/samples"
echo "demo finished: see $OUT (samples/grid.png, generator.safetensors, generator.pt)"
