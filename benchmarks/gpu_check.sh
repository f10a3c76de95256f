#!/usr/bin/env bash
# Every GPU path of transrec on one GPU machine, in under 8 minutes, for a session that is lent one:
#   1. DALI's GPU JPEG decoder ("mixed", nvJPEG; picked by itself under CUDA) against PIL, on the ml-100k posters
#   2. bf16 train steps under NCCL through DeepSpeed (1 rank): the end-to-end text preset and the MoM preset,
#      30 steps each, no evaluation: seconds per step, MFU (model FLOPs over the GPU's measured bf16 peak)
#   3. full ranking of 1M items (dim 256, 65,536 users) on the GPU: benchmarks/eval_scale.py
#   4. an LLM-size item tower: OPT-1.3B's shape (random weights) fully trained in bf16 under ZeRO-3, built inside
#      deepspeed.zero.Init and read shard by shard: seconds per step, items/s (benchmarks/llm_tower.py)
# Needs the stack of scripts/setup.sh on that machine (a venv at .venv is used when present) and the ml-100k
# files at $ML100K (default ../shared/data/ml-100k; data/ml-100k-* are reused when already prepared).
# Logs go to ${OUT:-runs/gpu-check}; put the numbers in benchmarks/README.md with the date and the machine.
# Without a GPU it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then . .venv/bin/activate; export PATH="$PWD/.venv/bin:$PATH"; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no GPU on this machine (torch.cuda.is_available() is False): nothing checked"
  exit 0
fi
LOG=${OUT:-runs/gpu-check}
SRC=${ML100K:-../shared/data/ml-100k}
mkdir -p "$LOG"
python -c "import torch; print(torch.cuda.get_device_name())" | tee "$LOG/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG/device.txt" || true
[ -f data/ml-100k-mom/manifest.json ] || python -m transrec.launcher.cli prepare movielens --src "$SRC" \
  --out data/ml-100k-mom --image-fraction 0.5
[ -f data/ml-100k-text/manifest.json ] || python -m transrec.launcher.cli prepare movielens --src "$SRC" \
  --out data/ml-100k-text

echo "== 1. DALI mixed (GPU) vs PIL decode"
timeout 120 python benchmarks/data_loader.py decode --data data/ml-100k-mom --threads 4 | tee "$LOG/decode.jsonl"

echo "== 2. bf16 train steps, NCCL, DeepSpeed ZeRO-2"
for preset in text mom; do
  timeout 180 python - "$preset" "$LOG" <<'PY' | tee -a "$LOG/train.txt"
import json, shutil, sys
from pathlib import Path
from transrec.trainer.torchrun_entry import launch
preset, log = sys.argv[1], Path(sys.argv[2])
run = log / "runs" / f"gpu-{preset}"
shutil.rmtree(run, ignore_errors=True)
result = launch(1, f"ml100k-{preset}", [f"name=gpu-{preset}", f"output_dir={run.parent}",
                "train.max_steps=30", "train.log_every=5", "eval.every_epochs=0", "train.precision=auto"], timeout=170)
(log / f"train-{preset}.stderr").write_text(result.stderr[-20000:])
if result.returncode:
    sys.exit(f"{preset}: exit {result.returncode}; see {log}/train-{preset}.stderr")
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
machine = next(r for r in records if r["kind"] == "machine")
steps = [r for r in records if r["kind"] == "train" and r["step"] > 10]
print(json.dumps({"preset": preset, "dtype": machine["dtype"], "peak_tflops": machine["matmul_peak_tflops"],
                  "sequences_per_s": sum(r["sequences_per_s"] for r in steps) / len(steps),
                  "mfu": sum(r["mfu"] for r in steps) / len(steps),
                  "mfu_real_tokens": sum(r["mfu_real_tokens"] for r in steps) / len(steps)}))
PY
done

echo "== 3. full ranking, 1M items"
timeout 120 python benchmarks/eval_scale.py --items 1000000 --dim 256 --users 65536 --batch 4096 --device cuda \
  | tee "$LOG/ranking.txt"

echo "== 4. LLM-size item tower (OPT-1.3B shape), bf16 train steps, ZeRO-3 under zero.Init"
timeout 300 python benchmarks/llm_tower.py --shapes opt-1.3b --settings zero3 --ranks 1 --steps 10 \
  --batch-size 16 --trainable-blocks -1 --workdir "$LOG/llm-tower" --timeout 240 | tee "$LOG/llm-tower.txt"
