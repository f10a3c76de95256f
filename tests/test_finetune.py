"""Fine-tuning modes from an export: full, top-k blocks, and adapters (only the adapters train)."""
from __future__ import annotations

import gc

import pytest
import torch

from transrec.config import ConfigError, load_config
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.loader import TrainLoader
from transrec.models import TransRec
from transrec.models.transrec import read_export_config
from transrec.trainer.finetune import build_model
from transrec.trainer.run_dir import resolve

CONFIG = "tiny"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(dataset directory, export directory of a tiny model) -- the export's towers as `transrec export` writes them."""
    from transrec.writers.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("finetune")
    manifest = prepare_synthetic(root / "data", users=48, items=40)
    cfg = resolve(load_config(CONFIG, [f"data.path={root / 'data'}"]))
    torch.manual_seed(0)
    TransRec(cfg.model).save_pretrained(root / "export", dtype=torch.float32, towers_apart=True)
    return root / "data", root / "export", manifest["num_items"]


def finetune_model(pretrained, mode: str, blocks: int = 1) -> TransRec:
    data, export, num_items = pretrained
    cfg = resolve(load_config(CONFIG, [f"data.path={data}", f"init_from={export}", f"train.finetune_mode={mode}",
                                       f"train.finetune_blocks={blocks}", "train.adapter_dim=4"]))
    return build_model(cfg, num_items)


def trainable(model: TransRec) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_full_and_top_k_modes_choose_the_trainable_blocks(pretrained):
    full = finetune_model(pretrained, "full")
    assert trainable(full) == {name for name, _ in full.named_parameters()}
    top = trainable(finetune_model(pretrained, "top_k", blocks=1))
    assert "item_encoder.text.body.encoder.layer.1.output.dense.weight" in top
    assert "item_encoder.image.body.blocks.1.mlp.fc2.weight" in top and "user_encoder.positions.weight" in top
    assert not any(".layer.0." in name or ".blocks.0." in name or "embeddings" in name for name in top)


def test_adapters_mode_trains_only_the_adapters(pretrained):
    data, export, _ = pretrained
    model = finetune_model(pretrained, "adapters")
    # after the user encoder's 1 layer and the top block of each tower
    assert len(model.adapters) == 3 and trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("adapters.")}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    loader = TrainLoader(load_config(CONFIG).data, data, batch_size=8, max_seq_len=10, num_negatives=2, seed=0,
                         rank=0, world_size=1, decoder=ImageDecoder(32, "pil"))
    batches = iter(loader)
    with torch.no_grad():  # a new adapter is the identity: the export's function (up to the kernels chosen:
        first = next(batches)  # hooks keep torch's fused Transformer fast path out of the user encoder)
        torch.testing.assert_close(model.eval()(first), TransRec.from_pretrained(export).eval()(first))
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2, encoder_lr=1e-2, weight_decay=0.01))
    for batch in [first, next(batches)]:
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    del batches, loader
    gc.collect()  # one live StreamingDataset per directory per process

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable(model)  # every adapter weight moved, nothing else did

    model.save_pretrained(export.parent / "adapted", dtype=torch.float32, towers_apart=True)
    reloaded = TransRec.from_pretrained(export.parent / "adapted").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(first), model.eval()(first), atol=0, rtol=0)
    # fine-tuning the adapted export again trains its adapters, and adds none
    again = finetune_model((data, export.parent / "adapted", None), "adapters")
    assert len(again.adapters) == 3 and trainable(again) == trainable(model)


def test_fine_tuning_takes_the_architecture_from_the_export_and_the_training_switches_from_the_run(pretrained):
    data, export, _ = pretrained
    exported = read_export_config(export)[0]
    cfg = resolve(load_config(CONFIG, [f"data.path={data}", f"init_from={export}", "model.dim=8", "model.layers=5",
                                       "model.gradient_checkpointing=true", "model.dropout=0.3",
                                       "model.text.cache_frozen=true", "model.image.trainable_blocks=-1"]))
    assert (cfg.model.dim, cfg.model.layers) == (exported.dim, exported.layers) != (8, 5)
    assert cfg.model.gradient_checkpointing and cfg.model.dropout == 0.3
    assert cfg.model.text.cache_frozen and cfg.model.image.trainable_blocks == -1
    assert cfg.model.text.config == exported.text.config and cfg.model.image.name == exported.image.name


def test_a_fresh_user_encoder_keeps_the_export_s_towers_and_draws_its_own_weights(pretrained):
    data, export, num_items = pretrained
    exported = TransRec.from_pretrained(export).state_dict()

    def fresh(seed: int) -> dict[str, torch.Tensor]:
        cfg = resolve(load_config(CONFIG, [f"data.path={data}", f"init_from={export}", "train.finetune_mode=full",
                                           "train.fresh_user_encoder=true"]))
        torch.manual_seed(seed)
        return build_model(cfg, num_items).state_dict()

    model = fresh(1)
    assert model.keys() == exported.keys()
    for name, tensor in model.items():
        if not name.startswith("user_encoder."):
            assert torch.equal(tensor, exported[name]), name  # the towers and projections: the export's
        elif tensor.dim() >= 2:  # the user encoder's random matrices (norms start at 1 and 0 either way)
            assert tensor.shape == exported[name].shape and not torch.equal(tensor, exported[name]), name
    assert all(torch.equal(tensor, fresh(1)[name]) for name, tensor in model.items())  # drawn from the seed
    with pytest.raises(ConfigError, match="train.fresh_user_encoder needs init_from"):
        load_config(CONFIG, ["train.fresh_user_encoder=true"])


@pytest.mark.parametrize("item_encoder", ["id", "id+text", "id+mom"])
def test_a_model_with_item_ids_does_not_transfer(item_encoder):
    cfg = load_config(CONFIG, ["init_from=some/export", f"model.item_encoder={item_encoder}"])
    with pytest.raises(ValueError, match=f"with item IDs \\({item_encoder.replace('+', '.')}\\): its item table cannot"):
        build_model(cfg, num_items=10)
