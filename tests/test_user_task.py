"""PeterRec-style user transfer: `transrec finetune --task user-attribute`, a user attribute from the history."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from transrec.config import load_config
from transrec.dataloading.item_store import ItemStore
from transrec.launcher.cli import main
from transrec.models import TransRec
from transrec.trainer.console import Console
from transrec.trainer.finetune import build_model
from transrec.trainer.metrics import classification_metrics
from transrec.trainer.run_dir import resolve
from transrec.trainer.user_task import UserTask, majority_class, split_users

CONFIG = "tiny"
FAST = ["train.batch_size=8", "train.finetune_blocks=1", "train.adapter_dim=4", "data.image_decoder=pil"]


@pytest.fixture(scope="module")
def export(tmp_path_factory, ml100k_dataset):
    """A tiny model's export, as `transrec export` writes it (random weights: the mechanics are under test)."""
    out = tmp_path_factory.mktemp("user-task") / "export"
    torch.manual_seed(0)
    TransRec(load_config(CONFIG).model).save_pretrained(out, dtype=torch.float32, towers_apart=True)
    return out


def test_accuracy_macro_f1_and_the_majority_class_on_a_hand_made_example():
    labels, predicted = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    # F1 per class: 0: 2*2/(3+2) = 0.8, 1: 2*1/(2+2) = 0.5, 2: 2*1/(1+2) = 2/3
    assert classification_metrics(predicted, labels) == pytest.approx({"accuracy": 4 / 6,
                                                                       "macro_f1": (0.8 + 0.5 + 2 / 3) / 3})
    # a class predicted but never true counts 0; one neither predicted nor true (3) not at all
    assert classification_metrics(torch.tensor([0, 4, 1]), torch.tensor([0, 0, 1])) == pytest.approx(
        {"accuracy": 2 / 3, "macro_f1": (2 / 3 + 1 + 0) / 3})
    majority = majority_class(torch.tensor([1, 1, 0, 2, 1, 2]))
    test = torch.tensor([0, 1, 1, 2])
    assert majority == 1 and majority_class(torch.tensor([2, 0, 2, 0])) == 0  # a tie: the lowest class
    # the baseline predicts 1 for all: accuracy 2/4; F1 of 1 = 2*2/(2+4), of 0 and 2: 0
    assert classification_metrics(torch.full_like(test, majority), test) == pytest.approx(
        {"accuracy": 0.5, "macro_f1": (2 / 3) / 3})


def test_the_user_split_is_deterministic_disjoint_and_stratified():
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [60, 40, 7]))
    split = split_users(labels, seed=3)
    assert all(np.array_equal(split[s], rows) for s, rows in split_users(labels, seed=3).items())
    assert not np.array_equal(split["test"], split_users(labels, seed=4)["test"])
    together = np.concatenate(list(split.values()))
    assert len(together) == len(np.unique(together)) == len(labels)  # disjoint, and every user in one
    for label, count in zip((0, 1, 2), (60, 40, 7)):
        held_out = round(count * 0.15)
        assert [int((labels[split[s]] == label).sum()) for s in ("train", "valid", "test")] == [
            count - 2 * held_out, held_out, held_out]


def test_adapters_mode_trains_only_the_patches_and_the_head(export, ml100k_dataset):
    cfg = resolve(load_config(CONFIG, [f"data.path={ml100k_dataset}", f"init_from={export}", "train.max_steps=2",
                                       *FAST]))
    task = UserTask(cfg, "gender")
    assert task.users.classes == ["F", "M"] and len(task.users.labels) == 943
    classifier = task.classifier("adapters")
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("recommender.adapters.", "head.")) for name in trainable)
    assert any(name.startswith("recommender.adapters.") for name in trainable)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}

    record = task.train(classifier, "adapters", Console())

    changed = {name for name, p in classifier.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable  # every patch and head weight moved; every other weight is bitwise the export's
    assert record["steps"] == 2 and record["stopped"] == "max_steps"
    assert set(record["best"]["test"]) == {"accuracy", "macro_f1"}


def test_an_id_model_transfers_to_the_users_of_its_own_data_set_only(tmp_path, ml100k_dataset, tiny_dataset):
    """PeterRec's setting, the same users and items and another task: there an ID table is valid; elsewhere not."""
    export = tmp_path / "id-export"
    model = replace(load_config(CONFIG, ["model.item_encoder=id"]).model, num_items=ItemStore(ml100k_dataset).num_items)
    torch.manual_seed(0)
    exported = TransRec(model)
    exported.save_pretrained(export, dtype=torch.float32, towers_apart=True)
    (export / "manifest.json").write_text(json.dumps({"dataset": str(ml100k_dataset)}))  # as `transrec export` does
    cfg = resolve(load_config(CONFIG, [f"data.path={ml100k_dataset}", f"init_from={export}", *FAST]))

    classifier = UserTask(cfg, "gender").classifier("full")

    assert torch.equal(classifier.recommender.item_encoder.embedding.weight, exported.item_encoder.embedding.weight)
    elsewhere = resolve(load_config(CONFIG, [f"data.path={tiny_dataset}", f"init_from={export}", *FAST]))
    with pytest.raises(ValueError, match=f"its item table cannot transfer to new items \\(data.path {tiny_dataset}; "
                                         f"the export was trained on {ml100k_dataset}\\)"):
        build_model(elsewhere, ItemStore(tiny_dataset).num_items)


def test_the_command_trains_every_mode_beside_the_majority_class(tmp_path, export, ml100k_dataset, capsys):
    argv = ["finetune", "--task", "user-attribute", "--label", "age", "--from", str(export), "--config", CONFIG,
            *[arg for value in [f"data.path={ml100k_dataset}", f"output_dir={tmp_path}", "name=age",
                                "train.max_steps=1", *FAST] for arg in ("--set", value)]]
    assert main(argv) == 0
    results = json.loads((tmp_path / "age" / "results.json").read_text())
    assert "| majority class (" in capsys.readouterr().out
    assert results["classes"] == ["<25", "25-34", "35-44", "45+"] and sum(results["users"].values()) == 943

    labels = ItemStore(ml100k_dataset).user_attribute("age").codes  # the split, recomputed from the data set
    split = split_users(labels, seed=load_config(CONFIG).train.seed)
    majority = majority_class(torch.from_numpy(labels[split["train"]]))
    assert results["majority"]["class"] == results["classes"][majority]
    assert results["majority"]["test"]["accuracy"] == pytest.approx(np.mean(labels[split["test"]] == majority))

    modes = results["modes"]
    assert list(modes) == ["adapters", "full", "scratch"]
    assert modes["adapters"]["trainable_parameters"] < modes["full"]["trainable_parameters"]
    assert modes["full"]["trainable_parameters"] == modes["full"]["parameters"] == modes["scratch"]["parameters"]


def test_the_scratch_classifier_starts_from_the_run_configs_towers_not_the_exports(tmp_path, export, ml100k_dataset):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    body = tmp_path / "text-body"  # a "pretrained" text tower of the run config (as MiniLM is of the text presets)
    torch.manual_seed(1)
    BertModel(BertConfig(**load_config(CONFIG).model.text.config), add_pooling_layer=False).save_pretrained(body)
    run = load_config(CONFIG, [f"data.path={ml100k_dataset}", f"init_from={export}", f"model.text.pretrained={body}",
                               *FAST])
    task = UserTask(resolve(run), "gender", resolve(replace(run, init_from="")))

    def text_body(mode: str) -> dict[str, torch.Tensor]:
        return task.classifier(mode).recommender.item_encoder.text.body.state_dict()

    pretrained, exported, scratch = load_file(body / "model.safetensors"), text_body("full"), text_body("scratch")
    assert all(torch.equal(scratch[name], pretrained[name]) for name in pretrained)
    assert not torch.equal(exported["encoder.layer.0.attention.self.query.weight"],
                           pretrained["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize(("dataset", "label", "message"), [
    ("tiny_dataset", "gender", "the data set has no user attributes"),
    ("ml100k_dataset", "colour", r"no user attribute 'colour' \(has: gender, age, occupation\)"),
])
def test_a_missing_attribute_is_a_one_line_error_naming_the_data_set(request, tmp_path, export, capsys, dataset,
                                                                     label, message):
    root = request.getfixturevalue(dataset)
    argv = ["finetune", "--task", "user-attribute", "--label", label, "--from", str(export), "--config", CONFIG,
            "--set", f"data.path={root}", "--set", f"output_dir={tmp_path}", "--set", "name=missing"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(root) in err and re.search(message, err)
    assert not (tmp_path / "missing").exists()  # nothing is made before the inputs are checked
