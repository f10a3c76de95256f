"""On paper: the memory and time of an HLLM-1B-scale run at MicroLens scale (1B interactions, 1M items) on 8 and 64
H100s, from the model's exact parameter count, DeepSpeed's own ZeRO-3 estimate of the model states, and this
project's measurements where it has them (the distinct items a batch encodes; packed titles, no padding FLOPs).

HLLM-1B (arXiv 2409.12740): an item LLM and a user LLM, each TinyLlama-1.1B, both fully trained. Its item LLM
turns an item's text (with an item token appended) into the item's vector; its user LLM runs over the history's
item vectors. transrec's shape of it: `model.text` a TinyLlama-shaped tower (`model_type: llama`, `pooling:
last`, `item_token`, `trainable_blocks: -1`) and the user encoder on top; the user LLM is the 1.1B user encoder.
Counted here: both towers' FLOPs as 2 x parameters per token forward, 4 x backward, plus one more forward for
activation checkpointing (8 x in all), attention included; nothing for padding (titles packed) or for items a
global batch already encoded (`--reuse`: item positions per item encoded; measured in benchmarks/README.md,
"Distinct items vs item slots per batch": 1.6-2.4x at 10,000 items, more with larger batches, so 1.5 is cautious).

    python benchmarks/hllm_estimate.py                       # the table of benchmarks/README.md
    python benchmarks/hllm_estimate.py --item-tokens 256 --mfu 0.3
"""
from __future__ import annotations

import argparse
import contextlib
import io

import torch

# TinyLlama/TinyLlama-1.1B's config (HLLM-1B's item LLM and user LLM), without its weights.
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
GIB = 2**30


def llm_shape() -> dict:
    """Parameters of one TinyLlama body (all, and without the token embedding, a lookup) and its largest layer, counted
    on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(**TINYLLAMA)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    # (DeepSpeed's model_to_params tells tensors apart by data pointer, all 0 on the meta device: counted here, as it)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    embedding = model.get_input_embeddings().weight.numel()
    return {"params": total, "matmul_params": total - embedding, "largest_layer": largest, "config": config}


def per_token_flops(shape: dict, context: int) -> float:
    """Training FLOPs of one token through one LLM: 8 x (2 x matmul params + attention over `context` tokens)."""
    config = shape["config"]
    attention = 2 * 2 * config.num_hidden_layers * context * config.hidden_size  # QK^T and AV, forward
    return 4 * (2 * shape["matmul_params"] + attention)  # forward 1x, backward 2x, recomputed forward 1x


def model_states_gib(params: int, largest_layer: int, gpus: int) -> float:
    """DeepSpeed's estimate of ZeRO-3 model states (bf16 weights and gradients, fp32 Adam) per GPU, no offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    with contextlib.redirect_stdout(io.StringIO()):
        _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=min(gpus, 8),
                                                                num_nodes=max(1, gpus // 8), cpu_offload=False)
    return gpu_bytes / GIB


def activation_gib(shape: dict, tokens: int) -> float:
    """bf16 activations of `tokens` tokens through one checkpointed LLM: each layer's input kept (2h bytes a token per
    layer), plus one layer's working set recomputed in backward (~34h bytes a token: Korthikanti et al. 2022, flash
    attention, so no term in the context length)."""
    h, layers = shape["config"].hidden_size, shape["config"].num_hidden_layers
    return tokens * (2 * h * layers + 34 * h) / GIB


def estimate(args, shape: dict, gpus: int) -> dict:
    users = args.interactions / args.history_mean
    item_encodes = args.interactions / args.reuse  # per epoch: every position once (stride windows)
    item_flops = item_encodes * args.item_tokens * per_token_flops(shape, args.item_tokens)
    user_flops = args.interactions * per_token_flops(shape, args.seq_len)
    rate = gpus * H100_BF16_TFLOPS * 1e12 * args.mfu
    # one evaluation (valid or test) of every user: the catalogue encoded once, every user's history through the
    # user LLM, a full ranking of the catalogue; forward only (2 x params a token)
    evaluation = (args.items * args.item_tokens * 2 * shape["matmul_params"]
                  + users * args.seq_len * 2 * shape["matmul_params"]
                  + users * args.items * 2 * shape["config"].hidden_size)
    micro_items = args.users_per_gpu * args.seq_len / args.reuse
    return {
        "gpus": gpus, "item_tokens": args.item_tokens,
        "epoch_h": (item_flops + user_flops) / rate / 3600,
        "item_share": item_flops / (item_flops + user_flops),
        "eval_min": evaluation / rate / 60,
        "states_gib": model_states_gib(2 * shape["params"], shape["largest_layer"], gpus),
        "item_act_gib": activation_gib(shape, int(micro_items * args.item_tokens)),
        "user_act_gib": activation_gib(shape, args.users_per_gpu * args.seq_len),
        "catalogue_gib": args.items * shape["config"].hidden_size * 2 / GIB,
    }


def table(args, shape: dict) -> str:
    lines = [f"HLLM-1B shape: 2 x TinyLlama-1.1B ({shape['params'] / 1e9:.3f}B parameters each, "
             f"{shape['matmul_params'] / 1e9:.3f}B in matmuls); {args.interactions:.0e} interactions, "
             f"{args.items:.0e} items, histories of {args.seq_len}, {args.users_per_gpu} users per GPU per "
             f"micro-batch, {args.reuse}x item reuse per global batch, MFU {args.mfu} of {H100_BF16_TFLOPS:.0f} "
             "TFLOP/s (bf16 dense).", "",
             "| H100s | item tokens | one epoch (h) | item LLM share of FLOPs | one full evaluation (min) | "
             "ZeRO-3 model states / GPU (GiB) | activations / GPU: item LLM + user LLM (GiB) | "
             "item vectors of the catalogue (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for tokens in args.item_tokens_list:
        for gpus in args.gpus:
            row = estimate(argparse.Namespace(**{**vars(args), "item_tokens": tokens}), shape, gpus)
            lines.append(f"| {gpus} | {tokens} | {row['epoch_h']:.1f} | {row['item_share']:.0%} | "
                         f"{row['eval_min']:.0f} | {row['states_gib']:.1f} | {row['item_act_gib']:.1f} + "
                         f"{row['user_act_gib']:.1f} | {row['catalogue_gib']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=float, default=1e9)
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--history-mean", type=float, default=28.9, help="interactions per user (MicroLens ~29)")
    parser.add_argument("--seq-len", type=int, default=50, help="history positions through the user LLM")
    parser.add_argument("--item-tokens", dest="item_tokens_list", type=int, nargs="+", default=[64, 256],
                        help="mean real tokens of an item's text (HLLM: title, tags, description, up to 256)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--users-per-gpu", type=int, default=8)
    parser.add_argument("--reuse", type=float, default=1.5, help="item positions per item encoded in a global batch")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the bf16 peak reached")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    print(table(arguments, llm_shape()))
