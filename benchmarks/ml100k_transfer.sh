#!/usr/bin/env bash
# Transfer on ml-100k: pretrain MoM on domain a, then on domain b (no user and no item in common with a):
# zero-shot, fine-tuned full / top-k blocks / adapters, and from scratch. Half of the items of each domain are
# shown as SYNTHETIC posters. Usage: bash benchmarks/ml100k_transfer.sh [extra --set ... for every run]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
SRC=../shared/data/ml-100k
for domain in a b; do
  [ -f data/ml-100k-$domain/manifest.json ] ||
    transrec prepare movielens --src $SRC --out data/ml-100k-$domain --image-fraction 0.5 --domain $domain
done
mkdir -p runs exports
timed() {  # name, then the command; its output goes to runs/NAME.log
  local name=$1; shift
  local start=$SECONDS
  "$@" > "runs/$name.log" 2>&1
  echo "$name wall_s=$((SECONDS - start))" | tee -a runs/ml100k-transfer-walltimes.txt
}
train() {  # pretrain|finetune, name, then overrides
  local command=$1 name=$2; shift 2
  rm -rf "runs/$name"
  timed "$name" transrec "$command" --config ml100k-mom --set name="$name" "$@"
}
train pretrain ml100k-a-pretrain --set data.path=data/ml-100k-a "$@"
rm -rf exports/ml100k-a && transrec export --run runs/ml100k-a-pretrain --out exports/ml100k-a
timed ml100k-b-zero-shot transrec evaluate --export exports/ml100k-a --data data/ml-100k-b --config ml100k-mom
sed -n '/^{/,$p' runs/ml100k-b-zero-shot.log > runs/ml100k-b-zero-shot.json
for mode in full top_k adapters; do
  train finetune "ml100k-b-$mode" --from exports/ml100k-a --set data.path=data/ml-100k-b --set train.finetune_mode=$mode "$@"
done
train pretrain ml100k-b-scratch --set data.path=data/ml-100k-b "$@"
python benchmarks/results_table.py runs/ml100k-b-zero-shot.json runs/ml100k-b-full runs/ml100k-b-top_k \
  runs/ml100k-b-adapters runs/ml100k-b-scratch
