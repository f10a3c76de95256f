"""Image tower: a timm backbone, pooled features projected to the model width."""
from __future__ import annotations

import re

import safetensors.torch
import timm
import torch
from torch import nn

from transrec.config import ImageEncoderConfig


def split_blocks(body: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks from bottom to top, head modules after the last block) of a timm backbone.

    ViT, DeiT, EfficientNet: `blocks`; ConvNeXt: `stages`; Swin: `layers`; ResNet: `layer1`..`layer4`.
    Anything else: its top-level children that hold parameters are the blocks (no separate head).
    Everything before the blocks (stem, patch embedding, cls/position tokens) is never a block.
    """
    children = dict(body.named_children())
    names = list(children)
    for name in ("blocks", "stages", "layers"):
        if name in children:
            return list(children[name]), [children[n] for n in names[names.index(name) + 1 :]]
    stages = [n for n in names if re.fullmatch(r"layer\d+", n)]
    if stages:
        return [children[n] for n in stages], [children[n] for n in names[names.index(stages[-1]) + 1 :]]
    return [m for m in children.values() if list(m.parameters())], []


class ImageItemEncoder(nn.Module):
    """images float [n, 3, H, W] (normalized) -> item vectors [n, dim]."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int):
        super().__init__()
        self.body = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.kwargs)
        self.pretrained = bool(cfg.weights)  # pretrained weights train at encoder_lr, random ones at lr
        if cfg.weights:
            # A checkpoint's classifier has no place in a num_classes=0 backbone (unexpected keys are fine);
            # a missing key means the weights are for another architecture.
            state = safetensors.torch.load_file(cfg.weights)
            missing = self.body.load_state_dict(state, strict=False).missing_keys
            if missing:
                raise ValueError(f"{cfg.weights} does not fit timm {cfg.name!r}: missing {missing[:5]}")
        self.proj = nn.Linear(self.body.num_features, dim)
        # The input size the backbone expects, for the empty batch of a step without image items.
        # (ViTs check it; the default config's size is wrong when img_size is passed in kwargs.)
        patch_embed = getattr(self.body, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None) or self.body.pretrained_cfg["input_size"][1:]
        self.input_size: tuple[int, int] = tuple(size)
        if cfg.trainable_blocks >= 0:
            blocks, head = split_blocks(self.body)
            self.body.requires_grad_(False)
            for module in blocks[max(len(blocks) - cfg.trainable_blocks, 0) :] + head:
                module.requires_grad_(True)

    def train(self, mode: bool = True) -> "ImageItemEncoder":
        super().train(mode)
        # Frozen means frozen: batch norms of frozen blocks keep their (pretrained) running statistics
        # instead of normalizing with, and drifting towards, each small per-rank batch.
        for module in self.body.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        # timm checkpoints non-reentrantly by default (timm.layers.use_reentrant_ckpt() is False).
        self.body.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The loader hands float32 images; a bf16 model (DeepSpeed casts parameters, not inputs) wants bf16.
        return self.proj(self.body(images.to(self.proj.weight.dtype)))
