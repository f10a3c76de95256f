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
from transrec.launcher.transfer import METHODS as TRANSFER_METHODS
from transrec.trainer.console import VERBOSE_ENV, quiet_libraries

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: encoders come from config or local paths
# read when Ray is imported: the embedded cluster's node address is 127.0.0.1 and it binds loopback only
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def add_config_args(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--config", required=True, help="a YAML file, or a preset by name: tiny, demo, ml100k-id, ... (transrec/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set train.epochs=3")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    add_verbose_arg(parser)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's and the workers' own output (default: in runs/NAME/logs/)")


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
    movielens.add_argument("--split", choices=["random", "genre"], default="random",
                           help="how --domain splits the items: random halves, or by genre (a = dramas and "
                                "comedies, b = the rest); the users are split in seeded halves either way")
    synthetic = sources.add_parser("synthetic", help="a generated mixture-of-modalities data set")
    synthetic.add_argument("--users", type=int, default=2000)
    synthetic.add_argument("--items", type=int, default=1000)
    synthetic.add_argument("--seed", type=int, default=0, help="seeds of one world share topics, not items")
    synthetic.add_argument("--image-fraction", type=float, default=0.5)
    synthetic.add_argument("--shift", type=float, default=0.0,
                           help="how far this world is from the shared one, 0..1: a share of each topic's words "
                                "taken from one other topic, of its succession from another (a target's domain "
                                "distance)")
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
        sub.add_argument("--video-fraction", type=float, default=0.0,
                         help="share of items (beyond the image share) shown as a SYNTHETIC clip (VP9 WebM) of their "
                              "poster panning and zooming")

    pretrain = commands.add_parser("pretrain", help="train a model on the cluster")
    add_config_args(pretrain)
    finetune = commands.add_parser("finetune", help="train an exported model on another data set, or on a task of "
                                   "its users")
    finetune.add_argument("--from", dest="init_from", required=True, type=Path, help="directory from `export`")
    finetune.add_argument("--task", choices=["next-item", "user-attribute"], default="next-item",
                          help="next-item: recommendation, on the cluster | user-attribute: PeterRec's user transfer, "
                               "a user attribute predicted from the user's history (runs/NAME/results.json)")
    finetune.add_argument("--label", default="", help="user-attribute: the data set's user attribute to predict "
                          "(ml-100k: gender, age, occupation)")
    finetune.add_argument("--modes", default="", help="user-attribute: the classifiers, a subset of adapters,full,"
                          "scratch (default: all)")
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
    export.add_argument("--merge-lora", action="store_true",
                        help="fold the text tower's LoRA adapter into text_encoder/ (default: apart, in text_peft/)")

    features = commands.add_parser("features", help="every item through frozen towers, once (Ray Data), into the "
                                   "data set: what model.item_encoder features (two-stage) trains on")
    features.add_argument("--data", required=True, type=Path)
    features.add_argument("--name", required=True, help="the features' name (model.features)")
    features.add_argument("--from", dest="init_from", default="", help="an export whose towers encode the items")
    features.add_argument("--config", default=None, help="without --from: the config whose towers encode the items "
                          "(a YAML file or a preset); its cluster section says where the job runs")
    features.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    features.add_argument("--workers", type=int, default=2, help="actors holding the towers (a GPU each, if any)")
    features.add_argument("--overwrite", action="store_true", help="replace features of that name")
    add_verbose_arg(features)

    transfer = commands.add_parser("transfer", help="fine-tuned, adapted, two-stage, zero-shot and from-scratch "
                                   "models on a target, against the share of its training users kept")
    transfer.add_argument("--from", dest="init_from", required=True, type=Path, help="export pretrained on the source")
    transfer.add_argument("--data", required=True, type=Path, help="the target data set (no user or item of the source)")
    add_config_args(transfer, resume=False)  # a study resumes by itself: finished runs are kept
    transfer.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1", help="shares of the target's training users")
    transfer.add_argument("--seeds", type=int, default=3)
    transfer.add_argument("--methods", default=",".join(TRANSFER_METHODS),
                          help=f"a subset of {','.join(TRANSFER_METHODS)} (popularity and zero-shot always)")
    transfer.add_argument("--out", required=True, type=Path, help="study directory: runs/, data/, report.md, report.png")

    demo = commands.add_parser("demo", help="synthetic source -> pretrain -> fine-tune on a disjoint target")
    demo.add_argument("--workdir", type=Path, default=Path("."), help="where data/, runs/ and exports/ go")
    demo.add_argument("--config", default="demo", help="a YAML file or a preset name")
    add_verbose_arg(demo)
    cluster_commands.add_parsers(commands)
    return parser


def command_prepare(args) -> None:
    from transrec.writers.movielens import prepare_movielens
    from transrec.writers.synthetic import MICROLENS, prepare_synthetic

    if args.source == "movielens":
        manifest = prepare_movielens(args.src, args.out, image_fraction=args.image_fraction,
                                     skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite, domain=args.domain,
                                     split=args.split, video_fraction=args.video_fraction,
                                     users_per_sample=args.users_per_sample)
    else:
        lengths = {"min_len": args.min_len, "max_len": args.max_len, "length_exponent": args.length_exponent}
        manifest = prepare_synthetic(args.out, users=args.users, items=args.items, seed=args.seed,
                                     image_fraction=args.image_fraction, overwrite=args.overwrite,
                                     workers=args.workers, users_per_sample=args.users_per_sample, shift=args.shift,
                                     video_fraction=args.video_fraction, **(MICROLENS if args.microlens else lengths))
    summary = {k: manifest[k] for k in ("num_users", "num_items", "num_interactions", "modality_counts",
                                        "synthetic_images", "synthetic_videos", "skipped")}
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


def command_user_task(args) -> None:
    from transrec.trainer.user_task import MODES, results_table, run_user_task

    if not args.label:
        raise ValueError("--task user-attribute needs --label, the user attribute to predict (ml-100k: gender, age, "
                         "occupation)")
    if args.resume:
        raise ValueError("--resume: a user-attribute run keeps no checkpoint; run it again")
    modes = tuple(mode for mode in args.modes.split(",") if mode) if args.modes else tuple(MODES)
    cfg = load_config(args.config, [*args.overrides, f"init_from={args.init_from}"])
    print(results_table(run_user_task(cfg, args.label, modes)))
    print(f"wrote {cfg.run_dir / 'results.json'}")


def command_transfer(args) -> None:
    from transrec.launcher.transfer import parse_fractions, run_study
    from transrec.trainer import run_dir

    fractions = parse_fractions(args.fractions)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in TRANSFER_METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: {','.join(unknown) or 'none given'}: choose from {','.join(TRANSFER_METHODS)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be 1 or more, got {args.seeds}")
    # what every run of the study will check, checked once before any of them
    cfg = run_dir.resolve(load_config(args.config, [*args.overrides, f"data.path={args.data}",
                                                    f"init_from={args.init_from}"]))
    run_dir.check_model_parts(cfg)
    run_dir.check_dataset(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    run_study(args.init_from, args.data, args.config, args.overrides, fractions, args.seeds, args.out, methods)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.png'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # read by the workers too (cluster/launch.py worker_env)
    else:
        quiet_libraries()
    try:
        if args.command == "prepare":
            command_prepare(args)
        elif args.command == "finetune" and args.task == "user-attribute":
            command_user_task(args)
        elif args.command in ("pretrain", "finetune"):
            if args.command == "finetune" and (args.label or args.modes):
                raise ValueError("--label and --modes go with --task user-attribute")
            overrides = args.overrides + ([f"init_from={args.init_from}"] if args.command == "finetune" else [])
            from transrec.cluster.launch import prepare_and_train

            summary = prepare_and_train(load_config(args.config, overrides), args.resume)
            print(json.dumps({"name": summary["name"], "best": summary["best"]}, indent=2))
        elif args.command == "evaluate":
            command_evaluate(args)
        elif args.command == "export":
            from transrec.trainer.export import export

            print(f"exported to {export(args.run, args.out, args.tag, args.dtype, args.merge_lora)}")
        elif args.command == "features":
            from transrec.cluster.features import compute_features

            if args.init_from and not (Path(args.init_from) / "config.json").is_file():
                raise FileNotFoundError(f"--from {args.init_from}: not an export (no config.json)")
            if args.workers < 1:
                raise ValueError(f"--workers must be 1 or more, got {args.workers}")
            cfg = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
            entry = compute_features(cfg, args.init_from, args.name, args.workers, args.overwrite)
            print(f"wrote item features {args.name!r} of {args.data}: {json.dumps(entry)}")
        elif args.command == "transfer":
            command_transfer(args)
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
