"""The `transrec` command: parse, validate the config, call the part that does the work."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transrec.config import ConfigError, load_config
from transrec.dataloading.dataset_format import USERS_PER_SAMPLE, DatasetFileError
from transrec.launcher import cluster_commands

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: encoders come from config or local paths
# read when Ray is imported: the embedded cluster's node address is 127.0.0.1 and it binds loopback only
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML file, or a preset by name: tiny, demo, ml100k-id, ... (transrec/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set train.epochs=3")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="write a dataset directory (MDS shards + item store)")
    sources = prepare.add_subparsers(dest="source", required=True)
    movielens = sources.add_parser("movielens", help="from RecBole atomic files (.inter/.item)")
    movielens.add_argument("--src", required=True, type=Path)
    movielens.add_argument("--image-fraction", type=float, default=0.0,
                           help="share of items shown as a SYNTHETIC poster image instead of text")
    movielens.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed rows")
    movielens.add_argument("--domain", choices=["a", "b"], default="",
                           help="one of two halves with disjoint users and items (transfer: pretrain on a, tune on b)")
    synthetic = sources.add_parser("synthetic", help="a generated mixture-of-modalities data set")
    synthetic.add_argument("--users", type=int, default=2000)
    synthetic.add_argument("--items", type=int, default=1000)
    synthetic.add_argument("--seed", type=int, default=0, help="seeds of one world share topics, not items")
    synthetic.add_argument("--image-fraction", type=float, default=0.5)
    synthetic.add_argument("--min-len", type=int, default=5, help="shortest history")
    synthetic.add_argument("--max-len", type=int, default=50, help="longest history")
    synthetic.add_argument("--length-exponent", type=float, default=0.0,
                           help="p(length) ~ length^-exponent (0: uniform; MicroLens' shape: --microlens)")
    synthetic.add_argument("--microlens", action="store_true",
                           help="MicroLens' history lengths: 5..500, exponent 1.8 (overrides the three above)")
    synthetic.add_argument("--workers", type=int, default=1, help="processes writing parts in parallel")
    for sub, users_per_sample in ((movielens, 1), (synthetic, USERS_PER_SAMPLE)):
        sub.add_argument("--out", required=True, type=Path)
        sub.add_argument("--overwrite", action="store_true")
        sub.add_argument("--users-per-sample", type=int, default=users_per_sample,
                         help="train sequences per streaming sample; train batch sizes must be multiples of it")

    pretrain = commands.add_parser("pretrain", help="train a model on the cluster")
    add_config_args(pretrain)
    finetune = commands.add_parser("finetune", help="train an exported model on another data set")
    finetune.add_argument("--from", dest="init_from", required=True, type=Path, help="directory from `export`")
    add_config_args(finetune)

    evaluate = commands.add_parser("evaluate", help="full-ranking HR/NDCG of a run's checkpoint or an export")
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="run directory (runs/NAME)")
    which.add_argument("--export", type=Path, help="export directory")
    evaluate.add_argument("--tag", help="checkpoint tag (default: best by valid, else latest)")
    evaluate.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    evaluate.add_argument("--config", help="config for the eval settings of an export (default: built-in)")

    export = commands.add_parser("export", help="checkpoint -> config.json + model.safetensors + tokenizer")
    export.add_argument("--run", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--tag")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

    demo = commands.add_parser("demo", help="synthetic source -> pretrain -> fine-tune on a disjoint target")
    demo.add_argument("--workdir", type=Path, default=Path("."), help="where data/, runs/ and exports/ go")
    demo.add_argument("--config", default="demo", help="a YAML file or a preset name")
    cluster_commands.add_parsers(commands)
    return parser


def command_prepare(args) -> None:
    from transrec.dataloading.prepare import prepare_movielens
    from transrec.dataloading.synthetic import MICROLENS, prepare_synthetic

    if args.source == "movielens":
        manifest = prepare_movielens(args.src, args.out, image_fraction=args.image_fraction,
                                     skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite, domain=args.domain,
                                     users_per_sample=args.users_per_sample)
    else:
        lengths = {"min_len": args.min_len, "max_len": args.max_len, "length_exponent": args.length_exponent}
        manifest = prepare_synthetic(args.out, users=args.users, items=args.items, seed=args.seed,
                                     image_fraction=args.image_fraction, overwrite=args.overwrite,
                                     workers=args.workers, users_per_sample=args.users_per_sample,
                                     **(MICROLENS if args.microlens else lengths))
    summary = {k: manifest[k] for k in ("num_users", "num_items", "num_interactions", "modality_counts", "skipped")}
    print(f"wrote {args.out}: {json.dumps(summary)}")


def command_evaluate(args) -> None:
    from transrec.trainer.evaluate import evaluate_model

    if args.run:
        from transrec.trainer.export import load_checkpoint_model

        model, cfg, tag = load_checkpoint_model(args.run, args.tag)
        source = f"{args.run} @ {tag}"
    else:
        from transrec.models import TransRec

        model = TransRec.from_pretrained(args.export, dtype=None)
        cfg = load_config(args.config)
        source = str(args.export)
    data = args.data or cfg.data.path
    results = evaluate_model(model, data, cfg)
    print(json.dumps({"model": source, "data": data, **results}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            command_prepare(args)
        elif args.command in ("pretrain", "finetune"):
            overrides = args.overrides + ([f"init_from={args.init_from}"] if args.command == "finetune" else [])
            from transrec.cluster.launch import prepare_and_train

            summary = prepare_and_train(load_config(args.config, overrides), args.resume)
            print(json.dumps({"name": summary["name"], "best": summary["best"]}, indent=2))
        elif args.command == "evaluate":
            command_evaluate(args)
        elif args.command == "export":
            from transrec.trainer.export import export

            print(f"exported to {export(args.run, args.out, args.tag, args.dtype)}")
        elif args.command == "demo":
            from transrec.launcher.demo import run_demo

            run_demo(args.workdir, args.config)
        elif args.command in cluster_commands.COMMANDS:
            return cluster_commands.run(args)
    except (ConfigError, DatasetFileError, FileNotFoundError, ValueError) as err:
        print(f"transrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
