"""What caching the towers' frozen parts per item saves: train-step time of a config's model with no cache,
`model.text.cache_frozen`, and both it and `model.image.cache_frozen`, on the same batches, in one process.

The caches are filled first by encoding the whole catalogue once (as the first epoch of a run would), then
`--steps` train steps (forward, backward, AdamW) are timed per setting, each from the same initial weights;
their losses must agree bit for bit (the frozen parts are deterministic).

    python benchmarks/frozen_cache.py --config ml100k-mom --steps 6
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from transrec.config import load_config
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.dataset_format import read_manifest
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import TrainLoader
from transrec.trainer.evaluate import encode_catalogue
from transrec.trainer.finetune import build_model
from transrec.trainer.loop import use_bf16


def timed_steps(cfg, batches: list, text: bool, image: bool) -> dict:
    model_cfg = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, cache_frozen=text),
                                    image=dataclasses.replace(cfg.model.image, cache_frozen=image))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(cfg.train.seed)
    dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
    model = build_model(cfg, read_manifest(cfg.data.path)["num_items"]).to(dtype)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay))
    start = time.perf_counter()
    with torch.no_grad():
        decoder = ImageDecoder(cfg.model.image.image_size, cfg.data.image_decoder)
        encode_catalogue(model, ItemStore(cfg.data.path), decoder, cfg.eval.item_batch_size, torch.device("cpu"),
                         model.cfg.item_encoder)
    fill_s = time.perf_counter() - start
    losses, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"text.cache_frozen": text, "image.cache_frozen": image, "dtype": str(dtype), "catalogue_pass_s": round(fill_s, 1),
            "step_s": [round(s, 2) for s in seconds], "mean_step_s": sum(seconds[1:]) / (len(seconds) - 1),
            "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="ml100k-mom")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cfg = load_config(args.config)
    loader = TrainLoader(cfg.data, cfg.data.path, batch_size=cfg.train.batch_size, max_seq_len=cfg.model.max_seq_len,
                         num_negatives=cfg.data.num_negatives, seed=cfg.train.seed, rank=0, world_size=1,
                         decoder=ImageDecoder(cfg.model.image.image_size, cfg.data.image_decoder), mode=cfg.model.item_encoder)
    batches = [batch for _, batch in zip(range(args.steps), loader)]
    loader.close()
    dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
    for batch in batches:
        if batch.items.images is not None:
            batch.items.images = batch.items.images.to(dtype)
    results = [timed_steps(cfg, batches, text, image) for text, image in ((False, False), (True, False), (True, True))]
    for result in results:
        print(json.dumps(result), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(),
                      "same_losses": all(r["losses"] == results[0]["losses"] for r in results),
                      "speedup_over_no_cache": [results[0]["mean_step_s"] / r["mean_step_s"] for r in results]}))


if __name__ == "__main__":
    main()
