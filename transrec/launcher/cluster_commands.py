"""`transrec cluster up|down|status`, `submit`, `jobs`, `logs`, `stop`: the cluster-facing commands.

Thin: parse, then call `transrec.cluster.embedded` / `transrec.cluster.jobs`. Errors the user can fix (no
cluster, wrong address, bad config, a scaling config the cluster cannot hold) are one line on stderr and
exit code 2; a job that ends in FAILED or STOPPED under `--follow` / `logs --follow` is exit code 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

from transrec.cluster.embedded import ClusterError
from transrec.config import ConfigError
from transrec.dataloading.dataset_format import DatasetFileError

COMMANDS: tuple[str, ...] = ("cluster", "submit", "jobs", "logs", "stop")


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", default=None,
                        help="where the embedded cluster's state lives (default: $TRANSREC_HOME or ~/.transrec)")


def _address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's dashboard / Jobs API URL, e.g. http://HOST:8265 "
                             "(default: the embedded cluster of `transrec cluster up`)")
    _state_dir_arg(parser)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Adds this module's subcommands to the `transrec` parser."""
    cluster = commands.add_parser("cluster", help="start, stop or describe the embedded local Ray cluster")
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start a local Ray head on loopback (dashboard and Jobs API included)")
    up.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: this machine's)")
    up.add_argument("--num-gpus", type=int, default=0)
    up.add_argument("--temp-dir", default=None, help="Ray's temp dir (default: a new /tmp/trr-* dir)")
    _state_dir_arg(up)
    down = actions.add_parser("down", help="stop every process of the embedded cluster")
    down.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir (its logs)")
    _state_dir_arg(down)
    status = actions.add_parser("status", help="addresses, nodes, resources, listeners")
    _state_dir_arg(status)

    submit = commands.add_parser("submit", help="submit a pretraining job to a Ray cluster (Jobs API)")
    submit.add_argument("--config", required=True, help="a YAML file, or a preset by name (transrec/configs/)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    submit.add_argument("--follow", action="store_true", help="print the job's logs until it ends")
    _address_arg(submit)

    jobs = commands.add_parser("jobs", help="list the cluster's jobs")
    jobs.add_argument("--json", action="store_true")
    _address_arg(jobs)
    logs = commands.add_parser("logs", help="print a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
    _address_arg(logs)
    stop = commands.add_parser("stop", help="stop a job")
    stop.add_argument("job_id")
    _address_arg(stop)


def _when(timestamp_ms) -> str:
    if not timestamp_ms:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _cluster(args) -> int:
    from transrec.cluster import embedded

    if args.action == "up":
        state = embedded.up(args.state_dir, num_cpus=args.num_cpus, num_gpus=args.num_gpus, temp_dir=args.temp_dir)
        print(f"cluster up: dashboard / Jobs API {state.dashboard_url}, Ray address {state.gcs_address}, "
              f"{state.num_cpus} CPUs, {state.num_gpus} GPUs, temp dir {state.temp_dir}")
        print(f"  transrec submit --config FILE        (or: ray job submit --address {state.dashboard_url} -- ...)")
    elif args.action == "down":
        result = embedded.down(args.state_dir, keep_temp=args.keep_temp)
        print(f"cluster down: stopped {result['stopped']} processes of {result['dashboard_url']}")
    else:
        info = embedded.status(args.state_dir)
        print(json.dumps(info, indent=2, default=str))
        return 0 if info["running"] else 1
    return 0


def _jobs_table(rows: list[dict]) -> str:
    lines = [f"{'JOB':<34} {'STATUS':<10} {'RUN':<16} {'STARTED':<19} {'ENDED':<19}"]
    for r in rows:
        lines.append(f"{r['job_id'] or '-':<34} {r['status']:<10} {r['run'] or '-':<16} {_when(r['start_time']):<19} "
                     f"{_when(r['end_time']):<19}")
        if r["resume"]:  # FAILED or STOPPED: Ray's message says why
            if r["message"]:
                lines.append(f"  {r['message']}")
            lines.append(f"  to resume: {r['resume']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from transrec.cluster import jobs

    try:
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "submit":
            job_id, url, cfg = jobs.submit(args.config, args.overrides, args.address, args.resume, args.state_dir)
            print(job_id)
            print(f"submitted run {cfg.name} to {url}: `transrec logs {job_id} --follow`", file=sys.stderr)
            if args.follow:
                final = jobs.logs(url, job_id, follow=True)
                print(f"job {job_id}: {final}", file=sys.stderr)
                return 0 if final == "SUCCEEDED" else 1
            return 0
        url = jobs.resolve_address(args.address, args.state_dir)
        if args.command == "jobs":
            cluster_args = (["--address", args.address] if args.address  # (the resume commands name it so)
                            else ["--state-dir", args.state_dir] if args.state_dir else [])
            rows = jobs.list_jobs(url, cluster_args)
            print(json.dumps(rows, indent=2) if args.json else _jobs_table(rows))
        elif args.command == "logs":
            final = jobs.logs(url, args.job_id, follow=args.follow)
            if args.follow:
                print(f"job {args.job_id}: {final}", file=sys.stderr)
                return 0 if final == "SUCCEEDED" else 1
        elif args.command == "stop":
            final = jobs.stop(url, args.job_id)
            print(f"job {args.job_id}: {final}")
            return 0 if final in jobs.TERMINAL else 1
        return 0
    except (ClusterError, ConfigError, DatasetFileError) as err:
        print(f"transrec {args.command}: error: {err}", file=sys.stderr)
        return 2
