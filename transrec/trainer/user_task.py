"""PeterRec-style user transfer (`transrec finetune --task user-attribute`): an attribute of each user (ml-100k:
gender, age bucket, occupation; the data set's users/attributes.json) predicted from the user's history by a
pretrained recommender's user encoder under a classification head.

The users whose value is known are split into train, valid and test users (SHARES of each class, shuffled by
`train.seed`). A user's input is its history up to its valid item (the train part of its sequence, the newest
`model.max_seq_len` items: what pretraining saw of it). One classifier per mode (MODES), each the same
architecture under the same head (models/user_classifier.py):
- adapters: the export frozen, with PeterRec's model patches, the bottleneck adapters of `TransRec.add_adapters`
  (after every user-encoder layer and each tower's top `train.finetune_blocks` blocks), trained with the head;
- full: the export, every weight trained;
- scratch: no export: the run config's own model and starting weights (its pretrained towers, MiniLM for the text
  presets; as `transrec transfer`'s scratch), every weight trained;
beside the train users' majority class. Each trains by cross-entropy for up to `train.epochs` epochs
(`train.max_steps` caps the steps) at the config's learning rates and schedule; after each epoch it classifies the
valid and test users, and reports the epoch of the best valid macro-F1 (with unbalanced classes, a classifier of
the majority class has a high accuracy and a low macro-F1); `train.patience` epochs without a better one stop it.
RUN/results.json holds the split, the baseline and every mode's epochs; `results_table` shows them.

One process (on a GPU where there is one), not Ray Train workers with DeepSpeed: a labelled user set is small
(ml-100k: 943 users, an epoch of tens of steps) and the model fits one device, so data parallelism has nothing to
divide and a worker group with its engines would take longer to start than the training takes. The run directory,
model building (finetune.py), catalogue encoding (evaluate.py), learning-rate schedule and console are the other
runs' own.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from transrec.config import Config
from transrec.dataloading.dataset_format import UNKNOWN_CLASS
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import EvalLoader
from transrec.dataloading.videos import VideoDecoder, item_decoders
from transrec.models.user_classifier import UserClassifier
from transrec.trainer.console import Console
from transrec.trainer.evaluate import encode_catalogue
from transrec.trainer.finetune import build_model, load_item_features
from transrec.trainer.loop import lr_factor, use_bf16, use_cuda
from transrec.trainer.metrics import classification_metrics
from transrec.trainer.run_dir import check_model_parts, resolve, write_run_dir

# mode -> (train.finetune_mode of its recommender, whether it is the export's model)
MODES = {"adapters": ("adapters", True), "full": ("full", True), "scratch": ("full", False)}
SHARES = {"train": 0.7, "valid": 0.15, "test": 0.15}  # of each class's users
HELD_OUT = ("valid", "test")


def split_users(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Row numbers of the train, valid and test users: each class's users shuffled by `seed` and cut by SHARES, so
    that every split holds each class in its share (a rare occupation too, where it has users enough)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SHARES}
    for label in np.unique(labels):
        users = rng.permutation(np.flatnonzero(labels == label))
        valid, test = (round(len(users) * SHARES[split]) for split in HELD_OUT)
        parts["valid"].append(users[:valid])
        parts["test"].append(users[valid:valid + test])
        parts["train"].append(users[valid + test:])
    return {split: np.sort(np.concatenate(rows)) for split, rows in parts.items()}


def majority_class(labels: torch.Tensor) -> int:
    """The most common class of `labels` (of a tie, the lowest number)."""
    return int(torch.bincount(labels).argmax())


@dataclass
class LabelledUsers:
    """The users whose value of the attribute is known."""

    history: torch.Tensor  # int64 [U, T]: item indices up to the valid item, left-padded
    mask: torch.Tensor  # bool [U, T]
    labels: torch.Tensor  # int64 [U]: class numbers
    classes: list[str]


class UserTask:
    """One attribute of a data set's users: the labelled users, their split, and a classifier's training."""

    def __init__(self, cfg: Config, label: str, scratch: Config | None = None):
        """`cfg` resolved (run_dir.resolve: the model is the export's), `scratch` the same without the export (the
        scratch classifier's; default: the export's model at random init). A data set without the attribute fails
        here, before any model is built."""
        self.cfg = cfg
        self.scratch = scratch or replace(cfg, init_from="")
        self.store = ItemStore(cfg.data.path)
        attribute = self.store.user_attribute(label)
        everyone = next(iter(EvalLoader(cfg.data.path, "valid", self.store.manifest["num_users"],
                                        cfg.model.max_seq_len, rank=0, world_size=1)))
        codes = torch.from_numpy(attribute.codes)[everyone.users]
        known = codes != UNKNOWN_CLASS
        self.users = LabelledUsers(everyone.history[known], everyone.history_mask[known], codes[known],
                                   attribute.classes)
        self.split = {split: torch.from_numpy(rows) for split, rows in
                      split_users(self.users.labels.numpy(), cfg.train.seed).items()}
        self.device = torch.device("cuda" if use_cuda() else "cpu")

    def autocast(self):
        """bf16 where `train.precision` says so (the weights stay fp32: one process needs no master copy)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=use_bf16(self.cfg.train.precision))

    def majority(self) -> dict:
        """The baseline: every valid and test user given the train users' most common class."""
        labels = self.users.labels
        majority = majority_class(labels[self.split["train"]])
        return {"class": self.users.classes[majority],
                **{split: classification_metrics(torch.full_like(labels[self.split[split]], majority),
                                                 labels[self.split[split]]) for split in HELD_OUT}}

    def classifier(self, mode: str) -> UserClassifier:
        """The classifier of `mode` (MODES), its random weights drawn from `train.seed`."""
        finetune_mode, from_export = MODES[mode]
        cfg = self.cfg if from_export else self.scratch
        cfg = replace(cfg, train=replace(cfg.train, finetune_mode=finetune_mode))
        torch.manual_seed(cfg.train.seed)
        recommender = build_model(cfg, self.store.num_items)
        load_item_features(recommender, self.store)
        return UserClassifier(recommender, len(self.users.classes)).to(self.device)

    def history_vectors(self, recommender, decoders: tuple[ImageDecoder, VideoDecoder], history: torch.Tensor
                        ) -> torch.Tensor:
        """[B, T, dim]: the vectors of the items of `history` [B, T], each distinct item encoded once."""
        image_decoder, video_decoder = decoders
        distinct, rows = np.unique(history.numpy(), return_inverse=True)
        items = self.store.item_batch(distinct, image_decoder, recommender.item_mode, video_decoder)
        vectors = recommender.encode_items(items.to(self.device))
        return vectors[torch.from_numpy(rows.reshape(history.shape)).to(self.device)]

    def train(self, classifier: UserClassifier, phase: str, console: Console) -> dict:
        """Trains `classifier` on the train users; returns its record: parameters, steps, seconds, why it stopped,
        each epoch's valid and test accuracy and macro-F1, and the epoch of the best valid macro-F1."""
        cfg, users, recommender = self.cfg.train, self.users, classifier.recommender
        decoders = item_decoders(recommender.cfg, self.cfg.data)  # clips' frames sampled evenly
        train_rows = self.split["train"]
        schedule_steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
        total = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps
        optimizer = torch.optim.AdamW(classifier.param_groups(cfg.lr, cfg.encoder_lr, cfg.weight_decay))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_schedule, cfg.warmup_steps,
                                                                          schedule_steps))
        order = torch.Generator().manual_seed(cfg.seed)
        record = {"parameters": sum(p.numel() for p in classifier.parameters()),
                  "trainable_parameters": sum(p.numel() for p in classifier.parameters() if p.requires_grad),
                  "steps": 0, "seconds": 0.0, "stopped": "epochs", "best": None, "epochs": []}
        started, since_best = time.perf_counter(), 0
        for epoch in range(1, cfg.epochs + 1):
            classifier.train()
            for rows in train_rows[torch.randperm(len(train_rows), generator=order)].split(cfg.batch_size):
                with self.autocast():
                    logits = classifier(self.history_vectors(recommender, decoders, users.history[rows]),
                                        users.mask[rows].to(self.device))
                loss = nn.functional.cross_entropy(logits.float(), users.labels[rows].to(self.device))
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(classifier.parameters(), cfg.grad_clip)
                optimizer.step()
                schedule.step()
                record["steps"] += 1
                console.progress(phase, record["steps"], total, loss.item())
                if record["steps"] == total:
                    break
            record["seconds"] = time.perf_counter() - started
            evaluation = {"epoch": epoch, "step": record["steps"], "seconds": record["seconds"],
                          **self.evaluate(classifier, decoders)}
            record["epochs"].append(evaluation)
            console.line(f"[{phase}] epoch {epoch}: " + "  ".join(
                f"{split} accuracy={evaluation[split]['accuracy']:.4f} macro-F1={evaluation[split]['macro_f1']:.4f}"
                for split in HELD_OUT))
            if record["best"] is None or evaluation["valid"]["macro_f1"] > record["best"]["valid"]["macro_f1"]:
                record["best"], since_best = evaluation, 0
            else:
                since_best += 1
            if cfg.patience and since_best >= cfg.patience:
                record["stopped"] = "patience"
                break
            if record["steps"] == total:
                record["stopped"] = "max_steps" if total < schedule_steps else "epochs"
                break
        console.close()
        return record

    @torch.no_grad()
    def evaluate(self, classifier: UserClassifier, decoders: tuple[ImageDecoder, VideoDecoder]
                 ) -> dict[str, dict[str, float]]:
        """Accuracy and macro-F1 on the valid and the test users, the catalogue encoded once."""
        classifier.eval()
        recommender, users, batch_size = classifier.recommender, self.users, self.cfg.eval.batch_size
        image_decoder, video_decoder = decoders
        results = {}
        with self.autocast():
            item_vectors = encode_catalogue(recommender, self.store, image_decoder, self.cfg.eval.item_batch_size,
                                            self.device, recommender.item_mode, video_decoder)
            for split in HELD_OUT:
                predicted = torch.cat([
                    classifier(item_vectors[users.history[rows].to(self.device)], users.mask[rows].to(self.device))
                    .argmax(-1).cpu() for rows in self.split[split].split(batch_size)])
                results[split] = classification_metrics(predicted, users.labels[self.split[split]])
        return results


def run_user_task(cfg: Config, label: str, modes: tuple[str, ...] = tuple(MODES),
                  console: Console | None = None) -> dict:
    """Trains a classifier of the users' `label` per mode (MODES) beside the majority class; writes RUN/results.json
    (after each mode) and returns it. Every input is checked before the run directory is made."""
    scratch = resolve(replace(cfg, init_from=""))
    cfg = resolve(cfg)
    check_model_parts(cfg)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes: {','.join(unknown) or 'none given'}: choose from {','.join(MODES)}")
    task = UserTask(cfg, label, scratch)
    write_run_dir(cfg)
    console = console or Console()
    results = {"name": cfg.name, "task": "user-attribute", "label": label, "classes": task.users.classes,
               "from": cfg.init_from, "data": cfg.data.path, "seed": cfg.train.seed,
               "users": {split: len(rows) for split, rows in task.split.items()}, "majority": task.majority(),
               "modes": {}}
    for mode in modes:
        results["modes"][mode] = task.train(task.classifier(mode), f"{cfg.name} {mode}", console)
        (cfg.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def results_table(results: dict) -> str:
    """Markdown: the test users' accuracy and macro-F1 of the majority class and of each mode at its best epoch."""
    users, majority = results["users"], results["majority"]
    lines = [f"{results['label']} of the users of {results['data']}: {len(results['classes'])} classes; "
             f"{users['train']} train, {users['valid']} valid, {users['test']} test users; seed {results['seed']}",
             "", "| classifier | test accuracy | test macro-F1 | valid macro-F1 | trained parameters | best epoch | "
             "seconds |", "|---|---|---|---|---|---|---|",
             f"| majority class ({majority['class']}) | {majority['test']['accuracy']:.4f} | "
             f"{majority['test']['macro_f1']:.4f} | {majority['valid']['macro_f1']:.4f} | 0 | - | - |"]
    for mode, record in results["modes"].items():
        best = record["best"]
        lines.append(f"| {mode} | {best['test']['accuracy']:.4f} | {best['test']['macro_f1']:.4f} | "
                     f"{best['valid']['macro_f1']:.4f} | {record['trainable_parameters']:,} | {best['epoch']} | "
                     f"{record['seconds']:.0f} |")
    return "\n".join(lines)
