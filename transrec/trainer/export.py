"""A run's checkpoint -> a compact directory anyone can load without DeepSpeed or Ray.

EXPORT/config.json + model.safetensors (written by `TransRec.save_pretrained`, towers apart: the user encoder,
projections and any ID table), text_encoder/ (a transformers model directory), image_encoder/ (timm config +
weights), tokenizer/ (from the dataset the run trained on) and manifest.json (where it came from, each file's
size and sha256, the export's and the checkpoint's total size). Weights only, in `dtype`: no optimizer
state. A text tower with a LoRA (peft) adapter: its body's own weights in text_encoder/ and the adapter in
text_peft/ (peft's format), or the two merged into text_encoder/ (`merge_lora`). Written to a temporary
directory and renamed into place.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside create their floating-point weights in `dtype`."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def load_checkpoint_model(run_dir: Path, tag: str | None = None, dtype: torch.dtype = torch.float32):
    """The run's model with the weights of checkpoint `tag` (default: best by valid, else latest), in `dtype`:
    built in it and given the checkpoint's tensors as they are converted, so a 16-bit model is never held in
    fp32."""
    from transrec.dataloading.dataset_format import read_manifest

    cfg = run_config(run_dir)
    tag = tag or best_or_latest_tag(run_dir)
    with default_dtype(dtype):
        model = build_model(cfg, read_manifest(cfg.data.path)["num_items"], load_init=False)
    model.load_state_dict(consolidated_state_dict(run_checkpoints(cfg), tag, dtype), strict=True, assign=True)
    return model.eval(), cfg, tag


def export(run_dir: Path, out: Path, tag: str | None = None, dtype: str = "bfloat16", merge_lora: bool = False) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, cfg, tag = load_checkpoint_model(run_dir, tag, DTYPES[dtype])
    if merge_lora:
        text = getattr(model.item_encoder, "text", None)
        if text is None or text.peft_config is None:
            raise ValueError(f"--merge-lora: run {run_dir} has no text tower with a LoRA adapter")
        text.merge_peft()
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
