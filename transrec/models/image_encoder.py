"""Image tower: a timm backbone, pooled features projected to the model width."""
from __future__ import annotations

import re
from typing import NamedTuple

import safetensors.torch
import torch
from torch import nn

from transrec.config import ImageEncoderConfig
from transrec.models.frozen_cache import FrozenOutputCache


class BackboneParts(NamedTuple):
    stem: list[nn.Module]  # top-level children before the blocks
    blocks: list[nn.Module]  # bottom to top
    head: list[nn.Module]  # top-level children after the last block


def split_blocks(body: nn.Module) -> BackboneParts:
    """The stem, blocks and head of a timm backbone.

    ViT, DeiT, EfficientNet: `blocks`; ConvNeXt: `stages`; Swin: `layers`; ResNet: `layer1`..`layer4`.
    Anything else: its top-level children that hold parameters are the blocks (no stem, no head).
    Everything before the blocks (stem, patch embedding, cls/position tokens) is never a block.
    """
    children = dict(body.named_children())
    names = list(children)
    for name in ("blocks", "stages", "layers"):
        if name in children:
            at = names.index(name)
            return BackboneParts([children[n] for n in names[:at]], list(children[name]),
                                 [children[n] for n in names[at + 1 :]])
    stages = [n for n in names if re.fullmatch(r"layer\d+", n)]
    if stages:
        first, last = names.index(stages[0]), names.index(stages[-1])
        return BackboneParts([children[n] for n in names[:first]], [children[n] for n in stages],
                             [children[n] for n in names[last + 1 :]])
    return BackboneParts([], [m for m in children.values() if list(m.parameters())], [])


def run_in_order(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


class ImageItemEncoder(nn.Module):
    """images float [n, 3, H, W] (normalized) -> item vectors [n, dim]."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int):
        super().__init__()
        import timm  # (here, not at the top: a model without images never pays its seconds of import)

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
        # The size images are decoded to (the loader reads it from here, so an export feeds itself right).
        self.input_size: tuple[int, int] = (cfg.image_size, cfg.image_size)
        # With cache_frozen, the body runs as its stem and frozen blocks (computed once per item, kept in
        # frozen_cache), then its trainable blocks and head.
        self.cache_frozen = cfg.cache_frozen and cfg.trainable_blocks >= 0
        self.frozen_cache = FrozenOutputCache()
        if cfg.trainable_blocks >= 0:
            stem, blocks, head = split_blocks(self.body)
            first_trainable = max(len(blocks) - cfg.trainable_blocks, 0)
            self.body.requires_grad_(False)
            for module in blocks[first_trainable:] + head:
                module.requires_grad_(True)
            self.frozen_part, self.trainable_part = stem + blocks[:first_trainable], blocks[first_trainable:] + head
            if self.cache_frozen:
                self._check_runs_in_order(cfg.name)
        self.train()  # frozen batch norms in eval mode from the start, not only after a first .train() call

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

    @torch.no_grad()
    def _check_runs_in_order(self, name: str) -> None:
        """Caching splits the body's forward into its children run in order: true of ResNets, ConvNeXts,
        EfficientNets..., not of ViTs (their forward adds position embeddings between children)."""
        images = torch.randn(2, 3, *self.input_size, generator=torch.Generator().manual_seed(0))
        training = self.training
        self.eval()
        expected = self.body(images)
        try:
            in_order = run_in_order(self.frozen_part + self.trainable_part, images)
            matches = in_order.shape == expected.shape and torch.allclose(in_order, expected, atol=1e-5)
        except RuntimeError:  # a child that cannot take its predecessor's output
            matches = False
        self.train(training)
        if not matches:
            raise ValueError(f"model.image.cache_frozen: timm {name!r} does not run as its stem, blocks and head "
                             f"in order; set cache_frozen: false (or use a ResNet, ConvNeXt, EfficientNet...)")

    @torch.no_grad()
    def _frozen_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The stem and frozen blocks, without autograd and in eval mode (frozen means fixed)."""
        training = self.training
        for module in self.frozen_part:
            module.eval()
        features = run_in_order(self.frozen_part, images)
        self.train(training)
        return features

    def forward(self, images: torch.Tensor, item_ids: torch.Tensor | None = None,
                cache: FrozenOutputCache | None = None) -> torch.Tensor:
        """`item_ids` (global item index per row) lets the frozen part's output be cached per item, in `cache`
        (default: this tower's; the video tower keeps its frames' apart, keyed by item and frame)."""
        return self.proj(self.features(images, item_ids, cache))

    def features(self, images: torch.Tensor, item_ids: torch.Tensor | None = None,
                 cache: FrozenOutputCache | None = None) -> torch.Tensor:
        """[n, num_features]: the pooled backbone output, before the projection."""
        # The loader hands float32 images; a bf16 model (DeepSpeed casts parameters, not inputs) wants bf16.
        images = images.to(self.proj.weight.dtype)
        if self.cache_frozen and item_ids is not None and len(images):
            cache = self.frozen_cache if cache is None else cache
            frozen = cache.lookup(item_ids, lambda rows: self._frozen_forward(images[rows]))
            return run_in_order(self.trainable_part, torch.stack(frozen))
        return self.body(images)
