"""`transrec features`: every item of a data set through frozen towers, once, as a Ray Data batch-inference job
(MoRec's two-stage; `model.item_encoder: features` trains on the result with no tower in the step).

Actors (`workers` of them; one GPU each when the cluster has GPUs) hold the towers of a model, an export's or
those a config builds (pretrained MiniLM, or seeded random weights), and encode fixed ranges of item ids; the
driver writes each range's rows into a memory-mapped file as they arrive (bounded memory at any catalogue size),
then moves it into the data set and lists it in the manifest (writers/features.py). The ranges are fixed and
each actor computes with the same number of threads, so the bytes do not depend on scheduling: the same inputs
give the same file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from transrec.config import Config

CHUNK = 512  # items per call of an actor


class _EncodeItems:
    """A Ray Data actor: the frozen towers, encoding the item id ranges it is handed."""

    def __init__(self, cfg_dict: dict, export: str, data_path: str, threads: int):
        import torch

        from transrec.config import from_dict
        from transrec.dataloading.item_store import ItemStore
        from transrec.dataloading.videos import item_decoders

        torch.set_num_threads(threads)
        cfg = from_dict(Config, cfg_dict, "features config")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_towers(cfg, export).to(self.device).eval()
        self.encoder, self.mode = model.item_encoder, model.item_mode
        self.store = ItemStore(data_path)
        self.decoder, self.video_decoder = item_decoders(model.cfg, cfg.data)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (start,), (stop,) = batch["start"], batch["stop"]  # one range per call (batch_size=1)
        items = self.store.item_batch(np.arange(start, stop), self.decoder, self.mode, self.video_decoder)
        items = items.to(self.device)
        return {"start": batch["start"], "features": self.encoder.features(items).numpy()[None]}


def build_towers(cfg: Config, export: str):
    """The model whose towers encode the items: the export's, or the config's (seeded by train.seed)."""
    import torch

    from transrec.models import TransRec

    if export:
        return TransRec.from_pretrained(export, dtype=torch.float32)
    torch.manual_seed(cfg.train.seed)
    return TransRec(cfg.model)


def compute_features(cfg: Config, export: str, name: str, workers: int, overwrite: bool = False) -> dict:
    """Writes item features `name` into the data set `cfg.data.path` (on the cluster `cfg.cluster` names);
    returns their manifest entry."""
    import ray

    from transrec.cluster.launch import connect
    from transrec.cluster.scaling import ray_nodes, resolve_use_gpu
    from transrec.dataloading.dataset_format import read_manifest
    from transrec.writers.features import FeaturesWriter

    towers = build_towers(cfg, export)
    if not hasattr(towers.item_encoder, "features"):
        raise ValueError(f"model.item_encoder {towers.cfg.item_encoder}: no content tower to compute features with")
    data = str(Path(cfg.data.path).absolute())
    num_items = read_manifest(data)["num_items"]
    # checks the name and the data set, before any cluster starts
    writer = FeaturesWriter(data, name, towers.item_encoder.feature_width, overwrite)
    ranges = [{"start": s, "stop": min(s + CHUNK, num_items)} for s in range(0, num_items, CHUNK)]
    threads = max(1, int(cfg.cluster.cpus_per_worker))
    try:
        connect(cfg.cluster)
        encoded = ray.data.from_items(ranges).map_batches(
            _EncodeItems, fn_constructor_args=(cfg.to_dict(), export, data, threads), batch_size=1,
            concurrency=workers, num_cpus=cfg.cluster.cpus_per_worker,
            num_gpus=1 if resolve_use_gpu(cfg.cluster, ray_nodes()) else 0)
        with tqdm(total=num_items, desc=f"features {name}", unit="item") as bar:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                for start, rows in zip(batch["start"], batch["features"]):
                    writer.write(int(start), rows)
                    bar.update(len(rows))
    except BaseException:
        writer.abort()
        raise
    return writer.commit({"source": export or "config", "item_encoder": towers.cfg.item_encoder,
                          "text": towers.cfg.text.pretrained or "random", "image": towers.cfg.image.name,
                          "dtype": "float32"})
