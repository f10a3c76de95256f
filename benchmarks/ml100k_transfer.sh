#!/usr/bin/env bash
# Transfer on real data: ml-100k split into two domains with no user and no item in common, by genre (a =
# dramas and comedies, b = the rest; the users in seeded halves) or at random (items in seeded halves).
# Pretrains the end-to-end text model (ml100k-text preset) on a, exports it, then runs `transrec transfer` on b:
# popularity, zero-shot, two-stage, fine-tuned, top-k, adapters, fresh-user-encoder and scratch against the share of b's
# training users kept, 3 seeds each. Writes runs/transfer-SPLIT/report.md and report.png.
# Usage: bash benchmarks/ml100k_transfer.sh [genre|random ...]   (FRACTIONS="0.1,0.25,1" SEEDS=3 METHODS=...
#        SETS="train.patience_steps=60 train.lr=0.001": overrides for every run of the study;
#        SUFFIX=-steps60: the study goes to runs/transfer-SPLIT-steps60)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
SRC=../shared/data/ml-100k
FRACTIONS=${FRACTIONS:-0.1,0.25,1}
SEEDS=${SEEDS:-3}
METHODS=${METHODS:-two-stage,fine-tuned,top-k,adapters,fresh-user-encoder,scratch}
. benchmarks/transfer_common.sh
mkdir -p runs exports
for split in ${*:-genre random}; do
  for domain in a b; do
    [ -f "data/ml-100k-$split-$domain/manifest.json" ] || transrec prepare movielens --src $SRC \
      --out "data/ml-100k-$split-$domain" --domain $domain --split "$split"
  done
  pretrain_and_export "ml100k-$split-a" "data/ml-100k-$split-a"
  transrec transfer --from "exports/ml100k-$split-a" --data "data/ml-100k-$split-b" --config ml100k-text \
    "${study_sets[@]}" --fractions "$FRACTIONS" --seeds "$SEEDS" --methods "$METHODS" \
    --out "runs/transfer-$split${SUFFIX:-}"
done
