"""A run's checkpoint -> a compact directory anyone can load without DeepSpeed or Ray.

EXPORT/config.json + model.safetensors (written by `TransRec.save_pretrained`, towers apart: the user encoder,
projections and any ID table), text_encoder/ (a transformers model directory), image_encoder/ (timm config +
weights), tokenizer/ (from the dataset the run trained on) and manifest.json (where it came from, each file's
size and sha256, the export's and the checkpoint's total size). Weights only, in `dtype`: no optimizer
state. Written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from transrec.fileio import describe_files
from transrec.trainer.checkpoint import consolidated_state_dict
from transrec.trainer.checkpoint_store import run_checkpoints
from transrec.trainer.finetune import build_model
from transrec.trainer.run_dir import best_or_latest_tag, run_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_checkpoint_model(run_dir: Path, tag: str | None = None):
    """The run's model with the weights of checkpoint `tag` (default: best by valid, else latest)."""
    from transrec.dataloading.dataset_format import read_manifest

    cfg = run_config(run_dir)
    tag = tag or best_or_latest_tag(run_dir)
    model = build_model(cfg, read_manifest(cfg.data.path)["num_items"], load_init=False)
    model.load_state_dict(consolidated_state_dict(run_checkpoints(cfg), tag), strict=True)
    return model.eval(), cfg, tag


def export(run_dir: Path, out: Path, tag: str | None = None, dtype: str = "bfloat16") -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, cfg, tag = load_checkpoint_model(run_dir, tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, dtype=DTYPES[dtype], towers_apart=True)
        shutil.copytree(Path(cfg.data.path) / "tokenizer", tmp / "tokenizer")
        files = describe_files(tmp)
        manifest = {"format": 1, "run": str(run_dir), "tag": tag, "dtype": dtype, "dataset": cfg.data.path,
                    "bytes": sum(f["bytes"] for f in files.values()),
                    "checkpoint_bytes": run_checkpoints(cfg).saved_bytes(tag), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
