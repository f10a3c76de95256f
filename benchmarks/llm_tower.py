"""Decoder-only LLM item towers on this machine: OPT-125M, OPT-350M and OPT-1.3B shapes (their real configs,
written out below; random weights, no hub), a few train steps each under ZeRO-2, ZeRO-3, and ZeRO-3 with the
parameters and optimizer offloaded to CPU: each rank's peak resident memory, seconds per step, items encoded per
second, against DeepSpeed's estimate of the ZeRO-3 model states (estimate_zero3_model_states_mem_needs_all_live).

Each shape's random weights are written once as a transformers directory (bf16 safetensors in 500 MB shards) and
trained as `model.text.pretrained`: under ZeRO-3 the tower is then built inside deepspeed.zero.Init and read
shard by shard into each rank's share, as a real pretrained LLM tower would be. The model: text items only,
last-token pooling, the tower's top `--trainable-blocks` layers trained (gradient-checkpointed), bf16, `--ranks`
torchrun ranks on a synthetic data set; no evaluation. Peak RSS is each rank's process (its DataLoader worker
apart), polled every 0.2 s. DeepSpeed's estimate assumes every weight trains (Adam states for all of them), so it
bounds from above a run whose bottom layers are frozen.

    python benchmarks/llm_tower.py --shapes opt-125m,opt-350m --steps 5
    python benchmarks/llm_tower.py --shapes opt-1.3b --settings zero3-offload --steps 3
    python benchmarks/llm_tower.py --smoke      # 2 steps of OPT-125M under each setting
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import torch

# The models' own configs (facebook/opt-125m, -350m, -1.3b), without their weights.
OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, activation_function="relu",
           enable_bias=True, layer_norm_elementwise_affine=True, dropout=0.1, attention_dropout=0.0,
           pad_token_id=1, bos_token_id=2, eos_token_id=2)
SHAPES = {
    "opt-125m": dict(OPT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     word_embed_proj_dim=768, do_layer_norm_before=True),
    "opt-350m": dict(OPT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(OPT, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048, do_layer_norm_before=True),
}
SETTINGS = {
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "zero3-offload": ["train.zero_stage=3", "train.offload_params=true", "train.offload_optimizer=true"],
}
GIB = 2**30


def write_tower(shape: str, out: Path) -> Path:
    """A random-weight transformers directory of `shape` (once)."""
    from transformers import AutoConfig, AutoModel

    if not (out / "config.json").is_file():
        fields = dict(SHAPES[shape])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        AutoModel.from_config(config, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="500MB")
    return out


def deepspeed_estimate(tower: Path, ranks: int) -> dict:
    """DeepSpeed's ZeRO-3 model-states estimate for the tower on `ranks` ranks: its table, and the GiB per rank
    for the two ZeRO-3 settings run here (one node; its "GPU" is each rank's device, here host memory too)."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live, model_to_params)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tower, dtype=torch.bfloat16)  # (DeepSpeed counts weights by data pointer)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks)
    total, largest = model_to_params(model)
    per_rank = {}
    for setting, offload in (("zero3", False), ("zero3-offload", True)):
        cpu, device, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=ranks,
                                                               cpu_offload=offload, cpu_offload_params=offload)
        per_rank[setting] = round((device + cpu / ranks) / GIB, 2)
    return {"params_m": round(total / 1e6, 1), "table": table.getvalue(), "gib_per_rank": per_rank}


def peak_rss_per_rank(done: threading.Event) -> list[float]:
    """GiB: the largest resident memory of each torchrun rank of this process's launch until `done`."""
    peaks: dict[int, int] = {}
    me = psutil.Process()
    while not done.wait(0.2):
        for agent in me.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                for rank in agent.children():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if "transrec.trainer.torchrun_entry" in rank.cmdline():  # (not a helper the agent ran)
                            peaks[rank.pid] = max(peaks.get(rank.pid, 0), rank.memory_info().rss)
    return [round(peaks[pid] / GIB, 2) for pid in sorted(peaks)]


def run(shape: str, setting: str, tower: Path, args) -> dict:
    from transrec.trainer.torchrun_entry import launch

    name = f"{shape}-{setting}"
    shutil.rmtree(args.workdir / "runs" / name, ignore_errors=True)  # (a run of an earlier invocation)
    sets = [f"name={name}", f"output_dir={args.workdir / 'runs'}", f"data.path={args.workdir / 'data'}",
            "model.item_encoder=text", f"model.text.pretrained={tower}", "model.text.pooling=last",
            f"model.text.trainable_blocks={args.trainable_blocks}", "model.gradient_checkpointing=true",
            "train.precision=bf16", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
            "train.log_every=1", "eval.every_epochs=0", *SETTINGS[setting]]
    done, peaks = threading.Event(), []
    poller = threading.Thread(target=lambda: peaks.extend(peak_rss_per_rank(done)))
    poller.start()
    started = time.perf_counter()
    result = launch(args.ranks, "tiny", sets, timeout=args.timeout)
    wall = time.perf_counter() - started
    done.set()
    poller.join()
    if result.returncode:
        return {"shape": shape, "setting": setting, "error": result.stderr[-2000:]}
    records = [json.loads(line) for line in (args.workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    timed = steps[1:] or steps  # the first step warms up (allocations, oneDNN primitives)
    return {"shape": shape, "setting": setting, "ranks": args.ranks, "steps": len(steps),
            "seconds_per_step": round(sum(r["seconds_per_step"] for r in timed) / len(timed), 2),
            "items_per_s": round(sum(r["items_encoded_per_s"] for r in timed) / len(timed), 1),
            "peak_rss_gib_per_rank": peaks, "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="opt-125m,opt-350m")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="users per rank per step")
    parser.add_argument("--trainable-blocks", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("runs/llm-tower"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--smoke", action="store_true", help="2 steps of OPT-125M under each setting")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.steps = "opt-125m", 2
    if not (args.workdir / "data" / "manifest.json").is_file():
        from transrec.writers.synthetic import prepare_synthetic

        prepare_synthetic(args.workdir / "data", users=400, items=2000, image_fraction=0.0)  # titles only
    for shape in args.shapes.split(","):
        tower = write_tower(shape, args.workdir / "towers" / shape)
        estimate = deepspeed_estimate(tower, args.ranks)
        print(estimate.pop("table"), flush=True)
        print(json.dumps({"shape": shape, "deepspeed_estimate": estimate}), flush=True)
        for setting in args.settings.split(","):
            print(json.dumps(run(shape, setting, tower, args)), flush=True)


if __name__ == "__main__":
    main()
