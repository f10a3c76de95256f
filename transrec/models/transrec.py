"""TransRec: item encoder (by content) -> Transformer user encoder -> loss, trained end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, NamedTuple

import safetensors.torch
import torch
from torch import nn

from transrec.config import ModelConfig, from_dict
from transrec.batch import Batch, ItemBatch
from transrec.models.image_encoder import ImageItemEncoder, split_blocks
from transrec.models.item_encoders import ITEM_ENCODERS
from transrec.models.losses import LOSSES
from transrec.models.negatives import log_inclusion
from transrec.models.text_encoder import TextItemEncoder
from transrec.models.user_encoder import USER_ENCODERS
from transrec.models.video_encoder import VideoItemEncoder


class Adapter(nn.Module):
    """Bottleneck adapter (AdapterRec): x + up(gelu(down(x))) over the feature axis (last, or channels of a
    feature map). `up` starts at zero, so a new adapter leaves its block's function unchanged."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.movedim(1, -1) if x.dim() == 4 else x
        out = channels_last + self.up(nn.functional.gelu(self.down(channels_last)))
        return out.movedim(-1, 1) if x.dim() == 4 else out


def _width(block: nn.Module) -> int:
    """Features of a block's output: those of its last linear or convolution layer."""
    last = [m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def _adapt_output(adapter: Adapter):
    def hook(module, inputs, output):
        if isinstance(output, tuple):  # transformers layers return (hidden, ...)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


TEXT_PEFT = "text_peft"  # an export's subdirectory for the text tower's peft adapter, in peft's own format


def read_export_config(directory: str | Path) -> tuple[ModelConfig, dict | None]:
    """(model config, adapter settings or None) of a save_pretrained export."""
    config_path = Path(directory) / "config.json"
    saved = json.loads(config_path.read_text())
    adapters = saved.pop("adapters", None)
    return from_dict(ModelConfig, saved, str(config_path)), adapters


class StepOutput(NamedTuple):
    loss: torch.Tensor
    item_vectors: torch.Tensor  # [R, d] of every row of batch.row_ids, detached (for an ItemVectorBank)


def seen_pairs(batch: Batch, predicting: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, row) pairs of each predicting position and the other items of its window (history and
    targets): the user interacted with them, so they are no negatives. O(positions x window), not x catalogue."""
    window = torch.cat([batch.history, batch.targets], 1)  # [B, 2T]
    valid = torch.cat([batch.history_mask, batch.target_mask], 1)
    row = predicting.nonzero()[:, 0]
    items, keep = window[row], valid[row] & (window[row] != targets[:, None])
    positions = torch.arange(row.numel(), device=row.device)[:, None].expand_as(items)
    return positions[keep], items[keep]


class TransRec(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter_settings: dict | None = None  # set by add_adapters
        self.item_encoder = ITEM_ENCODERS.get(cfg.item_encoder)(cfg)
        self.user_encoder = USER_ENCODERS.get(cfg.user_encoder)(cfg)
        self.loss = LOSSES.get(cfg.loss)()
        # train frequency of each item (set_item_popularity): data, not weights, so not saved with the model
        self.register_buffer("popularity", torch.zeros(0), persistent=False)
        if cfg.gradient_checkpointing:
            for tower in self.towers():
                tower.enable_gradient_checkpointing()

    def towers(self) -> list[TextItemEncoder | ImageItemEncoder]:
        """The content towers: their `body` is the (pretrained) text or image encoder."""
        return [m for m in self.modules() if isinstance(m, (TextItemEncoder, ImageItemEncoder))]

    @property
    def item_mode(self) -> str:
        """How the data routes this model's items to its towers (item_store.ITEM_MODES)."""
        return self.item_encoder.mode

    def encode_items(self, items: ItemBatch) -> torch.Tensor:
        """[U, dim]: one vector per distinct item, in the order of items.ids."""
        return self.item_encoder(items)

    def encode_users(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded histories [B, T, dim] -> user vectors [B, dim], the state at the newest item (bert4rec: at
        a mask appended after it)."""
        if self.user_encoder.cloze:
            item_vectors, mask = self.user_encoder.append_mask(item_vectors, mask)
        return self.user_encoder(item_vectors, mask)[:, -1]

    def scoring(self, vectors: torch.Tensor) -> torch.Tensor:
        """User or item vectors as they are compared (dot product): unit length when model.temperature > 0.
        Only scores see them; the user encoder reads the item vectors as encoded."""
        return nn.functional.normalize(vectors, dim=-1) if self.cfg.temperature > 0 else vectors

    def predicting(self, batch: Batch) -> torch.Tensor:
        """[B, T] True at the positions whose state predicts a target: every one with a target (causal), or only
        the newest (bidirectional states have seen the whole history, their own targets included); bert4rec's
        cloze: the masked positions of each window (history, then its last target), [B, T+1]."""
        if batch.cloze is not None:
            return batch.cloze
        if self.user_encoder.causal:
            return batch.target_mask
        predicting = batch.target_mask.clone()
        predicting[:, :-1] = False
        return predicting

    @property
    def candidates_are_sampled(self) -> bool:
        """Whether the softmax sees a sample of the catalogue (to be corrected by log q) or all of it."""
        sampled_bank = self.cfg.negatives == "bank" and self.cfg.sampled_negatives > 0
        return self.cfg.negatives in ("inbatch", "mixed") or sampled_bank

    def set_item_popularity(self, counts: torch.Tensor) -> None:
        """Train interactions of every item [N], for the logQ correction (an item never seen counts once)."""
        counts = counts.double().clamp_min(1)
        self.popularity = (counts / counts.sum()).float().to(self.popularity.device)

    def forward(self, batch: Batch, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                normalizer: float | None = None, extra: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> StepOutput:
        """The training loss of a batch: each distinct item is encoded once, then gathered into place.

        `gather` maps the vectors of `batch.items` to those of every row of `batch.row_ids` (ranks sharing
        their items: each encodes its share, trainer/item_sharing.py); `normalizer` divides the summed loss
        (default: this batch's predicting positions); `extra` = (ids, vectors) of more negatives, no gradient."""
        own = self.encode_items(batch.items)
        vectors = own if gather is None else gather(own)  # [R, d]
        predicting = self.predicting(batch)
        if batch.cloze is None:
            hidden = self.user_encoder(vectors[batch.history], batch.history_mask)
            targets, negatives = batch.targets[predicting], batch.negatives[predicting]
        else:  # each window's masked items, predicted from both sides
            sequence = torch.cat([batch.history, batch.targets[:, -1:]], 1)
            sequence_mask = torch.cat([batch.history_mask, batch.target_mask[:, -1:]], 1)
            hidden = self.user_encoder(self.user_encoder.masked(vectors[sequence], batch.cloze), sequence_mask)
            targets, negatives = sequence[predicting], batch.negatives.new_zeros(int(predicting.sum()), 0)
        users = self.scoring(hidden[predicting])
        if self.cfg.temperature > 0:
            users = users / self.cfg.temperature
        candidates, candidate_ids = self.scoring(vectors), batch.row_ids
        if extra is not None:
            candidates = torch.cat([candidates, self.scoring(extra[1].to(candidates.dtype))])
            candidate_ids = torch.cat([candidate_ids, extra[0]])
        log_q = None
        if self.cfg.logq_correction and self.popularity.numel() and self.candidates_are_sampled:
            sampled = self.cfg.sampled_negatives if self.cfg.negatives in ("mixed", "bank") else 0
            log_q = log_inclusion(self.popularity, targets.numel(), sampled)[candidate_ids]
        excluded = seen_pairs(batch, predicting, targets) if self.cfg.mask_seen else None
        loss = self.loss(users, candidates, targets, negatives, excluded, log_q)
        return StepOutput(loss / (normalizer or max(targets.numel(), 1)), vectors.detach())

    def param_groups(self, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parameters: pretrained tower bodies at encoder_lr (gently, not to
        erase what they know), the rest, randomly initialized towers included, at lr.

        Matrices and embeddings decay; biases and norm weights do not. Empty groups are left out.
        """
        encoder = {id(p) for tower in self.towers() if tower.pretrained for p in tower.body.parameters()}
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

    def add_adapters(self, blocks: int, dim: int) -> nn.ModuleList:
        """Bottleneck adapters after every user-encoder layer, each tower's top `blocks` blocks (the image tower's
        adapt video frames too) and every temporal layer of a video tower; returns them. (The text tower's top
        `blocks` must be its trainable ones, which run with autograd.)"""
        targets = [(block, self.cfg.dim) for block in self.user_encoder.blocks]
        targets += [(block, self.cfg.dim) for video in self.modules() if isinstance(video, VideoItemEncoder)
                    for block in video.blocks]
        for tower in self.towers():
            if isinstance(tower, TextItemEncoder):  # every transformers layer outputs hidden_size features
                targets += [(layer, tower.transformer.config.hidden_size) for layer in tower.layers[-blocks:]]
            else:
                targets += [(block, _width(block)) for block in split_blocks(tower.body).blocks[-blocks:]]
        self.adapters = nn.ModuleList(Adapter(width, dim) for _, width in targets)
        targets = [block for block, _ in targets]
        for block, adapter in zip(targets, self.adapters):
            block.register_forward_hook(_adapt_output(adapter))
        self.adapter_settings = {"blocks": blocks, "dim": dim}
        return self.adapters

    def tower_bodies(self) -> list[tuple[str, str, TextItemEncoder | ImageItemEncoder]]:
        """(state-dict prefix of the body, export subdirectory, tower) of each content tower."""
        return [(f"{name}.body.", "text_encoder" if isinstance(tower, TextItemEncoder) else "image_encoder", tower)
                for name, tower in self.named_modules() if isinstance(tower, (TextItemEncoder, ImageItemEncoder))]

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                        towers_apart: bool = False) -> None:
        """Writes config.json and model.safetensors: a model that rebuilds with no other file.

        With `towers_apart`, each tower's body is stored in its own library's format instead of in
        model.safetensors (every weight is still stored once): text_encoder/ loads with
        `transformers.AutoModel.from_pretrained`, image_encoder/ with `timm.create_model("local-dir:...")`
        or `timm.create_model(name, num_classes=0, **model_args)` + its model.safetensors.

        A text tower with a peft adapter (LoRA...) is stored as its body's own weights (under their transformers
        names) and the adapter in text_peft/, which `peft.PeftModel.from_pretrained(body, "text_peft")` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.cfg)
        # The text tower rebuilds from its full transformers config (random init, then overwritten by
        # the saved weights) and the image tower without its weights file: neither need be present.
        config["text"]["pretrained"] = ""
        text = getattr(self.item_encoder, "text", None)
        if text is not None:
            config["text"]["config"] = text.transformer.config.to_dict()
        config["image"]["weights"] = ""
        if self.adapter_settings:
            config["adapters"] = self.adapter_settings
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        def stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
                    for name, t in tensors.items()}

        state = stored(self.state_dict())
        if text is not None and text.peft_config is not None:
            from peft import get_base_model_state_dict

            prefix = next(prefix for prefix, _, tower in self.tower_bodies() if tower is text)
            body = {name.removeprefix(prefix): state.pop(name) for name in list(state) if name.startswith(prefix)}
            text.body.save_pretrained(str(directory / TEXT_PEFT), state_dict=body)  # the adapter's weights only
            state.update({prefix + name: t for name, t in stored(get_base_model_state_dict(text.body)).items()})
        for prefix, subdir, tower in self.tower_bodies() if towers_apart else []:
            (directory / subdir).mkdir(exist_ok=True)
            body = {name.removeprefix(prefix): state.pop(name) for name in list(state) if name.startswith(prefix)}
            safetensors.torch.save_file(body, str(directory / subdir / "model.safetensors"), metadata={"format": "pt"})
            if isinstance(tower, TextItemEncoder):
                tower.transformer.config.save_pretrained(directory / subdir)
            else:
                timm_config = {"architecture": self.cfg.image.name, "num_classes": 0,
                               "num_features": tower.body.num_features, "model_args": self.cfg.image.kwargs,
                               "pretrained_cfg": tower.body.pretrained_cfg}
                (directory / subdir / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
        safetensors.torch.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        cfg: ModelConfig | None = None) -> "TransRec":
        """Rebuilds a save_pretrained export (towers apart or not); safetensors only, nothing is unpickled.
        `cfg` replaces the saved config where it describes the same weights (e.g. other trainable blocks)."""
        directory = Path(directory)
        saved, adapters = read_export_config(directory)
        model = cls(cfg or saved)
        if adapters:
            model.add_adapters(**adapters)
        state = safetensors.torch.load_file(str(directory / "model.safetensors"))
        for prefix, subdir, _ in model.tower_bodies():
            if (directory / subdir / "model.safetensors").exists():
                body = safetensors.torch.load_file(str(directory / subdir / "model.safetensors"))
                state.update({prefix + name: t for name, t in body.items()})
        model.load_state_dict(state, strict=True)
        if (directory / TEXT_PEFT).is_dir():
            model.item_encoder.text.load_peft(directory / TEXT_PEFT)
        for tower in model.towers():
            tower.pretrained = True  # whatever they started from, their weights are trained ones now
        # one dtype throughout (default: the export's): transformers reads a tower body in the dtype it was saved in
        exported = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        return model.to(dtype or exported)
