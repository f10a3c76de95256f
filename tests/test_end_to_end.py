"""The whole path on the real stack: prepare -> 2 Ray workers x ZeRO-2 -> checkpoint -> export -> reload -> fine-tune."""
import json

import pytest
import torch

from transrec.launcher.cli import main

CONFIG = "tiny"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    yield
    ray.shutdown()


def test_pretrain_checkpoint_export_reload_finetune(tmp_path, ray_cluster, capfd):
    source, target = tmp_path / "source", tmp_path / "target"
    assert main(["prepare", "synthetic", "--out", str(source), "--users", "48", "--items", "40", "--seed", "0"]) == 0
    assert main(["prepare", "synthetic", "--out", str(target), "--users", "32", "--items", "30", "--seed", "1"]) == 0
    runs = tmp_path / "runs"
    common = ["--set", f"output_dir={runs}", "--set", "train.max_steps=3", "--set", "train.checkpoint_every=2"]
    assert main(["pretrain", "--config", CONFIG, "--set", "name=pre", "--set", f"data.path={source}", *common]) == 0

    run = runs / "pre"
    shown = capfd.readouterr()
    console = shown.out + shown.err
    assert "[pre] step 3: valid/hr@10=" in console  # rank 0's evaluation, drawn by the driver
    assert "RayTrainWorker" not in console and "DeepSpeed" not in console  # the workers' chatter is in logs/
    assert {p.name for p in (run / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3 and results["best"]["tag"] == "step3"
    assert (run / "checkpoints" / "latest").read_text() == "step3"
    for tag in ("step2", "step3"):  # every rank's state is in every checkpoint
        assert {p.name for p in (run / "checkpoints" / tag).glob("rank*_state.pt")} == {"rank0_state.pt", "rank1_state.pt"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"popularity", "train", "eval", "machine"}
    machine = next(r for r in records if r["kind"] == "machine")  # the settings that bound a rank's memory
    assert machine["malloc_mmap_threshold"] == str(4 << 20) and machine["onednn_primitive_cache"] == "128"
    assert all(0 < r["mfu"] < 1 and r["tflops_per_s"] > 0 and 0.1 < r["max_rank_rss_gb"] < 64
               for r in records if r["kind"] == "train")
    assert (run / "curves.png").stat().st_size > 0

    export_dir = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(export_dir), "--dtype", "float32"]) == 0
    assert {p.name for p in export_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer", "manifest.json"}

    # the exported model (no DeepSpeed) scores exactly like the checkpoint it came from
    from transrec.models import TransRec
    from transrec.trainer.export import load_checkpoint_model

    from_checkpoint, _, tag = load_checkpoint_model(run)
    exported = TransRec.from_pretrained(export_dir).eval()
    for name, tensor in from_checkpoint.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
    capfd.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 0
    by_checkpoint = json.loads(capfd.readouterr().out)
    # the export says how its towers are fed (the ViT takes 32 px images): no config needed
    assert main(["evaluate", "--export", str(export_dir), "--data", str(source)]) == 0
    by_export = json.loads(capfd.readouterr().out)
    assert by_checkpoint["test"] == by_export["test"] and by_checkpoint["valid"] == by_export["valid"]
    # and the distributed in-training evaluation agrees with the one-process one
    for key, value in by_checkpoint["test"].items():
        assert value == pytest.approx(results["best"][f"test/{key}"], abs=1e-6)

    # the transfer study (fine-tuned from the export; scratch is a plain pretrain), on half and all of the
    # target's users
    study = tmp_path / "study"
    assert main(["transfer", "--from", str(export_dir), "--data", str(target), "--config", CONFIG, *common,
                 "--fractions", "0.5,1", "--seeds", "1", "--methods", "fine-tuned", "--out", str(study)]) == 0
    fine = json.loads((study / "runs" / "fine-tuned-users1-seed0" / "results.json").read_text())
    assert fine["steps"] == 2  # one epoch: 32 users in batches of 8 on each of 2 ranks
    assert fine["epochs"] == 1 and fine["history"][-1]["epoch"] == 1  # the last step ended the epoch
    assert fine["best"]["test/ndcg@10"] > 0.0
    half = json.loads((study / "runs" / "fine-tuned-users0.5-seed0" / "results.json").read_text())
    assert half["steps"] == 1  # 16 users kept: one batch per epoch
    report = (study / "report.md").read_text().splitlines()
    cells = [line.split(" | ") for line in report if line.startswith("| 50%") or line.startswith("| 100%")]
    assert [c[1] for c in cells] == ["popularity", "zero-shot", "zero-shot+popularity", "fine-tuned"] * 2
    # each cell is its run's own result
    assert cells[7][4].startswith(f"{fine['best']['test/ndcg@10']:.4f} ± 0.0000")
    assert cells[3][4].startswith(f"{half['best']['test/ndcg@10']:.4f} ± 0.0000")
    assert cells[7][5] == f"{fine['best']['valid/ndcg@10']:.4f} ± 0.0000"  # the valid metric the row was chosen at
    assert report[0].startswith(f"Study: `--from {export_dir} --data {target} --config {CONFIG}`")
    assert "`--set train.max_steps=3`" in report[0]  # the overrides every run of the study had
    prior = json.loads((study / "runs" / "zero-shot+popularity-users1-seed0" / "results.json").read_text())
    by_weight = prior["valid_by_prior_weight"]  # the weight is chosen on valid
    assert prior["prior_weight"] == float(max(by_weight, key=by_weight.get))
    assert (study / "report.png").stat().st_size > 0


def test_pretrain_refuses_to_overwrite_a_run(tmp_path, tiny_dataset, capsys):
    run = tmp_path / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step1")
    code = main(["pretrain", "--config", CONFIG, "--set", "name=x", "--set", f"output_dir={tmp_path / 'runs'}",
                 "--set", f"data.path={tiny_dataset}"])
    assert code == 2 and "already has checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny", "demo", "ml100k-id", "ml100k-twostage", "ml100k-text", "ml100k-mom"])
def test_bad_input_is_one_line_naming_the_key_before_any_cluster_starts(tmp_path, tiny_dataset, capsys, preset,
                                                                        monkeypatch):
    monkeypatch.setattr("transrec.cluster.launch.train_on_cluster", lambda cfg: pytest.fail("reached the cluster"))
    cases = {  # override -> what the one line must say
        "model.loss=foo": "model.loss must be one of 'softmax', 'bce', got 'foo'",
        "train.zero_stage=5": "train.zero_stage must be one of 0, 1, 2, 3, got 5",
        "train.batch_size=-4": "train.batch_size must be > 0, got -4",
        "train.epochz=3": "unknown key 'train.epochz'",
        "model.dim=wide": "model.dim must be int, got str 'wide'",
        "model.item_encoder=nope": "model.item_encoder: unknown item encoder 'nope'; known: ",
        "model.user_encoder=nope": "model.user_encoder: unknown user encoder 'nope'; known: ",
        f"data.path={tmp_path / 'nonexistent'}": "nonexistent/manifest.json: missing",
        "train.batch_size=5": "train.batch_size 5 is not a multiple of users_per_sample=8",
        "eval.select_metric=ndcg@7": "eval.select_metric must be a metric of eval.ks (hr@5, hr@10, hr@20, ndcg@5,",
    }
    for override, message in cases.items():
        sets = [f"output_dir={tmp_path}", f"name={preset}", f"data.path={tiny_dataset}", override]
        code = main(["pretrain", "--config", preset, *(arg for item in sets for arg in ("--set", item))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, (override, err)
        assert err.startswith("transrec pretrain: error: ")
    assert not (tmp_path / preset).exists()  # nothing written


def test_missing_tower_weights_are_named_before_any_cluster_starts(tmp_path, tiny_dataset, capsys, monkeypatch):
    monkeypatch.setattr("transrec.cluster.launch.train_on_cluster", lambda cfg: pytest.fail("reached the cluster"))
    missing = tmp_path / "missing"
    cases = {"model.text.pretrained": f"model.text.pretrained: pretrained model '{missing}': not 'minilm' and not a",
             "model.image.weights": f"model.image.weights: {missing} is not a file"}
    for key, message in cases.items():
        sets = [f"output_dir={tmp_path}", f"data.path={tiny_dataset}", f"{key}={missing}"]
        code = main(["pretrain", "--config", "tiny", *(arg for item in sets for arg in ("--set", item))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and message in err, (key, err)
    assert not (tmp_path / "tiny").exists()
