"""What a run shows on the console: one progress bar per phase, one line per evaluation, the warnings that
matter. Everything else (Ray, DeepSpeed, torch, streaming, transformers) goes to `runs/NAME/logs/`, unless
`transrec ... --verbose` (TRANSREC_VERBOSE=1) brings it back.

Under Ray the workers' output does not reach the driver (`log_to_driver` is off): rank 0 sends its bar and
lines through a Ray queue (`QueueConsole`) and the driver draws them (`relay`).
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

VERBOSE_ENV = "TRANSREC_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class Console:
    """Draws in this process: a tqdm bar (a new one when the phase changes) and lines above it."""

    def __init__(self):
        self.bar: tqdm | None = None

    def progress(self, phase: str, done: int, total: int, loss: float) -> None:
        if self.bar is None or self.bar.desc != phase:
            self.close()
            self.bar = tqdm(total=total, initial=done, desc=phase, unit="step", mininterval=2.0)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def line(self, text: str) -> None:
        tqdm.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def draw(self, event: tuple) -> None:
        """One event of a `QueueConsole`."""
        getattr(self, event[0])(*event[1:])


class QueueConsole:
    """A Console whose drawing happens in the driver: each call is queued there (the bar at most once a second)."""

    def __init__(self, events, every_seconds: float = 1.0):
        self.events = events
        self.every_seconds = every_seconds
        self.last_progress = 0.0

    def progress(self, phase: str, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last_progress >= self.every_seconds or done == total:
            self.last_progress = now
            self.events.put_nowait(("progress", phase, done, total, loss))

    def line(self, text: str) -> None:
        self.events.put_nowait(("line", text))

    def close(self) -> None:
        self.events.put_nowait(("close",))


def relay(work: Callable[[], Any], events, console: Console) -> Any:
    """Runs `work` in a thread while drawing the events that arrive on `events`; returns what `work` returns
    (or raises what it raised) once it has ended and every event is drawn."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() or not events.empty():
        try:
            console.draw(events.get(timeout=0.5))
        except queue.Empty:  # ray.util.queue.Empty subclasses it
            continue
    console.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def send_output_to(log_file: Path) -> None:
    """Points this process's stdout and stderr (file descriptors 1 and 2: C++ and child processes included)
    at `log_file`, appended."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            stream.flush()
            os.dup2(log.fileno(), fd)


class _ToConsole(logging.Handler):
    def __init__(self, console, prefix: str):
        super().__init__(logging.WARNING)
        self.console, self.prefix = console, prefix

    def emit(self, record: logging.LogRecord) -> None:
        self.console.line(f"{self.prefix}{record.levelname.lower()}: {record.getMessage()}")


def forward_warnings(console, prefix: str = "") -> None:
    """transrec's own warnings and log records (WARNING and up) go to `console` too."""
    logging.getLogger("transrec").addHandler(_ToConsole(console, prefix))
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, line)
        if f"{os.sep}transrec{os.sep}" in filename:
            console.line(f"{prefix}warning: {message}")

    warnings.showwarning = showwarning


def quiet_libraries() -> None:
    """The driver's own chatter: transformers' and Ray's info messages (warnings stay)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("ray").setLevel(logging.WARNING)
