"""What a run shows while it runs (a progress bar, a line per evaluation) and leaves behind (metrics.jsonl,
TensorBoard, a PNG)."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLog:
    """Rank 0's log. Every record goes to metrics.jsonl and, as scalars, to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, console, total: int, initial: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self.console, self.total, self.done = console, total, initial
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def step(self, loss: float) -> None:
        if self.enabled:
            self.done += 1
            self.console.progress(self.run_dir.name, self.done, self.total, loss)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)
        if record["kind"] == "eval":
            self.console.line(f"[{self.run_dir.name}] step {step}: " + "  ".join(
                f"{k}={v:.4f}" for k, v in record.items() if "@10" in k))

    def close(self) -> None:
        if self.enabled:
            self.console.close()
            self.tensorboard.close()
            self.jsonl.close()
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")


def plot_curves(metrics_file: Path, out: Path) -> None:
    """Loss and valid/test NDCG@10 against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="train loss")
    for split in ("valid", "test"):
        right.plot([r["step"] for r in evals], [r[f"{split}/ndcg@10"] for r in evals], marker="o", label=split)
    right.set(xlabel="step", ylabel="NDCG@10")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
