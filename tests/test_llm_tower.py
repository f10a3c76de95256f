"""Decoder-only LLM towers under ZeRO-3 (2 torchrun ranks, gloo): a tiny OPT and a tiny Llama, read from
pretrained directories as a real tower would be, their bottom layer frozen, gradient-checkpointed, train as
under ZeRO-2 and resume bit for bit; under zero.Init each rank holds only its share of the tower; a LoRA run's
export loads with peft and plain transformers and gives the trained model's item vectors."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
from peft import PeftModel
from transformers import AutoConfig, AutoModel

from tests.launched import global_batches, losses, resumable_copy
from transrec.trainer.checkpoint import consolidated_state_dict
from transrec.trainer.checkpoint_store import CheckpointStore
from transrec.trainer.export import export, load_checkpoint_model

TOWERS = {
    "opt": dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """family -> a directory with a tiny random model of it, as from_pretrained reads one (vocabulary: the data's)."""
    root = tmp_path_factory.mktemp("towers")
    for family, fields in TOWERS.items():
        fields = dict(fields)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), vocab_size=30522, **fields)
                              ).save_pretrained(root / family)
    return root


def tower_run(towers, family: str, *overrides: str) -> tuple[str, ...]:
    """Overrides for one epoch (3 steps) of a text-only model with the `family` tower: last-token pooling, its
    bottom layer frozen, its layers gradient-checkpointed, fp32."""
    return (f"model.text.pretrained={towers / family}", "model.item_encoder=text", "model.text.pooling=last",
            "model.text.trainable_blocks=1", "model.gradient_checkpointing=true", "train.precision=fp32",
            "train.epochs=1", "eval.every_epochs=0", *overrides)


@pytest.mark.parametrize("family", TOWERS)
def test_zero3_trains_as_zero2(runs, towers, family):
    overrides = tower_run(towers, family)
    zero2, zero3 = runs(f"{family}-z2", 2, *overrides), runs(f"{family}-z3", 3, *overrides)
    assert [step for step, _, _ in losses(zero3)] == [1, 2, 3]
    # (the same sums, reduced in another order: fp32 rounding apart)
    torch.testing.assert_close([loss for _, loss, _ in losses(zero3)], [loss for _, loss, _ in losses(zero2)],
                               rtol=1e-5, atol=0)
    final = consolidated_state_dict(CheckpointStore(zero3 / "checkpoints"), "step3")
    # the embeddings and the bottom layer kept their pretrained weights; the top layer and final norm trained
    for name, weight in AutoModel.from_pretrained(towers / family).state_dict().items():
        frozen = "embed" in name or "layers.0." in name
        assert torch.equal(final[f"item_encoder.text.body.{name}"], weight) == frozen, name


def test_zero3_resumes_bit_identically(runs, towers):
    """On the HLLM family's tower (the resume does not depend on the family): the run of test_zero3_trains_as_zero2
    resumed from its step 2 redoes step 3 bit for bit."""
    overrides = tower_run(towers, "llama")
    zero3 = runs("llama-z3", 3, *overrides)
    resumed = runs(resumable_copy(zero3, 2, "llama-z3-resumed"), 3, *overrides, resume=True)
    assert losses(resumed) == losses(zero3)  # each step's loss and learning rate, bitwise
    assert global_batches(resumed) == global_batches(zero3)
    final = consolidated_state_dict(CheckpointStore(zero3 / "checkpoints"), "step3")
    final_resumed = consolidated_state_dict(CheckpointStore(resumed / "checkpoints"), "step3")
    assert final.keys() == final_resumed.keys()
    assert all(torch.equal(tensor, final_resumed[key]) for key, tensor in final.items())


def partitioned_build_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from transrec.config import load_config
    from transrec.trainer.finetune import build_model
    from transrec.trainer.loop import init_distributed, partitioned_build

    init_distributed()
    cfg = load_config("tiny", overrides)
    with partitioned_build(cfg):
        model = build_model(cfg, num_items=40)
    body = list(model.item_encoder.text.body.parameters())
    torch.save({"held": sum(p.ds_tensor.numel() for p in body), "total": sum(p.ds_numel for p in body),
                "largest_materialized": max(p.numel() for p in body)}, f"{out}.rank{rank}")


def test_under_zero_init_each_rank_holds_its_share_of_the_tower(towers, launch_dataset, tmp_path):
    from transrec.network import free_port

    overrides = [*tower_run(towers, "llama"), "train.zero_stage=3", f"data.path={launch_dataset}"]
    mp.spawn(partitioned_build_rank, args=(2, free_port(), overrides, str(tmp_path / "counts")), nprocs=2)
    counts = [torch.load(tmp_path / f"counts.rank{rank}") for rank in (0, 1)]
    total = counts[0]["total"]
    assert total == sum(p.numel() for p in AutoModel.from_pretrained(towers / "llama").parameters())
    for count in counts:
        assert count["largest_materialized"] == 0  # every weight a placeholder: its data lives in the shares
        assert total / 2 <= count["held"] <= total / 2 * 1.01  # half each (each weight padded to split evenly)


def last_token_vectors(body, proj: dict[str, torch.Tensor], input_ids, attention_mask) -> torch.Tensor:
    """Item vectors as anyone computes them from an export: the body's state at each item's last token, then the
    exported projection."""
    with torch.no_grad():
        states = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = states[torch.arange(len(input_ids)), attention_mask.sum(1) - 1]
    return last @ proj["item_encoder.text.proj.weight"].T + proj["item_encoder.text.proj.bias"]


def test_lora_under_zero3_exports_an_adapter_that_peft_loads_to_the_trained_vectors(runs, towers, tmp_path):
    """LoRA on the top layer of a gradient-checkpointed Llama under ZeRO-3 (every weight of the layers it runs
    through frozen: the crash case of transformers#47254): it trains, and its export gives the trained model's
    item vectors through peft + transformers alone, adapter apart or merged."""
    run = runs("lora-z3", 3, *tower_run(towers, "llama", "train.finetune_mode=lora", "train.finetune_blocks=1",
                                        "train.lr=0.01"))
    assert [step for step, _, _ in losses(run)] == [1, 2, 3]
    trained, _, _ = load_checkpoint_model(run)
    input_ids = torch.tensor([[101, 2000, 3000, 102, 0], [101, 4000, 5000, 6000, 102]])
    attention_mask = (input_ids > 0).long()
    with torch.no_grad():
        expected = trained.item_encoder.text(input_ids, attention_mask)

    apart = export(run, tmp_path / "apart", dtype="float32")
    proj = safetensors.torch.load_file(str(apart / "model.safetensors"))
    plain = AutoModel.from_pretrained(apart / "text_encoder").eval()
    adapted = PeftModel.from_pretrained(plain, apart / "text_peft").eval()
    lora_b = [t for name, t in safetensors.torch.load_file(str(apart / "text_peft" / "adapter_model.safetensors")
                                                           ).items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # the adapter trained (it starts at zero)
    torch.testing.assert_close(last_token_vectors(adapted, proj, input_ids, attention_mask), expected)

    merged = export(run, tmp_path / "merged", dtype="float32", merge_lora=True)
    assert not (merged / "text_peft").exists()
    body = AutoModel.from_pretrained(merged / "text_encoder").eval()
    torch.testing.assert_close(last_token_vectors(body, proj, input_ids, attention_mask), expected)
    without_adapter = AutoModel.from_pretrained(towers / "llama").eval()
    assert not torch.allclose(last_token_vectors(without_adapter, proj, input_ids, attention_mask), expected)
