"""Compact export of a ZeRO checkpoint: bf16 weights only, at most a quarter of the checkpoint, the text tower a
transformers model directory, the image tower timm weights, and nothing to unpickle."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from transformers import AutoModel

from transrec.models import TransRec
from transrec.trainer.checkpoint_store import CheckpointStore
from transrec.trainer.export import export, load_checkpoint_model
from transrec.trainer.torchrun_entry import launch

CONFIG = "tiny"


def files_bytes(directory: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in directory.rglob(pattern) if p.is_file())


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """One 2-rank bf16 run (the GPU default, and an option on CPU) of a ResNet image tower, every encoder weight
    trained, so the checkpoint holds optimizer state for all of them: the run of both tests."""
    from transrec.writers.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("bf16")
    prepare_synthetic(root / "data", users=48, items=40)
    resnet = "{layers: [1, 1, 1, 1], channels: [8, 16, 32, 64], stem_width: 8}"
    sets = ["name=bf16", f"output_dir={root / 'runs'}", f"data.path={root / 'data'}", "train.max_steps=2",
            "train.precision=bf16", "model.image.name=resnet18", f"model.image.kwargs={resnet}",
            "model.text.trainable_blocks=-1", "model.image.trainable_blocks=-1"]
    result = launch(2, CONFIG, sets)
    assert result.returncode == 0, result.stderr[-5000:]
    return root / "runs" / "bf16"


@pytest.fixture(scope="module")
def bf16_export(bf16_run, tmp_path_factory) -> Path:
    """The export of that run: what both tests load."""
    return export(bf16_run, tmp_path_factory.mktemp("bf16-export") / "export")


def test_bf16_export_is_a_quarter_of_the_checkpoint_and_loads_with_each_library(bf16_run, bf16_export):
    manifest = json.loads((bf16_export / "manifest.json").read_text())
    checkpoint_dir = bf16_run / "checkpoints" / manifest["tag"]
    assert manifest["checkpoint_bytes"] == CheckpointStore(checkpoint_dir.parent).saved_bytes(manifest["tag"]) == files_bytes(checkpoint_dir, "*.pt")
    assert manifest["bytes"] == files_bytes(bf16_export) - (bf16_export / "manifest.json").stat().st_size
    assert files_bytes(bf16_export) * 4 <= files_bytes(checkpoint_dir), \
        (files_bytes(bf16_export), files_bytes(checkpoint_dir))
    assert not [p for p in bf16_export.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]  # nothing pickled

    reference, cfg, _ = load_checkpoint_model(bf16_run)
    model = TransRec.from_pretrained(bf16_export).eval()
    for name, tensor in reference.state_dict().items():  # the checkpoint's weights, rounded to bf16 once
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(model.state_dict()[name], expected), name
    text, image = model.item_encoder.text.body.float(), model.item_encoder.image.body.float()

    # the text tower: a plain transformers model directory
    loaded_text = AutoModel.from_pretrained(bf16_export / "text_encoder").float().eval()
    tokens = torch.randint(1000, 30000, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded_text(input_ids=tokens).last_hidden_state,
                                   text(input_ids=tokens).last_hidden_state, atol=0, rtol=0)

    # the image tower: timm weights, by name + kwargs, or from the directory alone
    weights = safetensors.torch.load_file(str(bf16_export / "image_encoder" / "model.safetensors"))
    by_name = timm.create_model(cfg.model.image.name, pretrained=False, num_classes=0, **cfg.model.image.kwargs)
    by_name.load_state_dict(weights, strict=True)
    from_dir = timm.create_model(f"local-dir:{bf16_export / 'image_encoder'}", pretrained=True)
    images = torch.randn(2, 3, cfg.model.image.image_size, cfg.model.image.image_size)
    with torch.no_grad():
        expected = image(images)
        for loaded_image in (by_name.float().eval(), from_dir.float().eval()):
            torch.testing.assert_close(loaded_image(images), expected, atol=0, rtol=0)


def test_bf16_training_with_a_batchnorm_image_tower(bf16_run, bf16_export):
    """With a ResNet tower in bf16, its batch-norm statistics are cast with the weights, the run trains, and the
    export loaded in bf16 holds the checkpoint's weights."""
    losses = [json.loads(line)["loss"] for line in (bf16_run / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    reference, _, _ = load_checkpoint_model(bf16_run)
    model = TransRec.from_pretrained(bf16_export, dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(model.state_dict()[name], expected), name
