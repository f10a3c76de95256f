#!/usr/bin/env bash
# ml-100k: popularity vs ID vs text vs MoM (50% synthetic poster images), 2 Ray workers, ZeRO-2.
# Each model is the same command with one config change. Usage: bash benchmarks/ml100k.sh [extra --set ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
SRC=../shared/data/ml-100k
[ -f data/ml-100k-mom/manifest.json ] || transrec prepare movielens --src $SRC --out data/ml-100k-mom --image-fraction 0.5
[ -f data/ml-100k-text/manifest.json ] || transrec prepare movielens --src $SRC --out data/ml-100k-text --image-fraction 0
run() {  # name, then overrides
  local name=$1; shift
  rm -rf "runs/$name"
  local start=$SECONDS
  transrec pretrain --config configs/movielens.yaml --set name="$name" "$@" > "runs/$name.log" 2>&1
  echo "$name wall_s=$((SECONDS - start))" | tee -a runs/ml100k-walltimes.txt
}
mkdir -p runs
run ml-100k-mom "$@"
run ml-100k-text --set data.path=data/ml-100k-text "$@"
run ml-100k-id --set model.item_encoder=id "$@"
python benchmarks/results_table.py runs/ml-100k-mom runs/ml-100k-text runs/ml-100k-id
