"""`transrec demo`: transfer end to end on two synthetic domains that share no users and no items.

Source (seed 0) and target (seed 1) are drawn from one synthetic world (topics shared, users and items
not). Pretrain on the source, export, then on the target: zero-shot, fine-tuned from the export, and
trained from scratch, next to the popularity baseline. Items are texts, images and videos; all images and clips
are synthetic.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transrec.config import load_config
from transrec.dataloading.dataset_format import MANIFEST

SOURCE = {"users": 1000, "items": 600, "seed": 0, "image_fraction": 0.4, "video_fraction": 0.1}
TARGET = {"users": 600, "items": 400, "seed": 1, "image_fraction": 0.4, "video_fraction": 0.1}


def run_demo(workdir: Path, config_path: str) -> dict:
    from transrec.writers.synthetic import prepare_synthetic
    from transrec.cluster.launch import prepare_and_train
    from transrec.models import TransRec
    from transrec.trainer.evaluate import evaluate_model
    from transrec.trainer.export import export

    data, runs, exports = workdir / "data" / "demo", workdir / "runs", workdir / "exports"
    for name, spec in (("source", SOURCE), ("target", TARGET)):
        if not prepared(data / name, spec):
            prepare_synthetic(data / name, overwrite=True, **spec)
    for run in ("demo-pretrain", "demo-finetune", "demo-scratch"):
        shutil.rmtree(runs / run, ignore_errors=True)

    def config(name: str, dataset: str, *extra: str):
        return load_config(config_path, [f"name={name}", f"output_dir={runs}", f"data.path={data / dataset}", *extra])

    pretrained = prepare_and_train(config("demo-pretrain", "source"), resume=False)
    export_dir = export(runs / "demo-pretrain", exports / "demo")
    target_cfg = config("demo-zero-shot", "target")
    zero_shot = evaluate_model(TransRec.from_pretrained(export_dir), str(data / "target"), target_cfg)["test"]
    finetuned = prepare_and_train(config("demo-finetune", "target", f"init_from={export_dir}"), resume=False)
    scratch = prepare_and_train(config("demo-scratch", "target"), resume=False)

    rows = [
        ("source", "popularity", pretrained["popularity"]["test"]),
        ("source", "pretrained (MoM)", test_metrics(pretrained)),
        ("target", "popularity", finetuned["popularity"]["test"]),
        ("target", "zero-shot from source", zero_shot),
        ("target", "scratch", test_metrics(scratch)),
        ("target", "fine-tuned from source", test_metrics(finetuned)),
    ]
    print_table(rows)
    summary = [{"domain": d, "model": m, **metrics} for d, m, metrics in rows]
    (runs / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return {"rows": summary}


def prepared(path: Path, spec: dict) -> bool:
    """Whether `path` holds the data set of `spec` (one an earlier demo prepared, without videos say, is not)."""
    if not (path / MANIFEST).exists():
        return False
    manifest = json.loads((path / MANIFEST).read_text())
    found = {**manifest, **manifest.get("params", {})}
    return all(found.get(key) == value for key, value in spec.items())


def test_metrics(summary: dict) -> dict:
    """Test metrics of the checkpoint chosen by valid NDCG@10."""
    return {k.removeprefix("test/"): v for k, v in summary["best"].items() if k.startswith("test/")}


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    columns = ["hr@10", "ndcg@10", "hr@20", "ndcg@20"]
    print("\nTest metrics, full ranking, leave-one-out (synthetic data, synthetic images and clips):")
    print(f"{'domain':8} {'model':26} " + " ".join(f"{c:>8}" for c in columns))
    for domain, model, metrics in rows:
        print(f"{domain:8} {model:26} " + " ".join(f"{metrics[c]:8.4f}" for c in columns))
