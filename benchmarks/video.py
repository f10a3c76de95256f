"""What video items cost: clips decoded per second (DALI against PyAV; DALI's GPU decoder where CUDA is), bytes per
clip, and a train step's time and items/s when its items are videos against when they are images.

    python benchmarks/video.py decode [--clips 256] [--frames 16] [--size 96] [--k 4] [--batch 64] [--threads 2]
    python benchmarks/video.py step [--config demo] [--items 256] [--steps 6] [--warmup 2]
    python benchmarks/video.py decode --smoke; python benchmarks/video.py step --smoke   # seconds, to check it runs

Every clip and poster is SYNTHETIC (writers/clips.py, writers/posters.py). `step` times one process's forward,
backward and optimizer step of the config's model on batches whose items are all images, then all videos (decoded
content: random pixels; no data loading), each item's frames drawn anew each step as in training. Prints JSON lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from transrec.batch import Batch, ItemBatch
from transrec.config import load_config
from transrec.dataloading.videos import VideoDecoder, sample_frames
from transrec.models import TransRec
from transrec.writers.clips import render_clip
from transrec.writers.posters import SHAPES, render_poster, tag_color

SMOKE = {"decode": {"clips": 8, "frames": 8, "size": 32, "k": 4, "batch": 4},
         "step": {"config": "tiny", "items": 16, "steps": 2, "warmup": 1, "batch_size": 8}}


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def decode(args) -> None:
    looks = [(f"item {i}", [tag_color(f"genre {i % 7}"), tag_color(f"genre {i % 5}/accent")], SHAPES[i % len(SHAPES)],
              i, args.size) for i in range(args.clips)]
    clips = [np.frombuffer(render_clip(*look, args.frames), np.uint8) for look in looks]
    posters = [render_poster(*look) for look in looks]
    print_json({"synthetic_clips": args.clips, "frames": args.frames, "size": args.size, "codec": "vp9/webm",
                "bytes_per_clip": round(float(np.mean([len(c) for c in clips]))),
                "bytes_per_poster_jpeg": round(float(np.mean([len(p) for p in posters]))),
                "bytes_per_raw_clip": args.frames * args.size * args.size * 3})
    ids = np.arange(args.clips)
    indices = sample_frames(np.full(args.clips, args.frames), args.k)
    for backend in ("dali", "pyav"):
        decoder = VideoDecoder(args.size, args.k, backend, max_batch=args.batch, num_threads=args.threads)
        decoder.decode(clips[:args.batch], indices[:args.batch], ids[:args.batch])  # warm-up: DALI builds its pipeline
        start = time.perf_counter()
        for first in range(0, args.clips, args.batch):
            rows = slice(first, first + args.batch)
            decoded = decoder.decode(clips[rows], indices[rows], ids[rows])
        if decoded.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        device = ("gpu (mixed)" if decoder.device.type == "cuda" else "cpu") if backend == "dali" else "cpu"
        print_json({"backend": backend, "device": device, "threads": args.threads if backend == "dali" else 1,
                    "frames_per_clip_decoded": args.k, "clips_per_s": round(args.clips / seconds, 1),
                    "frames_per_s": round(args.clips * args.k / seconds, 1)})


def synthetic_batch(num_items: int, batch_size: int, length: int, kind: str, frames: int, size: int, step: int,
                    rng: np.random.Generator, device: torch.device) -> Batch:
    """`batch_size` histories of `length` + 1 items among `num_items`, every item an image or every item a video."""
    sequences = rng.integers(0, num_items, (batch_size, length + 1))
    ids = np.unique(sequences)
    rows = torch.from_numpy(np.searchsorted(ids, sequences))
    every = torch.arange(len(ids))
    none = torch.zeros(0, dtype=torch.int64)
    content = {"image_rows": every, "images": torch.randn(len(ids), 3, size, size)} if kind == "image" else {
        "image_rows": none, "images": None, "video_rows": every, "clips": torch.randn(len(ids), frames, 3, size, size),
        "frame_indices": torch.from_numpy(sample_frames(np.full(len(ids), 16), frames, ids, seed=(0, step)))}
    items = ItemBatch(ids=torch.from_numpy(ids), text_rows=none, input_ids=torch.zeros(0, 1, dtype=torch.int64),
                      attention_mask=torch.zeros(0, 1, dtype=torch.int64), **content)
    mask = torch.ones(batch_size, length, dtype=torch.bool)
    return Batch(items=items, row_ids=torch.from_numpy(ids), users=torch.arange(batch_size), history=rows[:, :-1],
                 history_mask=mask, targets=rows[:, 1:], target_mask=mask.clone(),
                 negatives=torch.zeros(batch_size, length, 0, dtype=torch.int64)).to(device)


def step(args) -> None:
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = min(cfg.model.max_seq_len, 20)
    batch_size = args.batch_size or cfg.train.batch_size
    for kind in ("image", "video"):
        torch.manual_seed(0)
        model = TransRec(dataclasses.replace(cfg.model, num_items=args.items)).to(device, dtype)
        optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.encoder_lr, 0.0))
        rng = np.random.default_rng(0)
        times, encoded = [], []
        for number in range(args.warmup + args.steps):
            batch = synthetic_batch(args.items, batch_size, length, kind, cfg.model.video.frames,
                                    cfg.model.image.image_size, number, rng, device)
            start = time.perf_counter()
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if number >= args.warmup:
                times.append(time.perf_counter() - start)
                encoded.append(batch.items.ids.numel())
        print_json({"config": args.config, "items": kind, "device": device.type, "dtype": str(dtype),
                    "frames_per_video": cfg.model.video.frames if kind == "video" else None,
                    "image_cache_frozen": cfg.model.image.cache_frozen, "batch_size": batch_size,
                    "items_per_step": round(float(np.mean(encoded)), 1), "step_s": round(float(np.mean(times)), 4),
                    "items_per_s": round(sum(encoded) / sum(times), 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("decode", help="clips decoded per second and bytes per clip")
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--frames", type=int, default=16, help="frames of each clip")
    p.add_argument("--size", type=int, default=96, help="frame width and height (the decoder's output too)")
    p.add_argument("--k", type=int, default=4, help="frames decoded per clip")
    p.add_argument("--batch", type=int, default=64, help="clips per decoder call")
    p.add_argument("--threads", type=int, default=2, help="DALI's CPU threads")
    p = commands.add_parser("step", help="train step time and items/s: video items against image items")
    p.add_argument("--config", default="demo", help="a preset or YAML file: its model section is timed")
    p.add_argument("--items", type=int, default=256, help="the catalogue the batches draw from")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=0, help="default: the config's train.batch_size")
    for p in commands.choices.values():
        p.add_argument("--smoke", action="store_true", help="a few clips or steps: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE[args.command])
    {"decode": decode, "step": step}[args.command](args)


if __name__ == "__main__":
    main()
