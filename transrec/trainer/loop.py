"""The train loop of one rank: a model and a loader wired with DeepSpeed, checkpoints, evaluation, logging.

`train(cfg)` runs inside each Ray Train worker (or any process where torch.distributed is set up
through the usual RANK/WORLD_SIZE/MASTER_ADDR variables). It resumes from the run's latest checkpoint
when there is one, so a restarted worker group continues where it stopped.
"""
from __future__ import annotations

import json
import os
import time

import torch

from transrec.config import Config
from transrec.trainer import checkpoint
from transrec.trainer.audit import SampleAudit
from transrec.trainer.checkpoint_store import run_checkpoints
from transrec.trainer.evaluate import encode_catalogue, evaluate_popularity, evaluate_splits, rank_and_world
from transrec.trainer.finetune import build_model
from transrec.trainer.host_memory import bound_host_memory, max_rank_rss_gb
from transrec.trainer.mfu import StepTimer, matmul_peak
from transrec.trainer.runlog import RunLog


def use_cuda() -> bool:
    return torch.cuda.is_available()


def use_bf16(precision: str) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and use_cuda())


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict:
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # a client torch AdamW: no JIT-compiled optimizer op on the CPU (STACK.md)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": use_bf16(cfg.train.precision)},
        "steps_per_print": 1 << 30,
        "checkpoint": {"load_universal": load_universal},  # resuming on another number of ranks
    }


def warmup_then_linear_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def init_distributed() -> torch.device:
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo")
    if use_cuda():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def train(cfg: Config) -> dict:
    """Trains (or resumes) the run `cfg.name`; returns the summary that rank 0 also writes to results.json."""
    from transrec.dataloading.images import ImageDecoder
    from transrec.dataloading.item_store import read_manifest
    from transrec.dataloading.loader import EvalLoader, TrainLoader

    memory_settings = bound_host_memory()
    device = init_distributed()
    import deepspeed

    rank, world = rank_and_world()
    run_dir = cfg.run_dir
    checkpoints = run_checkpoints(cfg)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    num_items = read_manifest(cfg.data.path)["num_items"]
    model = build_model(cfg, num_items)
    dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
    # Buffers too (batch-norm statistics): DeepSpeed casts only the parameters, and a bf16 batch norm with
    # fp32 statistics fails. The optimizer keeps fp32 master weights either way.
    model.to(dtype)
    mode = model.cfg.item_encoder
    decoder = ImageDecoder(cfg.data.image_size, cfg.data.image_decoder)
    loader = TrainLoader(cfg.data, cfg.data.path, batch_size=cfg.train.batch_size,
                         max_seq_len=model.cfg.max_seq_len, num_negatives=cfg.data.num_negatives,
                         seed=cfg.train.seed, rank=rank, world_size=world, decoder=decoder, mode=mode)
    store = loader.store  # opened (and checked against the manifest) once
    if model.cfg.logq_correction:
        model.loss.set_item_popularity(torch.as_tensor(store.popularity))
    # The LR schedule spans all epochs; max_steps only stops the loop, so a run stopped by max_steps and
    # resumed with a larger one follows the same schedule as one that never stopped.
    schedule_steps = cfg.train.epochs * len(loader)
    total_steps = min(schedule_steps, cfg.train.max_steps) if cfg.train.max_steps else schedule_steps

    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(cfg.train.warmup_steps, schedule_steps))
    started = time.perf_counter()
    resume = checkpoint.find_resume_point(checkpoints)  # verifies each file; converts for another world size
    resume_seconds = time.perf_counter() - started
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, resume is not None and resume.universal))

    torch.manual_seed(cfg.train.seed + rank)  # dropout differs per rank; a resume restores it instead
    state = {"step": 0, "epoch": 0, "best": None, "history": []}
    if resume is not None:
        started = time.perf_counter()
        state = checkpoint.load(engine, resume)
        loader.load_state_dict(state.pop("loader"))
        resume_seconds += time.perf_counter() - started

    peak_flops = matmul_peak(dtype, device)  # this rank's threads (or GPU), in the precision it trains in
    audit = SampleAudit(run_dir, rank, cfg.train.log_sample_ids)  # which samples this rank trains on
    audit.start(state["step"], state["epoch"])
    log = RunLog(run_dir, enabled=rank == 0, total=total_steps, initial=state["step"])
    log.write({"kind": "machine", "matmul_peak_tflops": peak_flops / 1e12, "dtype": str(dtype), "world_size": world,
               **memory_settings})
    if resume is not None:
        log.write({"kind": "resume", "step": state["step"], "tag": resume.tag, "from_world_size": resume.saved_world,
                   "seconds": resume_seconds})
    evaluators = {split: EvalLoader(cfg.data.path, split, cfg.eval.batch_size, model.cfg.max_seq_len, rank, world)
                  for split in ("valid", "test")}
    if "popularity" not in state:
        state["popularity"] = {split: evaluate_popularity(store.popularity, ev, cfg.eval.ks)
                               for split, ev in evaluators.items()}
        log.write({"kind": "popularity", **flatten(state["popularity"])})

    def save_checkpoint() -> None:
        protected = {state["best"]["tag"]} if state["best"] else set()
        checkpoint.save(engine, checkpoints, f"step{state['step']}",
                        {**state, "loader": loader.state_dict()}, cfg.train.keep_checkpoints, protected)

    while state["step"] < total_steps and state["epoch"] < cfg.train.epochs:
        loader.set_epoch(state["epoch"])
        window = StepTimer(world, peak_flops)
        for batch in checkpoint.rng_isolated(loader):
            batch = batch.to(device)
            if batch.items.images is not None:
                batch.items.images = batch.items.images.to(dtype)
            with window.counting():
                loss = engine(batch)
                engine.backward(loss)
            engine.step()
            state["step"] += 1
            audit.batch(state["step"], state["epoch"], batch.users.tolist())
            window.add(batch.users.shape[0] * world, batch.items.ids.shape[0] * world)
            log.step(loss.item())
            if state["step"] % cfg.train.log_every == 0:
                log.write({"kind": "train", "step": state["step"], "epoch": state["epoch"], "loss": loss.item(),
                           "lr": schedule.get_last_lr()[-1], **window.rates(), "max_rank_rss_gb": max_rank_rss_gb()})
                window = StepTimer(world, peak_flops)
            if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0:
                save_checkpoint()
            if state["step"] >= total_steps:
                break
        if loader.epoch_finished:  # (also when the last step of the run was the epoch's last batch)
            # rank 0's bad records skipped in the epoch (each rank's loader also logs its own)
            log.write({"kind": "data", "step": state["step"], "epoch": state["epoch"],
                       **{f"skipped/{kind}": count for kind, count in loader.skipped.items()}})
            state["epoch"] += 1
        if state["step"] >= total_steps or state["epoch"] % cfg.eval.every_epochs == 0:
            metrics = evaluate(engine.module, store, decoder, evaluators, cfg, device, mode)
            record = {"step": state["step"], "epoch": state["epoch"], "tag": f"step{state['step']}", **metrics}
            state["history"].append(record)
            selected = f"valid/{cfg.eval.select_metric}"
            if state["best"] is None or record[selected] > state["best"][selected]:
                state["best"] = record
            log.write({"kind": "eval", **record})
        save_checkpoint()

    summary = {"name": cfg.name, "steps": state["step"], "epochs": state["epoch"], "best": state["best"],
               "popularity": state.get("popularity"), "history": state["history"]}
    if rank == 0:
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log.close()
    return summary


def flatten(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{k}": v for split, metrics in per_split.items() for k, v in metrics.items()}


def evaluate(model, store, decoder, evaluators: dict, cfg: Config, device, mode: str) -> dict:
    model.eval()
    item_vecs = encode_catalogue(model, store, decoder, cfg.eval.item_batch_size, device, mode)
    metrics = flatten(evaluate_splits(model, item_vecs, evaluators, cfg.eval.ks, device))
    model.train()
    return metrics
