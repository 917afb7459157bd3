#!/bin/bash
# Two more SAEs on the committed finetuned-calcification feature store, probed and read with
# cue_neurons.py (docs/evaluation_discussion.md, "Other SAEs on the same features").
# Needs the scratch folder of a `make weights` run (default build/recipe). About 35 min on 2 cores.
# Usage: scripts/sae_variants.sh [WORK] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-build/recipe}
OUT=${2:-build/exp}
S=$WORK/stores/finetuned-calcification.h5
CLI=.venv/bin/napari-mammo-sae
common=(--store "$S" --split training --lr 0.0005 --batch-size 4096 --epochs 10 --fraction 1.0
        --seed 20261124 --device cpu --quiet)
for spec in "topk32:--kind topk --k 32 --d-latent 5120 --k-aux 256" \
            "relu8x:--kind relu --d-latent 10240 --l1-coefficient 0.0008 --resample-every-epochs 3"; do
  name=${spec%%:*}
  read -r -a flags <<< "${spec#*:}"
  [ -f "$OUT/$name/model.safetensors" ] || $CLI train "${common[@]}" --out "$OUT/$name" "${flags[@]}"
  $CLI probe --store "$S" --sae "$OUT/$name" --head weights/finetuned-calcification \
    --concept calcification --out "$OUT/$name-probe.npz" --split training --top-k 50 --device cpu
  .venv/bin/python scripts/cue_neurons.py --store "$S" --sae "$OUT/$name" \
    --probe "$OUT/$name-probe.npz" --data "$WORK/phantom" --split test | tee "$OUT/$name-cue.txt"
done
