"""Video tower: a clip's sampled frames, each through the image tower, pooled over time into the item's vector.

A frame is an image, so frames go through the model's image tower (ImageItemEncoder): its weights, trainable
blocks, gradient checkpointing and adapters serve both, and a still clip lands where its poster does. The video
tower adds the temporal pooling (`model.video.temporal`) and a frozen-part cache of its own, per item and frame.
"""
from __future__ import annotations

import torch
from torch import nn

from transrec.config import ModelConfig
from transrec.models.frozen_cache import FrozenOutputCache
from transrec.models.image_encoder import ImageItemEncoder
from transrec.registry import Registry

# A frame's key in the frame cache: item * FRAME_KEY_STRIDE + its index in the clip (clips of under 2^24 frames).
FRAME_KEY_STRIDE = 1 << 24

TEMPORAL_POOLING: Registry[type[nn.Module]] = Registry("temporal pooling")


@TEMPORAL_POOLING.register("mean")
class MeanPooling(nn.Module):
    """The mean of a clip's frame vectors: [n, K, d] -> [n, d]."""

    blocks: tuple[nn.Module, ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(1)


@TEMPORAL_POOLING.register("transformer")
class TemporalTransformer(nn.Module):
    """A small pre-norm Transformer over a clip's frame vectors (frame positions learned), then their mean:
    [n, K, d] -> [n, d]. Its positions and the last layer of each residual branch start at zero, so it starts as
    the mean pooling and a model trained with the mean (or on images only) keeps its item vectors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(cfg.video.frames, cfg.dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, cfg.dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.video.temporal_layers))
        for block in self.blocks:
            for last in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames + self.positions[: frames.shape[1]]
        for block in self.blocks:
            x = block(x)
        return x.mean(1)


class VideoItemEncoder(nn.Module):
    """Clips float [n, K, 3, H, W] (normalized frames) -> item vectors [n, dim].

    It holds no image tower: the model's is handed to each call, so its weights exist once (a module registered
    under two parents would be saved twice in every state dict)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.frames = cfg.video.frames
        self.temporal = TEMPORAL_POOLING.get(cfg.video.temporal)(cfg)
        self.frame_cache = FrozenOutputCache()  # the image tower's frozen part, per (item, frame)

    @property
    def blocks(self) -> list[nn.Module]:
        """The temporal layers (adapters follow them); none for the mean."""
        return list(self.temporal.blocks)

    def forward(self, clips: torch.Tensor, image_tower: ImageItemEncoder, item_ids: torch.Tensor | None = None,
                frame_indices: torch.Tensor | None = None) -> torch.Tensor:
        """`item_ids` [n] and `frame_indices` [n, K] (which frames of each clip `clips` holds) let the frozen
        part's output be cached per frame."""
        n, k = clips.shape[:2]
        keys = None
        if item_ids is not None and frame_indices is not None:
            keys = (item_ids[:, None] * FRAME_KEY_STRIDE + frame_indices).flatten()
        frames = image_tower(clips.flatten(0, 1), keys, self.frame_cache)
        return self.temporal(frames.view(n, k, frames.shape[-1]))

    def features(self, clips: torch.Tensor, image_tower: ImageItemEncoder) -> torch.Tensor:
        """[n, num_features]: the mean of the frames' image features, before the projection (two-stage's input)."""
        features = image_tower.features(clips.flatten(0, 1))
        return features.view(*clips.shape[:2], features.shape[-1]).mean(1)
