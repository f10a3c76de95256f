"""Two-stage (MoRec's TS): item features computed once by a Ray Data job, a model trained on them."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY
from transrec.batch import IMAGE
from transrec.config import load_config
from transrec.dataloading.dataset_format import DatasetFileError
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.item_store import ItemStore
from transrec.fileio import sha256_file
from transrec.models import TransRec
from transrec.writers.features import FeaturesWriter

CONFIG = "tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from transrec.writers.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("features") / "data"
    prepare_synthetic(root, **TINY)
    return root


def test_a_mom_model_s_features_are_each_tower_s_output_before_its_projection(data):
    torch.manual_seed(0)
    model = TransRec(load_config(CONFIG).model).eval()
    store = ItemStore(data)
    items = store.item_batch(np.arange(12), ImageDecoder(model.cfg.image.image_size, "pil"), model.item_mode)
    features = model.item_encoder.features(items)
    text, image = model.item_encoder.text, model.item_encoder.image
    assert features.shape == (12, max(text.proj.in_features, image.proj.in_features))
    with torch.no_grad():
        vectors = model.encode_items(items)
        for rows, tower in ((items.text_rows, text), (items.image_rows, image)):
            width = tower.proj.in_features
            torch.testing.assert_close(tower.proj(features[rows, :width]), vectors[rows], atol=1e-5, rtol=1e-5)
            assert not features[rows, width:].any()  # zero-padded to the widest tower


def test_the_features_encoder_projects_each_item_s_features_by_its_modality():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["model.item_encoder=features", "model.features=f", "model.features_width=6"])
    encoder = TransRec(cfg.model).item_encoder
    table, modality = torch.randn(10, 6), torch.tensor([0, 1] * 5, dtype=torch.int8)
    encoder.load_features(table, modality)
    ids = torch.tensor([3, 0, 7, 4])
    items = type("Items", (), {"ids": ids})()
    expected = torch.stack([encoder.proj[int(modality[i])](table[i]) for i in ids])
    torch.testing.assert_close(encoder(items), expected)
    assert "table" not in TransRec(cfg.model).state_dict() and not any("table" in k for k in encoder.state_dict())
    with pytest.raises(ValueError, match="width 5, the model was built for 6"):
        encoder.load_features(torch.zeros(10, 5), modality)


def test_the_mlp_features_head_is_morec_s_dnn_per_modality_and_trains():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["model.item_encoder=features", "model.features=f", "model.features_width=6",
                               "model.features_head=mlp"])
    encoder = TransRec(cfg.model).item_encoder
    assert [type(layer) for layer in encoder.proj[IMAGE]] == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    table, modality = torch.randn(10, 6), torch.tensor([0, 1] * 5, dtype=torch.int8)
    encoder.load_features(table, modality)
    items = type("Items", (), {"ids": torch.arange(10)})()
    targets = torch.randn(10, cfg.model.dim)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = nn.functional.mse_loss(encoder(items), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]  # each modality's MLP fits its own items
    encoder.eval()
    with torch.no_grad():
        expected = torch.stack([encoder.proj[int(modality[i])](table[i]) for i in range(10)])
        torch.testing.assert_close(encoder(items), expected)


def test_features_commit_into_the_manifest_and_are_checked_like_every_file(tmp_path, data):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    num_items = json.loads((root / "manifest.json").read_text())["num_items"]
    with pytest.raises(ValueError, match="features name"):
        FeaturesWriter(root, "../x", 4)
    writer = FeaturesWriter(root, "frozen", 4)
    writer.write(0, np.ones((num_items, 4), np.float32))
    assert writer.commit({"source": "test"}) == {"source": "test", "width": 4}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["features"]["frozen"]["width"] == 4
    assert manifest["files"]["features/frozen.npy"]["sha256"] == sha256_file(root / "features" / "frozen.npy")
    assert ItemStore(root).features("frozen").shape == (num_items, 4)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        FeaturesWriter(root, "frozen", 4)
    with pytest.raises(DatasetFileError, match="no item features 'other' \\(has: frozen\\)"):
        ItemStore(root).features("other")
    unfinished = FeaturesWriter(root, "partial", 4)
    with pytest.raises(RuntimeError, match="never written"):
        unfinished.commit({})
    unfinished.abort()
    with open(root / "features" / "frozen.npy", "r+b") as f:  # a flipped byte: the store no longer opens
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(DatasetFileError, match="frozen.npy: sha256 differs"):
        ItemStore(root)


def test_the_ray_data_job_writes_each_item_s_features_the_same_bytes_with_any_actor_count(tmp_path, data):
    import shutil
    import subprocess
    import sys

    from transrec.cluster import features as job

    root = tmp_path / "data"
    shutil.copytree(data, root)
    # in a process of its own, as a user runs it (and apart from any Ray session of this test process), twice:
    # 2 actors, then 1 on the same cluster; small ranges, so each actor encodes several and the last one is short
    script = ("import sys; from transrec.cluster import features; features.CHUNK = 16; "
              "from transrec.launcher.cli import main; "
              "sys.exit(max(main([*sys.argv[1:], '--workers', w, '--name', n]) for w, n in (('2', 'a'), ('1', 'b'))))")
    command = [sys.executable, "-c", script, "features", "--data", str(root), "--config", CONFIG]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store = ItemStore(root)
    assert sha256_file(root / "features" / "a.npy") == sha256_file(root / "features" / "b.npy")
    cfg = load_config(CONFIG)
    towers = job.build_towers(cfg, "").eval()
    ids = np.arange(store.num_items)
    direct = towers.item_encoder.features(store.item_batch(ids, ImageDecoder(cfg.model.image.image_size, "auto"),
                                                           towers.item_mode))
    np.testing.assert_allclose(store.features("a"), direct.numpy(), atol=1e-4)
    assert (store.modality == IMAGE).any() and (store.modality != IMAGE).any()

    # a two-stage model trains on them, with no tower in the step
    from transrec.trainer.torchrun_entry import launch

    result = launch(2, CONFIG, [f"data.path={root}", f"output_dir={tmp_path / 'runs'}", "name=two-stage",
                                "model.item_encoder=features", "model.features=a", "train.max_steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "two-stage" / "results.json").read_text())
    assert summary["steps"] == 2 and summary["best"]["test/ndcg@10"] > 0
