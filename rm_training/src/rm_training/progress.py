"""Stage lines and a heartbeat for long commands whose output goes to a log file.

An export of a multi-GB model spends minutes in single calls (torch.onnx.export, quantization, checking fp16
on the CPU provider) that report nothing themselves. A line at each stage, and one every `every_s` while a
stage runs, show in any log where the time goes and that the process is alive.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`stage(what)` prints `prog: what` and starts timing it; while the command runs, a daemon thread prints
    `prog: still what (N s into it, M s in all)` every `every_s` (0: no heartbeat)."""

    def __init__(self, prog: str, every_s: float = 30.0, stream: TextIO | None = None):
        self.prog, self.every_s, self.stream = prog, every_s, stream or sys.stderr
        self.started = self.stage_started = time.monotonic()
        self.what = "starting"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def stage(self, what: str) -> None:
        with self._lock:
            self.what, self.stage_started = what, time.monotonic()
            self._print(f"{what} ({self.stage_started - self.started:.0f} s in)")

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                now = time.monotonic()
                into, total = now - self.stage_started, now - self.started
                self._print(f"still {self.what} ({into:.0f} s into it, {total:.0f} s in all)")

    def _print(self, line: str) -> None:
        print(f"{self.prog}: {line}", file=self.stream, flush=True)


class _Lines:
    """tqdm's stream outside a terminal: each redraw becomes one plain line (carriage returns and cursor
    movements dropped), where in a log file the redraws would pile up into one unreadable line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; elsewhere (a log file) a plain line of it every 30 s."""
    if not on_terminal():
        kwargs = {"file": _Lines(sys.stderr), "mininterval": 30.0} | kwargs
    return tqdm(iterable, **kwargs)


def on_terminal() -> bool:
    return sys.stderr.isatty()
