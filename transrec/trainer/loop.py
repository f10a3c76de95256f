"""The train loop of one rank: a model and a loader wired with DeepSpeed, checkpoints, evaluation, logging.

`train(cfg)` runs inside each Ray Train worker (or any process where torch.distributed is set up through the
usual RANK/WORLD_SIZE/MASTER_ADDR variables). It resumes from the run's latest checkpoint when there is one,
so a restarted worker group continues where it stopped. A `Trainer` holds the run's named stateful parts
(the DeepSpeed engine, the loader, `TrainState`, every RNG, the item-vector bank), all of them checkpointed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from transrec.config import Config
from transrec.trainer import checkpoint
from transrec.trainer.audit import SampleAudit
from transrec.trainer.checkpoint_store import run_checkpoints
from transrec.trainer.console import Console
from transrec.trainer.distributed import rank_and_world
from transrec.trainer.evaluate import encode_catalogue, evaluate_popularity, evaluate_splits
from transrec.trainer.finetune import build_model, load_item_features
from transrec.trainer.host_memory import bound_host_memory, max_rank_rss_gb
from transrec.trainer.item_sharing import share_items
from transrec.trainer.mfu import StepTimer, matmul_peak
from transrec.trainer.runlog import RunLog


def use_cuda() -> bool:
    return torch.cuda.is_available()


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and use_cuda())


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict:
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda()}
    if cfg.train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_cuda()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        # a client torch AdamW: no JIT-compiled optimizer op on the CPU
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": use_bf16(cfg.train.precision)},
        "steps_per_print": 1 << 30,
        "checkpoint": {"load_universal": load_universal},  # resuming on another number of ranks
    }


@contextlib.contextmanager
def partitioned_build(cfg: Config):
    """Under ZeRO-3, a pretrained text tower's body is built inside deepspeed.zero.Init, every parameter split
    across the ranks as it is created, and its weights are read shard by shard into the splits (transformers'
    from_pretrained does both while a transformers.integrations.HfDeepSpeedConfig lives): no rank ever holds the
    whole tower. The rest (user encoder, projections, image tower, adapters) is small: deepspeed.initialize
    splits it. Not for a random-init tower (transformers' random init does not run on split weights: OPT's fails,
    others keep torch's defaults), nor when fine-tuning (`init_from`: an export is loaded into whole weights)."""
    if cfg.train.zero_stage != 3 or cfg.init_from or not cfg.model.text.pretrained:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(deepspeed_config(cfg))  # transformers holds it by a weak reference
    try:
        yield
    finally:
        del live


def lr_factor(schedule: str, warmup: int, total: int):
    """The learning rate's multiplier at each step: a linear warmup, then constant, or decaying to 0 at `total`
    (cosine or linear). A constant rate leaves the length of the run to early stopping."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1 - progress
        return 1.0

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


@dataclass
class TrainState:
    """Where the run is; every rank holds the same (the RNGs and the loader are checkpointed beside it)."""

    step: int = 0
    epoch: int = 0
    best: dict | None = None  # the evaluation record with the best valid metric (its tag is never pruned)
    evaluations_since_best: int = 0
    history: list = field(default_factory=list)  # every evaluation record
    popularity: dict | None = None  # the popularity baseline's metrics per split
    seconds: float = 0.0  # training wall time so far, over every process that worked on the run
    epoch_positions: int = 0  # target positions trained in this epoch (all ranks)
    stopped: str = ""  # why the run ended: epochs | max_steps | patience (Trainer.stop_reason)


class Trainer:
    def __init__(self, cfg: Config, console: Console | None = None):
        from transrec.dataloading.videos import item_decoders
        from transrec.dataloading.dataset_format import read_manifest
        from transrec.dataloading.loader import EvalLoader, TrainLoader
        from transrec.models.negatives import ItemVectorBank

        self.cfg = cfg
        memory_settings = bound_host_memory()
        self.device = init_distributed()
        import deepspeed

        self.rank, self.world = rank_and_world()
        self.checkpoints = run_checkpoints(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        num_items = read_manifest(cfg.data.path)["num_items"]
        with partitioned_build(cfg):
            model = build_model(cfg, num_items)
        self.dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
        # Buffers too (batch-norm statistics): DeepSpeed casts only the parameters, and a bf16 batch norm with
        # fp32 statistics fails. The optimizer keeps fp32 master weights either way.
        model.to(self.dtype)
        self.mode = model.item_mode
        self.decoder, self.video_decoder = item_decoders(model.cfg, cfg.data)
        self.loader = TrainLoader(cfg.data, cfg.data.path, batch_size=cfg.train.batch_size,
                                  max_seq_len=model.cfg.max_seq_len,
                                  num_negatives=cfg.data.num_negatives if model.cfg.loss == "bce" else 0,
                                  seed=cfg.train.seed, rank=self.rank, world_size=self.world, decoder=self.decoder,
                                  mode=self.mode, negatives=model.cfg.negatives,
                                  sampled_negatives=model.cfg.sampled_negatives,
                                  cloze_prob=model.cfg.cloze_prob if model.user_encoder.cloze else 0.0,
                                  video_decoder=self.video_decoder)
        self.store = self.loader.store  # opened (and checked against the manifest) once
        model.set_item_popularity(torch.as_tensor(self.store.popularity))
        load_item_features(model, self.store)
        self.bank = (ItemVectorBank(num_items, model.cfg.dim, device=self.device)
                     if model.cfg.negatives == "bank" else None)
        # The LR schedule spans all epochs; max_steps only stops the loop, so a run stopped by max_steps and
        # resumed with a larger one follows the same schedule as one that never stopped.
        schedule_steps = cfg.train.epochs * len(self.loader)
        self.total_steps = min(schedule_steps, cfg.train.max_steps) if cfg.train.max_steps else schedule_steps

        optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay))
        factor = lr_factor(cfg.train.lr_schedule, cfg.train.warmup_steps, schedule_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        started = time.perf_counter()
        resume = checkpoint.find_resume_point(self.checkpoints)  # verifies each file; converts for another world
        resume_seconds = time.perf_counter() - started
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.schedule,
            config=deepspeed_config(cfg, resume is not None and resume.universal))

        torch.manual_seed(cfg.train.seed + self.rank)  # dropout differs per rank; a resume restores it instead
        self.state = TrainState()
        if resume is not None:
            started = time.perf_counter()
            saved, shared = checkpoint.load(self.engine, resume)
            self.loader.load_state_dict(saved.pop("loader"))
            self.state = TrainState(**saved)
            if self.bank is not None:
                self.bank.load_state_dict(shared["bank"])
            resume_seconds += time.perf_counter() - started

        self.peak_flops = matmul_peak(self.dtype, self.device)  # this rank's threads (or GPU), in its precision
        self.audit = SampleAudit(cfg.run_dir, self.rank, cfg.train.log_sample_ids)
        self.audit.start(self.state.step, self.state.epoch)
        self.log = RunLog(cfg.run_dir, enabled=self.rank == 0, console=console or Console(), total=self.total_steps,
                          initial=self.state.step)
        self.log.write({"kind": "machine", "matmul_peak_tflops": self.peak_flops / 1e12, "dtype": str(self.dtype),
                        "world_size": self.world, **memory_settings})
        if resume is not None:
            self.log.write({"kind": "resume", "step": self.state.step, "tag": resume.tag,
                            "from_world_size": resume.saved_world, "seconds": resume_seconds})
        self.evaluators = {split: EvalLoader(cfg.data.path, split, cfg.eval.batch_size, model.cfg.max_seq_len,
                                             self.rank, self.world) for split in ("valid", "test")}
        if self.state.popularity is None and cfg.eval.every_epochs:
            self.state.popularity = {split: evaluate_popularity(self.store.popularity, ev, cfg.eval.ks)
                                     for split, ev in self.evaluators.items()}
            self.log.write({"kind": "popularity", **flatten(self.state.popularity)})

    @property
    def model(self):
        return self.engine.module

    @property
    def text_tower(self):
        return getattr(self.model.item_encoder, "text", None)

    def train_step(self, batch) -> tuple[float, int, int] | None:
        """One optimizer step on this rank's batch; (loss, target positions of the global batch, items this rank
        encoded), or None when every rank's batch is empty (all its samples bad): no step then, since a step on
        nothing would still move the weights (Adam's momentum, weight decay) and the schedule."""
        batch = batch.to(self.device)
        if batch.items.images is not None:
            batch.items.images = batch.items.images.to(self.dtype)
        shared = share_items(batch, int(self.model.predicting(batch).sum()), self.cfg.train.share_items)
        if shared.positions == 0:
            return None
        extra = None
        if self.bank is not None:
            generator = torch.Generator(self.device).manual_seed(self.cfg.train.seed * 1_000_003 + self.state.step)
            extra = self.bank.negatives(shared.batch.row_ids, self.model.cfg.sampled_negatives, generator)
        with self.window.counting():
            output = self.engine(shared.batch, gather=shared.gather, normalizer=shared.normalizer, extra=extra)
            self.engine.backward(output.loss)
        self.engine.step()
        if self.bank is not None:
            self.bank.update(shared.batch.row_ids, output.item_vectors)
        return output.loss.item(), shared.positions, shared.batch.items.ids.numel()

    def stop_reason(self) -> str:
        """Why the run is over ("" while it is not): read from the state, so a resumed run with a larger
        `epochs`, `max_steps`, `patience` or `patience_steps` goes on."""
        cfg, state = self.cfg.train, self.state
        if state.epoch >= cfg.epochs:
            return "epochs"
        if cfg.max_steps and state.step >= cfg.max_steps:
            return "max_steps"
        if (cfg.patience and state.best and state.evaluations_since_best >= cfg.patience
                and state.step - state.best["step"] >= cfg.patience_steps):
            return "patience"
        return ""

    def tick(self) -> None:
        """Adds the wall time since the last tick to the run's seconds (each process counts its own share)."""
        now = time.perf_counter()
        self.state.seconds += now - self.last_tick
        self.last_tick = now

    def fit(self) -> dict:
        cfg, state = self.cfg, self.state
        self.last_tick = time.perf_counter()
        while not self.stop_reason():
            self.loader.set_epoch(state.epoch)
            self.window = StepTimer(self.world, self.peak_flops, self.text_tower)
            for batch in self.loader:
                stepped = self.train_step(batch)
                if stepped is None:  # (the loader counted its samples as skipped)
                    continue
                loss, positions, items = stepped
                state.step += 1
                state.epoch_positions += positions
                self.audit.batch(state.step, state.epoch, batch.users.tolist())
                self.window.add(batch.users.shape[0] * self.world, items * self.world)
                self.log.step(loss)
                if state.step % cfg.train.log_every == 0:
                    self.log.write({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": loss,
                                    "lr": self.schedule.get_last_lr()[-1], **self.window.rates(),
                                    "max_rank_rss_gb": max_rank_rss_gb()})
                    self.window = StepTimer(self.world, self.peak_flops, self.text_tower)
                if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint()
                if state.step >= self.total_steps:
                    break
            if self.loader.epoch_finished:  # (also when the last step of the run was the epoch's last batch)
                # rank 0's bad records skipped in the epoch (each rank's loader also logs its own)
                self.log.write({"kind": "data", "step": state.step, "epoch": state.epoch,
                                "target_positions": state.epoch_positions,
                                **{f"skipped/{kind}": count for kind, count in self.loader.skipped.items()}})
                state.epoch += 1
                state.epoch_positions = 0
            if cfg.eval.every_epochs and (self.stop_reason() or state.epoch % cfg.eval.every_epochs == 0):
                self.evaluate()
            self.save_checkpoint()
        state.stopped = self.stop_reason()

        summary = {"name": cfg.name, "steps": state.step, "epochs": state.epoch, "stopped": state.stopped,
                   "seconds": state.seconds, "seconds_to_best": state.best["seconds"] if state.best else None,
                   "best": state.best, "popularity": state.popularity, "history": state.history}
        if self.rank == 0:
            (cfg.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        self.log.close()
        return summary

    def evaluate(self) -> None:
        """Valid and test metrics now; the best by valid is kept, and `train.patience` evaluations without a
        better one stop the run."""
        cfg, state = self.cfg, self.state
        self.tick()
        model = self.model.eval()
        item_vecs = encode_catalogue(model, self.store, self.decoder, cfg.eval.item_batch_size, self.device, self.mode,
                                     self.video_decoder)
        metrics = flatten(evaluate_splits(model, item_vecs, self.evaluators, cfg.eval.ks, self.device))
        model.train()
        record = {"step": state.step, "epoch": state.epoch, "tag": f"step{state.step}", "seconds": state.seconds,
                  **metrics}
        state.history.append(record)
        selected = f"valid/{cfg.eval.select_metric}"
        if state.best is None or record[selected] > state.best[selected]:
            state.best, state.evaluations_since_best = record, 0
        else:
            state.evaluations_since_best += 1
        self.log.write({"kind": "eval", **record})

    def save_checkpoint(self) -> None:
        self.tick()
        protected = {self.state.best["tag"]} if self.state.best else set()
        shared = {"bank": self.bank.state_dict()} if self.bank is not None else {}
        checkpoint.save(self.engine, self.checkpoints, f"step{self.state.step}",
                        {**dataclasses.asdict(self.state), "loader": self.loader.state_dict()},
                        self.cfg.train.keep_checkpoints, protected, shared)


def train(cfg: Config, console: Console | None = None) -> dict:
    """Trains (or resumes) the run `cfg.name`; returns the summary that rank 0 also writes to results.json.
    Rank 0 draws its progress on `console` (default: this process's terminal)."""
    return Trainer(cfg, console).fit()


def flatten(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{k}": v for split, metrics in per_split.items() for k, v in metrics.items()}
