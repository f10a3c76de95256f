#!/usr/bin/env bash
# ml-100k, converged models over 3 seeds: popularity, ID (SASRec), two-stage text (frozen MiniLM, each item's
# vector computed once), end-to-end text, MoM (half the items as SYNTHETIC posters), video (a quarter of the items
# as SYNTHETIC posters, a quarter as SYNTHETIC clips; not in the default list: hours on a CPU). Each model is one
# preset, ml100k-MODEL (transrec/configs/), early-stopped on valid NDCG@10; each seed changes the initial
# weights, the negatives and the data order. Writes runs/ml100k-report.md (mean ± sd) and runs/ml100k-report.png.
# Usage: bash benchmarks/ml100k.sh [MODEL ...]   (default: id twostage text mom; SEEDS="0 1 2")
# The user-encoder zoo: ENCODERS="sasrec bert4rec gru4rec nextitnet" (default sasrec, the presets' own) runs
# each model with each `model.user_encoder`; a run other than sasrec is named ml100k-MODEL-ENCODER-sSEED.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
SRC=../shared/data/ml-100k
SEEDS=${SEEDS:-0 1 2}
ENCODERS=${ENCODERS:-sasrec}
MODELS=${*:-id twostage text mom}
[ -f data/ml-100k-mom/manifest.json ] || transrec prepare movielens --src $SRC --out data/ml-100k-mom --image-fraction 0.5
[ -f data/ml-100k-text/manifest.json ] || transrec prepare movielens --src $SRC --out data/ml-100k-text --image-fraction 0
[ -f data/ml-100k-video/manifest.json ] || transrec prepare movielens --src $SRC --out data/ml-100k-video \
  --image-fraction 0.25 --video-fraction 0.25
mkdir -p runs
for model in $MODELS; do
  for encoder in $ENCODERS; do
    for seed in $SEEDS; do
      if [ "$encoder" = sasrec ]; then name=ml100k-$model-s$seed; else name=ml100k-$model-$encoder-s$seed; fi
      rm -rf "runs/$name"
      start=$SECONDS
      transrec pretrain --config "ml100k-$model" --set name="$name" --set train.seed="$seed" \
        --set data.shuffle_seed="$seed" --set model.user_encoder="$encoder" > "runs/$name.log" 2>&1
      echo "{\"name\": \"$name\", \"wall_s\": $((SECONDS - start))}" | tee -a runs/ml100k-walls.jsonl
    done
  done
done
python benchmarks/seeds_report.py --walls runs/ml100k-walls.jsonl --out runs/ml100k-report runs/ml100k-*-s[0-9]*
