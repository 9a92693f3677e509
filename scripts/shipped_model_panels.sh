#!/usr/bin/env bash
# Draw the README's panels of the shipped face model on real photos that ship inside installed packages
# (scikit-image's astronaut, matplotlib's grace_hopper.jpg), cropped like the generated faces, and on two
# generated test faces. Writes docs/shipped-model/<name>.png (each one demo summary.png).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -c "from trainer.results.sample_photos import write_sample_photos; write_sample_photos('$WORK/in', 128)"
for name in 000000 000003; do
  cp "data/faces/test/image/${name}_image.png" "$WORK/in/generated_${name}.png"
done
unsup3d demo --input "$WORK/in" --out "$WORK/out" --gif-frames 4 >/dev/null
mkdir -p docs/shipped-model
for folder in "$WORK"/out/*/; do
  cp "$folder/summary.png" "docs/shipped-model/$(basename "$folder").png"
done
ls docs/shipped-model
