"""Chaos at the worst moments: a pretrain whose training workers are SIGKILLed, by their pids, again and again.

    python benchmarks/chaos.py [--kills 10] [--users 96] [--epochs 8] [--seed 0] [--out runs/chaos.json]

Prepares a synthetic data set, then runs `transrec pretrain --config tiny` twice, each on its own in-process
(embedded) Ray cluster, one after the other: undisturbed (the reference), then with `cluster.max_failures` =
kills + 2 while a chaos monkey kills a random training worker `--kills` times. The monkey aims from outside the
run, by watching its files (no hook in the trainer):
- save: a checkpoint being written (a `stepN.tmp` staging directory newer than the aim in checkpoints/);
- eval: an evaluation under way (metrics.jsonl ends with an epoch's `data` record: the next is its `eval`);
- restart: the first step after a restart (every rank has a new `start` audit record, none a batch yet);
- random: a random moment, up to three steps into the training of the current worker group.
Each worker group is killed once it has started (every rank's `start` record), so each kill is a restart. The
first three kinds come once each, the rest are random, in a seeded random order (a restart never first).

Then it checks what is guaranteed: the run finished by itself; from the sample audit, every sample of every
epoch was trained exactly once (the batches a killed group trained after its last checkpoint are dropped: they
were trained again); the final weights equal the reference's bit for bit (every RNG, the loader position and
the optimizer resume, as in tests/test_failures.py). It reports the wall-time cost per kill: (chaos wall -
reference wall) / kills, and per kill the seconds from the kill to the next group's first step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transrec.trainer.audit import every_sample_once, read_audit, samples_per_epoch  # noqa: E402

MOMENTS = ("save", "eval", "restart", "random")
POLL_S = 0.02


def load() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Kill:
    moment: str  # one of MOMENTS
    rank: int
    pid: int
    seconds: float  # since the monkey started
    what: str  # what the run was doing, as seen from outside
    to_next_step_s: float | None = None  # from the kill to the next worker group's first step


class ChaosMonkey:
    """Kills a training worker of the run in `run_dir` at the moment asked, once per worker group."""

    def __init__(self, run_dir: Path, running: Callable[[], bool], rng: random.Random, ranks: int = 2):
        self.run_dir, self.running, self.rng, self.ranks = Path(run_dir), running, rng, ranks
        self.started = time.monotonic()
        self.killed_pids: set[int] = set()

    def _audit(self, rank: int) -> list[dict]:
        path = self.run_dir / "samples" / f"rank{rank}.jsonl"
        return read_audit(path) if path.exists() else []

    def _metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _wait(self, ready: Callable[[], object]) -> object:
        """Polls `ready` until it answers something true (returned) or the run ends (None)."""
        while self.running():
            found = ready()
            if found:
                return found
            time.sleep(POLL_S)
        return None

    def _live_group(self) -> list[dict] | None:
        """Each rank's latest `start` record, if all belong to a worker group that no kill has hit."""
        starts = [next((r for r in reversed(self._audit(rank)) if r.get("event") == "start"), None)
                  for rank in range(self.ranks)]
        return starts if all(s is not None and s["pid"] not in self.killed_pids for s in starts) else None

    def _steps(self, group: list[dict]) -> int:
        """Batches the worker group has trained so far, over its ranks."""
        return sum(1 for rank, start in enumerate(group) for r in self._audit(rank)
                   if "ids" in r and r["pid"] == start["pid"])

    def _saving(self, since: float) -> str | None:
        """A checkpoint being written: a staging directory made after `since` (an older one is a killed save's)."""
        for tmp in (self.run_dir / "checkpoints").glob("step*.tmp"):
            try:
                if tmp.stat().st_mtime >= since:
                    return f"{tmp.name} being written"
            except FileNotFoundError:  # published meanwhile
                continue
        return None

    def _evaluating(self, seen: int) -> str | None:
        """An evaluation under way: a `data` record (an epoch's end) after the first `seen` records, and last."""
        records = self._metrics()
        if len(records) > seen and records[-1]["kind"] == "data":
            return f"evaluating after epoch {records[-1]['epoch']}"
        return None

    def _seconds_per_step(self) -> float:
        return next((r["seconds_per_step"] for r in reversed(self._metrics()) if r["kind"] == "train"), 1.0)

    def kill(self, moment: str) -> Kill | None:
        """One kill at `moment` in the next worker group that no kill has hit; None if the run ended first."""
        group = self._wait(self._live_group)
        if group is None:
            return None
        if moment == "save":
            since = time.time()
            what = self._wait(lambda: self._saving(since))
        elif moment == "eval":
            seen = len(self._metrics())
            what = self._wait(lambda: self._evaluating(seen))
        elif moment == "restart" and self._steps(group) == 0:  # (found as soon as its ranks had started)
            what = "the first step after a restart"
        else:
            moment = "random"  # (also a restart whose first step was done before the monkey saw its group)
            self._wait(lambda: self._steps(group))
            time.sleep(self.rng.uniform(0, 3) * self._seconds_per_step())
            what = f"training: {self._steps(group) // self.ranks} step(s) into the worker group"
        if what is None or self._live_group() != group:  # the run ended, or its workers restarted on their own
            return None
        rank = self.rng.randrange(self.ranks)
        try:
            os.kill(group[rank]["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.killed_pids.update(start["pid"] for start in group)
        return Kill(moment, rank, group[rank]["pid"], round(time.monotonic() - self.started, 2), what)

    def seconds_to_next_step(self, kill: Kill) -> float | None:
        """Waits for the worker group after `kill` to train a step; the seconds from the kill."""
        group = self._wait(self._live_group)
        if group is None or not self._wait(lambda: self._steps(group)):
            return None
        return round(time.monotonic() - self.started - kill.seconds, 2)


def plan(kills: int, rng: random.Random) -> list[str]:
    """save, eval and restart once each (when there are that many kills), the rest random; a restart never first."""
    moments = list(MOMENTS[:3])[:kills] + ["random"] * max(0, kills - 3)
    rng.shuffle(moments)
    if moments and moments[0] == "restart":
        moments.append(moments.pop(0))
    return moments


def check(run: Path, reference: Path, users: int, epochs: int) -> dict:
    """What a run interrupted by kills must still be: every sample once per epoch, the reference's weights."""
    import torch

    from transrec.trainer.checkpoint import consolidated_state_dict
    from transrec.trainer.checkpoint_store import CheckpointStore

    counts = samples_per_epoch(run)
    per_epoch = {epoch: {"distinct": len(count), "lost": users - len(count),
                         "repeated": sum(n - 1 for n in count.values())} for epoch, count in sorted(counts.items())}
    mine = consolidated_state_dict(CheckpointStore(run / "checkpoints"))
    theirs = consolidated_state_dict(CheckpointStore(reference / "checkpoints"))
    differing = [name for name in theirs if name not in mine or not torch.equal(mine[name], theirs[name])]
    return {"every_sample_once_per_epoch": every_sample_once(counts, users, epochs), "per_epoch": per_epoch,
            "weights_bitwise_equal": not differing and mine.keys() == theirs.keys(), "tensors_differing": differing,
            "latest": CheckpointStore(run / "checkpoints").latest()}


def pretrain(workdir: Path, name: str, data: Path, sets: list[str]) -> subprocess.Popen:
    """`transrec pretrain` on an in-process cluster of its own (a fresh TRANSREC_HOME: no embedded one to join)."""
    argv = [sys.executable, "-m", "transrec.launcher.cli", "pretrain", "--config", "tiny"]
    for item in [f"name={name}", f"output_dir={workdir / 'runs'}", f"data.path={data}", *sets]:
        argv += ["--set", item]
    env = {**os.environ, "TRANSREC_HOME": str(workdir / "home")}
    return subprocess.Popen(argv, env=env, stdout=open(workdir / f"{name}.out", "w"), stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--users", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the kill plan, the victims and the random moments")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chaos.json")
    args = parser.parse_args()

    from transrec.writers.synthetic import prepare_synthetic

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="transrec-chaos-"))
    data = workdir / "data"
    if not data.exists():
        prepare_synthetic(data, users=args.users, items=40, seed=0)
    sets = [f"train.epochs={args.epochs}", f"train.checkpoint_every={args.checkpoint_every}",
            "train.log_sample_ids=true"]
    report: dict = {"config": "tiny", "users": args.users, "epochs": args.epochs, "kills_asked": args.kills,
                    "checkpoint_every": args.checkpoint_every, "seed": args.seed, "load_start": load()}

    started = time.monotonic()
    reference = pretrain(workdir, "reference", data, sets)
    assert reference.wait() == 0, f"the reference run failed: {workdir / 'reference.out'}"
    report["reference_wall_s"] = round(time.monotonic() - started, 1)
    report["load_after_reference"] = load()

    rng = random.Random(args.seed)
    started = time.monotonic()
    chaos = pretrain(workdir, "chaos", data, [*sets, f"cluster.max_failures={args.kills + 2}"])
    monkey = ChaosMonkey(workdir / "runs" / "chaos", lambda: chaos.poll() is None, rng)
    kills = []
    moments = plan(args.kills, rng)
    for i, moment in enumerate(moments):
        kill = monkey.kill(moment)
        if kill is None:
            break
        if moments[i + 1:i + 2] != ["restart"]:  # (a restart kill must find the next group before its first step)
            kill.to_next_step_s = monkey.seconds_to_next_step(kill)
        kills.append(kill)
        print(json.dumps(asdict(kill)), flush=True)
    report["chaos_exit_code"] = chaos.wait()
    report["chaos_wall_s"] = round(time.monotonic() - started, 1)
    report["load_end"] = load()
    report["kills"] = [asdict(kill) for kill in kills]
    report["kills_done"] = len(kills)
    report["moments_hit"] = sorted({kill.moment for kill in kills})
    report["cost_per_kill_s"] = round((report["chaos_wall_s"] - report["reference_wall_s"]) / max(len(kills), 1), 1)
    next_steps = [kill.to_next_step_s for kill in kills if kill.to_next_step_s is not None]
    report["kill_to_next_step_mean_s"] = round(sum(next_steps) / len(next_steps), 1) if next_steps else None
    report.update(check(workdir / "runs" / "chaos", workdir / "runs" / "reference", args.users, args.epochs))
    report["workdir"] = str(workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("kills", "per_epoch")}, indent=2))
    print(f"wrote {args.out}")
    ok = (report["chaos_exit_code"] == 0 and report["kills_done"] == args.kills
          and report["every_sample_once_per_epoch"] and report["weights_bitwise_equal"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
