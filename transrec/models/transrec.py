"""TransRec: item encoder (by content) -> Transformer user encoder -> loss, trained end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from transrec.config import ModelConfig, from_dict
from transrec.dataloading.batch import Batch, ItemBatch
from transrec.models.image_encoder import ImageItemEncoder
from transrec.models.item_encoders import ITEM_ENCODERS
from transrec.models.losses import LOSSES
from transrec.models.text_encoder import TextItemEncoder
from transrec.models.user_encoder import USER_ENCODERS


class TransRec(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.item_encoder = ITEM_ENCODERS.get(cfg.item_encoder)(cfg)
        self.user_encoder = USER_ENCODERS.get(cfg.user_encoder)(cfg)
        self.loss = LOSSES.get(cfg.loss)()
        if cfg.gradient_checkpointing:
            for tower in self.towers():
                tower.enable_gradient_checkpointing()

    def towers(self) -> list[TextItemEncoder | ImageItemEncoder]:
        """The content towers: their `body` is the (pretrained) text or image encoder."""
        return [m for m in self.modules() if isinstance(m, (TextItemEncoder, ImageItemEncoder))]

    def encode_items(self, items: ItemBatch) -> torch.Tensor:
        """[U, dim]: one vector per distinct item, in the order of items.ids."""
        return self.item_encoder(items)

    def encode_users(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded histories [B, T, dim] -> user vectors [B, dim], the state at the newest item."""
        return self.user_encoder(item_vectors, mask)[:, -1]

    def forward(self, batch: Batch) -> torch.Tensor:
        """The training loss of a batch: each distinct item is encoded once, then gathered into place."""
        vectors = self.encode_items(batch.items)
        hidden = self.user_encoder(vectors[batch.history], batch.history_mask)
        predicting = batch.target_mask
        if not self.user_encoder.causal:
            # Bidirectional states have seen the whole history: only the last one may predict what follows.
            predicting = predicting.clone()
            predicting[:, :-1] = False
        # The rows each user interacted with in this batch are never negatives for that user.
        B, T = batch.history.shape
        user = torch.arange(B, device=vectors.device).unsqueeze(1).expand(B, T)
        seen = torch.zeros(B, vectors.size(0), dtype=torch.bool, device=vectors.device)
        seen[user[batch.history_mask], batch.history[batch.history_mask]] = True
        seen[user[batch.target_mask], batch.targets[batch.target_mask]] = True
        return self.loss(
            hidden[predicting],
            vectors,
            batch.targets[predicting],
            batch.negatives[predicting],
            batch.items.ids,
            seen[user[predicting]],
        )

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parameters: tower bodies at encoder_lr, the rest at lr.

        Matrices and embeddings decay; biases and norm weights do not. Empty groups are left out.
        """
        encoder = {id(p) for tower in self.towers() for p in tower.body.parameters()}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault(("encoder" if id(p) in encoder else "rest", p.dim() >= 2), []).append(p)
        return [
            {
                "name": part if decay else f"{part}_no_decay",
                "params": params,
                "lr": encoder_lr if part == "encoder" else lr,
                "weight_decay": weight_decay if decay else 0.0,
            }
            for (part, decay), params in groups.items()
        ]

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Writes config.json and model.safetensors: a model that rebuilds with no other file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.cfg)
        # The text tower rebuilds from its full transformers config (random init, then overwritten by
        # the saved weights) and the image tower without its weights file: neither need be present.
        config["text"]["pretrained"] = ""
        text = getattr(self.item_encoder, "text", None)
        if text is not None:
            config["text"]["config"] = text.body.config.to_dict()
        config["image"]["weights"] = ""
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {
            name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in self.state_dict().items()
        }
        safetensors.torch.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "TransRec":
        """Rebuilds a save_pretrained export; safetensors only, nothing is unpickled."""
        directory = Path(directory)
        config_path = directory / "config.json"
        model = cls(from_dict(ModelConfig, json.loads(config_path.read_text()), str(config_path)))
        model.load_state_dict(safetensors.torch.load_file(str(directory / "model.safetensors")), strict=True)
        return model if dtype is None else model.to(dtype)
