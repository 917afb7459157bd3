#!/usr/bin/env bash
# `make evaluation`: re-run `evaluate` on the committed weights without retraining anything.
#
# The same phantom data as `make weights` (same command, seed and options as weights/MANIFEST.json
# records), the three feature stores extracted with the committed (float16) weights, then
# `evaluate` with the recipe's bootstrap and seed, written to REPORT (default docs/evaluation).
# Finished steps are skipped when run again (delete WORK to start over).
#
#   scripts/evaluate_committed.sh [WORK=build/reeval] [REPORT=docs/evaluation]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${1:-build/reeval}
REPORT=${2:-docs/evaluation}
SEED=20261124
SIZE=768x480
CLI=("$PY" -m napari_mammo_sae)
mkdir -p "$WORK/stores"

if [ ! -f "$WORK/phantom/finding_annotations.csv" ]; then
  "${CLI[@]}" phantom --out "$WORK/phantom" --studies 160 --seed "$SEED" \
    --mass-rate 0.3 --calc-rate 0.3 --size medium --workers 1
fi
extract() {  # weights folder, store
  if [ ! -f "$2" ]; then
    "${CLI[@]}" extract --data "$WORK/phantom" --weights "$1" --out "$2" --workers 1 \
      --device auto --dtype fp16 --preprocess mammoclip --input-size "$SIZE"
  fi
}
extract weights/pretrained-calcification "$WORK/stores/pretrained.h5"
extract weights/finetuned-mass "$WORK/stores/finetuned-mass.h5"
extract weights/finetuned-calcification "$WORK/stores/finetuned-calcification.h5"

"${CLI[@]}" evaluate \
  --store "$WORK/stores/pretrained.h5" "$WORK/stores/finetuned-mass.h5" \
  "$WORK/stores/finetuned-calcification.h5" \
  --sae weights/sae-finetuned-calcification \
  --heads weights/pretrained-mass weights/pretrained-calcification weights/finetuned-mass \
  weights/finetuned-calcification \
  --data "$WORK/phantom" --out "$REPORT" --bootstrap 1000 --seed "$SEED" --device auto
