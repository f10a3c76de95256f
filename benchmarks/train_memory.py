"""Why a CPU rank's memory grew over a long run: train steps of an image tower whose batch size (the batch's
distinct image items) changes at every step, as in training, under several allocator/oneDNN settings.

Each setting runs in a fresh process (oneDNN reads its setting once): `--steps`
forward+backward passes of timm `--model` on N random images, N drawn from [--min-items, --max-items] with
the same seed for every setting; prints the resident memory every 10 steps and the mean time per step.

    python benchmarks/train_memory.py --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

SETTINGS = {  # name -> environment; {} = the trainer's bound_host_memory(), nothing set beforehand
    "oneDNN cache 1024 (torch's default)": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"},
    "oneDNN cache 128": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"},
    "oneDNN cache 0": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
    "the trainer's bound_host_memory() (cache 128 + mmap threshold 4 MiB)": {},
}
BOUNDS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_MMAP_THRESHOLD_")


def run_steps(args) -> dict:
    import psutil
    import timm
    import torch

    if not os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        from transrec.trainer.host_memory import bound_host_memory

        bound_host_memory()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0).to(torch.bfloat16)
    process, rss, started = psutil.Process(), {}, time.perf_counter()
    for step in range(1, args.steps + 1):
        n = rng.randint(args.min_items, args.max_items)
        images = torch.randn(n, 3, args.image_size, args.image_size, dtype=torch.bfloat16)
        model(images).float().sum().backward()
        model.zero_grad(set_to_none=True)
        if step % 10 == 0:
            rss[step] = round(process.memory_info().rss / 2**30, 2)
    return {"rss_gib": rss, "s_per_step": (time.perf_counter() - started) / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--min-items", type=int, default=100)
    parser.add_argument("--max-items", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_steps(args)))
        return
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, *sys.argv, "--child"], env={**{k: v for k, v in os.environ.items() if k not in BOUNDS}, **env}, check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.splitlines()[-1])
        print(f"{name}: {result['s_per_step']:.2f} s/step; RSS GiB by step {result['rss_gib']}", flush=True)


if __name__ == "__main__":
    main()
