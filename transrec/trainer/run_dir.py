"""The run directory: RUN/config.yaml (the resolved config), checkpoints/, metrics.jsonl, results.json."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import yaml

from transrec.config import Config, ConfigError, load_config
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
    for tower in ("text", "image"):
        if getattr(cfg.model, tower).cache_frozen and cfg.train.zero_stage == 3:
            # ZeRO-3 gathers parameters collectively: every rank must run the frozen layers on every step
            raise ConfigError(f"model.{tower}.cache_frozen works with train.zero_stage 1 or 2, not 3")
    return cfg


def prepare(cfg: Config, resume: bool) -> Config:
    """Creates (or, with `resume`, reopens) the run directory and writes the resolved config into it."""
    cfg = resolve(cfg)
    run_dir, checkpoints = cfg.run_dir, run_checkpoints(cfg)
    checkpoints.check_writable()  # an unwritable checkpoint storage fails now, not at the first checkpoint
    if checkpoints.latest() is not None and not resume:
        raise ConfigError(f"run {run_dir} already has checkpoints (in {checkpoints}): pass --resume to "
                          f"continue it, or pick another name")
    if not resume and run_dir.exists():
        for stale in ("metrics.jsonl", "results.json"):
            (run_dir / stale).unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create the run directory {run_dir}: {err.strerror or err}") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg


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
