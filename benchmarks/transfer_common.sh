# Sourced by the transfer benchmarks (ml100k_transfer.sh, synthetic_transfer.sh): the source model, pretrained and
# exported once, and the study's --set overrides.

# pretrain_and_export NAME DATA: the ml100k-text model pretrained on DATA as runs/NAME and exported to
# exports/NAME, unless that export exists.
pretrain_and_export() {
  local name=$1 data=$2
  [ -f "exports/$name/config.json" ] && return
  rm -rf "runs/$name"
  transrec pretrain --config ml100k-text --set name="$name" --set data.path="$data"
  transrec export --run "runs/$name" --out "exports/$name"
}

# SETS="a=1 b=2" -> the array study_sets=(--set a=1 --set b=2), for every run of a study.
study_sets=()
for item in ${SETS:-}; do study_sets+=(--set "$item"); done
