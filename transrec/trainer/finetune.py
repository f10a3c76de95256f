"""Which weights a run trains (`train.finetune_mode`), and the model built accordingly: by pretraining, by
fine-tuning from an export (`init_from`), or to load a run's checkpoint."""
from __future__ import annotations

from dataclasses import replace

import torch

from transrec.config import Config, ModelConfig

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
    """The model section with each tower's trainable blocks set by the mode (an export keeps its num_items)."""
    mode, blocks = cfg.train.finetune_mode, cfg.train.finetune_blocks
    model = cfg.model if cfg.init_from else replace(cfg.model, num_items=num_items)
    trainable = {"full": -1, "top_k": blocks, "adapters": blocks}.get(mode)
    if trainable is None:
        return model
    # adapters: the top blocks run with autograd (their adapters need it) though their own weights stay frozen
    return replace(model, text=replace(model.text, trainable_blocks=trainable),
                   image=replace(model.image, trainable_blocks=trainable))


def build_model(cfg: Config, num_items: int, load_init: bool = True):
    """The run's model: random or pretrained encoders, or the `init_from` export's weights (unless `load_init`
    is False, when a checkpoint's weights come next); in adapters mode, with only the adapters trainable."""
    from transrec.models import TransRec

    model_cfg = model_config(cfg, num_items)
    if cfg.init_from and model_cfg.item_encoder == "id":
        raise ValueError(f"{cfg.init_from} is an ID-embedding model: its item table cannot transfer to new items")
    if cfg.init_from and load_init:
        model = TransRec.from_pretrained(cfg.init_from, dtype=torch.float32, cfg=model_cfg)
    else:
        model = TransRec(model_cfg)
    if cfg.train.finetune_mode == "adapters":
        model.requires_grad_(False)
        # an export that has adapters already (a model adapted before) goes on training those
        adapters = model.adapters if model.adapter_settings else model.add_adapters(cfg.train.finetune_blocks,
                                                                                    cfg.train.adapter_dim)
        adapters.requires_grad_(True)
    return model
