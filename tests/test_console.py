"""The quiet console: workers' chatter to log files, rank 0's bar and lines drawn by the driver."""
import logging
import queue
import subprocess
import sys
import warnings

import pytest

from transrec.trainer.console import Console, QueueConsole, forward_warnings, relay


class Recorder(Console):
    def __init__(self):
        super().__init__()
        self.drawn = []

    def progress(self, phase, done, total, loss):
        self.drawn.append(("progress", phase, done, total))

    def line(self, text):
        self.drawn.append(("line", text))

    def close(self):
        self.drawn.append(("close",))


def test_relay_draws_what_the_worker_sends_and_returns_its_result():
    events = queue.Queue()
    worker = QueueConsole(events, every_seconds=3600)

    def work():
        for done in range(1, 5):  # throttled: the first and the last (done == total) get through
            worker.progress("run", done, 4, 0.5)
        worker.line("[run] step 4: valid/ndcg@10=0.1")
        worker.close()
        return "summary"

    console = Recorder()
    assert relay(work, events, console) == "summary"
    assert console.drawn == [("progress", "run", 1, 4), ("progress", "run", 4, 4),
                             ("line", "[run] step 4: valid/ndcg@10=0.1"), ("close",), ("close",)]


def test_relay_raises_what_the_work_raised_after_drawing_what_came_before():
    events = queue.Queue()

    def work():
        QueueConsole(events).line("before the failure")
        raise ValueError("worker group failed")

    console = Recorder()
    with pytest.raises(ValueError, match="worker group failed"):
        relay(work, events, console)
    assert ("line", "before the failure") in console.drawn


def test_output_of_c_code_and_child_processes_goes_to_the_log_file(tmp_path):
    log = tmp_path / "logs" / "rank0.log"
    script = (f"import os, subprocess, sys\nfrom pathlib import Path\n"
              f"from transrec.trainer.console import send_output_to\n"
              f"print('before')\nsend_output_to(Path({str(log)!r}))\n"
              f"print('python'); os.write(2, b'file descriptor 2\\n'); subprocess.run(['echo', 'child'])\n")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert shown.stdout == "before\n" and shown.stderr == ""
    assert sorted(log.read_text().split("\n")) == ["", "child", "file descriptor 2", "python"]


def test_transrec_warnings_reach_the_console_and_libraries_warnings_do_not(monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", lambda *args, **kwargs: None)
    logger = logging.getLogger("transrec")
    monkeypatch.setattr(logger, "handlers", [])
    console = Recorder()
    forward_warnings(console, prefix="[rank 1] ")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("checkpoint step4 is damaged", UserWarning, "/x/transrec/trainer/checkpoint.py", 1)
        warnings.warn_explicit("torch.distributed.all_gather is deprecated", FutureWarning,
                               "/x/site-packages/torch/distributed/c10d_logger.py", 83)
    logging.getLogger("transrec.data").warning("skipped 3 bad samples")
    logging.getLogger("transrec.data").info("read 40 items")
    assert console.drawn == [("line", "[rank 1] warning: checkpoint step4 is damaged"),
                             ("line", "[rank 1] warning: skipped 3 bad samples")]
