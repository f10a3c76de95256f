"""The run directory: RUN/config.yaml (the resolved config), checkpoints/, metrics.jsonl, results.json."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import yaml

from transrec.config import Config, ConfigError, load_config, validate
from transrec.dataloading import resolve_pretrained_path
from transrec.dataloading.dataset_format import read_manifest
from transrec.models.transrec import read_export_config
from transrec.trainer.checkpoint_store import run_checkpoints
from transrec.trainer.finetune import fine_tuning_model


def absolute(path: str) -> str:
    """Workers may start in another directory (or on another node): they get absolute local paths."""
    return path if not path or "://" in path else str(Path(path).resolve())


def resolve(cfg: Config) -> Config:
    """Absolute paths; with `init_from`, the model is the exported one, with the run's training switches."""
    cfg = replace(cfg, output_dir=absolute(cfg.output_dir), init_from=absolute(cfg.init_from),
                  checkpoint_storage=absolute(cfg.checkpoint_storage), data=replace(cfg.data, path=absolute(cfg.data.path)))
    if cfg.init_from:
        exported = Path(cfg.init_from) / "config.json"
        if not exported.exists():
            raise ConfigError(f"init_from: {exported} not found; expected a directory written by `transrec export`")
        cfg = replace(cfg, model=fine_tuning_model(read_export_config(cfg.init_from)[0], cfg.model))
    return validate(cfg, "the resolved config")


def check_model_parts(cfg: Config) -> None:
    """The model's parts are registered ones (before any cluster starts)."""
    from transrec.models import ITEM_ENCODERS, LOSSES, USER_ENCODERS

    for registry, key in ((ITEM_ENCODERS, "item_encoder"), (USER_ENCODERS, "user_encoder"), (LOSSES, "loss")):
        try:
            registry.get(getattr(cfg.model, key))
        except KeyError as err:
            raise ConfigError(f"model.{key}: {err.args[0]}") from None
    towers = set(getattr(ITEM_ENCODERS.get(cfg.model.item_encoder), "modalities", ()))
    text, image = cfg.model.text, cfg.model.image
    if "text" in towers and text.pretrained:
        try:
            resolve_pretrained_path(text.pretrained)
        except FileNotFoundError as err:
            raise ConfigError(f"model.text.pretrained: {err}") from None
    if towers & {"image", "video"} and image.weights and not Path(image.weights).is_file():
        raise ConfigError(f"model.image.weights: {image.weights} is not a file (a safetensors state dict)")


def check_dataset(cfg: Config) -> None:
    """A data set on this machine: its manifest (present, of this format) and the batch size against its samples
    (before any cluster starts)."""
    if "://" in cfg.data.path:
        return
    manifest = read_manifest(cfg.data.path)
    if cfg.model.item_encoder == "features" and cfg.model.features not in manifest.get("features", {}):
        raise ConfigError(f"model.features: {cfg.model.features!r} is not among the item features of {cfg.data.path} "
                          f"({', '.join(manifest.get('features', {})) or 'none'}): run `transrec features` first")
    if cfg.train.batch_size % manifest["users_per_sample"]:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not a multiple of users_per_sample="
                          f"{manifest['users_per_sample']}, the train sequences per sample of {cfg.data.path}")


def prepare(cfg: Config, resume: bool) -> Config:
    """Checks the inputs, then creates (or, with `resume`, reopens) the run directory and writes the resolved
    config into it."""
    cfg = resolve(cfg)
    check_model_parts(cfg)
    check_dataset(cfg)
    run_dir, checkpoints = cfg.run_dir, run_checkpoints(cfg)
    if checkpoints.latest() is not None and not resume:
        raise ConfigError(f"run {run_dir} already has checkpoints (in {checkpoints}): pass --resume to "
                          f"continue it, or pick another name")
    checkpoints.check_writable()  # an unwritable checkpoint storage fails now, not at the first checkpoint
    write_run_dir(cfg, resume)
    return cfg


def write_run_dir(cfg: Config, resume: bool = False) -> None:
    """Creates the run directory, less a previous run's metrics and results unless `resume`, with the resolved
    config in it."""
    run_dir = cfg.run_dir
    if not resume and run_dir.exists():
        for stale in ("metrics.jsonl", "results.json"):
            (run_dir / stale).unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create the run directory {run_dir}: {err.strerror or err}") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    return load_config(path)


def best_or_latest_tag(run_dir: Path) -> str:
    store = run_checkpoints(run_config(run_dir))
    results = run_dir / "results.json"
    if results.exists():
        best = json.loads(results.read_text()).get("best")
        if best and best["tag"] in store.tags():
            return best["tag"]
    tag = store.latest()
    if tag is None:
        raise FileNotFoundError(f"{store} holds no checkpoint")
    return tag
