#!/usr/bin/env bash
# Transfer against domain distance, on SYNTHETIC data (text items only): the source is the shift-0 world (seed 0),
# each target another draw of users and items (seed 1) from a world moved `shift` of the way to another one (its
# topics' words and succession taken from partner topics: `prepare synthetic --shift`). Pretrains the end-to-end
# text model (ml100k-text preset) on the source, exports it, then runs `transrec transfer` on each target, and
# tabulates fine-tuned against scratch by shift (benchmarks/transfer_distance.py).
# Usage: bash benchmarks/synthetic_transfer.sh   (SHIFTS="0 0.5 1" FRACTIONS=0.1 SEEDS=3 METHODS=fine-tuned,scratch
#        SETS="train.patience_steps=60 train.lr=0.001": overrides for every run of every study)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
SHIFTS=${SHIFTS:-0 0.5 1}
FRACTIONS=${FRACTIONS:-0.1}
SEEDS=${SEEDS:-3}
METHODS=${METHODS:-fine-tuned,scratch}
SOURCE=(--users 1000 --items 600 --image-fraction 0)
TARGET=(--users 500 --items 400 --image-fraction 0)
. benchmarks/transfer_common.sh
mkdir -p runs exports
[ -f data/syn-source/manifest.json ] || transrec prepare synthetic --out data/syn-source --seed 0 "${SOURCE[@]}"
pretrain_and_export syn-source data/syn-source
studies=()
for shift in $SHIFTS; do
  [ -f "data/syn-target-shift$shift/manifest.json" ] || transrec prepare synthetic --out "data/syn-target-shift$shift" \
    --seed 1 --shift "$shift" "${TARGET[@]}"
  transrec transfer --from exports/syn-source --data "data/syn-target-shift$shift" --config ml100k-text \
    "${study_sets[@]}" --fractions "$FRACTIONS" --seeds "$SEEDS" --methods "$METHODS" --out "runs/transfer-shift$shift"
  studies+=("$shift=runs/transfer-shift$shift")
done
python benchmarks/transfer_distance.py --fractions "$FRACTIONS" --seeds "$SEEDS" --methods "$METHODS" \
  --out runs/transfer-distance "${studies[@]}"
