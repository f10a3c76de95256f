"""Which weights a run trains (`train.finetune_mode`), and the model built accordingly: by pretraining, by
fine-tuning from an export (`init_from`), or to load a run's checkpoint."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from transrec.config import Config, ModelConfig, TrainConfig
from transrec.dataloading.dataset_format import read_manifest

if TYPE_CHECKING:
    from peft import LoraConfig

# Model fields that say how a model trains, not what it is: a fine-tuning run takes these from its own config
# (YAML and --set, as any run) and everything else from the export it starts from.
TRAINING_SWITCHES = ("dropout", "gradient_checkpointing", "loss", "negatives", "sampled_negatives", "mask_seen",
                     "logq_correction")
TOWER_TRAINING_SWITCHES = ("trainable_blocks", "cache_frozen")


def fine_tuning_model(exported: ModelConfig, run: ModelConfig) -> ModelConfig:
    """The exported model with the run's training switches."""
    towers = {tower: replace(getattr(exported, tower),
                             **{k: getattr(getattr(run, tower), k) for k in TOWER_TRAINING_SWITCHES})
              for tower in ("text", "image")}
    return replace(exported, **{k: getattr(run, k) for k in TRAINING_SWITCHES}, **towers)


def model_config(cfg: Config, num_items: int) -> ModelConfig:
    """The model section with each tower's trainable blocks set by the mode, the size of the ID table and the
    width of the item features from the data set (an export keeps its own)."""
    mode, blocks = cfg.train.finetune_mode, cfg.train.finetune_blocks
    model = cfg.model
    if not cfg.init_from:
        width = (read_manifest(cfg.data.path)["features"][model.features]["width"]
                 if model.item_encoder == "features" else model.features_width)
        model = replace(model, num_items=num_items, features_width=width)
    trainable = {"full": -1, "top_k": blocks, "adapters": blocks, "lora": blocks}.get(mode)
    if trainable is None:
        return model
    # adapters, lora: the top blocks run with autograd (their adapters need it) though their own weights stay frozen
    image = model.image if mode == "lora" else replace(model.image, trainable_blocks=trainable)  # (LoRA: text only)
    return replace(model, text=replace(model.text, trainable_blocks=trainable), image=image)


def lora_config(train: TrainConfig) -> LoraConfig:
    """The run's LoRA as peft's config; no `lora_targets`: peft's default modules for the tower's family."""
    from peft import LoraConfig  # (imported by the runs that use it only: it takes seconds a process)

    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=train.lora_targets or None)


def load_item_features(model, store) -> None:
    """Gives a two-stage model (item_encoder features) its item features from the data set `store` opened."""
    if model.cfg.item_encoder == "features":
        table = torch.from_numpy(np.array(store.features(model.cfg.features)))
        model.item_encoder.load_features(table, torch.from_numpy(np.array(store.modality)))


def check_same_items(cfg: Config, item_encoder: str) -> None:
    """A model with item IDs starts from an export only on the data set the export was trained on (as recorded
    in its manifest.json): its item table holds that catalogue's items, in that order, and no other's (PeterRec's
    user transfer: the same users and items, another task)."""
    manifest = Path(cfg.init_from) / "manifest.json"
    trained_on = json.loads(manifest.read_text()).get("dataset") if manifest.exists() else None
    if trained_on is None or Path(trained_on).resolve() != Path(cfg.data.path).resolve():
        raise ValueError(f"{cfg.init_from} is a model with item IDs ({item_encoder}): its item table cannot "
                         f"transfer to new items (data.path {cfg.data.path}; the export was trained on "
                         f"{trained_on or 'an unrecorded data set'}); fine-tune a content model instead")


def build_model(cfg: Config, num_items: int, load_init: bool = True):
    """The run's model: random or pretrained encoders, or the `init_from` export's weights (unless `load_init`
    is False, when a checkpoint's weights come next); in adapters mode, with only the adapters trainable; in lora
    mode, with the text tower's body adapted by LoRA (an export's adapter goes on training)."""
    from transrec.models import TransRec
    from transrec.models.user_encoder import USER_ENCODERS

    model_cfg = model_config(cfg, num_items)
    if cfg.init_from and "id" in model_cfg.item_encoder.split("+"):
        check_same_items(cfg, model_cfg.item_encoder)
    if cfg.init_from and load_init:
        model = TransRec.from_pretrained(cfg.init_from, dtype=torch.float32, cfg=model_cfg)
        if cfg.train.fresh_user_encoder:
            model.user_encoder = USER_ENCODERS.get(model.cfg.user_encoder)(model.cfg)
    else:
        model = TransRec(model_cfg)
    if cfg.train.finetune_mode == "adapters":
        model.requires_grad_(False)
        # an export that has adapters already (a model adapted before) goes on training those
        adapters = model.adapters if model.adapter_settings else model.add_adapters(cfg.train.finetune_blocks,
                                                                                    cfg.train.adapter_dim)
        adapters.requires_grad_(True)
    if cfg.train.finetune_mode == "lora":
        text = getattr(model.item_encoder, "text", None)
        if text is None:
            raise ValueError(f"train.finetune_mode lora adapts the text tower; model.item_encoder "
                             f"{model_cfg.item_encoder} has none")
        if text.peft_config is None:
            text.add_peft(lora_config(cfg.train))
    return model
