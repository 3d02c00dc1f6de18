#!/usr/bin/env bash
# The recipe that produced src/qalign/weights/qalign-tiny (see MODEL_CARD.md).
#
#   bash recipes/qalign-tiny.sh            # or: make recipe
#
# 1. corpus: KADID-10k's 25 distortions on the pristine photos (2 random levels per type and photo),
#    each labelled with KADID's human mean score for that (type, level); 20% of photos held out.
# 2. train: stage 1 (4 epochs): the abstractor alone learns to read the score from the frozen vision
#    features through a linear readout; stage 2: Q-Align syllabus (one-hot levels; SOFT=1 for DeQA
#    soft labels), abstractor + LoRA r16 on SmolLM2.
# 3. eval: the held-out photos' images, float32, through the normal scoring path.
# Seed 0 everywhere. Stage times are printed; the whole run must stay under 60 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
QALIGN=${QALIGN:-.venv/bin/qalign}
PRISTINE=${PRISTINE:-../shared/data/pristine}
OUT=${OUT:-runs/recipe}
EPOCHS=${EPOCHS:-1}
ALIGN_EPOCHS=${ALIGN_EPOCHS:-4}
LABEL_FLAG=""
[ "${SOFT:-0}" = "1" ] && LABEL_FLAG="--soft-labels"

start=$SECONDS
"$QALIGN" data synth --pristine "$PRISTINE" --out "$OUT/corpus" --levels-per-type 2 --seed 0 --workers 2 --quiet
echo "recipe: corpus done after $((SECONDS - start)) s"
"$QALIGN" train --data "$OUT/corpus/labels.csv" --model qalign-tiny-base --output "$OUT/model" \
  --align-epochs "$ALIGN_EPOCHS" --epochs "$EPOCHS" --batch-size 16 --lr 3e-4 --lora-r 16 --seed 0 $LABEL_FLAG
echo "recipe: training done after $((SECONDS - start)) s"
"$QALIGN" eval --data "$OUT/corpus/labels.csv" --split test --model "$OUT/model" --report "$OUT/eval"
echo "recipe: finished after $((SECONDS - start)) s"
